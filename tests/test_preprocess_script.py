"""End-to-end tests of scripts/preprocess.py on a tiny synthetic data folder.

The full runs go through a subprocess, as a user runs the script; the quick error paths call its
``main`` in this process.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

from utils.data.kits_layout import IMAGING_NAME, SEGMENTATION_NAME
from utils.data.nifti_io import save_nifti
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "preprocess.py"
CASE_IDS = ["case_00000", "case_00001", "case_00002"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("script") / "data"
    generate_dataset(folder, 3, seed=2, options=SyntheticOptions(matrix=64, spacing=(3.0, 1.5, 1.5)),
                     show_progress=False)
    return folder


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("preprocess_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def _plan_folder(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("plan folder: "))
    return Path(line.removeprefix("plan folder: "))


def test_the_script_builds_the_cache_then_skips_it(data_dir: Path, tmp_path: Path) -> None:
    args = ("--data", str(data_dir), "--out", str(tmp_path / "cache"), "--set", "preprocessing.target_spacing=[4,2,2]")
    first = _run(*args)
    assert first.returncode == 0, first.stderr
    folder = _plan_folder(first.stdout)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("spacing_4x2x2_")
    assert "3 in the cache (3 written, 0 skipped" in first.stdout and "0 failed" in first.stdout
    assert "clip" in first.stdout and "HU" in first.stdout
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["case_ids"] == CASE_IDS
    assert plan["preprocessing"]["target_spacing"] == [4, 2, 2]  # the override
    assert plan["preprocessing"]["image_dtype"] == "float16"  # from configs/preprocessing.yaml
    assert plan["preprocessing"]["cache_dir"] == str(tmp_path / "cache")  # --out
    second = _run(*args)
    assert second.returncode == 0, second.stderr
    assert _plan_folder(second.stdout) == folder
    assert "(0 written, 3 skipped as up to date)" in second.stdout
    assert sorted(p.name for p in data_dir.iterdir()) == [*CASE_IDS, "kits.json"]  # the data folder is untouched


def test_the_default_config_and_the_data_variable(script: ModuleType, data_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("KITS19_DATA", str(data_dir))
    assert script.main(["--out", str(tmp_path / "cache")]) == 0
    folder = _plan_folder(capsys.readouterr().out)
    assert folder.name.startswith("spacing_3.22x1.62x1.62_") and (folder / "cases" / "case_00002").is_dir()


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preprocess.py: error: ")
    return lines[0]


def test_a_missing_data_folder_exits_2(script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing"
    assert script.main(["--data", str(missing), "--out", str(tmp_path / "cache")]) == 2
    assert str(missing) in _one_line_error(capsys)
    monkeypatch.delenv("KITS19_DATA", raising=False)
    assert script.main(["--out", str(tmp_path / "cache")]) == 2
    assert "KITS19_DATA" in _one_line_error(capsys)
    assert not (tmp_path / "cache").exists()


def test_a_cache_inside_the_data_folder_is_refused(script: ModuleType, data_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    for out in (data_dir / "cache", data_dir, data_dir / "case_00000" / "cache"):
        assert script.main(["--data", str(data_dir), "--out", str(out)]) == 2
        assert str(data_dir) in _one_line_error(capsys)
    assert sorted(p.name for p in data_dir.iterdir()) == [*CASE_IDS, "kits.json"]


def test_bad_settings_exit_2(script: ModuleType, data_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    out = ["--data", str(data_dir), "--out", str(tmp_path / "cache")]
    assert script.main([*out, "--set", "preprocessing.image_dtype=int8"]) == 2
    assert "image_dtype must be one of ['float16', 'float32'], got 'int8'" in _one_line_error(capsys)
    assert script.main([*out, "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: config file not found" in _one_line_error(capsys)
    assert script.main([*out, "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in _one_line_error(capsys)


def test_failed_and_inference_only_cases_are_reported(script: ModuleType, data_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    (data / "case_00003").mkdir()
    shutil.copy2(data / "case_00000" / IMAGING_NAME, data / "case_00003" / IMAGING_NAME)
    out = ["--data", str(data), "--out", str(tmp_path / "cache"), "--set", "preprocessing.target_spacing=[6,3,3]"]
    assert script.main(out) == 0  # a case without a segmentation is normal (a test case)
    assert "1 without a segmentation" in capsys.readouterr().out
    segmentation = nib.load(data / "case_00001" / SEGMENTATION_NAME)
    corrupt = np.asarray(segmentation.dataobj).copy()
    corrupt[0, 0, 0] = 7
    save_nifti(corrupt, segmentation.affine, data / "case_00001" / SEGMENTATION_NAME)
    assert script.main(out) == 1
    stdout = capsys.readouterr().out
    assert "2 in the cache" in stdout and "1 failed" in stdout
    assert "failed: case_00001:" in stdout and "bad_labels" in stdout
    assert "not cached (no segmentation, inference only): case_00003" in stdout


def test_an_experiment_config_builds_the_cache_training_reads(script: ModuleType, data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    from utils.config.experiment import load_experiment_config
    from utils.preprocessing.preprocess import plan_folder, prepare_training_cache

    config_path = tmp_path / "quick.yaml"
    text = (REPO_ROOT / "configs" / "resunet3d_quick.yaml").read_text()
    config_path.write_text(text.replace("data_dir: data/synthetic_demo", f"data_dir: {data_dir}")
                           .replace("cache_dir: data/cache_quick", f"cache_dir: {tmp_path / 'cache'}"))
    monkeypatch.delenv("KITS19_DATA", raising=False)
    assert script.main(["--config", str(config_path)]) == 0  # data folder and cache from the experiment config
    out = capsys.readouterr().out
    folder = _plan_folder(out)
    experiment = load_experiment_config(config_path)
    assert folder == plan_folder(experiment.preprocessing)
    assert f"training with {config_path} reads this plan folder" in out
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["preprocessing"]["target_spacing"] == [5.0, 3.0, 3.0] and plan["preprocessing"]["image_dtype"] == \
        "float32"
    assert prepare_training_cache(experiment, show_progress=False) == folder  # training finds it up to date
    assert script.main(["--config", str(config_path), "--set", "model.strides=[2,0,2]"]) == 2
    assert "strides must be > 0" in _one_line_error(capsys)


def test_the_guard_flag_allows_a_cache_inside_the_data_folder(script: ModuleType, data_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    out = ["--data", str(data), "--out", str(data / "cache"), "--set", "preprocessing.target_spacing=[6,3,3]"]
    assert script.main(out) == 2
    assert "--allow-inside-input" in _one_line_error(capsys)
    assert script.main([*out, "--allow-inside-input"]) == 0
    assert (data / "cache").is_dir()
