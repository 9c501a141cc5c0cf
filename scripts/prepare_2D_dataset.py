"""Write the cache's axial slices out as .npy files, for use outside this toolkit.

Usage::

    python scripts/prepare_2D_dataset.py --cache PLAN_DIR --out OUT [--config CFG] [--fold 0]
                                         [--set slices.image_size=256] [--allow-inside-input]

``PLAN_DIR`` is a plan folder made by ``scripts/preprocess.py`` (it prints it). Slices are
fitted to ``slices.image_size`` exactly as the 2D UNETR sees them (see ``utils/datasets/slices.py``)
and written under ``OUT`` (``images/``, ``labels/``, ``slices.csv`` with the split of each case).
Training does not need this: the 2D dataset reads the same cache directly. ``OUT`` may not lie
inside the raw data folder or the cache (unless ``--allow-inside-input``), checked before any
slice is written.

Exit status: 0 on success, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.config.data import SliceDatasetConfig
from utils.config.loading import load_config_sections
from utils.data.output_guard import OutputGuardError, add_guard_argument, check_output_location
from utils.datasets.slices import write_slice_dataset
from utils.preprocessing.cache import open_cache

EXIT_OK, EXIT_USAGE = 0, 2
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "preprocessing.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="plan folder printed by scripts/preprocess.py")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the slices")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config with a 'slices' section")
    parser.add_argument("--fold", type=int, default=0, help="fold whose split is written into slices.csv")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. slices.image_size=256")
    add_guard_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cache.is_dir():  # a missing cache is reported by open_cache
            check_output_location(args.out, [args.cache], what="--out", allow_inside_input=args.allow_inside_input)
        config = load_config_sections(args.config, {"slices": SliceDatasetConfig}, args.overrides)["slices"]
        cache = open_cache(args.cache)
        out = write_slice_dataset(cache, args.out, config, fold=args.fold,
                                  allow_inside_input=args.allow_inside_input)
    except OutputGuardError as error:
        print(f"prepare_2D_dataset.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote the slices of {len(cache.case_ids)} cases to {out} (index: {out / 'slices.csv'})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
