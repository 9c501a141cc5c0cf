"""Setting up a training run: seeds, run folder, data, model, optimiser, and the state of a resumed run.

:func:`set_up_run` returns a :class:`RunState` holding everything the epoch loop of
:mod:`utils.training.engine` needs. With several processes (``accelerate launch`` or
``torchrun``) only the main process creates folders, preprocesses and writes; the others
receive the folder names and wait for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from utils.data.case_discovery import resolve_data_dir
from utils.networks.checkpoints import load_checkpoint, restore_rng_state
from utils.config.loading import config_as_dict
from utils.config.experiment import ExperimentConfig
from utils.training.tracking import Tracker, build_tracker
from utils.networks.losses import build_loss
from utils.networks.models import build_model, check_input_size, model_input_size, spatial_dims
from utils.training.optimisation import build_optimiser, build_scheduler
from utils.datasets.patches import (
    EpochSampler, SampledDataset, VolumeDataset, background_value, build_patch_datasets, collate_samples,
)
from utils.training.performance import CompiledForward, configure_backends, loader_options, memory_format
from utils.preprocessing.cache import PreprocessedCache, open_cache
from utils.preprocessing.preprocess import NO_SEGMENTATION, preprocess_dataset
from utils.training.run_folder import (
    ProgressLog, attach_text_log, check_writable, create_run_folder, detach_text_log, save_resolved_config,
)
from utils.datasets.slices import build_slice_datasets

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"


@dataclass(eq=False)
class RunState:
    """Everything the epoch loop reads and updates (see :func:`set_up_run`)."""

    config: ExperimentConfig
    config_dict: dict[str, Any]
    accelerator: Accelerator
    folder: Path
    cache: PreprocessedCache
    sampler: EpochSampler
    loader: DataLoader
    validation: VolumeDataset
    model: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss: torch.nn.Module
    tracker: Tracker
    progress: ProgressLog | None
    forward: CompiledForward
    log_handler: logging.Handler | None = None
    start_epoch: int = 0
    epoch_progress: dict[str, Any] | None = None
    iteration: int = 0
    best_epoch: int | None = None
    best_score: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        """The optimiser's current learning rate."""
        return float(self.optimiser.param_groups[0]["lr"])

    def close(self) -> None:
        """Finish wandb, detach the text log, and leave the process group cleanly."""
        self.tracker.finish()
        if self.log_handler is not None:
            detach_text_log(self.log_handler)
        self.accelerator.wait_for_everyone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def set_up_run(config: ExperimentConfig, *, data_dir: str | Path | None, resume: str | Path | None,
               wandb: bool | None) -> RunState:
    """Prepare a new run, or restore one from ``resume/last.pt`` (see :func:`utils.training.engine.train`)."""
    training = config.training
    input_size = model_input_size(config)
    check_input_size(config.model, input_size)
    if spatial_dims(config.model) == 3:
        check_input_size(config.model, config.sliding_window.roi_size)
    accelerator = Accelerator(mixed_precision=training.mixed_precision, cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"{launched} processes were launched but accelerate formed a group of "
                           f"{accelerator.num_processes}; each would train alone and write the same run folder. "
                           "On CPU, launch with torchrun, or accelerate launch --multi_gpu with ACCELERATE_USE_CPU=1")
    if training.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(training.seed)
    if not accelerator.is_main_process:  # one voice in the terminal: other processes report only problems
        logging.getLogger().setLevel(logging.WARNING)
    folder = _run_folder(config, resume, accelerator)
    handler = attach_text_log(folder) if accelerator.is_main_process else None
    cache = _prepare_cache(config, data_dir, accelerator)
    train_set, validation = _build_datasets(config, cache)
    performance = config.performance
    configure_backends(performance, accelerator.device)
    train_set.defer_augmentation = performance.augment_on_device and train_set.augmenter is not None
    sampler = EpochSampler(len(train_set), rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = DataLoader(train_set, batch_size=training.batch_size, sampler=sampler, collate_fn=collate_samples,
                        **loader_options(performance, training.num_workers, accelerator.device))
    layout = memory_format(performance, spatial_dims(config.model))
    model = build_model(config.model, input_size).to(accelerator.device, memory_format=layout)
    optimiser = build_optimiser(model, config.optimiser, fused=None if performance.fused_optimiser else False)
    scheduler = build_scheduler(optimiser, config.optimiser, iterations_per_epoch=len(loader), epochs=training.epochs)
    model, optimiser = accelerator.prepare(model, optimiser)
    tracker = build_tracker(config.wandb, enabled_override=wandb, is_main_process=accelerator.is_main_process)
    state = RunState(config, config_as_dict(config), accelerator, folder, cache, sampler, loader, validation, model,
                     optimiser, scheduler, build_loss(config.loss), tracker,
                     ProgressLog(folder) if accelerator.is_main_process else None, CompiledForward(model, performance),
                     handler)
    state.extras.update(pad_value=background_value(cache), augmenter=train_set.augmenter, memory_format=layout)
    resume_id = _restore(state, folder / LAST_CHECKPOINT) if resume is not None else None
    if state.epoch_progress is not None:  # stopped by a signal mid-epoch: wandb saw every step up to it
        state.extras["wandb_logged_until"] = state.iteration
    elif resume is not None:  # wandb may have logged steps up to the next checkpoint before the run stopped
        state.extras["wandb_logged_until"] = state.iteration + len(loader) * training.checkpoint_every
    state.tracker.start(state.config_dict, folder, folder.name, resume_id)
    logger.info("run folder %s: %s, %d training and %d validation cases, %d samples per epoch on %d process(es), "
                "starting at epoch %d", folder, config.model.name, len(train_set.cases), len(validation),
                len(train_set), accelerator.num_processes, state.start_epoch + 1)
    return state


def _build_datasets(config: ExperimentConfig, cache: PreprocessedCache) -> tuple[SampledDataset, VolumeDataset]:
    """Training samples (3D patches or 2D slices, as the model needs) and whole validation volumes."""
    training = config.training
    if spatial_dims(config.model) == 2:
        train_set, validation = build_slice_datasets(cache, config.slices, config.augmentation, fold=training.fold,
                                                     seed=training.seed)
    else:
        train_set, validation = build_patch_datasets(cache, config.patches, config.augmentation, fold=training.fold,
                                                     seed=training.seed)
    if training.max_validation_cases is not None:
        validation.cases = validation.cases[:training.max_validation_cases]
    return train_set, validation


def _run_folder(config: ExperimentConfig, resume: str | Path | None, accelerator: Accelerator) -> Path:
    """A new run folder (main process creates it), or the resumed one; checked writable, config saved."""
    training = config.training
    message: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            if resume is not None:
                folder = Path(resume)
                if not (folder / LAST_CHECKPOINT).is_file():
                    raise FileNotFoundError(f"{folder}: no {LAST_CHECKPOINT} to resume from; start a new run instead")
            else:
                folder = create_run_folder(training.output_dir, training.run_name, config.model.name)
            check_writable(folder)
            save_resolved_config(folder, config_as_dict(config))
            message = [str(folder)]
        except OSError as error:  # tell the other processes before raising, so they do not wait forever
            message = [error]
    broadcast_object_list(message)
    if isinstance(message[0], BaseException):
        raise message[0]
    return Path(message[0])


def _prepare_cache(config: ExperimentConfig, data_dir: str | Path | None, accelerator: Accelerator) -> PreprocessedCache:
    """Preprocess (or confirm up to date) on the main process; every process then opens the cache."""
    message: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            message = [str(_preprocess(config, data_dir))]
        except (OSError, ValueError) as error:  # tell the other processes before raising
            message = [error]
    broadcast_object_list(message)
    if isinstance(message[0], BaseException):
        raise message[0]
    return open_cache(message[0])


def _preprocess(config: ExperimentConfig, data_dir: str | Path | None) -> Path:
    """Build or update the cache; refuse or skip bad cases as configured. Returns the plan folder."""
    source = resolve_data_dir(data_dir if data_dir is not None else config.data_dir)
    workers = max(1, min(config.training.num_workers, os.cpu_count() or 1))
    result = preprocess_dataset(source, config.preprocessing, config.split, workers=workers,
                                show_progress=True)
    bad = {**result.failed, **{c: r for c, r in result.excluded.items() if r != NO_SEGMENTATION}}
    if bad:
        listing = "; ".join(f"{case}: {reason}" for case, reason in sorted(bad.items()))
        if config.training.on_bad_case == "error":
            raise ValueError(f"{source}: {len(bad)} case(s) cannot be used: {listing}. Fix or remove them, "
                             "or set training.on_bad_case=skip to train without them")
        logger.warning("training without %d unusable case(s): %s", len(bad), listing)
    return result.folder


def _restore(state: RunState, path: Path) -> str | None:
    """Load every state saved in ``path`` into ``state``; returns the wandb run id to continue."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    state.accelerator.unwrap_model(state.model).load_state_dict(checkpoint["model"])
    state.optimiser.load_state_dict(checkpoint["optimiser"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    scaler = getattr(state.accelerator, "scaler", None)
    if scaler is not None and checkpoint.get("grad_scaler"):
        scaler.load_state_dict(checkpoint["grad_scaler"])
    restore_rng_state(checkpoint["rng"])
    state.start_epoch, state.iteration = int(checkpoint["epoch"]), int(checkpoint["iteration"])
    state.epoch_progress = checkpoint.get("epoch_progress")
    state.best_epoch, state.best_score = checkpoint.get("best_epoch"), checkpoint.get("best_score")
    if state.progress is not None:
        state.progress.truncate(after_epoch=state.start_epoch)
    if checkpoint.get("preprocessing_plan", {}).get("plan_hash") != state.cache.plan.get("plan_hash"):
        logger.warning("the cache was rebuilt since this run started (another plan hash): resumed epochs see "
                       "differently preprocessed data")
    within = f", batch {state.epoch_progress['batches'] + 1} of epoch {state.start_epoch + 1}" if state.epoch_progress else ""
    logger.info("resumed %s at epoch %d (iteration %d%s)", path, state.start_epoch, state.iteration, within)
    return checkpoint.get("wandb_run_id")
