"""End-to-end tests of scripts/segment.py with tiny real checkpoints on small synthetic CTs.

The KiTS19-folder run goes through a subprocess, as a user runs it; the other paths call the
script's ``main`` in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
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
from utils.data.output_guard import OWN_NIFTI_DESCRIPTION
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
    assert record["restore"] == "probabilities"
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
                        "--device", "cpu", "--restore", "labels"]) == script.EXIT_FAILED
    stdout = capsys.readouterr().out
    assert "segmented 1 of 3 CT(s)" in stdout
    assert f"failed: x.nii.gz: {flat / 'x.nii.gz'}:" in stdout
    assert f"failed: flat2d.nii: {flat / 'flat2d.nii'}: not a 3D image: shape (8, 8)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "segmentation_run.json"]
    assert nib.load(out / "good.nii.gz").shape == nib.load(flat / "good.nii.gz").shape
    assert json.loads((out / "segmentation_run.json").read_text())["restore"] == "labels"
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


def test_the_annotation_beside_a_ct_is_never_replaced(script: ModuleType, data_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    """Output in the CT's own case folder: refused before the checkpoint is even looked at."""
    ct = data_dir / "case_00000" / "imaging.nii.gz"
    annotation = data_dir / "case_00000" / "segmentation.nii.gz"
    before = _snapshot(data_dir)
    missing_run = tmp_path / "no_such_run"  # the guard answers first, so this is never read
    assert script.main(["--checkpoint", str(missing_run), "--input", str(ct), "--output", str(annotation),
                        "--device", "cpu"]) == script.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("segment.py: error: --output ") and str(annotation.resolve()) in err
    assert str((data_dir / "case_00000").resolve()) in err and "--allow-inside-input" in err
    assert "no such checkpoint" not in err
    assert _snapshot(data_dir) == before


def test_allow_inside_input_still_never_replaces_a_foreign_file(script: ModuleType, data_dir: Path, run_3d: Path,
                                                                tmp_path: Path, capsys) -> None:
    case = tmp_path / "data" / "case_00000"
    shutil.copytree(data_dir / "case_00000", case)
    annotation = case / "segmentation.nii.gz"
    before = annotation.read_bytes()
    assert script.main(["--checkpoint", str(tmp_path / "no_such_run"), "--input", str(case / "imaging.nii.gz"),
                        "--output", str(annotation), "--allow-inside-input"]) == script.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--output {annotation.resolve()} exists and was not written by this command" in err
    assert annotation.read_bytes() == before
    # An earlier prediction of this command (marked in its header) is replaced.
    own = case / "prediction.nii.gz"
    save_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), own, description=OWN_NIFTI_DESCRIPTION)
    assert script.main(["--checkpoint", str(run_3d), "--input", str(case / "imaging.nii.gz"), "--output", str(own),
                        "--device", "cpu", "--allow-inside-input"]) == script.EXIT_OK
    assert nib.load(own).shape == nib.load(case / "imaging.nii.gz").shape
    assert annotation.read_bytes() == before


def test_a_foreign_file_in_the_output_folder_stops_everything_before_the_model_loads(
        script: ModuleType, data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "case_00001.nii.gz"
    save_nifti(np.ones((2, 2, 2), np.uint8), np.eye(4), foreign)  # a label map, but not one of ours
    payload = foreign.read_bytes()
    assert script.main(["--checkpoint", str(tmp_path / "no_such_run"), "--input", str(data_dir),
                        "--output", str(out)]) == script.EXIT_USAGE
    err = capsys.readouterr().err
    assert str(foreign.resolve()) in err and "not written by this command" in err
    assert foreign.read_bytes() == payload and sorted(p.name for p in out.iterdir()) == ["case_00001.nii.gz"]
    (out / "segmentation_run.json").write_text(json.dumps({"notes": "mine"}))
    foreign.unlink()
    assert script.main(["--checkpoint", str(tmp_path / "no_such_run"), "--input", str(data_dir),
                        "--output", str(out)]) == script.EXIT_USAGE
    assert "segmentation_run.json" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_created_is_named_up_front(script: ModuleType, data_dir: Path,
                                                                   tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    out = blocker / "predictions"
    assert script.main(["--checkpoint", str(tmp_path / "no_such_run"), "--input", str(data_dir),
                        "--output", str(out)]) == script.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"output folder {out} cannot be created" in err and str(blocker) in err
    assert str(data_dir) not in err  # the input is not blamed
    one_ct = data_dir / "case_00000" / "imaging.nii.gz"
    assert script.main(["--checkpoint", str(tmp_path / "no_such_run"), "--input", str(one_ct),
                        "--output", str(out / "x.nii.gz")]) == script.EXIT_USAGE
    assert f"output folder {out} cannot be created" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_output_folder_is_named_up_front(script: ModuleType, data_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert script.main(["--checkpoint", str(tmp_path / "no_such_run"), "--input", str(data_dir),
                            "--output", str(locked)]) == script.EXIT_USAGE
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert f"output folder {locked} is not writable" in err and str(data_dir) not in err
