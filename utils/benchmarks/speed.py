"""Measurements behind ``scripts/benchmark.py``: the baseline configuration against ours, one device, one run.

The **baseline** is the common way of training these models: a plain per-sample dataset (3D:
every patch loads, reorients, resamples and normalises its case's NIfTI files with MONAI; 2D:
every slice is read from a prepared ``.npy`` file), batch 4, fp16 autocast with a gradient
scaler, 4 loader workers, and sliding windows one at a time. **Ours** is the experiment
config (``configs/resunet3d.yaml``, ``configs/unetr2d.yaml`` on a GPU): the memory-mapped cache,
its batch size and precision, and its ``performance`` section (channels-last, ``torch.compile``,
augmentation on the device, fused AdamW, pinned memory and prefetching), batched windows and
on-device stitching. Both use the same network, the same augmentation draws and the same loss,
so a ratio measures the pipeline and the settings, nothing else.

Each measurement (:class:`Measurement`) gives a rate or a time and, on CUDA, the peak memory
allocated. Every timed training step is the engine's own :func:`utils.training.step.train_step`,
run through Hugging Face ``accelerate`` as training runs it (:func:`train_steps`): augmentation on
the device, forward under ``accelerator.autocast()``, loss, the per-step reduction of the
non-finite and stop flags, ``accelerator.backward`` (fp16: with accelerate's gradient scaler),
clipping, the optimiser and scheduler steps built as training builds them, then ``loss.item()``
as the engine's progress bar does. Only the engine's bookkeeping (progress, checkpoints, wandb)
is left out.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from accelerate import Accelerator
from monai.inferers import sliding_window_inference
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)
from torch.utils.data import DataLoader, Dataset

from utils.benchmarks.data_loading import PerSamplePatchDataset
from utils.config.experiment import ExperimentConfig, PerformanceConfig, SlidingWindowConfig
from utils.config.loading import config_as_dict
from utils.datasets.augmentation import SampleAugmenter
from utils.datasets.patches import background_value, build_patch_datasets, collate_samples, read_region
from utils.datasets.slices import build_slice_datasets, write_slice_dataset
from utils.inference.predict import predict_volume_logits
from utils.inference.segment import load_segmentation_model, segment_file
from utils.metrics.scoring import score_case, summarise_scores
from utils.networks.checkpoints import save_checkpoint
from utils.networks.losses import build_loss
from utils.networks.models import build_model, model_input_size, spatial_dims
from utils.preprocessing.cache import PreprocessedCache
from utils.preprocessing.resampling import CANONICAL_AXCODES
from utils.training.optimisation import build_optimiser, build_scheduler
from utils.training.performance import (
    CompiledForward,
    build_accelerator_for,
    configure_backends,
    experiment_precision,
    loader_options,
    memory_format,
)
from utils.training.step import StepParts, train_step

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclass(frozen=True)
class Settings:
    """How one configuration trains and predicts.

    Attributes:
        name: ``"baseline"`` or ``"ours"``. batch_size: samples per step.
        precision: accelerate's ``mixed_precision``: ``"fp16"`` (with its gradient scaler), ``"bf16"`` or ``"no"``.
        pipeline: ``"per_sample"`` (the plain datasets) or ``"cache"`` (ours).
        workers: loader processes. performance: speed options (see :mod:`utils.training.performance`).
        sliding_window: window settings for whole-volume prediction.
    """

    name: str
    batch_size: int
    precision: str
    pipeline: str
    workers: int
    performance: PerformanceConfig
    sliding_window: SlidingWindowConfig


def baseline_settings(config: ExperimentConfig, device: torch.device) -> Settings:
    """The baseline: batch 4, fp16 (fp32 on the CPU, which has no fast fp16), 4 workers, one window at a time."""
    plain = PerformanceConfig(channels_last=False, compile=False, augment_on_device=False, fused_optimiser=False,
                              pin_memory=False, prefetch_factor=2, cudnn_benchmark=False, tf32=False)
    windows = replace(config.sliding_window, sw_batch_size=1)
    return Settings("baseline", 4, "fp16" if device.type == "cuda" else "no", "per_sample", 4, plain, windows)


def our_settings(config: ExperimentConfig, device: torch.device, workers: int) -> Settings:
    """Ours: the experiment's batch size, training precision (``auto`` resolved), ``performance`` and windows."""
    precision = experiment_precision(config, device)
    return Settings("ours", config.training.batch_size, precision, "cache", workers, config.performance,
                    config.sliding_window)


