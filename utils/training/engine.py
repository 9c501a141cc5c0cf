"""The training engine both models share: one function, :func:`train`, for notebooks and scripts.

What a run does, in order:

1. **Set-up** (:mod:`utils.training.setup`): seeds, a new run folder (or the one being resumed)
   checked writable before anything else, the resolved config saved (:func:`~utils.training.setup.start_run`);
   the data preprocessed or checked up to date, once (:func:`~utils.training.setup.prepare_cache`);
   then from that cache datasets, model, optimiser and scheduler built, and on resume every
   state restored from ``last.pt`` (:func:`~utils.training.setup.set_up_run`).
2. **Epochs**: each batch is one :func:`utils.training.step.train_step` (the step the benchmark
   times); class-balanced augmented samples, 3D patches for ``resunet3d`` and axial
   slices for ``unetr2d`` (sample ``i`` of epoch ``e`` depends only on
   ``(seed, e, i)``, each process taking every ``world_size``-th one), mixed precision and
   data parallelism through Hugging Face ``accelerate``, gradient clipping, the learning rate
   stepped per iteration, a non-finite loss stopping the run (or skipped and counted). The
   ``performance`` settings (:mod:`utils.training.performance`) decide how fast, not what: channels-last,
   ``torch.compile`` with a fallback, augmentation on the device, fused AdamW, pinned prefetching.
3. **Validation** every ``validate_every`` epochs on whole preprocessed validation volumes
   (sliding windows for the 3D model; every axial slice for the 2D one, stacked back into a
   volume), per case the Dice of the dataset's evaluation regions with one function
   (:func:`utils.metrics.scoring.score_case`), averaged over cases: KiTS19 kidney (label > 0)
   and tumour (label 2), KiTS23 kidney and masses (labels 1-3), masses (2, 3) and tumour (2);
   ``best.pt`` follows their mean, ``mean_dice``. These figures are computed on the cache's grid
   (``validation_space`` in the log says so), not the CT's original one.
4. **Records**: ``last.pt`` every ``checkpoint_every`` epochs, one line per epoch in
   ``training_progress.json`` and ``train.log``, optional wandb. Only the main process writes.

``--resume`` continues from the last checkpoint: a run killed at any moment loses at most the
work since that checkpoint, and on CPU with ``deterministic: true`` reproduces the per-epoch
losses of an uninterrupted run (a run killed before its first checkpoint restarts from scratch).
A resume is checked before the run folder changes (:mod:`utils.training.resume`): only some
settings may change, and the data must be the run's own (``data.json``). SIGTERM or SIGUSR1
(a scheduler's pre-emption or time-limit warning) lose nothing: the run saves ``last.pt``
after the current step, mid-epoch, and raises :class:`TrainingInterrupted`; resuming
continues with the next batch of that epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from utils.config.experiment import ExperimentConfig
from utils.data.case_discovery import resolve_data_dir
from utils.data.dataset_definitions import DatasetDefinition, get_dataset
from utils.data.progress import progress
from utils.inference.predict import predict_volume_logits
from utils.metrics.scoring import dice_names, score_case, summarise_scores
from utils.networks.checkpoints import CheckpointError, capture_rng_state, save_checkpoint
from utils.training.resume import plan_resume
from utils.training.setup import RunState, mark_logged, prepare_cache, set_up_run, start_run
from utils.training.step import train_step
from utils.training.stop_signals import StopSignals

logger = logging.getLogger(__name__)

VALIDATION_SPACE = "preprocessed cache grid (resampled and cropped), not the original CT grid"
#: Validation names a label whose predicted voxels are fewer than this share of its true voxels.
UNPREDICTED_FRACTION = 0.01


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


class TrainingInterrupted(RuntimeError):
    """A stop signal (SIGTERM/SIGUSR1) arrived; ``last.pt`` holds the run up to the last step.

    Attributes:
        run_folder: the folder to resume (``--resume`` or ``--auto-resume``).
        signal_name: the signal received.
    """

    def __init__(self, message: str, run_folder: Path, signal_name: str):
        super().__init__(message)
        self.run_folder = run_folder
        self.signal_name = signal_name


@dataclass(frozen=True)
class TrainingResult:
    """What a finished run left behind: its folder, per-epoch records (main process only) and the best epoch."""

    run_folder: Path
    records: list[dict[str, Any]]
    best_epoch: int | None
    best_score: float | None
    is_main_process: bool = True


def train(config: ExperimentConfig, *, data_dir: str | Path | None = None, resume: str | Path | None = None,
          wandb: bool | None = None, show_progress: bool = True,
          epoch_callback: Callable[[dict[str, Any]], None] | None = None) -> TrainingResult:
    """Train a model as configured; the one entry point of scripts and notebooks.

    Args:
        config: the experiment. When resuming, pass the run folder's ``config.yaml`` (as
            ``scripts/train_3d_unet.py --resume`` does); raising ``training.epochs`` extends a run.
            Only the settings of :data:`utils.training.resume.RESUMABLE_KEYS` may differ from the
            run's; the run folder is changed only once the resume has loaded its checkpoint.
        data_dir: raw KiTS-layout folder of ``config.dataset`` (default ``config.data_dir``, then ``KITS19_DATA``;
            when resuming, the folder the run recorded in its ``data.json``). The resolved folder
            is what the run's ``config.yaml`` and checkpoints record as ``data_dir``.
        resume: a run folder to continue from its ``last.pt`` (from scratch when it has none yet).
        wandb: force wandb on or off (``None``: ``config.wandb.enabled``).
        show_progress: tqdm bars (main process only).
        epoch_callback: called after every epoch, once its checkpoints and progress line are
            written, with that epoch's record (``epoch``; ``mean_dice`` and the region Dice keys
            of :func:`validate` on validation epochs, else absent); called on every process with the
            same record. It may raise to stop the run (e.g. ``optuna.TrialPruned``): the
            exception propagates after the run is closed, and the run folder can be resumed.

    Raises:
        utils.training.resume.ResumeRefused: a resume changing settings it may not, or on other
            data than the run's (nothing in the run folder is changed).
        NonFiniteLossError: a NaN/inf loss with ``nonfinite_loss: stop`` (``last.pt`` stays intact).
        TrainingInterrupted: SIGTERM or SIGUSR1 arrived (a scheduler's pre-emption or time limit);
            ``last.pt`` was saved after the last finished step, and resuming continues exactly there.
        utils.networks.checkpoints.CheckpointError: a checkpoint could not be written, e.g. a full disk
            (the previous stays intact; the error is logged to ``train.log``).
        OSError: the run folder is not writable (before the first epoch).
        ValueError: bad data with ``on_bad_case: error``, or inconsistent settings.
    """
    plan = None
    if resume is not None:  # checked before the run folder is touched
        plan = plan_resume(resume, config, data_dir)
        config, data = plan.config, plan.data_dir
    else:  # resolved before the run folder is created, and recorded as the run's data_dir
        data = resolve_data_dir(data_dir if data_dir is not None else config.data_dir)
        config = replace(config, data_dir=str(data.resolve()))
    start = start_run(config, resume=resume)
    try:
        cache = prepare_cache(config, data, start.accelerator)
        state = set_up_run(config, cache, resume=resume, wandb=wandb, start=start, plan=plan)
    except BaseException as error:
        start.abandon(error)
        raise
    try:
        with StopSignals() as stop:
            for epoch in range(state.start_epoch, state.config.training.epochs):
                record = _run_epoch(state, epoch, show_progress, stop)
                _finish_epoch(state, epoch, record)
                if epoch_callback is not None:
                    epoch_callback(record)
    except (NonFiniteLossError, CheckpointError, OSError) as error:
        if state.accelerator.is_main_process:  # into train.log too, before it is detached
            logger.error("training stopped: %s", error)
            mark_logged(error)
        raise
    finally:
        state.close()
    return TrainingResult(state.folder, state.progress.records if state.progress else [], state.best_epoch,
                          state.best_score, state.accelerator.is_main_process)


def _run_epoch(state: RunState, epoch: int, show_progress: bool, stop: StopSignals) -> dict[str, Any]:
    """Train one epoch (or the rest of a stopped one); returns its record (losses reduced over processes)."""
    accelerator, training = state.accelerator, state.config.training
    done = state.epoch_progress or {"batches": 0, "steps": 0, "skipped": 0, "samples": 0, "loss_sum": 0.0,
                                    "seconds": 0.0}
    state.epoch_progress = None
    state.model.train()
    state.sampler.set_epoch(epoch, skip=done["batches"] * training.batch_size)
    started = time.perf_counter() - done["seconds"]
    loss_sum = torch.tensor(done["loss_sum"], dtype=torch.float64, device=accelerator.device)
    batches, steps, skipped, samples = done["batches"], done["steps"], done["skipped"], done["samples"]
    # In a log file the epoch's own line follows at its end: a progress line only for epochs over 30 s.
    bar = progress(state.loader, desc=f"epoch {epoch + 1}/{training.epochs}", unit="batch", leave=False,
                   initial=batches, min_seconds=30, disable=not (show_progress and accelerator.is_main_process))
    parts = state.step_parts
    for batch in bar:
        outcome = train_step(parts, batch, stop)
        loss = outcome.loss
        if outcome.stopping:
            position = {"batches": batches, "steps": steps, "skipped": skipped, "samples": samples,
                        "loss_sum": loss_sum.item(), "seconds": time.perf_counter() - started}
            _stop_on_signal(state, epoch, position, stop.received or "a stop signal on another process")
        batches += 1
        if not outcome.finite or not outcome.finite_gradients:
            if training.nonfinite_loss == "stop":
                what = "loss" if not outcome.finite else f"gradients (loss {loss.item():.4f})"
                raise NonFiniteLossError(
                    f"non-finite {what} at epoch {epoch + 1}, step {batches} (iteration {state.iteration + 1}); "
                    f"nothing was updated and the last checkpoint in {state.folder} is intact. Lower the learning "
                    "rate, check the data, or set training.nonfinite_loss=skip to skip such steps")
            skipped += 1
            state.optimiser.zero_grad(set_to_none=True)
            continue
        state.iteration += 1
        steps += 1
        samples += outcome.samples
        loss_sum += loss.double()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if state.iteration > state.wandb_logged_until:  # after a resume: steps wandb has seen
            state.tracker.log({"train/loss": loss.item(), "train/learning_rate": state.learning_rate},
                              step=state.iteration)
    totals = accelerator.reduce(torch.tensor([loss_sum.item(), steps, skipped, samples], dtype=torch.float64,
                                             device=accelerator.device), reduction="sum").tolist()
    seconds = time.perf_counter() - started
    record = {"epoch": epoch + 1, "train_loss": totals[0] / totals[1] if totals[1] else math.nan,
              "learning_rate": state.learning_rate, "epoch_seconds": seconds,
              "samples_per_second": totals[3] / seconds, "skipped_steps": int(totals[2]),
              "world_size": accelerator.num_processes}
    state.sampler.set_epoch(epoch)
    record.update(_sample_sharding(state, epoch))
    return record


def _stop_on_signal(state: RunState, epoch: int, progress: dict[str, Any], signal_name: str) -> None:
    """Save ``last.pt`` at this point of the epoch, then raise :class:`TrainingInterrupted`."""
    if state.accelerator.is_main_process:
        checkpoint = _checkpoint_state(state, epoch, {"epoch": epoch})  # the epoch in progress counts as not done
        checkpoint["epoch_progress"] = progress
        save_checkpoint(state.folder / "last.pt", checkpoint)
        logger.warning("%s: saved %s at epoch %d, batch %d (iteration %d); resume with --resume %s",
                       signal_name, state.folder / "last.pt", epoch + 1, progress["batches"], state.iteration,
                       state.folder)
    state.accelerator.wait_for_everyone()
    raise TrainingInterrupted(f"stopped by {signal_name} at epoch {epoch + 1}, batch {progress['batches']}; "
                              f"{state.folder / 'last.pt'} holds the run up to there: continue it with "
                              f"--resume {state.folder}", state.folder, signal_name)


def _sample_sharding(state: RunState, epoch: int) -> dict[str, Any]:
    """Samples each process drew this epoch, and whether the processes' samples were disjoint."""
    indices = gather_object([list(state.sampler)])
    flat = [i for part in indices for i in part]
    return {"samples_per_rank": [len(part) for part in indices], "ranks_disjoint": len(flat) == len(set(flat))}


def _finish_epoch(state: RunState, epoch: int, record: dict[str, Any]) -> None:
    """Validate when due, then write checkpoints, the progress log, the text log and wandb."""
    training = state.config.training
    last = epoch + 1 == training.epochs
    if (epoch + 1) % training.validate_every == 0 or last:
        record.update(validate(state))
        if last and record["unpredicted"] and state.accelerator.is_main_process:
            logger.warning("the final model hardly predicts %s (predicted voxels as a share of the true ones, over "
                           "its %d validation cases, cache grid): it does not learn that class, whatever its region "
                           "Dice says", record["unpredicted"], record["validation_cases"])
    score = record.get("mean_dice")
    improved = score is not None and (state.best_score is None or score > state.best_score)
    if improved:
        state.best_epoch, state.best_score = epoch + 1, record["mean_dice"]
    record["best_epoch"] = state.best_epoch
    if state.accelerator.is_main_process:
        checkpoint = _checkpoint_state(state, epoch + 1, record)
        if improved:
            save_checkpoint(state.folder / "best.pt", checkpoint)
        if (epoch + 1) % training.checkpoint_every == 0 or last or improved:
            save_checkpoint(state.folder / "last.pt", checkpoint)
        state.progress.append(record)
        state.tracker.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, (int, float))},
                          step=state.iteration)
        logger.info(_summary_line(record, training.epochs))
    state.accelerator.wait_for_everyone()


