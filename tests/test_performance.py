"""Speed settings: memory format, torch.compile with its fallback, loader options, and training with them."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_training_engine import tiny_config
from utils.config.experiment import PerformanceConfig
from utils.training.engine import train
from utils.training.performance import CompiledForward, loader_options, memory_format
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
