"""Run the whole pipeline end to end on built-in synthetic KiTS19-style data.

    python scripts/demo.py [--config configs/demo.yaml] [--set synthetic.cases=4 ...]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set synthetic.cases=4 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, DemoConfig, args.set)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = run_demo(config)
    except UnusableCaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_demo_result(result))
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