def describe_selection_score(dataset: DatasetDefinition | str) -> str:
    """What ``mean_dice`` (the score ``best.pt`` follows) averages, for messages.

    Returns:
        ``"mean of kidney and tumour Dice"`` for KiTS19, ``"mean of kidney_and_masses, masses
        and tumour Dice"`` for KiTS23.
    """
    names = get_dataset(dataset).region_names
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"mean of {listed} Dice"


@torch.no_grad()
def validate(state: RunState) -> dict[str, Any]:
    """Per-case Dice and loss on whole validation volumes, split over processes, averaged over cases.

    Cases are scored with the run's dataset (``config.dataset``): its evaluation regions' Dice on
    the cache grid.

    Returns:
        ``val_loss``; one ``<region>_dice`` per region in the dataset's order (KiTS19
        ``kidney_dice``, ``tumour_dice``; KiTS23 ``kidney_and_masses_dice``, ``masses_dice``,
        ``tumour_dice``), each the mean over cases; ``mean_dice`` (their mean, the score
        ``best.pt`` follows); ``validation_cases``, ``validation_space``, ``unpredicted``
        (:func:`unpredicted_labels`: the labels the cases hold and the model hardly predicts, ``""``
        when none) and ``per_case`` (each case's scores, sorted by case id).
    """
    accelerator = state.accelerator
    dataset = get_dataset(state.config.dataset)
    model = state.model
    model.eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    per_case, counts = [], []
    for index in range(accelerator.process_index, len(state.validation), accelerator.num_processes):
        item = state.validation[index]
        image = item["image"][None].to(accelerator.device)
        label = item["label"][None].to(accelerator.device)
        logits = predict_volume_logits(model, image, state.config, autocast_dtype=dtype,
                                       pad_value=state.pad_value)
        prediction, truth = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy(), label[0, 0].cpu().numpy()
        scores = score_case(prediction, truth, dataset=dataset)
        scores["val_loss"] = float(state.loss(logits, label))
        per_case.append({"case_id": item["case_id"], **scores})
        counts.append([np.bincount(x.ravel(), minlength=dataset.num_classes) for x in (prediction, truth)])
    cases = gather_object(per_case)
    unpredicted = unpredicted_labels(gather_object(counts), dataset)
    model.train()
    summary = summarise_scores(cases, dataset=dataset)  # case_id is not a number: ignored
    val_loss = summary["val_loss"]["mean"] if not summary["val_loss"]["missing"] else math.nan  # NaN shows, as before
    return {"val_loss": val_loss, **{name: summary[name]["mean"] for name in dice_names(dataset)},
            "mean_dice": summary["mean_dice"], "validation_cases": len(cases), "validation_space": VALIDATION_SPACE,
            "unpredicted": unpredicted, "per_case": sorted(cases, key=lambda case: case["case_id"])}


