"""Prediction: a preprocessed volume to logits (3D windows or 2D slices), a raw CT file to labels in its grid."""
