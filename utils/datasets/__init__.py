"""Training samples from the cache: augmentation, 3D patch datasets and 2D slice datasets."""
