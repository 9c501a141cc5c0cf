"""Train the 2D UNETR (model key ``unetr2d``) on axial slices of KiTS19 or KiTS23 (or the built-in synthetic data).

It uses the same cache, split, engine and run folder as the 3D model: class-balanced,
augmented axial slices for training; every axial slice of each validation volume predicted,
stacked back into a volume and scored per case with the same Dice of the config's dataset. A hyperparameter
search's best trial trains with ``--config checkpoints/<search>/best_config.yaml``.
``--help`` adds the usage and exit status shared by the training scripts (utils/cli/train.py).
"""

import sys

from utils.cli.train import run_training_script

if __name__ == "__main__":
    sys.exit(run_training_script("unetr2d", __doc__))
