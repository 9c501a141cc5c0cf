"""Build or update the preprocessing cache of a KiTS19 (or KiTS23) data folder.

Usage::

    python scripts/preprocess.py --data DIR --out CACHE [--config configs/preprocessing.yaml]
                                 [--dataset kits19|kits23] [--workers K] [--set section.key=value ...]
                                 [--allow-inside-input]
    python scripts/preprocess.py --config configs/resunet3d_quick.yaml [--data DIR]
    python scripts/preprocess.py --config configs/resunet3d_kits23_quick.yaml [--data DIR]

``DIR`` holds the ``case_XXXXX`` folders (default: the ``KITS19_DATA`` environment variable) and
is only read. ``CACHE`` is the cache root (default: ``preprocessing.cache_dir`` of the config); the
cache of these settings is written to the plan folder ``CACHE/spacing_<z>x<y>x<x>_<hash>/``.
The ``preprocessing`` and ``split`` sections are read from the config. With an experiment config
(one with a ``model`` or ``training`` section, e.g. ``configs/resunet3d_quick.yaml``) the whole
config is validated as training validates it, ``--data`` defaults to its ``data_dir`` (then to
``KITS19_DATA``), its ``dataset`` (``kits19`` or ``kits23``) says what the folder holds, and the
cache built is exactly the one training with that config reads (the summary says so). With a
preprocessing-only config the folder is read as ``--dataset`` (default ``kits19``). A folder of
the other dataset (``kits23.json`` read as KiTS19, ``kits.json`` read as KiTS23) is refused.
Cases already up to date are skipped, so re-running is cheap.

A cache root inside the data folder is refused before any work (the raw data is never written
to) unless ``--allow-inside-input`` is given. Input anomalies of the CTs (see
:func:`utils.data.nifti_checks.find_ct_anomalies`) fail their case (NaN/inf voxels, zero or
negative voxel sizes, a volume of a few voxels) or are printed as warnings (oblique affine,
values that do not look like HU).

Exit status: 0 when every case with a segmentation is in the cache, 1 when any case failed or
was excluded as unusable (or none could be cached), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

from utils.config.data import PreprocessingConfig, SplitConfig
from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.config.loading import load_config_sections
from utils.data.case_discovery import resolve_data_dir
from utils.data.dataset_definitions import DATASETS, KITS19
from utils.data.output_guard import add_guard_argument, check_output_location
from utils.preprocessing.preprocess import NO_SEGMENTATION, PreprocessingResult, plan_folder, preprocess_dataset

EXIT_OK, EXIT_UNUSABLE, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "configs/preprocessing.yaml"
#: How many case ids a summary line lists before abbreviating.
_IDS_SHOWN = 5
#: Loggers whose messages (skipped, excluded and failed cases) the summary repeats.
_REPORTED_BY_SUMMARY = frozenset({"utils.data.case_validation", "utils.preprocessing.preprocess"})
#: Top-level sections that make a config file an experiment config (not a preprocessing-only one).
_EXPERIMENT_SECTIONS = frozenset({"model", "training"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder holding the case_XXXXX folders (default: $KITS19_DATA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="cache root (default: preprocessing.cache_dir of the config); never inside --data")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                        help="what the folder holds (default: the experiment config's dataset, else kits19); "
                             "with an experiment config it must agree with the config's dataset")
    parser.add_argument("--workers", type=int, default=1, help="processes preprocessing cases in parallel (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set preprocessing.target_spacing=[4,2,2] (repeatable)")
    add_guard_argument(parser)
    return parser.parse_args(argv)


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once (a case's warnings are found by two passes over it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def configure_logging() -> None:
    """Log warnings to stderr, except the per-case reports that the summary lists anyway."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(lambda record: record.name not in _REPORTED_BY_SUMMARY)
    handler.addFilter(_OncePerMessage())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def check_cache_location(cache_root: Path, data_dir: Path, *, allow_inside_input: bool = False) -> None:
    """Refuse a cache root inside (or equal to) the data folder: raw data is never written to.

    Raises:
        utils.data.output_guard.OutputGuardError: (a ``ValueError``) ``cache_root`` is ``data_dir``
            or lies inside it, and ``allow_inside_input`` is false; the message names both.
    """
    check_output_location(cache_root, [data_dir], what="cache folder (--out or preprocessing.cache_dir)",
                          allow_inside_input=allow_inside_input)


def is_experiment_config(path: str | Path) -> bool:
    """Whether a config file is a training experiment's (it has a ``model`` or ``training`` section).

    Raises:
        FileNotFoundError: no such file. ValueError: not valid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    return isinstance(mapping, dict) and bool(_EXPERIMENT_SECTIONS & set(mapping))


def load_settings(args: argparse.Namespace) -> tuple[PreprocessingConfig, SplitConfig, ExperimentConfig | None]:
    """The preprocessing and split settings of ``--config`` (and the experiment, for an experiment config).

    Raises:
        ValueError: an invalid config, or ``--dataset`` differing from an experiment config's ``dataset``.
    """
    if is_experiment_config(args.config):
        experiment = load_experiment_config(args.config, args.set)
        if args.dataset is not None and args.dataset != experiment.dataset:
            raise ValueError(f"--dataset is {args.dataset} but {args.config} trains on dataset {experiment.dataset}; "
                             f"drop --dataset, or use a config for {args.dataset} (its 'dataset:' key, model."
                             f"out_channels and loss.class_weights follow the dataset's labels)")
        return experiment.preprocessing, experiment.split, experiment
    sections = load_config_sections(args.config, {"preprocessing": PreprocessingConfig, "split": SplitConfig},
                                    args.set)
    return sections["preprocessing"], sections["split"], None


def selected_dataset(args: argparse.Namespace, experiment: ExperimentConfig | None) -> str:
    """The dataset the data folder is read as: the experiment config's, else ``--dataset``, else ``kits19``."""
    if experiment is not None:
        return experiment.dataset
    return args.dataset or KITS19.name


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


def training_note(experiment: ExperimentConfig, folder: Path, config_path: str) -> str:
    """Say whether training with the experiment config reads the plan folder just built."""
    trained_from = plan_folder(experiment.preprocessing, dataset=experiment.dataset)
    if trained_from.resolve() == folder.resolve():
        return f"training with {config_path} reads this plan folder"
    return (f"warning: training with {config_path} reads {trained_from}, not this plan folder (--out differs from "
            f"its preprocessing.cache_dir {experiment.preprocessing.cache_dir}); train with "
            f"--set preprocessing.cache_dir={folder.parent} to use this cache")


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing; return the exit status."""
    args = parse_args(argv)
    configure_logging()
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        config, split, experiment = load_settings(args)
        data = args.data if args.data is not None or experiment is None else experiment.data_dir
        data_dir = resolve_data_dir(data)
        if args.out is not None:
            config = dataclasses.replace(config, cache_dir=str(args.out))
        check_cache_location(Path(config.cache_dir), data_dir, allow_inside_input=args.allow_inside_input)
    except (ValueError, FileNotFoundError) as error:
        print(f"preprocess.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = preprocess_dataset(data_dir, config, split, workers=args.workers, show_progress=True,
                                    dataset=selected_dataset(args, experiment))
    except ValueError as error:  # another dataset's folder, no usable case, or too few for the split
        print(f"preprocess.py: error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(format_summary(result))
    if experiment is not None:
        print(training_note(experiment, result.folder, args.config))
    unusable = [case_id for case_id, reason in result.excluded.items() if reason != NO_SEGMENTATION]
    return EXIT_UNUSABLE if result.failed or unusable else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
