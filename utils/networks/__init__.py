"""The models (3D Residual U-Net, 2D UNETR), their losses, and checkpoints."""
