"""Tests of utils/evaluation/comparison.py and utils/figures/comparison.py on hand-made numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats

from utils.evaluation.comparison import (
    bootstrap_mean_interval,
    compare_metric,
    compare_reports,
    compute_wilcoxon_p_value,
    load_evaluation_report,
    resolve_report_folder,
)
from utils.evaluation.report import render_markdown
from utils.figures.comparison import plot_metric_boxplots, plot_paired_scatter
from utils.metrics.scoring import METRIC_NAMES


def _case(case_id: str, value: float | None = 0.5) -> dict:
    return {"case_id": case_id, **{metric: value for metric in METRIC_NAMES}}


def _write_report(folder: Path, cases: list[dict], model: str = "resunet3d") -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"cases": cases, "summary": {},
                                                     "settings": {"tolerance_mm": 2.0}}))
    (folder / "inference.json").write_text(json.dumps({
        "run_name": folder.name, "model": model, "parameters": 10, "device": "cpu", "checkpoint": "best.pt",
        "cases": [{"case_id": c["case_id"], "seconds": 1.0} for c in cases]}))
    return folder


def test_compare_metric_excludes_and_counts_missing_pairs() -> None:
    a = [1.0, 2.0, 3.0, None, 5.0, 6.0, 7.0]
    b = [2.0, 4.0, 3.0, 9.0, float("nan"), 10.0, 8.0]
    result = compare_metric(a, b, n_resamples=200, seed=0)
    # pairs: (1,2) (2,4) (3,3) (6,10) (7,8): differences 1, 2, 0, 4, 1
    assert result["n_pairs"] == 5 and result["excluded"] == 2
    assert result["mean_difference"] == pytest.approx(8 / 5)
    assert result["ci_low"] <= 8 / 5 <= result["ci_high"]
    assert result["p_value"] is None and "4 non-zero differences" in result["p_value_reason"]


def test_compare_metric_without_pairs_reports_none() -> None:
    result = compare_metric([None, 1.0], [2.0, None], n_resamples=10, seed=0)
    assert result["n_pairs"] == 0 and result["excluded"] == 2 and result["mean_difference"] is None


def test_bootstrap_interval_contains_the_mean_and_is_reproducible() -> None:
    differences = [0.1, -0.05, 0.2, 0.0, 0.15, 0.3, -0.1, 0.05]
    interval = bootstrap_mean_interval(differences, n_resamples=2000, seed=3)
    assert interval[0] < np.mean(differences) < interval[1]
    assert bootstrap_mean_interval(differences, n_resamples=2000, seed=3) == interval
    assert bootstrap_mean_interval(differences, n_resamples=2000, seed=4) != interval
    assert bootstrap_mean_interval([0.25, 0.25, 0.25], n_resamples=50, seed=0) == (0.25, 0.25)


@pytest.mark.parametrize("bad", [{"differences": []}, {"n_resamples": 0}, {"confidence": 1.0}])
def test_bootstrap_interval_refuses_bad_arguments(bad: dict) -> None:
    arguments = {"differences": [1.0, 2.0], "n_resamples": 10, "seed": 0, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        bootstrap_mean_interval(**arguments)


def test_wilcoxon_p_value_matches_scipy_and_the_hand_count() -> None:
    differences = [1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    p_value, reason = compute_wilcoxon_p_value(differences)
    # exact: W- = 2; P(W <= 2) = 3 / 2**7 (subsets {}, {1}, {2}); two-sided 6 / 128
    assert reason is None and p_value == pytest.approx(6 / 128)
    assert p_value == stats.wilcoxon(differences).pvalue


def test_wilcoxon_is_not_computed_for_zero_or_few_differences() -> None:
    assert compute_wilcoxon_p_value([0.0] * 8) == (None, "all 8 differences are zero")
    p_value, reason = compute_wilcoxon_p_value([1.0, 2.0, 0.0, 3.0, 4.0, 5.0])
    assert p_value is None and "5 non-zero differences, fewer than 6" in reason


def test_resolve_report_folder_accepts_reports_and_run_folders(tmp_path: Path) -> None:
    report = _write_report(tmp_path / "reports" / "run_a", [_case("case_00000")])
    run = tmp_path / "checkpoints" / "run_a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: resunet3d\n")
    assert resolve_report_folder(report, tmp_path / "elsewhere") == report
    assert resolve_report_folder(run, tmp_path / "reports") == tmp_path / "reports" / "run_a"
    unevaluated = tmp_path / "checkpoints" / "run_b"
    unevaluated.mkdir()
    (unevaluated / "config.yaml").write_text("model:\n  name: unetr2d\n")
    with pytest.raises(FileNotFoundError, match="scripts/eval_unetr.py"):
        resolve_report_folder(unevaluated, tmp_path / "reports")
    with pytest.raises(FileNotFoundError, match="neither metrics.json"):
        resolve_report_folder(tmp_path, tmp_path / "reports")


def test_load_evaluation_report_refuses_duplicate_and_incomplete_cases(tmp_path: Path) -> None:
    twice = _write_report(tmp_path / "twice", [_case("case_00000"), _case("case_00000")])
    with pytest.raises(ValueError, match="case_00000.*twice"):
        load_evaluation_report(twice)
    incomplete = _write_report(tmp_path / "incomplete", [{"case_id": "case_00000", "kidney_dice": 1.0}])
    with pytest.raises(ValueError, match="incomplete.*tumour_dice"):
        load_evaluation_report(incomplete)


def test_compare_reports_uses_shared_cases_and_warns_about_the_rest(tmp_path: Path) -> None:
    a = load_evaluation_report(_write_report(tmp_path / "a", [_case("case_00000", 0.5), _case("case_00001", 0.0)]))
    b = load_evaluation_report(_write_report(tmp_path / "b", [_case("case_00000", 0.75), _case("case_00002")],
                                             model="unetr2d"))
    comparison = compare_reports(a, b, n_resamples=20, seed=0)
    assert comparison["shared_cases"] == ["case_00000"] and comparison["only_a"] == ["case_00001"]
    assert comparison["summary"]["a"]["kidney_dice"]["mean"] == 0.5
    assert comparison["paired"]["tumour_dice"]["mean_difference"] == 0.25
    assert comparison["inference"]["a"] == {"n": 1, "missing": 0, "mean": 1.0, "median": 1.0, "total": 1.0}
    assert any("case_00001" in w for w in comparison["warnings"])
    markdown = render_markdown([("table", ["x", "y"], [["a|b", "1"]])], tmp_path)
    assert markdown.splitlines()[:3] == ["| x | y |", "|---|---|", "| a\\|b | 1 |"]
    lonely = load_evaluation_report(_write_report(tmp_path / "c", [_case("case_00009")]))
    with pytest.raises(ValueError, match="share no evaluated case"):
        compare_reports(a, lonely)


def test_figures_have_one_axis_per_metric_and_save_png(tmp_path: Path) -> None:
    records_a = [{"kidney_dice": 0.9, "tumour_dice": None}, {"kidney_dice": 0.7, "tumour_dice": 0.4}]
    records_b = [{"kidney_dice": 0.8, "tumour_dice": 0.5}, {"kidney_dice": 0.95, "tumour_dice": 0.6}]
    boxes = plot_metric_boxplots(records_a, records_b, ["a", "b"], metrics=["kidney_dice", "tumour_dice"])
    assert isinstance(boxes, Figure) and len([ax for ax in boxes.axes if ax.get_visible()]) == 2
    assert "missing A 1 / B 0" in boxes.axes[1].get_title()
    scatter = plot_paired_scatter(records_a, records_b, ["a", "b"], path=tmp_path / "scatter.png")
    assert "tumour_dice: 1 cases, 1 incomplete" == scatter.axes[1].get_title()
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same non-empty list"):
        plot_paired_scatter(records_a, records_b[:1], ["a", "b"])


def _write_out_of_fold_report(folder: Path, folds: dict[str, int], k: int = 3) -> Path:
    cases = [{**_case(case_id, 0.5 + 0.01 * index), "fold": fold}
             for index, (case_id, fold) in enumerate(folds.items())]
    _write_report(folder, cases)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["experiment"] = {"predictions": "out-of-fold", "k": k, "split_seed": 0, "model": "resunet3d"}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_resolve_report_folder_accepts_a_cross_validated_experiment(tmp_path: Path) -> None:
    experiment = tmp_path / "checkpoints" / "cv_unetr"
    (experiment / "fold_0").mkdir(parents=True)
    (experiment / "cross_validation.json").write_text(json.dumps({"model_name": "unetr2d", "folds": []}))
    with pytest.raises(FileNotFoundError, match=r"out-of-fold.*scripts/eval_unetr.py --run .*cv_unetr"):
        resolve_report_folder(experiment, tmp_path / "reports")
    report = _write_out_of_fold_report(tmp_path / "reports" / "cv_unetr", {"case_00000": 0, "case_00001": 1})
    assert resolve_report_folder(experiment, tmp_path / "reports") == report


def test_an_out_of_fold_report_is_described_as_such_in_the_comparison(tmp_path: Path) -> None:
    from utils.evaluation.report import build_report_blocks

    folds = {f"case_{i:05d}": i % 3 for i in range(6)}
    a = load_evaluation_report(_write_out_of_fold_report(tmp_path / "a", folds))
    b = load_evaluation_report(_write_report(tmp_path / "b", [_case(c, 0.25) for c in folds]))
    assert a.experiment["k"] == 3 and a.folds == folds and b.experiment is None and b.folds == {}
    comparison = compare_reports(a, b, n_resamples=20, seed=0)
    assert comparison["runs"]["a"]["predictions"] == "out-of-fold, k = 3"
    assert comparison["runs"]["b"]["predictions"] == "one model" and comparison["runs"]["a"]["folds"] == folds
    assert any("out-of-fold, k = 3" in warning and "one model" in warning for warning in comparison["warnings"])
    assert comparison["paired"]["kidney_dice"]["p_value"] is not None  # six non-zero differences
    markdown = render_markdown(build_report_blocks(comparison, {}), tmp_path)
    assert "| predictions | out-of-fold, k = 3 | one model |" in markdown
    assert "A's predictions are out-of-fold (A: a, k = 3 folds, split seed 0)" in markdown
