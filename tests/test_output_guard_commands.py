"""Every command that writes refuses an output inside its input data, before any work, and leaves the data intact.

Each command is run through its ``main(argv)`` (or the script function ``main`` calls) with its
output pointed at a file or folder inside the input data folder. It must exit with status 2
(the commands' usage error), name the refused path on stderr, and leave the SHA-256 of every
file in the data folder unchanged. Runs and checkpoints named here do not exist: the guard
answers before anything is loaded, which the messages confirm.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from utils.data.kits_layout import IMAGING_NAME, SEGMENTATION_NAME, build_kits_affine
from utils.data.nifti_io import save_nifti
from utils.metrics.scoring import METRIC_NAMES

REPO = Path(__file__).resolve().parents[1]
SHAPE = (6, 16, 16)
SPACING = (2.0, 0.8, 0.8)


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"guarded_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_kits_folder(root: Path) -> Path:
    """Two KiTS19-layout cases of real NIfTI files (CT in HU, labels 0/1/2)."""
    rng = np.random.default_rng(0)
    for index in range(2):
        folder = root / f"case_{index:05d}"
        folder.mkdir(parents=True)
        save_nifti(rng.integers(-1000, 1000, size=SHAPE, dtype=np.int16), build_kits_affine(SPACING),
                   folder / IMAGING_NAME)
        labels = np.zeros(SHAPE, np.uint8)
        labels[2:4, 4:10, 4:10] = 1
        labels[3, 6:8, 6:8] = 2
        save_nifti(labels, build_kits_affine(SPACING), folder / SEGMENTATION_NAME)
    return root


def _write_report(folder: Path, model: str) -> Path:
    folder.mkdir(parents=True)
    cases = [{"case_id": f"case_{i:05d}", **{metric: 0.5 + 0.1 * i for metric in METRIC_NAMES}} for i in range(3)]
    (folder / "metrics.json").write_text(json.dumps({"cases": cases, "summary": {}, "settings": {"tolerance_mm": 2.0},
                                                     "refused": [], "warnings": []}))
    (folder / "inference.json").write_text(json.dumps({"run_name": folder.name, "model": model, "parameters": 1,
                                                       "device": "cpu", "checkpoint": "best.pt",
                                                       "cases": [{"case_id": c["case_id"], "seconds": 1.0}
                                                                 for c in cases]}))
    return folder


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_kits_folder(tmp_path_factory.mktemp("guarded") / "data")


#: What a command is given: its argv, the input data folder it must leave intact, the refused output.
Setup = tuple[list[str], Path, Path]


def _check_data(data: Path, scratch: Path, request) -> Setup:
    ct = data / "case_00000" / IMAGING_NAME
    return ["--data", str(data), "--json", str(ct)], data, ct


def _preprocess(data: Path, scratch: Path, request) -> Setup:
    return ["--data", str(data), "--out", str(data / "cache")], data, data / "cache"


def _segment(data: Path, scratch: Path, request) -> Setup:
    annotation = data / "case_00000" / SEGMENTATION_NAME
    return (["--checkpoint", str(scratch / "no_run"), "--input", str(data / "case_00000" / IMAGING_NAME),
             "--output", str(annotation)], data, annotation)


def _evaluate(data: Path, scratch: Path, request) -> Setup:
    (scratch / "pred").mkdir()
    out = data / "case_00001" / "metrics"
    return ["--gt", str(data), "--pred", str(scratch / "pred"), "--out", str(out)], data, out


def _eval_run(data: Path, scratch: Path, request) -> Setup:
    out = data / "reports"
    return ["--run", str(scratch / "no_run"), "--data", str(data), "--out", str(out)], data, out


def _compare_models(data: Path, scratch: Path, request) -> Setup:
    report_a = _write_report(scratch / "reports" / "resunet3d_run", "resunet3d")
    report_b = _write_report(scratch / "reports" / "unetr2d_run", "unetr2d")
    return [str(report_a), str(report_b), "--out", str(report_a / "comparison")], report_a, report_a / "comparison"


def _prepare_2d_dataset(data: Path, scratch: Path, request) -> Setup:
    cache = request.getfixturevalue("tiny_cache")
    raw = Path(cache.plan["source_data"])
    inside = raw / "case_00000" / "slices"
    return ["--cache", str(cache.folder), "--out", str(inside)], raw, inside


def _train(data: Path, scratch: Path, request) -> Setup:
    config = "configs/unetr2d_quick.yaml" if "unetr" in request.node.name else "configs/resunet3d_quick.yaml"
    return (["--config", config, "--data", str(data), "--set", f"training.output_dir={data / 'runs'}",
             "--set", f"preprocessing.cache_dir={scratch / 'cache'}"], data, data / "runs")


def _demo(data: Path, scratch: Path, request) -> Setup:
    synthetic = data / "synthetic"
    return (["--config", "configs/demo.yaml", "--set", f"synthetic.out_dir={synthetic}",
             "--set", f"reports_dir={scratch / 'reports'}", "--set", f"preprocessing.cache_dir={scratch / 'cache'}",
             "--set", f"train_overrides=[training.output_dir={scratch / 'runs'}, "
                      f"preprocessing.cache_dir={scratch / 'cache'}]", "--set", "readme=null"], data, synthetic)


COMMANDS = {"check_data": _check_data, "preprocess": _preprocess, "segment": _segment, "evaluate": _evaluate,
            "eval_unet": _eval_run, "eval_unetr": _eval_run, "compare_models": _compare_models,
            "prepare_2D_dataset": _prepare_2d_dataset, "train_3d_unet": _train, "train_unetr": _train,
            "demo": _demo}


#: Scripts that are one call of a shared command with their model key, instead of a ``main``.
MODEL_SCRIPTS = {"eval_unet": ("evaluate", "resunet3d"), "eval_unetr": ("evaluate", "unetr2d"),
                 "train_3d_unet": ("train", "resunet3d"), "train_unetr": ("train", "unetr2d")}


def _main_of(command: str) -> Callable[[list[str]], int]:
    """The function the script's ``__main__`` block calls, taking ``argv``."""
    module = _load_script(command)
    if command not in MODEL_SCRIPTS:
        return module.main
    kind, model = MODEL_SCRIPTS[command]
    if kind == "evaluate":
        from utils.cli.evaluate import run_evaluation_script
        return lambda argv: run_evaluation_script(model, module.__doc__, argv)
    from utils.cli.train import run_training_script
    return lambda argv: run_training_script(model, module.__doc__, argv)


def _exit_status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's usage errors
        return int(stop.code)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_inside_the_input_data_is_refused_and_the_data_is_untouched(command: str, kits: Path,
                                                                              tmp_path: Path, capsys, monkeypatch,
                                                                              request) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("KITS19_DATA", raising=False)
    argv, data, refused = COMMANDS[command](kits, tmp_path, request)
    before = _hashes(data)
    status = _exit_status(_main_of(command), argv)
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert str(refused.resolve()) in err and str(data.resolve()) in err, err[-2000:]
    assert "no such checkpoint" not in err and "Traceback" not in err  # refused by the guard, nothing loaded
    assert _hashes(data) == before
    assert not refused.exists() or refused.is_file()  # no output folder was created
