"""The end-to-end demo on built-in synthetic data: generate, validate, preprocess, sample, plot.

Each stage calls the package's own functions exactly as a user's script would; later stages
(training, evaluation) join here as they are built.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from utils.case_validation import DatasetReport, load_case, select_cases, validate_dataset
from utils.config import DemoConfig, config_as_dict
from utils.experiment_config import load_experiment_config
from utils.intensity_separability import Separability, measure_separability
from utils.nifti_io import write_bytes_atomic
from utils.patch_dataset import build_patch_datasets
from utils.preprocessed_cache import open_cache
from utils.preprocessing import PreprocessingResult, preprocess_dataset
from utils.slice_dataset import build_slice_dataset
from utils.slice_statistics import classify_slices
from utils.statistics_figures import plot_slice_gallery
from utils.synthetic_dataset import CaseSummary, SyntheticOptions, generate_dataset
from utils.training_engine import TrainingResult, train
from utils.training_figures import plot_training_progress
from utils.visualisation import plot_case_gallery, save_figure

#: Augmented training samples of each kind drawn for the demo's figure.
SAMPLES_SHOWN = 6

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced: per-case summaries, the validation report, the intensity floor, files."""

    summaries: list[CaseSummary]
    validation: DatasetReport
    separability: Separability
    preprocessing: PreprocessingResult
    split: tuple[list[str], list[str]]
    gallery_path: Path
    samples_path: Path
    summary_path: Path
    training: TrainingResult | None = None
    training_seconds: float | None = None


def run_demo(config: DemoConfig, show_progress: bool = True) -> DemoResult:
    """Generate the synthetic dataset, validate it in full, measure it and save a gallery figure.

    Raises:
        UnusableCaseError: a generated case failed validation (the message names it).
    """
    synthetic = config.synthetic
    options = SyntheticOptions(matrix=synthetic.matrix, spacing=synthetic.spacing)
    summaries = generate_dataset(synthetic.out_dir, synthetic.cases, seed=synthetic.seed, options=options,
                                 workers=synthetic.workers, show_progress=show_progress)
    report = validate_dataset(synthetic.out_dir, full=True, show_progress=show_progress)
    cases = [load_case(files) for files in select_cases(report, on_bad="error")]
    pooled, _ = measure_separability((case.image, case.segmentation) for case in cases)
    reports_dir = Path(config.reports_dir)
    gallery = plot_case_gallery([(c.case_id, c.image, c.segmentation, c.spacing) for c in cases])
    gallery_path = save_figure(gallery, reports_dir / "synthetic_cases.png")
    prepared = preprocess_dataset(synthetic.out_dir, config.preprocessing, config.split, workers=synthetic.workers,
                                  show_progress=show_progress)
    samples_path, split = _save_training_samples(config, prepared.folder, reports_dir / "training_samples.png")
    summary = {
        "config": config_as_dict(config),
        "cases": [asdict(s) for s in summaries],
        "validation": report.counts,
        "intensity_only_floor": asdict(pooled),
        "cache": {"folder": prepared.folder, "cases": prepared.case_ids, "written": prepared.written,
                  "skipped": prepared.skipped, "failed": prepared.failed, "seconds": prepared.seconds,
                  "normalisation": {"clip_hu": prepared.fingerprint.clip_hu,
                                    "mean_hu": prepared.fingerprint.foreground_mean_hu,
                                    "std_hu": prepared.fingerprint.foreground_std_hu},
                  "split": {"train": split[0], "val": split[1]}},
    }
    training, seconds = _train(config, reports_dir, show_progress)
    if training is not None:
        best = next((r for r in training.records if r["epoch"] == training.best_epoch), {})
        summary["training"] = {"run_folder": training.run_folder, "seconds": seconds, "best_epoch": training.best_epoch,
                               "kidney_dice": best.get("kidney_dice"), "tumour_dice": best.get("tumour_dice"),
                               "validation_space": best.get("validation_space")}
    summary_path = reports_dir / "dataset_summary.json"
    write_bytes_atomic(summary_path, (json.dumps(summary, indent=2, default=_jsonable) + "\n").encode())
    return DemoResult(summaries, report, pooled, prepared, split, gallery_path, samples_path, summary_path,
                      training, seconds)


