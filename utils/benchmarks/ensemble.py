"""Measurements behind ``scripts/benchmark_ensemble.py``: one fold against the fold ensemble, per CT.

:func:`benchmark_ensemble` writes ``folds`` checkpoints of one experiment config with random
weights (a different seed per fold) into a temporary experiment folder laid out as a
cross-validated run (``fold_<k>/best.pt``), generates one synthetic CT
(:func:`utils.synthetic.dataset.generate_dataset`), and times the real file-to-file path,
:func:`utils.inference.segment.segment_file`, with the first fold alone and with the ensemble of
every fold loaded from the experiment folder. Both read, preprocess, restore and write once per
CT; only the prediction is repeated per model, so the ratio ensemble/single says how much of a
CT's time the network takes. Untrained weights cost the same time as trained ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from utils.config.experiment import ExperimentConfig
from utils.config.loading import config_as_dict
from utils.inference.segment import SegmentationModel, load_segmentation_model, segment_file
from utils.networks.checkpoints import save_checkpoint
from utils.networks.models import build_model, model_input_size
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

#: Normalisation written into the benchmark checkpoints' preprocessing plan: KiTS19-like
#: foreground values (the timing does not depend on them).
BENCHMARK_NORMALISATION = {"clip_low_hu": -79.0, "clip_high_hu": 304.0, "mean_hu": 101.0, "std_hu": 76.9}


@dataclass(frozen=True)
class EnsembleTiming:
    """Seconds per CT, file to file, with one fold and with the ensemble of ``folds`` folds.

    Attributes:
        folds: models in the ensemble.
        ct_shape: the synthetic CT's voxels.
        device: where the models ran.
        tta: whether mirroring test-time augmentation was on (for both).
        single_seconds, ensemble_seconds: median seconds per CT of the timed repeats.
        single_each, ensemble_each: every timed repeat.
        stage_seconds: ``{"single": {...}, "ensemble": {...}}``, the median seconds of each stage
            of :func:`utils.inference.segment.segment_file`.
    """

    folds: int
    ct_shape: tuple[int, int, int]
    device: str
    tta: bool
    single_seconds: float
    ensemble_seconds: float
    single_each: list[float] = field(default_factory=list)
    ensemble_each: list[float] = field(default_factory=list)
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Ensemble seconds over single-fold seconds."""
        return self.ensemble_seconds / self.single_seconds

    def as_dict(self) -> dict:
        """JSON-ready numbers, the ratio included."""
        return {"folds": self.folds, "ct_shape": list(self.ct_shape), "device": self.device, "tta": self.tta,
                "single_seconds": self.single_seconds, "ensemble_seconds": self.ensemble_seconds,
                "ratio": self.ratio, "single_each": self.single_each, "ensemble_each": self.ensemble_each,
                "stage_seconds": self.stage_seconds}


