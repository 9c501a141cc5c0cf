"""Train the 3D Residual U-Net (model key ``resunet3d``) on KiTS19 (or the built-in synthetic data).

Class-balanced, augmented 3D patches are drawn from the cache; every few epochs the whole
validation volumes are segmented with sliding windows and scored per case with the KiTS19
kidney and tumour Dice on the cache's grid. ``--help`` adds the usage and exit status shared by
the training scripts (utils/cli/train.py).
"""

import sys

from utils.cli.train import run_training_script

if __name__ == "__main__":
    sys.exit(run_training_script("resunet3d", __doc__))
