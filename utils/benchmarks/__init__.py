"""Speed measurements of the code users run: data loading, training steps, inference, segmentation."""