#: Options of ours that an ablation turns off one at a time: label, change to :class:`Settings`.
ABLATIONS = {
    "cache": lambda s: replace(s, pipeline="per_sample"),
    "mixed_precision": lambda s: replace(s, precision="no"),
    "channels_last": lambda s: replace(s, performance=replace(s.performance, channels_last=False)),
    "compile": lambda s: replace(s, performance=replace(s.performance, compile=False)),
    "augment_on_device": lambda s: replace(s, performance=replace(s.performance, augment_on_device=False)),
    "fused_optimiser": lambda s: replace(s, performance=replace(s.performance, fused_optimiser=False)),
    "pin_memory": lambda s: replace(s, performance=replace(s.performance, pin_memory=False)),
}


#: Options that act only on a GPU (pinned memory, the fused CUDA kernel).
GPU_ONLY_OPTIONS = ("fused_optimiser", "pin_memory")


def ablation_settings(ours: Settings, device: torch.device) -> list[Settings]:
    """Ours with each option that is on (and acts on ``device``) turned off, one at a time.

    The variants are named ``ours without <option>``.
    """
    variants = []
    for option, change in ABLATIONS.items():
        if option in GPU_ONLY_OPTIONS and device.type != "cuda":
            continue
        if option == "cache":
            enabled = ours.pipeline == "cache"
        elif option == "mixed_precision":
            enabled = ours.precision != "no"
        else:
            enabled = getattr(ours.performance, option)
        if enabled:
            variants.append(replace(change(ours), name=f"ours without {option}"))
    return variants


@dataclass
class Measurement:
    """One timed quantity: ``value`` in ``unit``, peak CUDA memory (GB, ``None`` on the CPU), details."""

    name: str
    settings: str
    value: float
    unit: str
    peak_memory_gb: float | None
    details: dict[str, Any] = field(default_factory=dict)


