"""One run of ``scripts/benchmark.py``: synthetic data, every measurement for both configurations, a table.

:func:`run_benchmark` generates KiTS19-style synthetic cases into a work folder, preprocesses
them for each experiment, then measures (see :mod:`utils.benchmarks.speed`) the baseline and our
configuration on one device, in one process:

a. 3D Residual U-Net training, end to end, patches/s;
b. 2D UNETR training, end to end, slices/s;
c. sliding-window inference of one preprocessed volume, seconds;
d. segmenting one synthetic CT from its NIfTI file to the prediction's NIfTI file, seconds;
e. peak GPU memory of each (CUDA only);
f. a short training comparison: both settings, the same number of steps, validation Dice.

Every training step of (a), (b) and (f) is the engine's :func:`utils.training.step.train_step`
through an ``Accelerator`` of the setting's precision (:func:`utils.benchmarks.speed.train_steps`).

A GPU run uses the full recipes and KiTS19 sizes (:func:`gpu_plan`); a CPU run the quick
configs and small shapes (:func:`cpu_plan`), so the whole benchmark is exercised in the tests.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from utils.benchmarks.speed import (
    Measurement,
    Settings,
    ablation_settings,
    baseline_settings,
    compare_training,
    measure_segmentation,
    measure_sliding_window,
    measure_training,
    our_settings,
    prepare_slices,
    ratio,
)
from utils.config.experiment import ExperimentConfig, load_experiment_config
from utils.data.progress import progress
from utils.datasets.patches import background_value
from utils.preprocessing.cache import PreprocessedCache, open_cache
from utils.preprocessing.preprocess import preprocess_dataset
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PARTS = ("train3d", "train2d", "sliding_window", "segment", "compare")


@dataclass(frozen=True)
class BenchmarkPlan:
    """Sizes and step counts of one benchmark run.

    Attributes:
        config_3d, config_2d: experiment YAML files of "ours" (their networks are used by both).
        cases, matrix, coverage_mm: synthetic training cases (in-plane size, cranio-caudal length).
        volume_shape: ``(Z, Y, X)`` preprocessed volume of the sliding-window measurement.
        ct_shape, ct_spacing: ``(Z, Y, X)`` voxels and mm of the CT segmented from file to file.
        warmup, steps: untimed then timed training steps of ours (compilation happens in warm-up).
        baseline_warmup, baseline_steps: the same for the baseline (slower; fewer steps suffice).
        compare_steps: steps of the training comparison. repeats: timed inference repetitions.
        workers: loader processes of ours. baseline_workers: of the baseline.
        ablation: also train ours with each of its options off, one at a time (what each bought).
    """

    config_3d: str
    config_2d: str
    cases: int
    matrix: int
    coverage_mm: tuple[float, float]
    volume_shape: tuple[int, int, int]
    ct_shape: tuple[int, int, int]
    ct_spacing: tuple[float, float, float]
    warmup: int
    steps: int
    baseline_warmup: int
    baseline_steps: int
    compare_steps: int
    repeats: int
    workers: int
    baseline_workers: int
    ablation: bool = False


def gpu_plan() -> BenchmarkPlan:
    """KiTS19 sizes and the full recipes: 512 x 512 cases, a 160 x 256 x 256 volume, a 512 x 512 x 200 CT."""
    cpus = os.cpu_count() or 4
    return BenchmarkPlan("configs/resunet3d.yaml", "configs/unetr2d.yaml", cases=4, matrix=512,
                         coverage_mm=(220.0, 300.0), volume_shape=(160, 256, 256), ct_shape=(200, 512, 512),
                         ct_spacing=(2.5, 0.78, 0.78), warmup=8, steps=30, baseline_warmup=2, baseline_steps=8,
                         compare_steps=120, repeats=3, workers=max(1, min(12, cpus - 2)), baseline_workers=4)


def cpu_plan() -> BenchmarkPlan:
    """Small shapes and the quick configs, for a CPU (and the tests): minutes, not hours."""
    return BenchmarkPlan("configs/resunet3d_quick.yaml", "configs/unetr2d_quick.yaml", cases=3, matrix=96,
                         coverage_mm=(150.0, 200.0), volume_shape=(32, 96, 96), ct_shape=(40, 128, 128),
                         ct_spacing=(5.0, 2.5, 2.5), warmup=1, steps=3, baseline_warmup=1, baseline_steps=2,
                         compare_steps=6, repeats=1, workers=1, baseline_workers=2)


def _config(path: str, work: Path, overrides: list[str]) -> ExperimentConfig:
    """An experiment config with its cache in the work folder."""
    return load_experiment_config(REPO / path, [f"preprocessing.cache_dir={work / 'cache'}", *overrides])


def _cache(config: ExperimentConfig, data: Path, workers: int) -> PreprocessedCache:
    result = preprocess_dataset(data, config.preprocessing, config.split, workers=workers, show_progress=False)
    return open_cache(result.folder)


def run_benchmark(plan: BenchmarkPlan, work: str | os.PathLike, device: torch.device, *,
                  parts: tuple[str, ...] = PARTS, overrides_3d: list[str] | None = None,
                  overrides_2d: list[str] | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run the measurements named in ``parts`` (see :data:`PARTS`); returns JSON-ready results.

    Args:
        plan: sizes and steps (:func:`gpu_plan` or :func:`cpu_plan`).
        work: folder for the synthetic data, caches and predictions (reused when present).
        device: where everything runs.
        parts: subset of :data:`PARTS`.
        overrides_3d, overrides_2d: ``section.key=value`` overrides of the two experiment configs.

    Raises:
        ValueError: an unknown part.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown benchmark part(s) {unknown}; choose from {list(PARTS)}")
    work = Path(work)
    cpus = os.cpu_count() or 1
    data = work / "data"
    if not (data / "kits.json").is_file():
        generate_dataset(data, plan.cases, seed=0, workers=min(plan.cases, cpus),
                         options=SyntheticOptions(matrix=plan.matrix, coverage_mm=plan.coverage_mm),
                         show_progress=show_progress)
    configs = {"3d": _config(plan.config_3d, work, list(overrides_3d or [])),
               "2d": _config(plan.config_2d, work, list(overrides_2d or []))}
    caches: dict[str, PreprocessedCache] = {}  # each experiment's cache, preprocessed (or checked) once
    measurements: list[Measurement] = []
    comparison = None
    steps = [part for part in PARTS if part in parts]
    for part in progress(steps, desc="benchmark", unit="part", disable=not show_progress):
        kind = "2d" if part == "train2d" else "3d"
        if kind not in caches:
            caches[kind] = _cache(configs[kind], data, min(cpus, plan.cases))
        if part == "compare":
            config = configs[kind]
            comparison = compare_training(config, _baseline(config, plan, device),
                                          our_settings(config, device, plan.workers), caches[kind], data, device,
                                          steps=plan.compare_steps)
        else:
            measurements.extend(_run_part(part, plan, work, data, device, configs[kind], caches[kind]))
    result = {"device": _device_name(device), "torch": torch.__version__, "python": platform.python_version(),
              "cpus": cpus, "plan": asdict(plan), "measurements": [asdict(m) for m in measurements],
              "ratios": _ratios(measurements)}
    if comparison is not None:
        result["training_comparison"] = comparison
    return result


def _baseline(config: ExperimentConfig, plan: BenchmarkPlan, device: torch.device) -> Settings:
    """The baseline settings with the plan's number of loader workers."""
    return replace(baseline_settings(config, device), workers=plan.baseline_workers)


