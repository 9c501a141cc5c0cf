"""Speed settings: memory format, torch.compile with its fallback, loader options, and training with them."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_training_engine import tiny_config
from utils.config.experiment import PerformanceConfig, TrainingConfig
from utils.networks.checkpoints import load_checkpoint
from utils.training.engine import train
from utils.training.performance import (
    CompiledForward,
    loader_options,
    memory_format,
    native_bf16,
    resolve_precision,
)
from utils.training.stop_signals import ignore_stop_signals


def test_memory_format_follows_the_setting_and_the_dimensions():
    assert memory_format(PerformanceConfig(), 3) == torch.contiguous_format
    assert memory_format(PerformanceConfig(channels_last=True), 3) == torch.channels_last_3d
    assert memory_format(PerformanceConfig(channels_last=True), 2) == torch.channels_last


def _failing_backend(graph, example_inputs):
    raise RuntimeError("no compiler on this machine")


def test_a_failing_compilation_falls_back_to_the_plain_module_with_a_warning(caplog):
    torch._dynamo.reset()
    module = torch.nn.Conv3d(1, 2, 3, padding=1)
    forward = CompiledForward(module, PerformanceConfig(compile=True), backend=_failing_backend)
    assert forward.is_compiled
    image = torch.randn(1, 1, 4, 4, 4)
    with caplog.at_level("WARNING"):
        out = forward(image)
    assert torch.allclose(out, module(image)) and not forward.is_compiled
    assert "no compiler on this machine" in forward.failure and "torch.compile failed" in caplog.text
    assert torch.allclose(forward(image), module(image))  # later calls go straight to the module


def test_compilation_keeps_the_results_and_the_module_unchanged():
    torch._dynamo.reset()
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU())
    keys = list(module.state_dict())
    forward = CompiledForward(module, PerformanceConfig(compile=True), backend="eager")
    image = torch.randn(2, 1, 8, 8)
    assert torch.allclose(forward(image), module(image)) and forward.is_compiled and forward.failure is None
    assert list(module.state_dict()) == keys
    assert CompiledForward(module, PerformanceConfig()).is_compiled is False


def test_loader_options_pin_only_for_gpus_and_prefetch_only_with_workers():
    performance = PerformanceConfig(prefetch_factor=6)
    on_cpu = loader_options(performance, 0, torch.device("cpu"))
    assert on_cpu == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    on_gpu = loader_options(performance, 3, torch.device("cuda"))
    assert on_gpu["pin_memory"] and on_gpu["prefetch_factor"] == 6 and on_gpu["persistent_workers"]
    assert on_gpu["worker_init_fn"] is ignore_stop_signals
    assert not loader_options(PerformanceConfig(pin_memory=False), 1, torch.device("cuda"))["pin_memory"]
    with pytest.raises(ValueError, match="compile_mode"):
        PerformanceConfig(compile_mode="fastest")


def test_training_with_the_speed_settings_learns_the_same(tiny_data, tmp_path):
    def losses(name, **performance):
        config = tiny_config(tmp_path, training={"run_name": name}, performance=performance)
        result = train(config, data_dir=tiny_data, show_progress=False)
        return [r["train_loss"] for r in json.loads((result.run_folder / "training_progress.json").read_text())]

    reference = losses("plain")
    assert losses("on_device", augment_on_device=True) == pytest.approx(reference, abs=1e-6)
    assert losses("channels_last", channels_last=True, augment_on_device=True) == pytest.approx(reference, abs=1e-4)


def test_auto_precision_is_bf16_on_gpus_that_have_it_and_float32_on_cpus(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert native_bf16(cpu) is native and resolve_precision("auto", cpu) == "no"
    assert resolve_precision("bf16", cpu) == "bf16"  # an explicit choice is kept where the CPU computes it
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="neither AVX512-BF16 nor AMX.*performance.allow_emulated_bf16"):
        resolve_precision("bf16", cpu)  # emulated: several times slower, refused
    with caplog.at_level("WARNING"):
        assert resolve_precision("bf16", cpu, allow_emulated_bf16=True) == "bf16"
    assert "emulated" in caplog.text
    assert resolve_precision("no", cpu) == "no" and resolve_precision("auto", cpu) == "no"
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_precision("auto", cuda) == expected
    assert [resolve_precision(p, cuda) for p in ("no", "fp16", "bf16")] == ["no", "fp16", "bf16"]
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainingConfig(mixed_precision="fp8")


def test_bf16_on_a_cpu_that_would_emulate_it_is_refused_before_the_run_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    config = tiny_config(tmp_path, training={"run_name": "emulated", "mixed_precision": "bf16"})
    with pytest.raises(ValueError, match="training.mixed_precision is bf16"):
        train(config, data_dir=tiny_data, show_progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_bf16_then_float32_training_in_one_process(tiny_data, tmp_path):
    """A notebook trains in bf16, then in float32, in one kernel: both train, each in its precision.

    On this tiny network the CPU's bf16 convolution backward pass can return NaN weight gradients
    for a finite loss; those steps are skipped (counted), and the weights stay finite.
    """
    def run(name, precision):
        config = tiny_config(tmp_path, training={"run_name": name, "mixed_precision": precision,
                                                 "nonfinite_loss": "skip"},
                             performance={"allow_emulated_bf16": True})  # this CPU may emulate bf16
        result = train(config, data_dir=tiny_data, show_progress=False)
        records = json.loads((result.run_folder / "training_progress.json").read_text())
        weights = load_checkpoint(result.run_folder / "last.pt")["model"]
        assert all(torch.isfinite(w).all() for w in weights.values())
        return [r["train_loss"] for r in records], sum(r["skipped_steps"] for r in records), result.run_folder

    reference, skipped, folder = run("float32", "no")
    assert skipped == 0 and "precision: float32" in (folder / "train.log").read_text()
    in_bf16, skipped, folder = run("bf16", "bf16")
    assert "precision: bf16 autocast" in (folder / "train.log").read_text()
    assert skipped > 0 or in_bf16 != reference, "bf16 changes the rounding (or skips NaN-gradient steps)"
    assert run("float32_again", "no")[0] == reference, "the second float32 run is exactly the first"
