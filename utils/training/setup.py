"""Setting up a training run: seeds, run folder, data, model, optimiser, and the state of a resumed run.

Three calls, in this order (:func:`utils.training.engine.train` makes them):

1. :func:`start_run`: the accelerator, seeds, and the run folder, checked writable before any
   data work, with its text log attached;
2. :func:`prepare_cache`: the preprocessing cache built or checked up to date
   (:func:`utils.preprocessing.preprocess.prepare_training_cache`) by the main process only;
3. :func:`set_up_run`: from that cache, datasets, model, optimiser and scheduler, and on resume
   every state restored; it returns a :class:`RunState` holding everything the epoch loop of
   :mod:`utils.training.engine` needs.

With several processes (``accelerate launch`` or ``torchrun``) only the main process creates
folders, preprocesses and writes; the others receive the folder names and wait for it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from utils.config.experiment import ExperimentConfig
from utils.config.loading import config_as_dict
from utils.datasets.augmentation import SampleAugmenter
from utils.datasets.patches import (
    EpochSampler,
    SampledDataset,
    VolumeDataset,
    background_value,
    build_patch_datasets,
    collate_samples,
)
from utils.datasets.slices import build_slice_datasets
from utils.inference.cascade import LOCATOR_NAME, check_locator_state, copy_locator
from utils.inference.segment import find_checkpoint
from utils.networks.checkpoints import CheckpointError, load_checkpoint, restore_rng_state
from utils.networks.losses import build_loss
from utils.networks.models import build_model, check_input_size, model_input_size, spatial_dims
from utils.preprocessing.cache import PreprocessedCache, open_cache
from utils.preprocessing.preprocess import prepare_training_cache
from utils.training.optimisation import build_optimiser, build_scheduler
from utils.training.performance import (
    CompiledForward,
    build_accelerator_for,
    configure_backends,
    experiment_precision,
    loader_options,
    memory_format,
    training_device,
)
from utils.training.resume import (
    LAST_CHECKPOINT,
    SET_UP_FILES,
    ResumePlan,
    check_same_data,
    data_record,
    plan_resume,
    remove_stale_temp_files,
    write_data_record,
)
from utils.training.run_folder import (
    ProgressLog,
    attach_text_log,
    check_writable,
    create_run_folder,
    detach_text_log,
    save_resolved_config,
)
from utils.training.step import StepParts
from utils.training.tracking import Tracker, build_tracker

logger = logging.getLogger(__name__)

_PRECISION_NAMES = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with a gradient scaler", "no": "float32"}


@dataclass(frozen=True, eq=False)
class RunStart:
    """A started run before its data is read: the accelerator and the run folder (see :func:`start_run`).

    Attributes:
        accelerator: the run's, with its mixed precision. folder: the run folder, writable (a new
        run's config saved in it). log_handler: the text log attached to ``folder/train.log``
        (main process only). resumed: the folder is an existing run's, being resumed.
    """

    accelerator: Accelerator
    folder: Path
    log_handler: logging.Handler | None
    resumed: bool = False

    def abandon(self, error: BaseException | None = None) -> None:
        """Close a run whose set-up failed before a :class:`RunState` existed to close it.

        A resumed run logs ``error`` to its ``train.log`` and keeps everything. A new run
        removes what set-up wrote (``config.yaml``, ``train.log``, ``data.json``) and its folder
        when that leaves it empty, so a refused run leaves no empty run folder behind.
        """
        if self.log_handler is not None:
            if self.resumed and isinstance(error, Exception):
                logger.error("resume of %s failed: %s", self.folder, error)
                mark_logged(error)
            detach_text_log(self.log_handler)
        if self.resumed or not self.accelerator.is_main_process:
            return
        try:
            for name in SET_UP_FILES:
                (self.folder / name).unlink(missing_ok=True)
            remove_stale_temp_files(self.folder)
            if not any(self.folder.iterdir()):
                self.folder.rmdir()
        except OSError as problem:
            logger.warning("could not remove the unused run folder %s: %s", self.folder, problem)


def mark_logged(error: BaseException) -> None:
    """Note that ``error`` is already in the run's ``train.log`` (the command line does not repeat it there)."""
    try:
        error.logged_in_run_folder = True  # type: ignore[attr-defined]
    except AttributeError:
        pass


def was_logged(error: BaseException) -> bool:
    """Whether :func:`mark_logged` noted ``error``."""
    return bool(getattr(error, "logged_in_run_folder", False))