def _run_part(part: str, plan: BenchmarkPlan, work: Path, data: Path, device: torch.device,
              config: ExperimentConfig, cache: PreprocessedCache) -> list[Measurement]:
    """The measurements of one timed part (not ``compare``), baseline first."""
    baseline, ours = _baseline(config, plan, device), our_settings(config, device, plan.workers)
    if part in ("train3d", "train2d"):
        slices = prepare_slices(cache, config, work / "slices" / cache.folder.name) if part == "train2d" else None
        variants = [baseline, ours, *(ablation_settings(ours, device) if plan.ablation else [])]
        return [measure_training(config, settings, cache, data, slices, device,
                                 warmup=plan.baseline_warmup if settings is baseline else plan.warmup,
                                 steps=plan.baseline_steps if settings is baseline else plan.steps)
                for settings in variants]
    if part == "sliding_window":
        pad = background_value(cache)
        return [measure_sliding_window(config, s, plan.volume_shape, device, pad, plan.repeats)
                for s in (baseline, ours)]
    ct = _benchmark_ct(plan, work)
    return [measure_segmentation(config, s, cache, ct, work, device, plan.repeats) for s in (baseline, ours)]


def _benchmark_ct(plan: BenchmarkPlan, work: Path) -> Path:
    """One synthetic CT of ``plan.ct_shape`` voxels at ``plan.ct_spacing`` (written once)."""
    folder = work / "ct"
    if not (folder / "kits.json").is_file():
        slices, matrix, _ = plan.ct_shape
        options = SyntheticOptions(matrix=matrix, spacing=plan.ct_spacing,
                                   coverage_mm=(slices * plan.ct_spacing[0],) * 2)
        generate_dataset(folder, 1, seed=7, options=options, show_progress=False)
    return folder / "case_00000" / "imaging.nii.gz"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _ratios(measurements: list[Measurement]) -> dict[str, float]:
    """Ours against the baseline for every measurement both have (> 1: ours is better)."""
    by_name: dict[str, dict[str, Measurement]] = {}
    for m in measurements:
        by_name.setdefault(m.name, {})[m.settings] = m
    return {name: ratio(pair["ours"], pair["baseline"]) for name, pair in by_name.items()
            if "ours" in pair and "baseline" in pair}