def unpredicted_labels(counts: Sequence[Sequence[np.ndarray]], dataset: DatasetDefinition | str, *,
                       min_fraction: float = UNPREDICTED_FRACTION) -> str:
    """The foreground labels that the validation cases hold and their predictions (almost) never contain.

    A region Dice can look fair while a class is not predicted at all (KiTS19's kidney region is
    label > 0: a model that calls every kidney voxel tumour still scores on it), so validation
    names such labels.

    Args:
        counts: per case, ``(predicted, true)`` voxel counts per label (arrays of ``num_classes``).
        dataset: whose labels.
        min_fraction: a label is named when its predicted voxels, summed over the cases, are fewer
            than this fraction of its true voxels (default 1 %).

    Returns:
        ``"kidney (1) 0.002 %"``-style entries (predicted voxels as a percentage of the true ones)
        joined by ``", "``; ``""`` when every label present is predicted often enough.
    """
    dataset = get_dataset(dataset)
    predicted = sum((np.asarray(case[0]) for case in counts), np.zeros(dataset.num_classes, dtype=np.int64))
    true = sum((np.asarray(case[1]) for case in counts), np.zeros(dataset.num_classes, dtype=np.int64))
    return ", ".join(f"{dataset.labels[label]} ({label}) {100 * predicted[label] / true[label]:.3g} %"
                     for label in dataset.foreground_labels
                     if true[label] > 0 and predicted[label] < min_fraction * true[label])


