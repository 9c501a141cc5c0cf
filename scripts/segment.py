"""Segment kidneys and kidney tumours in your own CT scans with a trained model.

Usage::

    python scripts/segment.py --checkpoint checkpoints/<run> --input CT.nii.gz --output OUT.nii.gz
    python scripts/segment.py --checkpoint RUN_DIR_OR_FILE --input DIR --output OUT_DIR
                              [--device cpu|cuda] [--tta] [--postprocess [--min-component-ml ML]]
                              [--restore probabilities|labels]
    python scripts/segment.py --checkpoint checkpoints/<experiment> --input CT.nii.gz --output OUT.nii.gz

``--checkpoint`` is a run folder (its ``best.pt``, else ``last.pt``) or a ``.pt`` file; it holds
the model, its config and the preprocessing, so nothing else is needed. It may also be the
folder of a cross-validated experiment (``fold_<k>/`` run folders): every fold's model is loaded
and their softmax averaged (a fold ensemble; the folds must share the model and preprocessing);
the summary says how many models were used. ``--input`` is one
``.nii``/``.nii.gz`` CT in HU, a KiTS19-layout folder (``case_XXXXX/imaging.nii.gz`` gives
``OUT_DIR/case_XXXXX.nii.gz``) or a flat folder of ``.nii.gz``/``.nii`` files (same names in
``OUT_DIR``; a KiTS23-layout folder, with ``kits23.json``, is read the same way). Each prediction
is a uint8 label map of the model's dataset (the ``dataset`` of its experiment config: KiTS19
0 background, 1 kidney, 2 tumour; KiTS23 adds 3 cyst) with its CT's shape and affine, written
atomically; the input is never written to. ``--postprocess`` keeps the largest kidneys (label > 0,
cysts included) and only the masses (tumour; for KiTS23 tumour and cyst) that touch kidney. A
folder output also gets ``segmentation_run.json``: the checkpoint (and every checkpoint file used,
one per model), the options, each case's outcome and, for a model of another dataset than KiTS19,
its ``dataset``.

Before the model is loaded, the outputs are checked (:mod:`utils.data.output_guard`): the output
may not be, or lie inside, the input folder (for one CT, the folder holding it, such as its
``case_XXXXX`` folder) unless ``--allow-inside-input`` is given; an existing file is only replaced
when it is a prediction this command wrote; and the output folder must be creatable and writable.

Exit status: 0 when every CT was segmented, 1 when any failed (the others are still written; the
summary names each failure and why), 2 on usage errors (bad paths, checkpoint, or CUDA missing).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from utils.data.case_discovery import discover_cases
from utils.data.dataset_definitions import DATASETS, KITS19
from utils.data.kits_layout import IMAGING_NAME, is_case_id
from utils.data.nifti_io import save_json_atomic
from utils.data.output_guard import (
    OutputGuardError,
    add_guard_argument,
    check_output_location,
    check_overwrite,
    is_own_json,
    is_own_prediction,
)
from utils.data.progress import progress
from utils.inference.postprocessing import DEFAULT_MIN_COMPONENT_ML
from utils.inference.segment import (
    SegmentationModel,
    add_restore_argument,
    load_segmentation_model,
    segment_file,
    select_device,
)
from utils.networks.checkpoints import CheckpointError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NIFTI_SUFFIXES = (".nii.gz", ".nii")
RUN_RECORD_NAME = "segmentation_run.json"
#: Keys every ``segmentation_run.json`` holds: how an earlier record of this command is recognised.
RUN_RECORD_KEYS = ("checkpoint", "run_name", "model", "input", "cases")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="run folder (best.pt, else last.pt), .pt file, or experiment folder of fold_<k> "
                             "run folders (a fold ensemble)")
    parser.add_argument("--input", type=Path, required=True,
                        help="CT .nii/.nii.gz, KiTS19-layout folder or folder of CTs")
    parser.add_argument("--output", type=Path, required=True, help="output .nii.gz (for one CT) or folder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--tta", action="store_true",
                        help="average over inputs mirrored along the axes the model was trained to see mirrored "
                             "(up to 8x slower for 3D models)")
    parser.add_argument("--postprocess", action="store_true",
                        help="keep the 2 largest kidney components and only tumour (KiTS23: and cyst) "
                             "touching kidney; with a postprocessing.json beside the checkpoint "
                             "(scripts/choose_postprocessing.py), also call its smaller tumour components kidney")
    parser.add_argument("--min-component-ml", type=float, default=DEFAULT_MIN_COMPONENT_ML,
                        help="with --postprocess: smallest kidney component kept, in ml "
                             f"(default {DEFAULT_MIN_COMPONENT_ML:g})")
    add_restore_argument(parser)
    add_guard_argument(parser)
    return parser.parse_args(argv)


def _is_nifti_name(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _folder_jobs(folder: Path, output: Path) -> list[tuple[str, Path, Path]]:
    """(name, CT, prediction) of a KiTS-layout folder (read as the dataset whose metadata file it holds,
    KiTS19 when none), else of a flat folder of NIfTI files."""
    if any(p.is_dir() and is_case_id(p.name) for p in folder.iterdir()):
        layout = next((d for d in DATASETS.values() if (folder / d.metadata_name).is_file()), KITS19)
        return [(case.case_id, case.imaging or case.folder / IMAGING_NAME, output / f"{case.case_id}.nii.gz")
                for case in discover_cases(folder, layout).cases]
    files = sorted(p for p in folder.iterdir() if _is_nifti_name(p) and not p.is_dir())
    return [(p.name, p, output / p.name) for p in files]


def list_jobs(source: Path, output: Path, *, allow_inside_input: bool = False) -> list[tuple[str, Path, Path]]:
    """Pair every input CT with its output path: ``(name, CT, prediction)``, sorted.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        OutputGuardError: the output is the input CT, or is or lies inside the input folder (for
            one CT, the folder holding it) and ``allow_inside_input`` is false.
        ValueError: a folder input with a NIfTI file output, or no CT found.
    """
    if not source.exists():
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    if source.is_file():
        target = output if _is_nifti_name(output) else output / source.name
        check_output_location(target, [source], what="--output", allow_inside_input=allow_inside_input)
        return [(source.name, source, target)]
    if _is_nifti_name(output):
        raise ValueError(f"--output {output} names a NIfTI file, but --input {source} is a folder; "
                         "give an output folder")
    check_output_location(output, [source], what="--output", allow_inside_input=allow_inside_input)
    jobs = _folder_jobs(source, output)
    if not jobs:
        raise ValueError(f"--input {source}: no CT found; expected case_XXXXX/{IMAGING_NAME} folders or "
                         f"{' / '.join('*' + s for s in NIFTI_SUFFIXES)} files")
    for _name, ct, _target in jobs:  # a CT found inside the input is protected as well
        check_output_location(output, [ct], what="--output", allow_inside_input=allow_inside_input)
    return jobs


def check_targets(jobs: list[tuple[str, Path, Path]], record: Path | None) -> None:
    """Refuse to replace any existing file that is not one of this command's own outputs.

    Args:
        jobs: ``(name, CT, prediction)`` of every CT; each prediction may only replace an earlier
            prediction (:func:`utils.data.output_guard.is_own_prediction`).
        record: the ``segmentation_run.json`` a folder output gets, ``None`` for one file.

    Raises:
        OutputGuardError: a target exists and was not written by this command; the message names it.
    """
    for _name, source, target in jobs:
        if target.resolve() == source.resolve():
            raise OutputGuardError(target.resolve(), source.resolve(),
                                   f"--output {target} would overwrite the input {source}")
        check_overwrite(target, is_own_prediction, what="--output")
    if record is not None:
        check_overwrite(record, is_own_json(RUN_RECORD_KEYS), what="--output")


def check_output_folder(folder: Path) -> None:
    """Make sure ``folder`` exists as a writable folder or can be created, before any CT is segmented.

    Raises:
        OutputGuardError: ``folder`` (or the nearest existing folder above it) is a file, is not
            writable, or cannot be created; the message names the output folder.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = "" if existing == folder else f" (it would be created inside {existing})"
    if not existing.is_dir():
        raise OutputGuardError(folder, existing, f"output folder {folder} cannot be created: {existing} is not a "
                                                 "folder; choose another --output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputGuardError(folder, existing, f"output folder {folder} is not writable{where}: permission "
                                                 f"denied on {existing}; choose another --output")


