"""End-to-end tests of scripts/compare_models.py on two hand-written report folders."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.metrics.scoring import METRIC_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "compare_models.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Shared cases 00000-00004; case_00005 only in A, case_00006 only in B (its values would shift every mean).
KIDNEY_A = [0.9, 0.8, 0.7, 0.6, 0.5]          # mean 0.7, std sqrt(0.02) = 0.141
KIDNEY_B = [0.95, 0.85, 0.8, 0.7, 0.7]        # mean 0.8; B - A mean 0.1
TUMOUR_A = [0.6, 0.5, 0.4, 0.3, 0.2]          # mean 0.4
TUMOUR_B = [0.7, 0.5, 0.5, 0.3, 0.0]          # mean 0.4; B - A: 0.1, 0, 0.1, 0, -0.2, mean 0
KIDNEY_HD_A = [2.0, 4.0, 6.0, 8.0, 10.0]      # mean 6 mm
KIDNEY_HD_B = [1.0, 2.0, 3.0, 4.0, None]      # mean 2.5 mm, 1 missing; pairs -1, -2, -3, -4: mean -2.5
TUMOUR_HD_A = [None, 5.0, 5.0, 5.0, 5.0]
TUMOUR_HD_B = [3.0] * 5
SECONDS_A, SECONDS_B = [10.0, 20.0, 30.0, 40.0, 50.0], [1.0, 2.0, 3.0, 4.0, 6.0]


def _cases(kidney, tumour, kidney_hd, tumour_hd, extra: str) -> list[dict]:
    rows = [{"case_id": f"case_{i:05d}", "kidney_dice": k, "tumour_dice": t, "kidney_surface_dice": k,
             "tumour_surface_dice": t, "kidney_hd95": kh, "tumour_hd95": th}
            for i, (k, t, kh, th) in enumerate(zip(kidney, tumour, kidney_hd, tumour_hd, strict=False))]
    return [*rows, {"case_id": extra, **{metric: 0.0 for metric in METRIC_NAMES}}]


def _write_report(folder: Path, model: str, cases: list[dict], seconds: list[float]) -> Path:
    folder.mkdir(parents=True)
    settings = {"tolerance_mm": 2.0, "hd_percentile": 95.0}
    (folder / "metrics.json").write_text(json.dumps({"cases": cases, "summary": {}, "settings": settings,
                                                     "refused": [], "warnings": []}))
    timed = [{"case_id": c["case_id"], "seconds": s} for c, s in zip(cases, [*seconds, 1000.0], strict=False)]
    (folder / "inference.json").write_text(json.dumps({"run_name": folder.name, "model": model, "parameters": 1234,
                                                       "device": "cpu",
                                                       "checkpoint": f"checkpoints/{folder.name}/best.pt",
                                                       "cases": timed}))
    return folder


@pytest.fixture()
def reports(tmp_path: Path) -> tuple[Path, Path]:
    a = _write_report(tmp_path / "reports" / "resunet3d_run", "resunet3d",
                      _cases(KIDNEY_A, TUMOUR_A, KIDNEY_HD_A, TUMOUR_HD_A, "case_00005"), SECONDS_A)
    b = _write_report(tmp_path / "reports" / "unetr2d_run", "unetr2d",
                      _cases(KIDNEY_B, TUMOUR_B, KIDNEY_HD_B, TUMOUR_HD_B, "case_00006"), SECONDS_B)
    return a, b


def _run(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, env=env,
                          timeout=120)


def test_script_writes_the_report_with_hand_computed_numbers(reports: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "comparison"
    result = _run(str(reports[0]), str(reports[1]), "--out", str(out), "--bootstrap", "500", "--seed", "1")
    assert result.returncode == 0, result.stderr
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["shared_cases"] == [f"case_{i:05d}" for i in range(5)]
    assert comparison["only_a"] == ["case_00005"] and comparison["only_b"] == ["case_00006"]
    summary_a, summary_b, paired = comparison["summary"]["a"], comparison["summary"]["b"], comparison["paired"]
    assert summary_a["kidney_dice"]["mean"] == pytest.approx(0.7)
    assert summary_a["kidney_dice"]["std"] == pytest.approx(0.02 ** 0.5)
    assert summary_b["kidney_hd95"] == pytest.approx({"mean": 2.5, "std": 1.25 ** 0.5, "median": 2.5, "n": 4,
                                                     "missing": 1})
    assert paired["kidney_dice"]["mean_difference"] == pytest.approx(0.1)
    assert paired["tumour_dice"]["mean_difference"] == pytest.approx(0.0, abs=1e-12)
    assert paired["kidney_hd95"]["mean_difference"] == pytest.approx(-2.5)
    assert (paired["kidney_hd95"]["n_pairs"], paired["kidney_hd95"]["excluded"]) == (4, 1)
    assert paired["kidney_dice"]["p_value"] is None  # five pairs: too few for the test
    assert comparison["inference"]["a"] == {"n": 5, "missing": 0, "mean": 30.0, "median": 30.0, "total": 150.0}
    assert comparison["inference"]["b"]["mean"] == pytest.approx(3.2)
    markdown = (out / "comparison.md").read_text()
    assert "| kidney_dice | 0.700 ± 0.141 | 0.700 | 5 (0) | 0.800 ± 0.095 | 0.800 | 5 (0) |" in markdown
    assert "| kidney_hd95 | 4 | 1 | -2.500 |" in markdown
    assert "case_00005" in markdown and "![" in markdown and "(boxplots.png)" in markdown
    page = (out / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "0.700 ± 0.141" in page and "<table>" in page
    for name in ("boxplots.png", "dice_scatter.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    again = tmp_path / "again"
    rerun = _run(str(reports[0]), str(reports[1]), "--out", str(again), "--bootstrap", "500", "--seed", "1")
    assert rerun.returncode == 0 and json.loads((again / "comparison.json").read_text()) == comparison


def test_script_names_the_eval_script_for_an_unevaluated_run(reports: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "checkpoints" / "unetr2d_new"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: unetr2d\n")
    result = _run(str(reports[0]), str(run), "--out", str(tmp_path / "comparison"),
                  "--reports-dir", str(tmp_path / "reports"))
    assert result.returncode == 1
    assert "scripts/eval_unetr.py" in result.stderr and "unetr2d_new" in result.stderr


def test_script_refuses_an_output_folder_that_is_an_input(reports: tuple[Path, Path], capsys) -> None:
    spec = importlib.util.spec_from_file_location("compare_models", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(reports[0]), str(reports[1]), "--out", str(reports[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_models.py: error: --out ") and "would overwrite the input" in err
    assert script.main([str(reports[0]), str(reports[1]), "--out", "x", "--bootstrap", "0"]) == 2


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_script_refuses_an_output_inside_a_report_folder_before_reading_it(reports: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    before = _hashes(reports[0])
    inside = reports[0] / "comparison"
    result = _run(str(reports[0]), str(reports[1]), "--out", str(inside))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--out {inside.resolve()} is inside the input data folder {reports[0].resolve()}" in result.stderr
    assert not inside.exists() and _hashes(reports[0]) == before
    allowed = _run(str(reports[0]), str(reports[1]), "--out", str(inside), "--bootstrap", "50",
                   "--allow-inside-input")
    assert allowed.returncode == 0, allowed.stderr
    assert (inside / "comparison.json").is_file()


def test_script_never_replaces_a_foreign_file_named_like_its_report(reports: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "comparison"
    out.mkdir()
    (out / "comparison.md").write_text("# My own notes\n")
    result = _run(str(reports[0]), str(reports[1]), "--out", str(out), "--bootstrap", "50")
    assert result.returncode == 2 and str((out / "comparison.md").resolve()) in result.stderr
    assert (out / "comparison.md").read_text() == "# My own notes\n" and sorted(out.iterdir()) == [
        out / "comparison.md"]
    (out / "comparison.md").unlink()
    assert _run(str(reports[0]), str(reports[1]), "--out", str(out), "--bootstrap", "50").returncode == 0
    again = _run(str(reports[0]), str(reports[1]), "--out", str(out), "--bootstrap", "50")
    assert again.returncode == 0, again.stderr  # its own earlier report is replaced