def _checkpoint_state(state: RunState, epochs_done: int, record: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to continue the run exactly (after ``epochs_done`` whole epochs), or to use the model later."""
    accelerator = state.accelerator
    scaler = getattr(accelerator, "scaler", None)
    return {
        "format_version": 1,
        "epoch": epochs_done,
        "iteration": state.iteration,
        "model": accelerator.unwrap_model(state.model).state_dict(),
        "optimiser": state.optimiser.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state(),
        "config": state.config_dict,
        "preprocessing_plan": state.cache.plan,
        "metrics": {k: (float(v) if isinstance(v, float) else v) for k, v in record.items()
                    if isinstance(v, (int, float, str)) or v is None},
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "wandb_run_id": state.tracker.run_id,
    }


def region_dice_keys(record: dict[str, Any]) -> list[str]:
    """The region Dice keys of an epoch record that hold a value, in record order (``mean_dice`` left out).

    KiTS19: ``["kidney_dice", "tumour_dice"]``; KiTS23: ``["kidney_and_masses_dice", "masses_dice",
    "tumour_dice"]``; ``[]`` for an epoch without validation.
    """
    return [key for key, value in record.items()
            if key.endswith("_dice") and key != "mean_dice" and isinstance(value, (int, float))]


def _summary_line(record: dict[str, Any], epochs: int) -> str:
    """One line per epoch for the text log and the terminal."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    keys = region_dice_keys(record)
    if keys:
        parts += [f"val loss {record['val_loss']:.4f}"]
        parts += [f"{key.removesuffix('_dice').replace('_', ' ')} Dice {record[key]:.3f}" for key in keys]
        parts[-1] += " (cache grid)"
        if record.get("unpredicted"):
            parts.append(f"hardly predicted: {record['unpredicted']} of its voxels")
    parts += [f"lr {record['learning_rate']:.2e}", f"{record['epoch_seconds']:.1f} s",
              f"{record['samples_per_second']:.1f} samples/s"]
    if record["skipped_steps"]:
        parts.append(f"{record['skipped_steps']} non-finite steps skipped")
    return " | ".join(parts)