def synchronise(device: torch.device) -> None:
    """Wait for queued GPU work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory count (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated since :func:`reset_peak_memory`, in GB (``None`` on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


class NpySliceDataset(Dataset):
    """The baseline's 2D dataset: prepared slices (``scripts/prepare_2D_dataset.py``) read per item, augmented.

    Item ``i`` picks a training slice uniformly with ``default_rng([seed, 0, i])`` and applies the
    same augmentation as :class:`utils.datasets.slices.SliceDataset`. Items: ``image`` ``(1, S, S)``
    float32, ``label`` uint8.
    """

    def __init__(self, folder: Path, augmenter: SampleAugmenter, spacing: tuple[float, float], pad_value: float,
                 samples: int, seed: int = 0):
        with open(folder / "slices.csv", newline="") as handle:
            self.rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
        self.folder, self.augmenter, self.spacing = folder, augmenter, spacing
        self.pad_value, self.samples, self.seed = pad_value, samples, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 0, index])
        row = self.rows[int(rng.integers(len(self.rows)))]
        image = np.load(self.folder / row["image"]).astype(np.float32)
        label = np.load(self.folder / row["label"])
        draw = self.augmenter.draw_spatial(rng, image.shape, self.spacing)
        centre = tuple(n // 2 for n in image.shape)
        image = torch.from_numpy(read_region(image, centre, draw.region_size, self.pad_value))[None]
        label = torch.from_numpy(read_region(label, centre, draw.region_size, 0, np.uint8))[None]
        image, label = self.augmenter.apply(image, label, draw, rng)
        return {"image": image, "label": label}


def build_training_data(config: ExperimentConfig, settings: Settings, cache: PreprocessedCache, data_dir: Path,
                        slices_dir: Path | None, samples: int) -> tuple[Dataset, SampleAugmenter | None]:
    """The training dataset of ``settings`` (and the augmenter :func:`utils.datasets.patches.augment_batch` needs)."""
    two_d = spatial_dims(config.model) == 2
    if settings.pipeline == "cache":
        if two_d:
            dataset = build_slice_datasets(cache, replace(config.slices, samples_per_epoch=samples),
                                           config.augmentation, fold=config.training.fold, seed=config.training.seed)[0]
        else:
            dataset = build_patch_datasets(cache, replace(config.patches, samples_per_epoch=samples),
                                           config.augmentation, fold=config.training.fold, seed=config.training.seed)[0]
        dataset.defer_augmentation = settings.performance.augment_on_device
        return dataset, dataset.augmenter
    if two_d:
        if slices_dir is None:
            raise ValueError("the per-sample 2D pipeline needs a folder of prepared slices")
        spacing = tuple(float(s) for s in cache.plan["preprocessing"]["target_spacing"][1:])
        return NpySliceDataset(slices_dir, SampleAugmenter(config.augmentation, 2), spacing, background_value(cache),
                               samples, seed=config.training.seed), None
    train_ids, _ = cache.split(config.training.fold)
    return PerSamplePatchDataset(cache, data_dir, replace(config.patches, samples_per_epoch=samples),
                                 config.augmentation, case_ids=train_ids, seed=config.training.seed), None


def build_network(config: ExperimentConfig, settings: Settings, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The experiment's network on ``device`` in the settings' memory format, seeded."""
    torch.manual_seed(seed)
    layout = memory_format(settings.performance, spatial_dims(config.model))
    return build_model(config.model, model_input_size(config)).to(device, memory_format=layout)


def build_accelerator(settings: Settings, device: torch.device) -> Accelerator:
    """An ``Accelerator`` with the settings' mixed precision on ``device``, for one measurement.

    The benchmark trains several settings in one process (on a GPU the baseline in fp16, ours in
    the config's precision); :func:`utils.training.performance.build_accelerator_for` resets
    accelerate's process-wide precision between them, as training does between runs. The
    benchmark is one process on one device; each measurement builds and drops its own accelerator.

    Raises:
        ValueError: accelerate's device (set by the first accelerator of the process) is not ``device``.
    """
    accelerator = build_accelerator_for(settings.precision, device)
    if accelerator.device.type != device.type or (accelerator.device.index or 0) != (device.index or 0):
        raise ValueError(f"the benchmark runs on {device} but accelerate's device in this process is "
                         f"{accelerator.device}; run the benchmark in a fresh process (scripts/benchmark.py)")
    return accelerator


