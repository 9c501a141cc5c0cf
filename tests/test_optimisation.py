"""AdamW and the warm-up + cosine schedule: the factor's landmarks, its floor, and exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from utils.config.experiment import OptimiserConfig
from utils.training.optimisation import build_optimiser, build_scheduler, learning_rate_factor

CONFIG = OptimiserConfig(learning_rate=1e-3, warmup_epochs=2, warmup_start_factor=0.1, min_lr_factor=0.05)
PER_EPOCH, EPOCHS = 5, 10  # 10 warm-up iterations, 50 in all


def _factors(config: OptimiserConfig = CONFIG, epochs: int = EPOCHS) -> list[float]:
    return [learning_rate_factor(i, iterations_per_epoch=PER_EPOCH, epochs=epochs, config=config)
            for i in range(PER_EPOCH * epochs)]


def test_warm_up_is_linear_from_the_start_factor_to_one():
    factors = _factors()
    assert factors[0] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.1 + 0.9 * 5 / 10)
    assert factors[10] == 1.0  # the first iteration after the warm-up
    assert all(a < b for a, b in zip(factors[:10], factors[1:11], strict=False))


def test_cosine_decays_monotonically_to_the_floor_at_the_last_iteration():
    factors = _factors()
    assert all(a > b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.05)
    # Iteration 30 is 20 of the 39 decay steps (10 .. 49) in.
    assert factors[30] == pytest.approx(0.05 + 0.95 * (1 + math.cos(math.pi * 20 / 39)) / 2)


def test_factor_never_drops_below_the_floor_even_past_the_end_or_in_the_warm_up():
    assert min(_factors()) == pytest.approx(0.05)
    assert learning_rate_factor(10_000, iterations_per_epoch=PER_EPOCH, epochs=EPOCHS, config=CONFIG) == 0.05
    low_start = OptimiserConfig(warmup_epochs=2, warmup_start_factor=0.01, min_lr_factor=0.05)
    assert _factors(low_start)[0] == 0.05


def test_no_warm_up_starts_at_one():
    factors = _factors(OptimiserConfig(warmup_epochs=0, min_lr_factor=0.01))
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.01)


def test_a_run_shorter_than_its_warm_up_warms_up_over_its_first_half():
    factors = [learning_rate_factor(i, iterations_per_epoch=5, epochs=2, config=CONFIG) for i in range(10)]
    assert factors[0] == pytest.approx(max(CONFIG.warmup_start_factor, CONFIG.min_lr_factor))
    assert factors[5] == 1.0 and factors[-1] == pytest.approx(CONFIG.min_lr_factor) and min(factors) > 0


def test_bad_lengths_are_rejected():
    with pytest.raises(ValueError, match="iterations_per_epoch must be an integer >= 1, got 0"):
        learning_rate_factor(0, iterations_per_epoch=0, epochs=EPOCHS, config=CONFIG)
    with pytest.raises(ValueError, match="iteration must be an integer >= 0, got -1"):
        learning_rate_factor(-1, iterations_per_epoch=PER_EPOCH, epochs=EPOCHS, config=CONFIG)


def _model_optimiser_scheduler() -> tuple[torch.nn.Module, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    model = torch.nn.Linear(3, 2)
    optimiser = build_optimiser(model, CONFIG)
    return model, optimiser, build_scheduler(optimiser, CONFIG, iterations_per_epoch=PER_EPOCH, epochs=EPOCHS)


def _train(model, optimiser, scheduler, steps: int) -> None:
    for _ in range(steps):
        model(torch.ones(4, 3)).square().mean().backward()
        optimiser.step()
        optimiser.zero_grad()
        scheduler.step()


def test_optimiser_is_adamw_and_not_fused_on_cpu():
    model, optimiser, _ = _model_optimiser_scheduler()
    assert isinstance(optimiser, torch.optim.AdamW)
    assert not optimiser.defaults["fused"] and optimiser.defaults["weight_decay"] == CONFIG.weight_decay
    with pytest.raises(ValueError, match="fused=True needs every parameter on CUDA"):
        build_optimiser(model, CONFIG, fused=True)


def test_scheduler_sets_the_learning_rate_of_each_iteration():
    model, optimiser, scheduler = _model_optimiser_scheduler()
    factors = _factors()
    for iteration in (0, 7, 10, 49):
        _train(model, optimiser, scheduler, iteration - scheduler.last_epoch)
        assert optimiser.param_groups[0]["lr"] == pytest.approx(1e-3 * factors[iteration], rel=1e-12)


def test_scheduler_state_round_trips_through_weights_only_load_with_the_exact_lr():
    model, optimiser, scheduler = _model_optimiser_scheduler()
    _train(model, optimiser, scheduler, 13)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, resumed_optimiser, resumed = _model_optimiser_scheduler()  # optimiser state not loaded
    resumed.load_state_dict(saved)
    assert resumed_optimiser.param_groups[0]["lr"] == optimiser.param_groups[0]["lr"]
    assert resumed.get_last_lr() == scheduler.get_last_lr() and resumed.last_epoch == 13
    _train(model, optimiser, scheduler, 1)
    _train(resumed_model, resumed_optimiser, resumed, 1)
    assert resumed_optimiser.param_groups[0]["lr"] == optimiser.param_groups[0]["lr"]