@dataclass(eq=False)
class RunState:
    """Everything the epoch loop reads and updates (see :func:`set_up_run`).

    Besides the objects it names: ``pad_value`` (the cache's background, padding windows at
    validation), ``augmenter`` (the training set's, for items whose augmentation is deferred to
    the device; ``None`` without augmentation), ``memory_format`` (of the model and its inputs),
    and ``wandb_logged_until`` (after a resume: the last iteration wandb may already have seen).
    """

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
    pad_value: float
    augmenter: SampleAugmenter | None
    memory_format: torch.memory_format
    log_handler: logging.Handler | None = None
    start_epoch: int = 0
    epoch_progress: dict[str, Any] | None = None
    iteration: int = 0
    best_epoch: int | None = None
    best_score: float | None = None
    wandb_logged_until: int = 0

    @property
    def learning_rate(self) -> float:
        """The optimiser's current learning rate."""
        return float(self.optimiser.param_groups[0]["lr"])

    @property
    def step_parts(self) -> StepParts:
        """What :func:`utils.training.step.train_step` needs, from this run's objects."""
        return StepParts(self.accelerator, self.model, self.forward, self.loss, self.optimiser, self.scheduler,
                         self.augmenter, self.memory_format, self.config.optimiser.grad_clip_norm)

    def close(self) -> None:
        """Finish wandb, detach the text log, and leave the process group cleanly."""
        self.tracker.finish()
        if self.log_handler is not None:
            detach_text_log(self.log_handler)
        self.accelerator.wait_for_everyone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start_run(config: ExperimentConfig, *, resume: str | Path | None) -> RunStart:
    """The accelerator, seeds and run folder of a new run, or of the one resumed (``resume``).

    Checks the model's input sizes, creates (main process) and checks writable the run folder,
    saves a new run's resolved config (a resumed run's is rewritten only once its checkpoint is
    loaded), removes leftovers of killed writes and attaches ``train.log``: all before any data work.

    Raises:
        ValueError: an input size the model cannot take; bf16 on a CPU that would emulate it
            (:func:`utils.training.performance.resolve_precision`).
        RuntimeError: the launched processes did not form one group.
        FileNotFoundError: ``resume`` is not a folder. OSError: the run folder is not writable.
    """
    training = config.training
    input_size = model_input_size(config)
    check_input_size(config.model, input_size)
    if spatial_dims(config.model) == 3:
        check_input_size(config.model, config.sliding_window.roi_size)
    device = training_device()
    precision = experiment_precision(config, device)
    accelerator = build_accelerator_for(precision, device)
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
    if handler is not None and resume is not None:  # logged to train.log: how many leftovers went
        remove_stale_temp_files(folder)
    if handler is not None:
        chosen = f" (auto on {device.type})" if training.mixed_precision == "auto" else ""
        logger.info("precision: %s%s", _PRECISION_NAMES.get(precision, precision), chosen)
    return RunStart(accelerator, folder, handler, resumed=resume is not None)