def prepare_step(config: ExperimentConfig, settings: Settings, model: torch.nn.Module,
                 augmenter: SampleAugmenter | None, device: torch.device) -> StepParts:
    """The engine's step parts for ``model``, built and prepared as :func:`utils.training.setup.set_up_run` does.

    The optimiser and the per-iteration scheduler are training's (:func:`build_optimiser`,
    :func:`build_scheduler`), the schedule as long as training's with the settings' batch size:
    ``samples_per_epoch // batch_size`` iterations per epoch for ``training.epochs`` epochs.
    """
    configure_backends(settings.performance, device)
    accelerator = build_accelerator(settings, device)
    optimiser = build_optimiser(model, config.optimiser, fused=None if settings.performance.fused_optimiser else False)
    samples = (config.slices if spatial_dims(config.model) == 2 else config.patches).samples_per_epoch
    scheduler = build_scheduler(optimiser, config.optimiser, epochs=config.training.epochs,
                                iterations_per_epoch=max(1, samples // settings.batch_size))
    model, optimiser = accelerator.prepare(model, optimiser)
    loss = build_loss(config.loss, config.dataset)
    return StepParts(accelerator, model, CompiledForward(model, settings.performance), loss,
                     optimiser, scheduler, augmenter, memory_format(settings.performance, spatial_dims(config.model)),
                     config.optimiser.grad_clip_norm)


def train_steps(config: ExperimentConfig, settings: Settings, model: torch.nn.Module, dataset: Dataset,
                augmenter: SampleAugmenter | None, device: torch.device, *, warmup: int, steps: int,
                on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``warmup + steps`` engine steps (:func:`train_step`); time the last ``steps`` (loading included).

    Each step is the engine's, through an accelerator of the settings' precision
    (:func:`prepare_step`); ``loss.item()`` follows each, as in the engine's progress bar. The
    loader reads ``dataset`` in order (item ``i`` is the ``i``-th sample of training's first epoch).

    Returns:
        ``samples_per_second``, ``seconds``, ``data_wait_fraction`` (share of the timed wall time
        spent waiting for the loader), ``compiled`` (whether compilation held), ``compile_failure``,
        ``final_loss``, ``losses`` (every step's, warm-up included) and ``skipped_steps`` (non-finite
        losses: no update, as training's ``nonfinite_loss: skip``).
    """
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=collate_samples,
                        drop_last=True, **loader_options(settings.performance, settings.workers, device))
    parts = prepare_step(config, settings, model, augmenter, device)
    parts.model.train()
    batches: Iterator[dict[str, Any]] = iter(loader)
    started = waited = 0.0
    losses: list[float] = []
    skipped = 0
    for step in range(warmup + steps):
        if step == warmup:
            synchronise(device)
            reset_peak_memory(device)
            started, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        outcome = train_step(parts, batch)
        skipped += not outcome.updated
        losses.append(outcome.loss.item())
        if on_step is not None:
            on_step(step)
    synchronise(device)
    seconds = time.perf_counter() - started
    del batches, loader
    parts.accelerator.free_memory()
    return {"samples_per_second": steps * settings.batch_size / seconds, "seconds": seconds,
            "data_wait_fraction": waited / seconds, "compiled": parts.forward.is_compiled,
            "compile_failure": parts.forward.failure, "final_loss": losses[-1] if losses else math.nan,
            "losses": losses, "skipped_steps": skipped}


def measure_training(config: ExperimentConfig, settings: Settings, cache: PreprocessedCache, data_dir: Path,
                     slices_dir: Path | None, device: torch.device, *, warmup: int, steps: int) -> Measurement:
    """End-to-end training throughput (samples/s) and peak memory of one configuration."""
    dataset, augmenter = build_training_data(config, settings, cache, data_dir, slices_dir,
                                             (warmup + steps) * settings.batch_size)
    model = build_network(config, settings, device)
    result = train_steps(config, settings, model, dataset, augmenter, device, warmup=warmup, steps=steps)
    unit = "slices/s" if spatial_dims(config.model) == 2 else "patches/s"
    name = f"{config.model.name} training"
    details = {k: v for k, v in result.items() if k != "samples_per_second"}
    details.update(batch_size=settings.batch_size, precision=settings.precision, pipeline=settings.pipeline,
                   workers=settings.workers, steps=steps, warmup_steps=warmup)
    return Measurement(name, settings.name, result["samples_per_second"], unit, peak_memory_gb(device), details)


def inference_precision(settings: Settings, device: torch.device) -> str:
    """The precision whole-volume prediction runs in: the settings' on a GPU, float32 on a CPU.

    As :func:`utils.inference.segment.segment_file` does: on a CPU every model predicts in float32,
    whatever precision it was trained in.
    """
    return settings.precision if device.type == "cuda" else "no"


def baseline_windows(model: torch.nn.Module, image: torch.Tensor, settings: Settings, pad_value: float) -> torch.Tensor:
    """The baseline's sliding windows: MONAI's inferer on the model, autocast as configured, one window per pass."""
    dtype = AUTOCAST[inference_precision(settings, image.device)]
    window = settings.sliding_window
    with torch.no_grad(), torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return sliding_window_inference(image, roi_size=tuple(window.roi_size), sw_batch_size=window.sw_batch_size,
                                        predictor=model, overlap=window.overlap, mode=window.blend, cval=pad_value)


def measure_sliding_window(config: ExperimentConfig, settings: Settings, shape: tuple[int, int, int],
                           device: torch.device, pad_value: float, repeats: int) -> Measurement:
    """Seconds to predict labels of one preprocessed volume of ``shape`` (median of ``repeats`` after a warm-up)."""
    model = build_network(config, settings, device).eval().requires_grad_(False)
    configure_backends(settings.performance, device)
    image = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    windows = replace(config, sliding_window=settings.sliding_window)
    precision = inference_precision(settings, device)

    def predict() -> torch.Tensor:
        if settings.name == "baseline":
            return baseline_windows(model, image, settings, pad_value).argmax(dim=1)
        return predict_volume_logits(model, image, windows, autocast_dtype=AUTOCAST[precision],
                                     pad_value=pad_value).argmax(dim=1)

    times = _repeat(predict, device, repeats)
    return Measurement("sliding-window inference", settings.name, float(np.median(times)), "s", peak_memory_gb(device),
                       {"volume": list(shape), "seconds_each": times,
                        "sw_batch_size": settings.sliding_window.sw_batch_size,
                        "overlap": settings.sliding_window.overlap, "precision": precision})


def _repeat(work: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Run ``work`` once to warm up, then ``repeats`` timed times (GPU work included); peak memory reset first."""
    work()
    synchronise(device)
    reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        synchronise(device)
        times.append(time.perf_counter() - started)
    return times


def write_benchmark_checkpoint(config: ExperimentConfig, cache: PreprocessedCache, path: Path, seed: int = 0) -> Path:
    """A checkpoint of the untrained network with the cache's preprocessing plan, loadable by ``segment``."""
    torch.manual_seed(seed)
    model = build_model(config.model, model_input_size(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, {"model": model.state_dict(), "config": config_as_dict(config),
                                  "preprocessing_plan": cache.plan})


def baseline_segment_file(ct_path: Path, output_path: Path, model: torch.nn.Module, settings: Settings,
                          cache: PreprocessedCache, device: torch.device) -> None:
    """The baseline's segmentation of one CT, as in MONAI's tutorials: load, reorient, resample and
    normalise with transforms, slide windows, argmax, invert the transforms onto the CT's grid, save."""
    plan, norm = cache.plan["preprocessing"], cache.plan["normalisation"]
    low, high = norm["clip_low_hu"], norm["clip_high_hu"]
    pre = Compose([
        LoadImaged(keys="image", image_only=False), EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="".join(CANONICAL_AXCODES), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys="image", pixdim=plan["target_spacing"], mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=(low - norm["mean_hu"]) / norm["std_hu"],
                             b_max=(high - norm["mean_hu"]) / norm["std_hu"], clip=True),
    ])
    data = pre({"image": str(ct_path)})
    image = data["image"].as_tensor()[None].to(device)
    data["pred"] = baseline_windows(model, image, settings, background_value(cache))[0].cpu()
    post = Compose([AsDiscreted(keys="pred", argmax=True),
                    Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)])
    labels = np.asarray(post(data)["pred"][0]).astype(np.uint8)
    affine = nib.load(str(ct_path)).affine
    nib.save(nib.Nifti1Image(labels, affine), str(output_path))


def measure_segmentation(config: ExperimentConfig, settings: Settings, cache: PreprocessedCache, ct_path: Path,
                         work: Path, device: torch.device, repeats: int) -> Measurement:
    """Seconds from reading the CT's NIfTI to writing its label NIfTI (median of ``repeats`` after a warm-up)."""
    output = work / f"prediction_{settings.name}.nii.gz"
    if settings.name == "baseline":
        model = build_network(config, settings, device).eval().requires_grad_(False)

        def segment() -> None:
            baseline_segment_file(ct_path, output, model, settings, cache, device)
    else:
        checkpoint = write_benchmark_checkpoint(replace(config, sliding_window=settings.sliding_window), cache,
                                                work / "checkpoint" / "best.pt")
        segmenter = load_segmentation_model(checkpoint, device=device)

        def segment() -> None:
            stages.append({})
            segment_file(ct_path, output, segmenter, timings=stages[-1])
    stages: list[dict[str, float]] = []
    times = _repeat(segment, device, repeats)
    written = nib.load(str(output))
    source = nib.load(str(ct_path))
    if written.shape != source.shape or not np.allclose(written.affine, source.affine, atol=1e-4):
        raise RuntimeError(f"{output}: the {settings.name} segmentation is not on the CT's grid "
                           f"({written.shape} vs {source.shape})")
    details = {"ct_shape": list(source.shape), "seconds_each": times,
               "precision": inference_precision(settings, device)}
    if stages:  # ours: median seconds of each stage over the timed runs
        details["stage_seconds"] = {name: float(np.median([s[name] for s in stages[1:]])) for name in stages[-1]}
    return Measurement("segment one CT (file to file)", settings.name, float(np.median(times)), "s",
                       peak_memory_gb(device), details)


def compare_training(config: ExperimentConfig, baseline: Settings, ours: Settings, cache: PreprocessedCache,
                     data_dir: Path, device: torch.device, *, steps: int) -> dict[str, Any]:
    """Train both configurations ``steps`` steps from the same initial weights, then score the validation cases.

    Both read the cache (the data pipeline changes speed, not samples: the same augmentation of
    the same cases), so the difference is the settings: batch size, precision, compilation and
    layout. Scores are per-case KiTS19 Dice on the cache grid, averaged (see :func:`score_case`).
    """
    _, validation = build_patch_datasets(cache, config.patches, None, fold=config.training.fold)
    results = {}
    for settings in (baseline, ours):
        cached = replace(settings, pipeline="cache")
        dataset, augmenter = build_training_data(config, cached, cache, data_dir, None, steps * settings.batch_size)
        model = build_network(config, cached, device)
        timing = train_steps(config, cached, model, dataset, augmenter, device, warmup=0, steps=steps)
        model.eval()
        windows = replace(config, sliding_window=settings.sliding_window)
        per_case = []
        for item in validation:
            image = item["image"][None].to(device)
            logits = predict_volume_logits(model, image, windows, autocast_dtype=AUTOCAST[settings.precision],
                                           pad_value=background_value(cache))
            per_case.append(score_case(logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy(), item["label"][0].numpy()))
        summary = summarise_scores(per_case)
        results[settings.name] = {"steps": steps, "batch_size": settings.batch_size, "precision": settings.precision,
                                  "final_loss": timing["final_loss"], "kidney_dice": summary["kidney_dice"]["mean"],
                                  "tumour_dice": summary["tumour_dice"]["mean"], "mean_dice": summary["mean_dice"],
                                  "validation_cases": len(per_case), "seconds": timing["seconds"]}
    results["ours_at_least_baseline"] = results["ours"]["mean_dice"] >= results["baseline"]["mean_dice"]
    return results


def prepare_slices(cache: PreprocessedCache, config: ExperimentConfig, folder: Path) -> Path:
    """The baseline's prepared ``.npy`` slices of the cache (written once)."""
    if not (folder / "slices.csv").is_file():
        write_slice_dataset(cache, folder, config.slices, fold=config.training.fold, show_progress=False)
    return folder


def ratio(ours: Measurement, baseline: Measurement) -> float:
    """How many times better ours is: rates ours/baseline, times baseline/ours."""
    return ours.value / baseline.value if ours.unit.endswith("/s") else baseline.value / ours.value
