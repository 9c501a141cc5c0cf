"""End-to-end tests of scripts/segment.py with tiny real checkpoints on small synthetic CTs.

The KiTS19-folder run goes through a subprocess, as a user runs it; the other paths call the
script's ``main`` in this process.
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
import torch
from test_ct_inference import TINY_2D, TINY_3D, write_tiny_checkpoint

from utils.data.nifti_io import save_nifti
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "segment.py"
CASE_IDS = ["case_00000", "case_00001"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("segment") / "data"
    generate_dataset(folder, 2, seed=4, options=SyntheticOptions(matrix=64), show_progress=False)
    return folder


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("runs") / "resunet3d_tiny", TINY_3D).parent


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("segment_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_a_kits19_folder_gives_one_prediction_per_case(data_dir: Path, run_3d: Path, tmp_path: Path) -> None:
    before = _snapshot(data_dir)
    out = tmp_path / "predictions"
    done = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(run_3d), "--input", str(data_dir),
                           "--output", str(out), "--device", "cpu", "--postprocess"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "segmented 2 of 2 CT(s)" in done.stdout and "resunet3d_tiny (resunet3d, cpu" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{c}.nii.gz" for c in CASE_IDS] + ["segmentation_run.json"]
    for case_id in CASE_IDS:
        ct, prediction = nib.load(data_dir / case_id / "imaging.nii.gz"), nib.load(out / f"{case_id}.nii.gz")
        assert prediction.shape == ct.shape and prediction.get_data_dtype() == np.uint8
        np.testing.assert_allclose(prediction.affine, ct.affine, atol=1e-5)
    record = json.loads((out / "segmentation_run.json").read_text())
    assert record["cases"] == {c: "written" for c in CASE_IDS} and record["postprocess"] is True
    assert _snapshot(data_dir) == before  # the input is untouched, bytes and modification times


def test_bad_files_are_refused_by_name_and_the_good_one_is_written(script: ModuleType, data_dir: Path, run_3d: Path,
                                                                   tmp_path: Path, capsys) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(data_dir / "case_00000" / "imaging.nii.gz", flat / "good.nii.gz")
    (flat / "x.nii.gz").write_text("not a CT\n")
    save_nifti(np.zeros((8, 8), np.int16), np.eye(4), flat / "flat2d.nii")
    (flat / "notes.txt").write_text("ignored\n")
    before = _snapshot(flat)
    out = tmp_path / "out"
    assert script.main(["--checkpoint", str(run_3d / "best.pt"), "--input", str(flat), "--output", str(out),
                        "--device", "cpu"]) == script.EXIT_FAILED
    stdout = capsys.readouterr().out
    assert "segmented 1 of 3 CT(s)" in stdout
    assert f"failed: x.nii.gz: {flat / 'x.nii.gz'}:" in stdout
    assert f"failed: flat2d.nii: {flat / 'flat2d.nii'}: not a 3D image: shape (8, 8)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "segmentation_run.json"]
    assert nib.load(out / "good.nii.gz").shape == nib.load(flat / "good.nii.gz").shape
    assert _snapshot(flat) == before


def test_a_2d_checkpoint_segments_one_file(script: ModuleType, data_dir: Path, tmp_path: Path, capsys) -> None:
    run = write_tiny_checkpoint(tmp_path / "unetr2d_tiny", TINY_2D)
    ct = data_dir / "case_00001" / "imaging.nii.gz"
    out = tmp_path / "pred" / "case_00001_labels.nii.gz"
    assert script.main(["--checkpoint", str(run), "--input", str(ct), "--output", str(out), "--device", "cpu",
                        "--tta"]) == script.EXIT_OK
    assert "(unetr2d, cpu, tta on" in capsys.readouterr().out
    prediction = nib.load(out)
    assert prediction.shape == nib.load(ct).shape
    np.testing.assert_allclose(prediction.affine, nib.load(ct).affine, atol=1e-5)


@pytest.mark.parametrize("output", ["SAME_FILE", "INPUT_DIR", "INSIDE_INPUT", "FILE_FOR_DIR"])
def test_outputs_that_would_touch_the_input_are_usage_errors(script: ModuleType, data_dir: Path, run_3d: Path,
                                                             tmp_path: Path, capsys, output: str) -> None:
    ct = data_dir / "case_00000" / "imaging.nii.gz"
    source, target = {"SAME_FILE": (ct, ct), "INPUT_DIR": (data_dir, data_dir),
                      "INSIDE_INPUT": (data_dir, data_dir / "case_00000" / "pred"),
                      "FILE_FOR_DIR": (data_dir, tmp_path / "pred.nii.gz")}[output]
    assert script.main(["--checkpoint", str(run_3d), "--input", str(source), "--output", str(target),
                        "--device", "cpu"]) == script.EXIT_USAGE
    assert "--output" in capsys.readouterr().err
    assert not (data_dir / "case_00000" / "pred").exists()


def test_other_usage_errors(script: ModuleType, data_dir: Path, run_3d: Path, tmp_path: Path, capsys) -> None:
    assert script.main(["--checkpoint", str(tmp_path / "nothing"), "--input", str(data_dir),
                        "--output", str(tmp_path / "o")]) == script.EXIT_USAGE
    assert "no such checkpoint file or run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert script.main(["--checkpoint", str(run_3d), "--input", str(tmp_path / "empty"),
                        "--output", str(tmp_path / "o")]) == script.EXIT_USAGE
    assert "no CT found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--checkpoint", str(run_3d), "--input", str(data_dir), "--output", str(tmp_path / "o"),
                            "--device", "cuda"]) == script.EXIT_USAGE
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