def set_up_run(config: ExperimentConfig, cache: PreprocessedCache | str | Path, *, resume: str | Path | None,
               wandb: bool | None, start: RunStart | None = None, plan: ResumePlan | None = None) -> RunState:
    """Set up a new run, or restore one from ``resume/last.pt``, on an already prepared cache.

    A resumed run is checked against the data it was trained on (:func:`utils.training.resume.check_same_data`)
    and restored; only then are its ``config.yaml`` and ``data.json`` rewritten. A run with no
    ``last.pt`` yet restarts from scratch with its saved config.

    Args:
        config: the experiment (see :func:`utils.training.engine.train`).
        cache: the preprocessed cache to train from, or its plan folder (see :func:`prepare_cache`).
        resume: the run folder to continue, or ``None`` for a new run.
        wandb: force wandb on or off (``None``: ``config.wandb.enabled``).
        start: the run started by :func:`start_run` (``None``: started here).
        plan: the checked resume (:func:`utils.training.resume.plan_resume`; ``None``: checked here).

    Returns:
        The state the epoch loop reads and updates.
    """
    cache = cache if isinstance(cache, PreprocessedCache) else open_cache(cache)
    if resume is not None and plan is None:
        plan = plan_resume(resume, config, cache.plan.get("source_data"))
    if plan is not None:
        config = plan.config
        check_same_data(plan, cache)
    start = start if start is not None else start_run(config, resume=resume)
    accelerator, folder, training = start.accelerator, start.folder, config.training
    input_size = model_input_size(config)
    train_set, validation = build_training_datasets(config, cache)
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
                     optimiser, scheduler, build_loss(config.loss, config.dataset), tracker,
                     ProgressLog(folder) if accelerator.is_main_process else None, CompiledForward(model, performance),
                     pad_value=background_value(cache), augmenter=train_set.augmenter, memory_format=layout,
                     log_handler=start.log_handler)
    restored = plan is not None and plan.checkpoint is not None
    resume_id = _restore(state, folder / LAST_CHECKPOINT, plan.checkpoint) if restored else None
    if plan is not None and not restored:
        logger.info("%s has no %s yet: the run restarts from its first epoch with its saved config", folder,
                    LAST_CHECKPOINT)
        if state.progress is not None:
            state.progress.truncate(after_epoch=0)
    if accelerator.is_main_process:  # a resume has succeeded: only now may the run's config change
        if resume is not None:
            save_resolved_config(folder, state.config_dict)
        data_dir = plan.data_dir if plan is not None else config.data_dir or cache.plan.get("source_data")
        write_data_record(folder, data_record(data_dir, cache))
    if state.epoch_progress is not None:  # stopped by a signal mid-epoch: wandb saw every step up to it
        state.wandb_logged_until = state.iteration
    elif restored:  # wandb may have logged steps up to the next checkpoint before the run stopped
        state.wandb_logged_until = state.iteration + len(loader) * training.checkpoint_every
    state.tracker.start(state.config_dict, folder, folder.name, resume_id)
    logger.info("run folder %s: %s, %d training and %d validation cases, %d samples per epoch on %d process(es), "
                "starting at epoch %d", folder, config.model.name, len(train_set.cases), len(validation),
                len(train_set), accelerator.num_processes, state.start_epoch + 1)
    return state


def build_training_datasets(config: ExperimentConfig,
                            cache: PreprocessedCache) -> tuple[SampledDataset, VolumeDataset]:
    """The datasets a run trains and validates on, exactly as :func:`set_up_run` builds them.

    Args:
        config: the experiment: ``model.name`` picks 3D patches (``patches``) or 2D axial slices
            (``slices``); ``augmentation``, ``training.fold``, ``training.seed`` and
            ``training.max_validation_cases`` apply.
        cache: the preprocessing cache.

    Returns:
        The class-balanced, augmented training samples (items ``image`` ``(1, Z, Y, X)`` or
        ``(1, S, S)`` float32, ``label`` uint8 alike) and the whole validation volumes.

    Raises:
        ValueError: the cache holds another dataset than ``config.dataset`` (its labels, and so
            the model's output channels and the scores, would not match).
    """
    if cache.dataset.name != config.dataset:
        raise ValueError(f"{cache.folder} caches {cache.dataset.title} data (plan.json's dataset is "
                         f"{cache.dataset.name!r}) but the config's dataset is {config.dataset!r}: preprocess the "
                         f"data as {config.dataset} (scripts/preprocess.py with this config) or train on a "
                         f"{config.dataset} cache")
    training = config.training
    if spatial_dims(config.model) == 2:
        train_set, validation = build_slice_datasets(cache, config.slices, config.augmentation, fold=training.fold,
                                                     seed=training.seed)
    else:
        train_set, validation = build_patch_datasets(cache, config.patches, config.augmentation, fold=training.fold,
                                                     seed=training.seed)
    if training.max_validation_cases is not None:
        validation.cases = validation.cases[:training.max_validation_cases]
    if config.cascade.locator is not None and isinstance(validation, VolumeDataset):
        spacing = [float(s) for s in cache.plan["preprocessing"]["target_spacing"]]
        validation.roi_margin = tuple(math.ceil(config.cascade.margin_mm / s) for s in spacing)
    return train_set, validation