def write_fold_checkpoints(config: ExperimentConfig, experiment: Path, folds: int, *, seed: int = 0) -> list[Path]:
    """``experiment/fold_<k>/best.pt`` for ``k < folds``: freshly initialised models (seed ``seed + k``).

    Every fold gets the same config and preprocessing plan (the config's preprocessing and
    :data:`BENCHMARK_NORMALISATION`), as the folds of one cross-validated experiment do.
    """
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    plan = {"preprocessing": config_as_dict(config.preprocessing), "normalisation": dict(BENCHMARK_NORMALISATION)}
    paths = []
    for k in range(folds):
        torch.manual_seed(seed + k)
        model = build_model(config.model, model_input_size(config))
        (experiment / f"fold_{k}").mkdir(parents=True, exist_ok=True)
        paths.append(save_checkpoint(experiment / f"fold_{k}" / "best.pt",
                                     {"model": model.state_dict(), "config": config_as_dict(config),
                                      "preprocessing_plan": plan}))
    return paths


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_segmentation(segmenter: SegmentationModel, ct_path: Path, output: Path, *, repeats: int,
                      tta: bool = False) -> tuple[list[float], dict[str, float]]:
    """Seconds of each of ``repeats`` timed :func:`segment_file` runs after one warm-up, and the median stages."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    segment_file(ct_path, output, segmenter, tta=tta)  # warm-up: allocator, thread pools, kernels
    _synchronise(segmenter.device)
    times, stages = [], []
    for _ in range(repeats):
        stages.append({})
        started = time.perf_counter()
        segment_file(ct_path, output, segmenter, tta=tta, timings=stages[-1])
        _synchronise(segmenter.device)
        times.append(time.perf_counter() - started)
    return times, {name: float(np.median([s[name] for s in stages])) for name in stages[0]}


def benchmark_ensemble(config: ExperimentConfig, work: str | Path, *, folds: int = 5, repeats: int = 2,
                       matrix: int = 64, device: str | torch.device = "cpu", tta: bool = False,
                       seed: int = 0) -> EnsembleTiming:
    """Time one synthetic CT, NIfTI to NIfTI, with the first fold alone and with the ``folds``-fold ensemble.

    Args:
        config: the experiment config of every fold.
        work: scratch folder (the experiment folder, the CT and the predictions go there).
        folds: models in the ensemble (>= 2).
        repeats: timed runs of each, after one warm-up; the median counts.
        matrix: in-plane size of the synthetic CT (64 to 1024 voxels).
        device: where the models run.
        tta: mirroring test-time augmentation for both.
        seed: seed of the synthetic CT and of the first fold's weights.

    Raises:
        ValueError: ``folds`` < 2, ``repeats`` < 1 or a bad ``matrix``.
        RuntimeError: the ensemble loaded another number of models, or a prediction is not on the CT's grid.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2 for an ensemble, got {folds}")
    work = Path(work)
    experiment = work / "experiment"
    write_fold_checkpoints(config, experiment, folds, seed=seed)
    data = work / "data"
    generate_dataset(data, 1, seed=seed, options=SyntheticOptions(matrix=matrix), show_progress=False)
    ct_path = data / "case_00000" / "imaging.nii.gz"
    single = load_segmentation_model(experiment / "fold_0", device)
    ensemble = load_segmentation_model(experiment, device)
    if ensemble.model_count != folds:
        raise RuntimeError(f"{experiment}: the ensemble loaded {ensemble.model_count} model(s), expected {folds}")
    results = {}
    for name, segmenter in (("single", single), ("ensemble", ensemble)):
        output = work / f"prediction_{name}.nii.gz"
        results[name] = time_segmentation(segmenter, ct_path, output, repeats=repeats, tta=tta)
        written, source = nib.load(str(output)), nib.load(str(ct_path))
        if written.shape != source.shape or not np.allclose(written.affine, source.affine, atol=1e-4):
            raise RuntimeError(f"{output}: the {name} segmentation is not on the CT's grid "
                               f"({written.shape} vs {source.shape})")
    shape = tuple(int(n) for n in nib.load(str(ct_path)).shape)
    return EnsembleTiming(folds, shape, str(single.device), tta,  # type: ignore[arg-type]
                          float(np.median(results["single"][0])), float(np.median(results["ensemble"][0])),
                          results["single"][0], results["ensemble"][0],
                          {name: stages for name, (_, stages) in results.items()})


def format_ensemble_timing(result: EnsembleTiming) -> str:
    """A few lines: seconds per CT with one fold and with the ensemble, their ratio, and the stages."""
    lines = [f"segment one CT {'x'.join(map(str, result.ct_shape))} file to file on {result.device}, "
             f"tta {'on' if result.tta else 'off'}:",
             f"  single fold:          {result.single_seconds:8.2f} s/CT",
             f"  ensemble of {result.folds} folds: {result.ensemble_seconds:8.2f} s/CT",
             f"  ratio ensemble/single: {result.ratio:.2f} (x{result.folds} models)"]
    for name, stages in result.stage_seconds.items():
        lines.append(f"  {name} stages (s): "
                     + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in stages.items()))
    return "\n".join(lines)