def _train(config: DemoConfig, reports_dir: Path, show_progress: bool) -> tuple[TrainingResult | None, float | None]:
    """Train the demo's model on its synthetic cases and save its training curves."""
    if config.train_config is None:
        return None, None
    experiment = load_experiment_config(config.train_config, config.train_overrides)
    started = time.perf_counter()
    result = train(experiment, data_dir=config.synthetic.out_dir, show_progress=show_progress)
    seconds = time.perf_counter() - started
    save_figure(plot_training_progress(result.records, title=result.run_folder.name),
                reports_dir / "training_progress.png")
    return result, seconds


def _save_training_samples(config: DemoConfig, cache_folder: Path, path: Path) -> tuple[Path, tuple[list[str], list[str]]]:
    """Draw augmented 3D patches (their middle axial slice) and 2D slices as the models see them; save a figure."""
    cache = open_cache(cache_folder)
    patches, _ = build_patch_datasets(cache, config.patches, config.augmentation, seed=config.seed)
    slices = build_slice_dataset(cache, config.slices, config.augmentation, seed=config.seed)
    middles = []
    for patch in (patches[i] for i in range(SAMPLES_SHOWN)):
        depth = patch["image"].shape[1]
        label = patch["label"][:, depth // 2]
        middles.append({"image": patch["image"][:, depth // 2], "label": label, "case_id": patch["case_id"],
                        "slice_index": f"middle of 3D patch ({patch['centre_class']})",
                        "slice_class": int(classify_slices(label.numpy())[0])})
    figure = plot_slice_gallery(middles + [slices[i] for i in range(SAMPLES_SHOWN)], columns=SAMPLES_SHOWN)
    return save_figure(figure, path), cache.split(0)


def format_demo_result(result: DemoResult) -> str:
    """The demo's summary as text: a per-case table, validation counts and the intensity floor."""
    lines = [f"{'case':<12} {'status':<15} {'shape (Z,Y,X)':<17} {'spacing mm (Z,Y,X)':<21} "
             f"{'kidney ml':>9} {'tumour ml':>9}"]
    status = {r.case_id: r.status for r in result.validation.reports}
    for s in result.summaries:
        spacing = " x ".join(f"{v:.2f}" for v in s.spacing)
        lines.append(f"{s.case_id:<12} {status.get(s.case_id, '?'):<15} {str(s.shape):<17} {spacing:<21} "
                     f"{s.kidney_ml:>9.1f} {s.tumour_ml:>9.1f}")
    counts = ", ".join(f"{k}: {v}" for k, v in result.validation.counts.items())
    floor = result.separability
    prepared = result.preprocessing
    low, high = prepared.fingerprint.clip_hu
    lines += [f"validation (full): {counts}",
              f"intensity-only floor: best HU interval {floor.kidney_interval_hu} gives kidney Dice "
              f"{floor.kidney_interval_dice:.3f}; best HU threshold inside kidney gives tumour Dice "
              f"{floor.tumour_threshold_dice:.3f}",
              f"cache: {prepared.folder} ({len(prepared.written)} written, {len(prepared.skipped)} up to date, "
              f"{len(prepared.failed)} failed, {prepared.seconds:.1f} s)",
              f"normalisation: clip to [{low:.0f}, {high:.0f}] HU, z-score with mean "
              f"{prepared.fingerprint.foreground_mean_hu:.1f} HU and std {prepared.fingerprint.foreground_std_hu:.1f} HU",
              f"split: {len(result.split[0])} train, {len(result.split[1])} validation cases",
              f"figures: {result.gallery_path}, {result.samples_path}", f"summary: {result.summary_path}"]
    if result.training is not None:
        best = next((r for r in result.training.records if r["epoch"] == result.training.best_epoch), None)
        scores = (f"kidney Dice {best['kidney_dice']:.3f}, tumour Dice {best['tumour_dice']:.3f} per case on the "
                  f"validation cases (cache grid), best of epoch {best['epoch']}") if best else "no validated epoch"
        lines += [f"training: {result.training.run_folder} in {result.training_seconds:.0f} s; {scores}"]
    return "\n".join(lines)


def _jsonable(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