def _run_folder(config: ExperimentConfig, resume: str | Path | None, accelerator: Accelerator) -> Path:
    """A new run folder (main process creates it), or the resumed one; checked writable, config saved."""
    training = config.training
    message: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            if resume is not None:
                folder = Path(resume)
                if not folder.is_dir():
                    raise FileNotFoundError(f"{folder}: no such run folder to resume")
                check_writable(folder)
                if config.cascade.locator is not None and not (folder / LOCATOR_NAME).is_file():
                    copy_locator(folder, find_checkpoint(config.cascade.locator), config.dataset)
            else:
                locator = None
                if config.cascade.locator is not None:  # refuse a bad locator before making the run folder
                    locator = find_checkpoint(config.cascade.locator)
                    check_locator_state(load_checkpoint(locator), locator, config.dataset)
                folder = create_run_folder(training.output_dir, training.run_name, config.model.name)
                try:
                    check_writable(folder)
                    save_resolved_config(folder, config_as_dict(config))
                    if locator is not None:
                        copy_locator(folder, locator, config.dataset, checked=True)
                except OSError:
                    if not any(folder.iterdir()):
                        folder.rmdir()  # refused before anything was written: leave no empty run folder
                    raise
            message = [str(folder)]
        except (OSError, ValueError, CheckpointError) as error:  # tell the other processes, so they do not wait
            message = [error]
    broadcast_object_list(message)
    if isinstance(message[0], BaseException):
        raise message[0]
    return Path(message[0])


def prepare_cache(config: ExperimentConfig, data_dir: str | Path | None, accelerator: Accelerator) -> PreprocessedCache:
    """The cache a run trains from: prepared by the main process only, then opened by every process.

    The main process calls :func:`utils.preprocessing.preprocess.prepare_training_cache` (build
    or check up to date; refuse or skip bad cases as ``training.on_bad_case`` says); the others
    wait for its plan folder, or for its error, broadcast through ``accelerate``. The
    preprocessing stage knows nothing of processes: that part stays here, in training.

    Args:
        config: the experiment (``dataset``, ``preprocessing``, ``split``, ``training.on_bad_case``, ``data_dir``).
        data_dir: raw KiTS-layout folder of ``config.dataset`` (default ``config.data_dir``, then ``KITS19_DATA``).
        accelerator: the run's (see :func:`start_run`).

    Raises:
        FileNotFoundError, OSError: no data folder, or the cache cannot be written.
        ValueError: bad cases with ``on_bad_case: error``.
    """
    message: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            message = [str(prepare_training_cache(config, data_dir))]
        except (OSError, ValueError) as error:  # tell the other processes before raising
            message = [error]
    broadcast_object_list(message)
    if isinstance(message[0], BaseException):
        raise message[0]
    return open_cache(message[0])


def _restore(state: RunState, path: Path, checkpoint: dict[str, Any] | None = None) -> str | None:
    """Load every state saved in ``path`` (already loaded: ``checkpoint``) into ``state``; returns the wandb run id."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path, map_location="cpu")
    try:
        state.accelerator.unwrap_model(state.model).load_state_dict(checkpoint["model"])
        state.optimiser.load_state_dict(checkpoint["optimiser"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
    except (KeyError, RuntimeError, ValueError) as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise CheckpointError(path, f"{path} does not fit the model and optimiser of this config "
                                    f"({type(error).__name__}: {detail}); "
                                    "its run folder was not changed. A run can only continue with the settings "
                                    "it was trained with: start a new run to change them") from None
    scaler = getattr(state.accelerator, "scaler", None)
    if scaler is not None and checkpoint.get("grad_scaler"):
        scaler.load_state_dict(checkpoint["grad_scaler"])
    restore_rng_state(checkpoint["rng"])
    state.start_epoch, state.iteration = int(checkpoint["epoch"]), int(checkpoint["iteration"])
    state.epoch_progress = checkpoint.get("epoch_progress")
    state.best_epoch, state.best_score = checkpoint.get("best_epoch"), checkpoint.get("best_score")
    if state.progress is not None:
        state.progress.truncate(after_epoch=state.start_epoch)
        metrics = checkpoint.get("metrics")
        if (state.epoch_progress is None and isinstance(metrics, dict) and metrics.get("epoch") == state.start_epoch
                and (state.progress.last_epoch or 0) < state.start_epoch):
            # killed between writing last.pt and its progress line: the checkpoint holds that epoch's record
            state.progress.append(dict(metrics))
            logger.info("%s: restored the record of epoch %d from %s", state.progress.path, state.start_epoch, path)
    within = (f", batch {state.epoch_progress['batches'] + 1} of epoch {state.start_epoch + 1}"
              if state.epoch_progress else "")
    logger.info("resumed %s at epoch %d (iteration %d%s)", path, state.start_epoch, state.iteration, within)
    return checkpoint.get("wandb_run_id")
