"""Evaluate a trained 3D Residual U-Net (model key ``resunet3d``) in each CT's original grid with the KiTS metrics.

The metrics are those of the model's dataset (its config's ``dataset``): KiTS19 kidney and tumour, or
KiTS23's hierarchical evaluation regions (kidney and masses, masses, tumour).

The 3D model predicts whole volumes with sliding windows (Gaussian blending). ``--run`` takes a
run folder, or a cross-validated experiment folder, evaluated out of fold (every case segmented
by the fold that held it out, one report). ``--help`` adds the usage and exit status shared by
the evaluation scripts (utils/cli/evaluate.py).
"""

import sys

from utils.cli.evaluate import run_evaluation_script

if __name__ == "__main__":
    sys.exit(run_evaluation_script("resunet3d", __doc__))
