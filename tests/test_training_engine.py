"""The training engine: real training steps, the run folder, exact resume after SIGKILL, two processes, failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.config.experiment import ExperimentConfig
from utils.config.loading import build_config, config_as_dict
from utils.data.kits_layout import SEGMENTATION_NAME
from utils.data.nifti_io import load_nifti, read_voxels, save_nifti
from utils.datasets.patches import PatchDataset, background_value
from utils.networks.checkpoints import load_checkpoint
from utils.networks.losses import RegionDice, build_loss
from utils.networks.models import build_model
from utils.preprocessing.cache import open_cache
from utils.training.engine import NonFiniteLossError, train
from utils.training.optimisation import build_optimiser

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_3d_unet.py"

TINY = {
    "preprocessing": {"target_spacing": [4.0, 4.0, 4.0], "image_dtype": "float32"},
    "split": {"validation_fraction": 0.25},
    "patches": {"patch_size": [8, 16, 16], "samples_per_epoch": 8},
    "augmentation": {"affine_prob": 0.5, "elastic_prob": 0.2},
    "model": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "optimiser": {"learning_rate": 0.01, "warmup_epochs": 1},
    "sliding_window": {"roi_size": [8, 16, 16], "overlap": 0.25, "sw_batch_size": 2},
    "training": {"epochs": 2, "batch_size": 2, "num_workers": 0, "validate_every": 1, "mixed_precision": "no",
                 "deterministic": True},
}


def tiny_config(tmp_path: Path, **sections) -> ExperimentConfig:
    """The tiny experiment with its cache and runs under ``tmp_path``; ``sections`` update sections."""
    mapping = json.loads(json.dumps(TINY))
    mapping["preprocessing"]["cache_dir"] = str(tmp_path / "cache")
    mapping["training"]["output_dir"] = str(tmp_path / "runs")
    for name, values in sections.items():
        mapping.setdefault(name, {}).update(values)
    return build_config(ExperimentConfig, mapping)


def write_config(tmp_path: Path, config: ExperimentConfig) -> Path:
    import yaml
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config_as_dict(config)))))
    return path


@pytest.mark.parametrize("loss", [{}, {"name": "dice_ce", "region_dice": True}], ids=["default", "region_dice"])
def test_loss_decreases_on_a_fixed_batch(tiny_cache, loss):
    torch.manual_seed(0)
    config = tiny_config(Path("unused"), loss=loss)
    dataset = PatchDataset(tiny_cache.cases(), config.patches, None, seed=0, pad_value=background_value(tiny_cache))
    batch = [dataset[i] for i in range(2)]
    image, label = torch.stack([b["image"] for b in batch]), torch.stack([b["label"] for b in batch])
    model, loss_function = build_model(config.model), build_loss(config.loss)
    optimiser = build_optimiser(model, config.optimiser)
    losses = []
    for _ in range(25):
        loss = loss_function(model(image), label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_a_run_writes_its_folder_and_never_reuses_one(tiny_data, tmp_path):
    config = tiny_config(tmp_path, training={"run_name": "first"})
    result = train(config, data_dir=tiny_data, show_progress=False)
    folder = result.run_folder
    assert folder == tmp_path / "runs" / "first"
    expected_files = {"config.yaml", "last.pt", "best.pt", "training_progress.json", "train.log"}
    assert expected_files <= {p.name for p in folder.iterdir()}
    records = json.loads((folder / "training_progress.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "val_loss", "kidney_dice", "tumour_dice", "learning_rate", "epoch_seconds",
                "samples_per_second"):
        assert records[-1][key] is not None
    assert "cache grid" in records[-1]["validation_space"] and records[-1]["learning_rate"] > 0
    assert isinstance(records[-1]["unpredicted"], str)
    checkpoint = load_checkpoint(folder / "last.pt")
    assert checkpoint["epoch"] == 2 and tuple(checkpoint["config"]["model"]["channels"]) == (4, 8, 16)
    assert checkpoint["preprocessing_plan"]["plan_hash"]
    assert "epoch 2/2" in (folder / "train.log").read_text()
    with pytest.raises(FileExistsError, match="--resume"):
        train(config, data_dir=tiny_data, show_progress=False)


def test_validation_names_a_class_the_model_hardly_predicts(tiny_data, tmp_path, monkeypatch):
    import utils.training.engine as engine

    real = engine.predict_volume_logits

    def kidney_called_tumour(*args, **kwargs):  # the real prediction, every kidney voxel relabelled tumour
        logits = real(*args, **kwargs).clone()
        logits[:, 2] = torch.maximum(logits[:, 1], logits[:, 2]) + 1.0
        return logits

    monkeypatch.setattr(engine, "predict_volume_logits", kidney_called_tumour)
    result = train(tiny_config(tmp_path, training={"run_name": "no_kidney"}), data_dir=tiny_data, show_progress=False)
    assert all(record["unpredicted"].startswith("kidney (1) 0 %") for record in result.records)
    log = (result.run_folder / "train.log").read_text()
    assert "hardly predicted: kidney (1) 0 %" in log and "the final model hardly predicts kidney (1) 0 %" in log
    assert load_checkpoint(result.run_folder / "last.pt")["metrics"]["unpredicted"].startswith("kidney (1) 0 %")


def test_unpredicted_labels_counts_over_every_case():
    from utils.training.engine import unpredicted_labels

    def case(predicted, true):
        return [np.array(predicted), np.array(true)]

    # KiTS19: 5 kidney voxels predicted against 1000 true ones (0.5 % < 1 %): named; the tumour passes
    counts = [case([900, 5, 100], [800, 600, 100]), case([1000, 0, 0], [600, 400, 0])]
    assert unpredicted_labels(counts, "kits19") == "kidney (1) 0.5 %"
    assert unpredicted_labels(counts, "kits19", min_fraction=0.004) == ""
    assert unpredicted_labels([case([90, 5, 5], [90, 10, 0])], "kits19") == ""  # tumour absent: not named
    # KiTS23: tumour and cyst held, neither predicted
    assert unpredicted_labels([case([90, 10, 0, 0], [80, 10, 5, 5])], "kits23") == "tumour (2) 0 %, cyst (3) 0 %"
    assert unpredicted_labels([], "kits19") == ""


def _train_command(config_path: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(config_path), "--data", str(data), *extra]


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(tiny_data, tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 4, "validate_every": 2})
    config_path = write_config(tmp_path, config)
    whole = subprocess.run(_train_command(config_path, tiny_data, "--set", "training.run_name=whole"),
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert whole.returncode == 0, whole.stderr
    whole_progress = json.loads((tmp_path / "runs" / "whole" / "training_progress.json").read_text())
    expected = [r["train_loss"] for r in whole_progress]
    killed_folder = tmp_path / "runs" / "killed"
    process = subprocess.Popen(_train_command(config_path, tiny_data, "--set", "training.run_name=killed"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    progress = killed_folder / "training_progress.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if progress.is_file() and len(json.loads(progress.read_text() or "[]")) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run([sys.executable, str(SCRIPT), "--resume", str(killed_folder), "--data", str(tiny_data)],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    records = json.loads(progress.read_text())
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert np.allclose([r["train_loss"] for r in records], expected, rtol=0, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_train_disjoint_samples_and_one_writes(tiny_data, tmp_path):
    config = tiny_config(tmp_path, training={"run_name": "ddp", "epochs": 2})
    config_path = write_config(tmp_path, config)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), str(SCRIPT), "--config", str(config_path), "--data", str(tiny_data)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, env=environment)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    records = json.loads((tmp_path / "runs" / "ddp" / "training_progress.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert record["world_size"] == 2 and record["samples_per_rank"] == [4, 4] and record["ranks_disjoint"]
    assert (tmp_path / "runs" / "ddp" / "train.log").read_text().count("epoch 1/2 |") == 1


def test_an_unwritable_output_folder_is_refused_before_training(tiny_data, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the runs folder should be")
    config = tiny_config(tmp_path, training={"output_dir": str(blocker / "runs")})
    run = subprocess.run(_train_command(write_config(tmp_path, config), tiny_data), capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert run.returncode == 1 and "not_a_folder" in run.stderr
    assert not (tmp_path / "cache").exists()  # refused before any data work


def test_a_corrupt_case_is_named_and_refused_or_skipped(tiny_data, tmp_path):
    data = tmp_path / "data"
    for case in sorted(tiny_data.glob("case_*")):
        (data / case.name).mkdir(parents=True)
        for file in case.iterdir():
            (data / case.name / file.name).symlink_to(file)
    broken = data / "case_00001" / SEGMENTATION_NAME
    source = load_nifti(broken)
    labels = read_voxels(source, np.uint8)
    labels[0, 0, 0] = 7
    broken.unlink()
    save_nifti(labels, source.affine, broken)
    with pytest.raises(ValueError, match="case_00001"):
        train(tiny_config(tmp_path), data_dir=data, show_progress=False)
    result = train(tiny_config(tmp_path, training={"on_bad_case": "skip", "epochs": 1}), data_dir=data,
                   show_progress=False)
    assert "case_00001" not in load_checkpoint(result.run_folder / "last.pt")["preprocessing_plan"]["case_ids"]


class _NaNAfter(torch.nn.Module):
    """Wraps a loss and returns NaN from its ``after``-th call on."""

    def __init__(self, loss: torch.nn.Module, after: int):
        super().__init__()
        self.loss, self.after, self.calls = loss, after, 0

    def forward(self, logits, labels):
        self.calls += 1
        value = self.loss(logits, labels)
        return value * float("nan") if self.calls >= self.after and self.training_step else value

    @property
    def training_step(self) -> bool:
        return torch.is_grad_enabled()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    import utils.training.setup as setup
    # per epoch: 4 training calls, then 1 validation call (no gradient: never NaN); call 7 is epoch 2, step 2
    monkeypatch.setattr(setup, "build_loss", lambda config, dataset: _NaNAfter(build_loss(config, dataset), after=7))
    config = tiny_config(tmp_path, training={"run_name": "nan", "epochs": 3})
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 2"):
        train(config, data_dir=tiny_data, show_progress=False)
    assert load_checkpoint(tmp_path / "runs" / "nan" / "last.pt")["epoch"] == 1
    skipping = tiny_config(tmp_path, training={"run_name": "skip", "epochs": 2, "nonfinite_loss": "skip"})
    result = train(skipping, data_dir=tiny_data, show_progress=False)
    assert [r["skipped_steps"] for r in result.records] == [0, 3]


TINY_UNETR = {"model": {"name": "unetr2d", "feature_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2},
              "slices": {"image_size": 32, "samples_per_epoch": 8}, "slice_inference": {"batch_size": 16}}
UNETR_SCRIPT = REPO / "scripts" / "train_unetr.py"


def test_unetr_trains_on_slices_and_is_scored_per_case_like_the_3d_model(tiny_data, tiny_cache, tmp_path):
    from utils.datasets.patches import VolumeDataset
    from utils.inference.predict import predict_volume_logits
    from utils.metrics.scoring import score_case

    config = tiny_config(tmp_path, **TINY_UNETR, training={"run_name": "unetr"})
    result = train(config, data_dir=tiny_data, show_progress=False)
    records = result.records
    assert [r["epoch"] for r in records] == [1, 2] and all(np.isfinite(r["train_loss"]) for r in records)
    checkpoint = load_checkpoint(result.run_folder / "last.pt")
    assert checkpoint["config"]["model"]["name"] == "unetr2d"
    # the validation volumes are the split's, the same the 3D model is validated on
    _, validation_ids = tiny_cache.split(0)
    assert [case["case_id"] for case in records[-1]["per_case"]] == sorted(validation_ids)
    # and the recorded scores are score_case of the whole-volume prediction rebuilt from last.pt
    model = build_model(config.model, (32, 32))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    (plan_folder,) = (tmp_path / "cache").glob("spacing_*")  # the cache this run built from tiny_data
    cache = open_cache(plan_folder)
    volumes = VolumeDataset(cache.cases(sorted(validation_ids)))
    for item, recorded in zip(volumes, records[-1]["per_case"], strict=False):
        logits = predict_volume_logits(model, item["image"][None], config, pad_value=background_value(cache))
        assert logits.shape[2:] == item["label"].shape[1:]
        scores = score_case(logits.argmax(dim=1)[0].to(torch.uint8).numpy(), item["label"][0].numpy())
        assert scores["kidney_dice"] == pytest.approx(recorded["kidney_dice"], abs=1e-6)
        assert scores["tumour_dice"] == pytest.approx(recorded["tumour_dice"], abs=1e-6)


def test_each_training_script_refuses_the_other_models_config(tiny_data, tmp_path):
    unetr_config = write_config(tmp_path, tiny_config(tmp_path, **TINY_UNETR))
    run = subprocess.run([sys.executable, str(SCRIPT), "--config", str(unetr_config), "--data", str(tiny_data)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2 and "scripts/train_unetr.py" in run.stderr
    run = subprocess.run([sys.executable, str(UNETR_SCRIPT), "--config", str(unetr_config), "--data", str(tiny_data),
                          "--set", "training.epochs=1", "--set", "training.run_name=script"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "run folder" in run.stdout and (tmp_path / "runs" / "script" / "best.pt").is_file()


class _StopAfterFirstEpoch(Exception):
    pass


def _stop_after_first_epoch(record):
    if record["epoch"] == 1:
        raise _StopAfterFirstEpoch


def test_unetr_stopped_by_an_epoch_callback_resumes_exactly(tiny_data, tmp_path):
    whole = train(tiny_config(tmp_path, **TINY_UNETR, training={"run_name": "whole"}), data_dir=tiny_data,
                  show_progress=False)
    config = tiny_config(tmp_path, **TINY_UNETR, training={"run_name": "stopped"})
    with pytest.raises(_StopAfterFirstEpoch):
        train(config, data_dir=tiny_data, show_progress=False, epoch_callback=_stop_after_first_epoch)
    assert load_checkpoint(tmp_path / "runs" / "stopped" / "last.pt")["epoch"] == 1
    resumed = train(config, data_dir=tiny_data, resume=tmp_path / "runs" / "stopped", show_progress=False)
    assert [r["epoch"] for r in resumed.records] == [1, 2]
    assert np.allclose([r["train_loss"] for r in resumed.records], [r["train_loss"] for r in whole.records],
                       rtol=0, atol=1e-6)
    assert resumed.records[-1]["kidney_dice"] == pytest.approx(whole.records[-1]["kidney_dice"], abs=1e-6)


def test_set_up_takes_a_prepared_cache_and_does_no_data_work(tiny_cache, tmp_path, monkeypatch):
    import utils.preprocessing.preprocess as preprocess
    import utils.training.setup as setup

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("set_up_run must not preprocess: train() prepares the cache before set-up")

    monkeypatch.setattr(preprocess, "preprocess_dataset", no_preprocessing)
    monkeypatch.setattr(setup, "prepare_training_cache", no_preprocessing)
    config = tiny_config(tmp_path, training={"run_name": "prepared"}, performance={"augment_on_device": True},
                         loss={"name": "dice_ce", "region_dice": True})
    state = setup.set_up_run(config, tiny_cache.folder, resume=None, wandb=False)
    try:
        # the loss section reaches the run with the experiment's dataset: KiTS19's two regions
        assert isinstance(state.loss.dice, RegionDice) and state.loss.dice.membership.tolist() == [[0, 1, 1], [0, 0, 1]]
        assert state.cache.folder == tiny_cache.folder and state.folder == tmp_path / "runs" / "prepared"
        assert state.pad_value == background_value(tiny_cache) and state.augmenter is not None
        assert state.memory_format == torch.contiguous_format and state.wandb_logged_until == 0
        parts = state.step_parts
        assert parts.model is state.model and parts.scheduler is state.scheduler and parts.augmenter is state.augmenter
        assert parts.grad_clip_norm == config.optimiser.grad_clip_norm
    finally:
        state.close()
