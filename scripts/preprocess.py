"""Build or update the preprocessing cache of a KiTS19 data folder.

Usage::

    python scripts/preprocess.py --data DIR --out CACHE [--config configs/preprocessing.yaml]
                                 [--workers K] [--set section.key=value ...]

``DIR`` holds the ``case_XXXXX`` folders (default: the ``KITS19_DATA`` environment variable) and
is only read. ``CACHE`` is the cache root (default: ``preprocessing.cache_dir`` of the config); the
cache of these settings is written to the plan folder ``CACHE/spacing_<z>x<y>x<x>_<hash>/``.
The ``preprocessing`` and ``split`` sections are read from the config (any config holding them
will do). Cases already up to date are skipped, so re-running is cheap.

Exit status: 0 when every case with a segmentation is in the cache, 1 when any case failed or
was excluded as unusable (or none could be cached), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from utils.config.data import PreprocessingConfig, SplitConfig
from utils.config.loading import load_config_sections
from utils.data.case_discovery import resolve_data_dir
from utils.preprocessing.preprocess import NO_SEGMENTATION, PreprocessingResult, preprocess_dataset

EXIT_OK, EXIT_UNUSABLE, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "configs/preprocessing.yaml"
#: How many case ids a summary line lists before abbreviating.
_IDS_SHOWN = 5
#: Loggers whose messages (skipped, excluded and failed cases) the summary repeats.
_REPORTED_BY_SUMMARY = frozenset({"utils.data.case_validation", "utils.preprocessing.preprocess"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder holding the case_XXXXX folders (default: $KITS19_DATA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="cache root (default: preprocessing.cache_dir of the config); never inside --data")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("--workers", type=int, default=1, help="processes preprocessing cases in parallel (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set preprocessing.target_spacing=[4,2,2] (repeatable)")
    return parser.parse_args(argv)


def configure_logging() -> None:
    """Log warnings to stderr, except the per-case reports that the summary lists anyway."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(lambda record: record.name not in _REPORTED_BY_SUMMARY)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def check_cache_location(cache_root: Path, data_dir: Path) -> None:
    """Refuse a cache root inside (or equal to) the data folder: raw data is never written to.

    Raises:
        ValueError: ``cache_root`` is ``data_dir`` or lies inside it.
    """
    cache, data = cache_root.expanduser().resolve(), data_dir.resolve()
    if cache == data or data in cache.parents:
        raise ValueError(f"cache folder {cache_root} is inside the data folder {data_dir}; the raw data is "
                         "never written to: choose a cache root outside it with --out")


def _ids(case_ids: list[str]) -> str:
    shown = ", ".join(case_ids[:_IDS_SHOWN])
    return shown + (f", … ({len(case_ids)} in all)" if len(case_ids) > _IDS_SHOWN else "")


def format_summary(result: PreprocessingResult) -> str:
    """A few lines: plan folder, case counts, failures and exclusions with reasons, fingerprint, time."""
    unusable = {case_id: reason for case_id, reason in result.excluded.items() if reason != NO_SEGMENTATION}
    inference_only = sorted(case_id for case_id, reason in result.excluded.items() if reason == NO_SEGMENTATION)
    lines = [
        f"plan folder: {result.folder}",
        f"cases: {len(result.case_ids)} in the cache ({len(result.written)} written, {len(result.skipped)} "
        f"skipped as up to date), {len(result.failed)} failed, {len(unusable)} excluded as unusable, "
        f"{len(inference_only)} without a segmentation",
    ]
    lines += [f"failed: {case_id}: {reason}" for case_id, reason in sorted(result.failed.items())]
    lines += [f"excluded: {case_id}: {reason}" for case_id, reason in sorted(unusable.items())]
    if inference_only:
        lines.append(f"not cached (no segmentation, inference only): {_ids(inference_only)}")
    fingerprint = result.fingerprint
    low, high = fingerprint.clip_hu
    lines.append(f"fingerprint: {len(fingerprint.case_ids)} cases, {fingerprint.foreground_voxels} foreground voxels; "
                 f"clip {low:g} .. {high:g} HU (percentiles {fingerprint.clip_percentiles[0]:g}, "
                 f"{fingerprint.clip_percentiles[1]:g}), mean {fingerprint.foreground_mean_hu:.1f} HU, "
                 f"std {fingerprint.foreground_std_hu:.1f} HU")
    if result.split_problem:
        lines.append(f"warning: {result.split_problem}")
    lines.append(f"finished in {result.seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing; return the exit status."""
    args = parse_args(argv)
    configure_logging()
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        data_dir = resolve_data_dir(args.data)
        sections = load_config_sections(args.config, {"preprocessing": PreprocessingConfig, "split": SplitConfig},
                                        args.set)
        config: PreprocessingConfig = sections["preprocessing"]
        if args.out is not None:
            config = dataclasses.replace(config, cache_dir=str(args.out))
        check_cache_location(Path(config.cache_dir), data_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"preprocess.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = preprocess_dataset(data_dir, config, sections["split"], workers=args.workers,
                                    show_progress=True)
    except ValueError as error:  # no usable case, or too few for the split
        print(f"preprocess.py: error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(format_summary(result))
    unusable = [case_id for case_id, reason in result.excluded.items() if reason != NO_SEGMENTATION]
    return EXIT_UNUSABLE if result.failed or unusable else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
