"""Evaluate a trained 3D Residual U-Net run in each CT's original grid with the KiTS19 metrics.

Usage::

    python scripts/eval_unet.py --run checkpoints/<run> [--data DIR] [--cases validation|all] [--device cuda] [--tta]

Segments the run's validation cases (or every labelled case of ``--data``) from their raw CTs
with ``best.pt``, writes ``reports/<run>/predictions/``, ``metrics.json``, ``metrics.csv``,
``inference.json`` and ``case_scores.png``, and prints the mean and median of every metric.

Exit status: 0 when every case was scored, 1 when a case was refused, 2 on usage errors.
"""

from __future__ import annotations

import sys

from utils.cli.evaluate import run_evaluation_command


def main(argv: list[str] | None = None) -> int:
    return run_evaluation_command(argv, model_name="resunet3d", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
