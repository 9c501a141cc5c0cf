"""Train a k-fold cross-validation experiment: every fold in turn on one device, or one fold (--fold K).

Each fold is an ordinary run folder under ``<training.output_dir>/<experiment>/fold_<k>/``, beside
the manifest ``cross_validation.json``; ``--help`` adds the usage and exit status
(utils/cli/cross_validate.py).
"""

import sys

from utils.cli.cross_validate import run_cross_validation_command

if __name__ == "__main__":
    sys.exit(run_cross_validation_command(description=__doc__))
