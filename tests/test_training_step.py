"""The training step: what it updates, when it does not, and that training and the benchmark run the same one."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import utils.training.engine as engine
import utils.training.setup as setup
from tests.test_training_engine import tiny_config
from utils.benchmarks.speed import build_network, build_training_data, our_settings, train_steps
from utils.config.experiment import OptimiserConfig, PerformanceConfig
from utils.datasets.patches import background_value
from utils.preprocessing.cache import open_cache
from utils.training.optimisation import build_optimiser, build_scheduler
from utils.training.performance import CompiledForward
from utils.training.step import StepParts, train_step

CPU = torch.device("cpu")


def _parts(loss: torch.nn.Module) -> StepParts:
    """A 1x1 convolution trained by the step on CPU, with the real optimiser and scheduler."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 3, 1)
    optimiser = build_optimiser(model, OptimiserConfig(learning_rate=0.1, warmup_epochs=0))
    scheduler = build_scheduler(optimiser, OptimiserConfig(learning_rate=0.1, warmup_epochs=0),
                                iterations_per_epoch=4, epochs=1)
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    model, optimiser = accelerator.prepare(model, optimiser)
    return StepParts(accelerator, model, CompiledForward(model, PerformanceConfig()), loss, optimiser, scheduler,
                     None, torch.contiguous_format, 1.0)


def _batch() -> dict[str, torch.Tensor]:
    image = torch.arange(16, dtype=torch.float32).reshape(2, 1, 2, 2, 2) / 16
    return {"image": image, "label": (image > 0.5).to(torch.uint8)}


def _cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, label[:, 0].long())


def test_a_step_updates_the_weights_and_steps_the_schedule_once():
    parts = _parts(_cross_entropy)
    before = [p.detach().clone() for p in parts.model.parameters()]
    outcome = train_step(parts, _batch())
    assert outcome.updated and outcome.finite and not outcome.stopping and outcome.samples == 2
    assert not outcome.loss.requires_grad and outcome.loss.item() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.model.parameters(), strict=True))
    assert parts.scheduler.last_epoch == 1
    assert all(p.grad is None for p in parts.model.parameters())  # zero_grad(set_to_none=True)


@pytest.mark.parametrize("nan_loss, received", [(True, None), (False, "SIGTERM")])
def test_a_non_finite_loss_or_a_stop_signal_updates_nothing(nan_loss, received):
    parts = _parts((lambda logits, label: _cross_entropy(logits, label) * float("nan")) if nan_loss
                   else _cross_entropy)
    before = [p.detach().clone() for p in parts.model.parameters()]
    outcome = train_step(parts, _batch(), SimpleNamespace(received=received))
    assert not outcome.updated
    assert outcome.finite is not nan_loss and outcome.stopping is (received is not None)
    assert all(torch.equal(a, b) for a, b in zip(before, parts.model.parameters(), strict=True))
    assert parts.scheduler.last_epoch == 0 and all(p.grad is None for p in parts.model.parameters())


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not (as a faulty kernel gives)."""

    @staticmethod
    def forward(ctx, logits):
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_nan_gradients_of_a_finite_loss_update_nothing(clip):
    parts = _parts(lambda logits, label: _cross_entropy(_NanGradient.apply(logits), label))
    if not clip:
        from dataclasses import replace
        parts = replace(parts, grad_clip_norm=0.0)
    before = [p.detach().clone() for p in parts.model.parameters()]
    outcome = train_step(parts, _batch())
    assert outcome.finite and torch.isfinite(outcome.loss)
    assert not outcome.finite_gradients and not outcome.updated
    assert all(torch.equal(a, b) for a, b in zip(before, parts.model.parameters(), strict=True))
    assert parts.scheduler.last_epoch == 0 and all(p.grad is None for p in parts.model.parameters())


def test_the_benchmark_times_the_step_training_runs(tiny_data, tmp_path, monkeypatch):
    """The benchmark's per-step losses are the engine's first steps' from the same weights and batches."""
    assert engine.train_step is train_step
    config = tiny_config(tmp_path, training={"run_name": "engine", "epochs": 2},
                         performance={"augment_on_device": True})
    engine_losses: list[float] = []
    initial: dict[str, torch.Tensor] = {}

    def recording_step(parts, batch, stop=None):
        outcome = train_step(parts, batch, stop)
        engine_losses.append(outcome.loss.item())
        return outcome

    def recording_build_model(*args, **kwargs):
        model = setup_build_model(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    setup_build_model = setup.build_model
    monkeypatch.setattr(engine, "train_step", recording_step)
    monkeypatch.setattr(setup, "build_model", recording_build_model)
    engine.train(config, data_dir=tiny_data, show_progress=False)
    monkeypatch.undo()
    assert len(engine_losses) == 8  # 2 epochs of 8 samples in batches of 2
    (plan_folder,) = (tmp_path / "cache").glob("spacing_*")
    cache = open_cache(plan_folder)
    settings = our_settings(config, CPU, workers=0)
    steps = 4  # training's first epoch
    dataset, augmenter = build_training_data(config, settings, cache, tiny_data, None, steps * settings.batch_size)
    assert augmenter is not None and dataset.pad_value == background_value(cache)
    model = build_network(config, settings, CPU)
    model.load_state_dict(initial)
    result = train_steps(config, settings, model, dataset, augmenter, CPU, warmup=1, steps=steps - 1)
    assert result["skipped_steps"] == 0
    assert np.allclose(result["losses"], engine_losses[:steps], rtol=0, atol=1e-6), (result["losses"], engine_losses)
