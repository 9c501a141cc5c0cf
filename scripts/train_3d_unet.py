"""Train the 3D Residual U-Net (model key ``resunet3d``) on KiTS19 or KiTS23 (or the built-in synthetic data).

Class-balanced, augmented 3D patches are drawn from the cache; every few epochs the whole
validation volumes are segmented with sliding windows and scored per case with the Dice of the
config's dataset on the cache's grid (KiTS19 kidney and tumour; KiTS23 kidney and masses,
masses and tumour; e.g. ``--config configs/resunet3d_kits23_quick.yaml``). ``--help`` adds the
usage and exit status shared by the training scripts (utils/cli/train.py).
"""

import sys

from utils.cli.train import run_training_script

if __name__ == "__main__":
    sys.exit(run_training_script("resunet3d", __doc__))
