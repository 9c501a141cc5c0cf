"""Run the whole pipeline end to end on built-in synthetic KiTS19-style data.

    python scripts/demo.py [--config configs/demo.yaml] [--set synthetic.cases=4 ...] [--allow-inside-input]
    python scripts/demo.py --config configs/demo_cv.yaml    # cross-validated: 3 folds of both models

``configs/demo.yaml`` (``make demo``) trains one run of each model and evaluates it on its
validation cases. ``configs/demo_cv.yaml`` (``split.scheme: kfold``) trains every fold of each
model, evaluates each out-of-fold on every case, compares them on all cases (so the Wilcoxon test
is computed) and writes its results to ``<reports_dir>/results.md``.

Every folder it writes is checked first: its synthetic data folder may not hold KiTS19 cases it
did not generate, and its reports, cache and runs may not land inside a data folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from utils.cli.demo import format_demo_result, run_demo
from utils.config.demo import DemoConfig
from utils.config.loading import load_config
from utils.data.case_validation import UnusableCaseError
from utils.data.output_guard import OutputGuardError, add_guard_argument


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set synthetic.cases=4 (repeatable)")
    add_guard_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, DemoConfig, args.set)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = run_demo(config, allow_inside_input=args.allow_inside_input)
    except OutputGuardError as error:
        print(f"demo.py: error: {error}", file=sys.stderr)
        return 2
    except UnusableCaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_demo_result(result))
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
