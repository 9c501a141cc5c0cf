"""AdamW and its per-iteration learning-rate schedule: linear warm-up, then cosine decay to a floor.

With ``W = min(round(warmup_epochs * iterations_per_epoch), N // 2)`` warm-up iterations and
``N = epochs * iterations_per_epoch`` iterations in all (numbered ``0 .. N - 1``), the factor
multiplying ``learning_rate`` at iteration ``i`` is

* ``i < W``: ``warmup_start_factor + (1 - warmup_start_factor) * i / W`` (linear, from the
  start factor at ``i = 0``; with ``W = 0`` there is no warm-up);
* ``i >= W``: ``min_lr_factor + (1 - min_lr_factor) * (1 + cos(pi * t)) / 2`` with
  ``t = (i - W) / (N - 1 - W)`` clamped to ``[0, 1]``: 1 at ``i = W``, ``min_lr_factor`` at the
  last iteration and after it.

The factor is never below ``min_lr_factor`` (> 0, also during the warm-up), so no iteration
trains at learning rate 0. A run shorter than twice its warm-up (a smoke run) warms up over its
first half.
The scheduler is stepped once per optimiser step (iteration), not per epoch.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from utils.config.experiment import OptimiserConfig

logger = logging.getLogger(__name__)


def build_optimiser(model: torch.nn.Module, config: OptimiserConfig, *, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over every trainable parameter of ``model``, at ``config.learning_rate``.

    Args:
        model: the network, already on its device (the optimiser state follows the parameters).
        config: ``learning_rate`` and ``weight_decay`` (decoupled, applied to every parameter).
        fused: use PyTorch's fused CUDA kernel; ``None`` (default) picks it exactly when every
            parameter is on a CUDA device. ``True`` with a parameter off CUDA is an error.

    Returns:
        The optimiser (the scheduler of :func:`build_scheduler` then sets its learning rate).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no trainable parameters (requires_grad=True); nothing to optimise")
    on_cuda = all(p.device.type == "cuda" for p in parameters)
    if fused is None:
        fused = on_cuda
    elif fused and not on_cuda:
        devices = sorted({str(p.device) for p in parameters})
        raise ValueError(f"fused=True needs every parameter on CUDA, got devices {devices}; "
                         "move the model first or pass fused=None")
    logger.info("AdamW: lr %g, weight decay %g, fused %s", config.learning_rate, config.weight_decay, fused)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)


def _schedule_lengths(iterations_per_epoch: int, epochs: int, config: OptimiserConfig) -> tuple[int, int]:
    """``(warm-up iterations, total iterations)``, validated."""
    for name, value in (("iterations_per_epoch", iterations_per_epoch), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    total = epochs * iterations_per_epoch
    # a run shorter than its warm-up (a smoke run) warms up over its first half instead
    warmup = min(round(config.warmup_epochs * iterations_per_epoch), total // 2)
    return warmup, total


def learning_rate_factor(iteration: int, *, iterations_per_epoch: int, epochs: int, config: OptimiserConfig) -> float:
    """Factor multiplying ``config.learning_rate`` at ``iteration`` (0-based; see the module docstring).

    Args:
        iteration: optimiser steps taken before this one, ``>= 0``.
        iterations_per_epoch: optimiser steps per epoch, ``>= 1``.
        epochs: epochs of the run, ``>= 1`` and ``> config.warmup_epochs`` when there is a warm-up.
        config: ``warmup_epochs``, ``warmup_start_factor``, ``min_lr_factor``.

    Returns:
        The factor, in ``[min_lr_factor, 1]``: iteration 0 gives
        ``max(warmup_start_factor, min_lr_factor)``, the first iteration after the warm-up 1,
        the last iteration ``min_lr_factor``.
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
    warmup, total = _schedule_lengths(iterations_per_epoch, epochs, config)
    floor = config.min_lr_factor
    if iteration < warmup:
        start = config.warmup_start_factor
        return max(floor, start + (1.0 - start) * iteration / warmup)
    decay_length = total - 1 - warmup
    progress = 1.0 if decay_length <= 0 else min((iteration - warmup) / decay_length, 1.0)
    return max(floor, floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class WarmupCosineSchedule(LambdaLR):
    """``LambdaLR`` whose ``load_state_dict`` also puts the restored learning rate into the optimiser.

    A plain ``LambdaLR`` restores its counters but leaves the optimiser's ``lr`` untouched until
    the next ``step()``; here the optimiser holds the exact learning rate of the saved iteration
    right after loading, whether or not the optimiser's own state is loaded too.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule from :meth:`state_dict` (plain tensors and numbers; ``weights_only`` safe)."""
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr(), strict=False):
            group["lr"] = lr


def build_scheduler(optimiser: torch.optim.Optimizer, config: OptimiserConfig, *, iterations_per_epoch: int,
                    epochs: int) -> LambdaLR:
    """The warm-up + cosine schedule of :func:`learning_rate_factor`; call ``step()`` after every optimiser step.

    Args:
        optimiser: from :func:`build_optimiser`; its current ``lr`` becomes the base learning rate.
        config: the optimiser section. iterations_per_epoch, epochs: the run's length.

    Returns:
        A :class:`WarmupCosineSchedule` (a ``LambdaLR``); the optimiser's ``lr`` is set to
        iteration 0's. Its ``state_dict()`` holds no callables, so it survives
        ``torch.save`` / ``torch.load(weights_only=True)``, and ``load_state_dict`` restores the
        exact learning rate.
    """
    _schedule_lengths(iterations_per_epoch, epochs, config)

    def lr_lambda(iteration: int) -> float:  # a plain function: LambdaLR leaves it out of state_dict
        return learning_rate_factor(iteration, iterations_per_epoch=iterations_per_epoch, epochs=epochs,
                                    config=config)

    return WarmupCosineSchedule(optimiser, lr_lambda=lr_lambda)
