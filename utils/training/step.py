"""One training step: the computation behind every optimiser step of a run, and what the benchmark times.

:func:`train_step` is the one implementation: :func:`utils.training.engine.train` calls it for
every batch (and keeps its own bookkeeping: progress, counters, checkpoints, the non-finite
policy, wandb), and :func:`utils.benchmarks.speed.train_steps` calls it for every timed step,
so a speed figure measures the code that training runs.

A step, in order: the batch to the device (augmenting deferred items there), the images in the
model's memory format, the forward pass under ``accelerator.autocast()`` through the
:class:`~utils.training.performance.CompiledForward`, the loss on float32 logits, one reduction
over processes of the non-finite and stop flags (so every process decides alike), and, when
the loss is finite everywhere and no stop was requested: ``accelerator.backward``, gradient
clipping by ``accelerator.clip_grad_norm_``, the optimiser step, the scheduler step, and
``zero_grad``. Without fp16's gradient scaler (which skips such steps itself), a finite loss
whose gradients are not finite updates nothing either: the total gradient norm (the one clipping
computes) is checked before the optimiser step, so one NaN gradient never reaches the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from utils.datasets.augmentation import SampleAugmenter
from utils.datasets.patches import augment_batch
from utils.training.performance import CompiledForward
from utils.training.stop_signals import StopSignals


@dataclass(frozen=True, eq=False)
class StepParts:
    """What a training step works with; model and optimiser prepared by ``accelerator``.

    Attributes:
        accelerator: autocast, backward (with the fp16 gradient scaler), clipping, reductions.
        model: the prepared model; its parameters are clipped.
        forward: ``model`` called through ``torch.compile`` when configured.
        loss: ``(float32 logits (B, C, *size), uint8 labels (B, 1, *size)) -> scalar``.
        optimiser: the prepared optimiser.
        scheduler: the learning-rate schedule, stepped after every optimiser step.
        augmenter: the dataset's augmenter for deferred items (``None``: batches come augmented).
        memory_format: layout of the input images (``torch.channels_last_3d`` or contiguous, ...).
        grad_clip_norm: largest total gradient norm; ``0`` turns clipping off.
    """

    accelerator: Accelerator
    model: torch.nn.Module
    forward: CompiledForward
    loss: torch.nn.Module
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augmenter: SampleAugmenter | None
    memory_format: torch.memory_format
    grad_clip_norm: float


@dataclass(frozen=True)
class StepOutcome:
    """What one step did.

    Attributes:
        loss: the detached scalar loss on the device (NaN or infinite when ``finite`` is false).
        finite: the loss was finite on every process.
        stopping: some process had received a stop signal; nothing was updated.
        samples: images in this process's batch.
        finite_gradients: the total gradient norm was finite (``False`` only for a finite loss
            whose backward pass gave NaN or infinite gradients; nothing was updated then).
    """

    loss: torch.Tensor
    finite: bool
    stopping: bool
    samples: int
    finite_gradients: bool = True

    @property
    def updated(self) -> bool:
        """Whether the step changed the weights (loss and gradients finite everywhere, no stop requested)."""
        return self.finite and self.finite_gradients and not self.stopping


def train_step(parts: StepParts, batch: dict[str, Any], stop: StopSignals | None = None) -> StepOutcome:
    """Run one training step on ``batch`` (see the module docstring); update only when the loss is finite.

    Args:
        parts: the model, optimiser and the rest, prepared by one accelerator.
        batch: from :func:`utils.datasets.patches.collate_samples` (deferred or augmented items).
        stop: the run's stop signals, read once, in the step's reduction; ``None``: never stopping.

    Returns:
        The outcome; when it is not ``updated``, no gradient was computed and the weights, the
        optimiser and the scheduler are unchanged (the caller applies its stop or non-finite policy).
    """
    accelerator = parts.accelerator
    image, label = augment_batch(batch, parts.augmenter, accelerator.device)
    image = image.contiguous(memory_format=parts.memory_format)
    with accelerator.autocast():
        logits = parts.forward(image)
    loss = parts.loss(logits.float(), label)
    finite, stopping = _step_flags(accelerator, loss, stop)
    samples = int(image.shape[0])
    if finite and not stopping:
        accelerator.backward(loss)
        scaled = getattr(accelerator, "scaler", None) is not None  # fp16: the scaler skips inf/NaN steps itself
        if parts.grad_clip_norm > 0 or not scaled:
            norm = accelerator.clip_grad_norm_(parts.model.parameters(), parts.grad_clip_norm or math.inf)
            if not scaled and not torch.isfinite(torch.as_tensor(norm)).item():
                parts.optimiser.zero_grad(set_to_none=True)
                return StepOutcome(loss.detach(), finite, stopping, samples, finite_gradients=False)
        parts.optimiser.step()
        parts.scheduler.step()
        parts.optimiser.zero_grad(set_to_none=True)
    return StepOutcome(loss.detach(), finite, stopping, samples)


def _step_flags(accelerator: Accelerator, loss: torch.Tensor, stop: StopSignals | None) -> tuple[bool, bool]:
    """Whether the loss is finite on every process, and whether any process received a stop signal.

    One reduction per step carries both, so every process takes the same decisions.
    """
    received = stop is not None and stop.received is not None
    flags = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0, 1.0 if received else 0.0],
                         device=accelerator.device)
    bad, stopping = accelerator.reduce(flags, reduction="sum").tolist()
    return bad == 0, stopping > 0