#: Targets on one H100 (checked only on CUDA): minimum ratio and minimum (or maximum) value.
GPU_TARGETS = {"resunet3d training": (4.0, ">=", 150.0), "unetr2d training": (3.0, ">=", 200.0),
               "segment one CT (file to file)": (None, "<=", 3.0)}


def format_benchmark(result: dict[str, Any]) -> str:
    """The results as a text table: one row per measurement, ratios ours/baseline, targets on CUDA."""
    rows = [f"device: {result['device']}; torch {result['torch']}; {result['cpus']} CPU cores; "
            "ratio > 1: ours is faster (rates ours/baseline, times baseline/ours); peak GPU GB: baseline / ours",
            f"{'measurement':<30} {'baseline':>17} {'ours':>17} {'ours/baseline':>13} {'peak GPU GB':>11}  target"]
    pairs: dict[str, dict[str, dict[str, Any]]] = {}
    for m in result["measurements"]:
        pairs.setdefault(m["name"], {})[m["settings"]] = m
    on_gpu = "CPU" not in result["device"]
    for name, pair in pairs.items():
        base, ours = pair.get("baseline"), pair.get("ours")
        if base is None and ours is None:
            continue
        unit = (ours or base)["unit"]
        memory = " / ".join(f"{m['peak_memory_gb']:.1f}" if m and m["peak_memory_gb"] is not None else "-"
                            for m in (base, ours))
        share = result["ratios"].get(name)
        rows.append(f"{name:<30} {_value(base, unit):>17} {_value(ours, unit):>17} "
                    f"{(f'{share:.2f}x' if share else '-'):>13} {memory:>11}  {_target(name, share, ours, on_gpu)}")
    for name, pair in pairs.items():
        variants = [(settings, m) for settings, m in pair.items() if settings.startswith("ours without")]
        if variants and "ours" in pair:
            rows.append(f"what each option bought in {name} (ours / ours without it):")
            rows += [f"  {settings[len('ours without '):]:<28} {m['value']:>10.2f} {m['unit']:<10} "
                     f"{pair['ours']['value'] / m['value']:.2f}x" for settings, m in variants]
    for m in result["measurements"]:
        if m["details"].get("stage_seconds"):
            rows.append(f"{m['name']}, {m['settings']}, by stage: " + ", ".join(
                f"{stage} {seconds:.2f} s" for stage, seconds in m["details"]["stage_seconds"].items()))
    comparison = result.get("training_comparison")
    if comparison:
        for name in ("baseline", "ours"):
            c = comparison[name]
            rows.append(f"training comparison, {name}: {c['steps']} steps of batch {c['batch_size']} "
                        f"({c['precision']}): "
                        f"validation kidney Dice {c['kidney_dice']:.3f}, tumour Dice {c['tumour_dice']:.3f}, "
                        f"mean {c['mean_dice']:.3f} ({c['validation_cases']} cases, cache grid)")
        rows.append("ours reaches at least the baseline's mean Dice in the same steps: "
                    + ("yes" if comparison["ours_at_least_baseline"] else "no"))
    return "\n".join(rows)


def _value(measurement: dict[str, Any] | None, unit: str) -> str:
    """A measurement's value with its unit, or ``-`` when it was not taken."""
    return f"{measurement['value']:.2f} {unit}" if measurement else "-"


def _target(name: str, share: float | None, ours: dict[str, Any] | None, on_gpu: bool) -> str:
    """The H100 target of a measurement and whether it is met (targets apply to GPU runs only)."""
    if name not in GPU_TARGETS or ours is None:
        return ""
    minimum_ratio, direction, bound = GPU_TARGETS[name]
    text = " and ".join(filter(None, [f">= {minimum_ratio:g}x" if minimum_ratio else "",
                                      f"{direction} {bound:g} {ours['unit']}"]))
    if not on_gpu:
        return f"({text} on an H100; not applicable on a CPU)"
    met = (minimum_ratio is None or (share or 0) >= minimum_ratio) and (
        ours["value"] >= bound if direction == ">=" else ours["value"] <= bound)
    return f"{text}: {'met' if met else 'NOT met'}"
