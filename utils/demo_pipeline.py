"""The end-to-end demo on built-in synthetic data: generate, validate, summarise, plot.

Each stage calls the package's own functions exactly as a user's script would; later stages
(preprocessing, training, evaluation) join here as they are built.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from utils.case_validation import DatasetReport, load_case, select_cases, validate_dataset
from utils.config import DemoConfig, config_as_dict
from utils.intensity_separability import Separability, measure_separability
from utils.nifti_io import write_bytes_atomic
from utils.synthetic_dataset import CaseSummary, SyntheticOptions, generate_dataset
from utils.visualisation import plot_case_gallery, save_figure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced: per-case summaries, the validation report, the intensity floor, files."""

    summaries: list[CaseSummary]
    validation: DatasetReport
    separability: Separability
    gallery_path: Path
    summary_path: Path


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
    summary = {
        "config": config_as_dict(config),
        "cases": [asdict(s) for s in summaries],
        "validation": report.counts,
        "intensity_only_floor": asdict(pooled),
    }
    summary_path = reports_dir / "dataset_summary.json"
    write_bytes_atomic(summary_path, (json.dumps(summary, indent=2, default=_jsonable) + "\n").encode())
    return DemoResult(summaries, report, pooled, gallery_path, summary_path)


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
    lines += [f"validation (full): {counts}",
              f"intensity-only floor: best HU interval {floor.kidney_interval_hu} gives kidney Dice "
              f"{floor.kidney_interval_dice:.3f}; best HU threshold inside kidney gives tumour Dice "
              f"{floor.tumour_threshold_dice:.3f}",
              f"figure: {result.gallery_path}", f"summary: {result.summary_path}"]
    return "\n".join(lines)


def _jsonable(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