def segment_all(jobs: list[tuple[str, Path, Path]], segmenter: SegmentationModel,
                args: argparse.Namespace) -> dict[str, str]:
    """Segment each CT; returns name -> ``"written"`` or the reason it failed (the others go on)."""
    outcomes: dict[str, str] = {}
    for name, source, target in progress(jobs, desc="segment", unit="CT", disable=None):
        try:
            segment_file(source, target, segmenter, tta=args.tta, postprocess=args.postprocess,
                         min_component_ml=args.min_component_ml, restore=args.restore)
            outcomes[name] = "written"
        except (ValueError, OSError, torch.cuda.OutOfMemoryError) as error:  # NiftiReadError is a ValueError
            reason = str(error) if str(source) in str(error) else f"{source}: {error}"
            outcomes[name] = reason
            logging.getLogger("segment").error("%s failed: %s", name, reason)
            if segmenter.device.type == "cuda":
                torch.cuda.empty_cache()
    return outcomes


def _models_used(segmenter: SegmentationModel) -> str:
    """``"1 model"``, or ``"ensemble of 5 models"`` for the folds of an experiment."""
    count = segmenter.model_count
    return "1 model" if count == 1 else f"ensemble of {count} models"


def _labels_used(segmenter: SegmentationModel) -> str:
    """``""`` for a KiTS19 model, else e.g. ``", KiTS23 labels 0 (background), 1 (kidney), 2 (tumour), 3 (cyst)"``."""
    dataset = segmenter.dataset
    return "" if dataset is KITS19 else f", {dataset.title} labels {dataset.describe_labels()}"


