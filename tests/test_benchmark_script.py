"""scripts/benchmark.py: every measurement of both configurations on the CPU, the table, the JSON, refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.benchmarks.suite import PARTS, BenchmarkPlan, format_benchmark, run_benchmark

REPO = Path(__file__).resolve().parents[1]

TINY_PLAN = BenchmarkPlan("configs/resunet3d_quick.yaml", "configs/unetr2d_quick.yaml", cases=3, matrix=64,
                          coverage_mm=(120.0, 140.0), volume_shape=(16, 48, 48), ct_shape=(24, 64, 64),
                          ct_spacing=(5.0, 3.0, 3.0), warmup=1, steps=2, baseline_warmup=1, baseline_steps=1,
                          compare_steps=2, repeats=1, workers=0, baseline_workers=0, ablation=True)
TINY_3D = ["model.channels=[4,8,16,32]", "patches.patch_size=[16,32,32]", "sliding_window.roi_size=[16,32,32]",
           "performance.augment_on_device=true", "performance.channels_last=true"]
TINY_2D = ["model.hidden_size=32", "model.mlp_dim=64", "model.num_heads=2", "model.feature_size=4",
           "slices.image_size=32", "training.batch_size=4", "performance.augment_on_device=true"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("benchmark")


@pytest.fixture(scope="module")
def result(work):
    return run_benchmark(TINY_PLAN, work, torch.device("cpu"), overrides_3d=TINY_3D, overrides_2d=TINY_2D,
                         show_progress=False)


def test_every_measurement_is_taken_for_both_configurations(result):
    names = {(m["name"], m["settings"]) for m in result["measurements"]}
    expected = {"resunet3d training", "unetr2d training", "sliding-window inference", "segment one CT (file to file)"}
    ablated = {("resunet3d training", f"ours without {option}") for option in ("cache", "channels_last",
                                                                               "augment_on_device")}
    ablated |= {("unetr2d training", f"ours without {option}") for option in ("cache", "augment_on_device")}
    assert names == {(name, settings) for name in expected for settings in ("baseline", "ours")} | ablated
    by_key = {(m["name"], m["settings"]): m for m in result["measurements"]}
    for m in result["measurements"]:
        assert m["value"] > 0 and m["peak_memory_gb"] is None  # no GPU memory on the CPU
    train3d = by_key[("resunet3d training", "ours")]
    assert train3d["unit"] == "patches/s" and train3d["details"]["pipeline"] == "cache"
    assert by_key[("resunet3d training", "baseline")]["details"]["pipeline"] == "per_sample"
    assert by_key[("unetr2d training", "baseline")]["details"]["batch_size"] == 4
    assert by_key[("unetr2d training", "ours")]["unit"] == "slices/s"
    assert by_key[("sliding-window inference", "baseline")]["details"]["sw_batch_size"] == 1
    segment_ours = by_key[("segment one CT (file to file)", "ours")]["details"]
    assert segment_ours["ct_shape"] == [24, 64, 64]  # KiTS19 files store slices first
    assert set(segment_ours["stage_seconds"]) == {"read", "preprocess", "predict", "restore", "write"}
    rates = result["ratios"]["resunet3d training"]
    assert rates == pytest.approx(train3d["value"] / by_key[("resunet3d training", "baseline")]["value"])
    times = result["ratios"]["segment one CT (file to file)"]
    assert times == pytest.approx(by_key[("segment one CT (file to file)", "baseline")]["value"]
                                  / by_key[("segment one CT (file to file)", "ours")]["value"])


def test_the_training_comparison_scores_both_settings_after_the_same_steps(result):
    comparison = result["training_comparison"]
    for name in ("baseline", "ours"):
        assert comparison[name]["steps"] == 2 and comparison[name]["validation_cases"] >= 1
        assert 0 <= comparison[name]["kidney_dice"] <= 1 and 0 <= comparison[name]["mean_dice"] <= 1
    ours, baseline = comparison["ours"]["mean_dice"], comparison["baseline"]["mean_dice"]
    assert comparison["ours_at_least_baseline"] == (ours >= baseline)


def test_the_table_names_the_device_every_measurement_and_the_targets(result):
    table = format_benchmark(result)
    assert "CPU" in table and torch.__version__ in table
    for name in ("resunet3d training", "unetr2d training", "sliding-window inference", "segment one CT"):
        assert name in table
    assert "not applicable on a CPU" in table and "training comparison, ours" in table
    assert "what each option bought in resunet3d training" in table and "  channels_last" in table
    assert "segment one CT (file to file), ours, by stage: read" in table


def test_the_script_prints_the_table_and_writes_json(result, work, tmp_path):
    out = tmp_path / "bench.json"  # the synthetic data of the measurements above is reused
    run = subprocess.run([sys.executable, "scripts/benchmark.py", "--device", "cpu", "--parts", "sliding_window",
                          "--work", str(work), "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    saved = json.loads(out.read_text())
    assert [m["name"] for m in saved["measurements"]] == ["sliding-window inference"] * 2
    assert "sliding-window inference" in run.stdout and "ours/baseline" in run.stdout


def _script_main():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_script_refuses_an_unknown_part_and_a_missing_gpu(tmp_path, capsys):
    main = _script_main()
    assert main(["--device", "cpu", "--parts", "warp_drive", "--work", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "warp_drive" in error and all(part in error for part in PARTS)
    assert not any(tmp_path.iterdir()), "nothing is generated before the arguments are checked"
    if not torch.cuda.is_available():
        assert main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_every_timed_training_step_is_the_engines_step_through_accelerate(result, work, monkeypatch):
    from accelerate import Accelerator

    import utils.benchmarks.speed as speed
    import utils.training.engine as engine
    from utils.benchmarks.suite import _config
    from utils.preprocessing.cache import open_cache

    assert speed.train_step is engine.train_step  # one function, the one training calls
    calls = []

    def spy(parts, batch, stop=None):
        calls.append(parts)
        return engine.train_step(parts, batch, stop)

    monkeypatch.setattr(speed, "train_step", spy)
    config = _config(TINY_PLAN.config_3d, work, TINY_3D)
    (plan_folder,) = (work / "cache").glob("spacing_*")
    settings = speed.our_settings(config, torch.device("cpu"), workers=0)
    dataset, augmenter = speed.build_training_data(config, settings, open_cache(plan_folder), work / "data", None,
                                                   3 * settings.batch_size)
    model = speed.build_network(config, settings, torch.device("cpu"))
    timing = speed.train_steps(config, settings, model, dataset, augmenter, torch.device("cpu"), warmup=1, steps=2)
    assert len(calls) == 3 and len(timing["losses"]) == 3 and timing["final_loss"] == timing["losses"][-1]
    parts = calls[0]
    assert isinstance(parts.accelerator, Accelerator) and parts.accelerator.mixed_precision == "no"
    assert parts.scheduler.last_epoch == 3  # training's per-iteration schedule, stepped by every step
    assert parts.augmenter is augmenter and parts.memory_format == torch.channels_last_3d
    ours = [m for m in result["measurements"] if m["name"] == "resunet3d training" and m["settings"] == "ours"][0]
    assert len(ours["details"]["losses"]) == TINY_PLAN.warmup + TINY_PLAN.steps
    assert ours["details"]["skipped_steps"] == 0


def test_settings_of_other_precisions_get_fresh_accelerators_in_one_process():
    from dataclasses import replace

    from accelerate import Accelerator

    from utils.benchmarks.speed import build_accelerator, our_settings
    from utils.config.experiment import load_experiment_config

    settings = our_settings(load_experiment_config(REPO / TINY_PLAN.config_3d), torch.device("cpu"), workers=0)
    bf16 = build_accelerator(replace(settings, precision="bf16"), torch.device("cpu"))
    assert bf16.mixed_precision == "bf16" and bf16.native_amp
    with pytest.raises(ValueError, match="mixed_precision"):  # what accelerate alone does: one precision per process
        Accelerator(mixed_precision="no", cpu=True)
    plain = build_accelerator(replace(settings, precision="no"), torch.device("cpu"))
    assert plain.mixed_precision == "no" and not plain.native_amp
