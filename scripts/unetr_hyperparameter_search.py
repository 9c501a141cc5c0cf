"""Search the 2D UNETR's hyperparameters with Optuna: an alias of ``scripts/hyperparameter_search.py``.

Usage::

    python scripts/unetr_hyperparameter_search.py --config configs/unetr2d_search.yaml --trials 30 \
        [--storage STORAGE] [--study-name NAME] [--worker-rank I] [--data DIR] [--set key=value ...]

The same command as ``scripts/hyperparameter_search.py`` (kept for existing commands and jobs):
it takes any search config, the UNETR's (configs/unetr2d_search.yaml) as well as the 3D model's
(configs/resunet3d_search.yaml), the same storages (SQLite, journal:PATH, a database URL) and
several workers; see ``python scripts/hyperparameter_search.py --help`` for the whole usage.

Run the same command again to continue an interrupted search: ``--trials`` counts the trials
already finished, and a trial that was killed is retried with its parameters from its ``last.pt``.

Exit status: 0 when the study has the trials asked for and the reports are written, 1 when it
stopped on an error or was interrupted (rerun to continue), 2 on usage errors, 75 when SIGTERM
or SIGUSR1 stopped the worker after a trial saved its ``last.pt`` (rerun to continue; the trial
is retried from there).
"""

from __future__ import annotations

import sys

from hyperparameter_search import main  # scripts/ is the first import path of a script run by path

if __name__ == "__main__":
    sys.exit(main(program="unetr_hyperparameter_search.py", doc=__doc__))