def format_summary(outcomes: dict[str, str], segmenter: SegmentationModel, output: Path, seconds: float,
                   args: argparse.Namespace) -> str:
    """A few lines: how many CTs were segmented, with what, where, and each failure with its reason."""
    failed = {name: reason for name, reason in outcomes.items() if reason != "written"}
    lines = [f"segmented {len(outcomes) - len(failed)} of {len(outcomes)} CT(s) in {seconds:.1f} s with "
             f"{segmenter.run_name} ({segmenter.config.model.name}, {segmenter.device}, tta "
             f"{'on' if args.tta else 'off'}, postprocessing {'on' if args.postprocess else 'off'}, "
             f"{_models_used(segmenter)}{_labels_used(segmenter)}) -> {output}"]
    lines += [f"failed: {name}: {reason}" for name, reason in failed.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the segmentation; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    started = time.perf_counter()
    try:
        if args.min_component_ml < 0:
            raise ValueError(f"--min-component-ml must be >= 0 ml, got {args.min_component_ml}")
        jobs = list_jobs(args.input, args.output, allow_inside_input=args.allow_inside_input)
        folder_output = args.input.is_dir()
        check_targets(jobs, args.output / RUN_RECORD_NAME if folder_output else None)
        check_output_folder(args.output if folder_output else jobs[0][2].parent)
        device = select_device(args.device)
        segmenter = load_segmentation_model(args.checkpoint, device)
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        print(f"segment.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    outcomes = segment_all(jobs, segmenter, args)
    if folder_output:
        args.output.mkdir(parents=True, exist_ok=True)
        save_json_atomic(args.output / RUN_RECORD_NAME, {
            "checkpoint": str(segmenter.checkpoint.resolve()), "run_name": segmenter.run_name,
            "model": segmenter.config.model.name, "model_count": segmenter.model_count,
            "checkpoints": [str(path.resolve()) for path in segmenter.checkpoints],
            "device": str(segmenter.device), "tta": args.tta,
            "postprocess": args.postprocess, "min_component_ml": args.min_component_ml, "restore": args.restore,
            "input": str(args.input.resolve()), "cases": outcomes,
            **({} if segmenter.dataset is KITS19 else {"dataset": segmenter.dataset.name})})
    print(format_summary(outcomes, segmenter, args.output, time.perf_counter() - started, args))
    return EXIT_OK if all(reason == "written" for reason in outcomes.values()) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
