"""The README's demo results: rendered from the demo's figures, replaced in place, never typed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.cli.demo_results import (
    BEGIN,
    CV_TITLE,
    END,
    cross_validation_results,
    demo_results,
    read_readme_results,
    read_results_file,
    readme_block,
    render_cross_validation_results,
    render_demo_results,
    update_readme_results,
    write_results_file,
)

REPO = Path(__file__).resolve().parents[1]


def _summary() -> dict:
    metric = lambda mean: {"mean": mean, "std": 0.0, "median": mean, "n": 2, "missing": 0}  # noqa: E731
    return {
        "config": {"synthetic": {"matrix": 160}},
        "cases": [{"case_id": f"case_{i:05d}"} for i in range(8)],
        "cache": {"split": {"train": ["a"] * 6, "val": ["case_00002", "case_00004"]}},
        "training": {"resunet3d": {"kidney_dice": 0.9051, "tumour_dice": 0.0, "seconds": 301.4},
                     "unetr2d": {"kidney_dice": 0.8499, "tumour_dice": None, "seconds": 176.6}},
        "evaluation": {"resunet3d": {"seconds_per_case": 0.544, "summary": {
            "kidney_dice": metric(0.9031), "tumour_dice": metric(0.0), "kidney_surface_dice": metric(0.5071),
            "kidney_hd95": metric(46.015), "tumour_hd95": metric(158.137)}}},
    }


def test_results_come_from_the_summary_and_render_one_row_per_model():
    results = demo_results(_summary(), seconds=508.24, machine="2 CPU cores, no GPU")
    assert results["cases"] == 8 and results["validation_cases"] == 2 and results["seconds"] == 508.2
    table = render_demo_results(results)
    rows = table.splitlines()
    assert rows[0].startswith("| model | validation Dice, cache grid (kidney / tumour) | kidney Dice")
    assert rows[2] == "| resunet3d | 0.905 / 0.000 | 0.903 | 0.000 | 0.507 | 46.0 | 158.1 | 301 | 0.54 |"
    assert rows[3] == "| unetr2d | 0.850 / - | - | - | - | - | - | 177 | - |"  # not evaluated: dashes, not zeros
    assert "508 s on 2 CPU cores, no GPU" in table and "8 synthetic cases of 160 x 160" in table


def test_the_table_says_whether_predictions_were_post_processed():
    summary = _summary()
    assert demo_results(summary, seconds=1.0, machine="m")["postprocess"] is False
    assert "Raw predictions, not post-processed." in render_demo_results(demo_results(summary, seconds=1.0,
                                                                                      machine="m"))
    summary["config"]["postprocess"] = True
    results = demo_results(summary, seconds=1.0, machine="m")
    assert results["postprocess"] is True
    assert "Predictions post-processed: the largest kidney components" in render_demo_results(results)
    del results["postprocess"]  # a block written before the demo could post-process: no claim either way
    assert "post-processed" not in render_demo_results(results)


def test_update_replaces_only_the_block_and_reads_back(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{BEGIN}\nold table typed by hand\n{END}\nafter\n", encoding="utf-8")
    results = demo_results(_summary(), seconds=100.0, machine="m")
    update_readme_results(readme, results)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{END}\nafter\n") and "typed by hand" not in text
    assert read_readme_results(text) == (results, render_demo_results(results))
    update_readme_results(readme, results)
    assert readme.read_text(encoding="utf-8") == text  # idempotent
    (tmp_path / "plain.md").write_text("no block here")
    with pytest.raises(ValueError, match="no demo results block"):
        update_readme_results(tmp_path / "plain.md", results)


def test_the_committed_readme_table_is_exactly_what_the_demo_rendered():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    results, table = read_readme_results(text)
    assert table == render_demo_results(results), "the README's demo table was edited by hand; rerun make demo"
    assert readme_block(results) in text
    assert {model["model"] for model in results["models"]} == {"resunet3d", "unetr2d"}


def _cv_summary() -> dict:
    summary = _summary()
    summary["config"] = {"synthetic": {"matrix": 160}, "split": {"scheme": "kfold", "folds": 3}}
    summary["cases"] = [{"case_id": f"case_{i:05d}"} for i in range(12)]
    for training in summary["training"].values():
        training["folds_finished"] = 3
    summary["evaluation"]["resunet3d"]["cases"] = 12
    paired = {"n_pairs": 12, "mean_difference": -0.0001, "ci_low": -0.00004, "ci_high": 0.0123, "p_value": 0.0342,
              "p_value_reason": None}
    summary["paired_comparison"] = {"a": "resunet3d", "b": "unetr2d", "cases": 12, "paired": {
        "kidney_dice": paired,
        "kidney_hd95": {**paired, "mean_difference": 12.34, "ci_low": 3.21, "ci_high": 20.0, "p_value": 0.00123},
        "tumour_hd95": {"n_pairs": 3, "mean_difference": 1.0, "ci_low": 0.5, "ci_high": 1.5, "p_value": None,
                        "p_value_reason": "3 non-zero differences, fewer than 6"}}}
    return summary


def test_cross_validated_results_show_out_of_fold_means_and_the_paired_tests():
    results = cross_validation_results(_cv_summary(), seconds=1234.56, machine="2 CPU cores, no GPU")
    assert results["cases"] == 12 and results["folds"] == 3 and results["seconds"] == 1234.6
    assert results["models"][0]["kidney_dice"] == 0.9031 and results["models"][0]["folds_finished"] == 3
    table = render_cross_validation_results(results)
    rows = table.splitlines()
    assert rows[0].startswith("| model | out-of-fold validation Dice, cache grid (kidney / tumour) | kidney Dice")
    assert rows[2] == "| resunet3d | 0.905 / 0.000 | 0.903 | 0.000 | 0.507 | 46.0 | 158.1 | 301 | 0.54 |"
    assert "Paired differences over the 12 cases, B (unetr2d) - A (resunet3d):" in table
    assert "| kidney_dice | 12 | 0.000 | [0.000, 0.012] | 0.0342 |" in table  # no "-0.000"
    assert "| kidney_hd95 | 12 | 12.3 | [3.2, 20.0] | 0.00123 |" in table
    assert "| tumour_hd95 | 3 | 1.0 | [0.5, 1.5] | not computed (3 non-zero differences, fewer than 6) |" in table
    assert "1235 s on 2 CPU cores, no GPU" in table and "3-fold cross-validation" in table
    assert "12 synthetic cases of 160 x 160" in table


def test_the_results_file_is_written_and_read_back(tmp_path):
    results = cross_validation_results(_cv_summary(), seconds=10.0, machine="m")
    path = write_results_file(tmp_path / "results.md", results)
    text = path.read_text(encoding="utf-8")
    assert text.startswith(CV_TITLE + "\n") and BEGIN not in text
    assert read_results_file(text) == (results, render_cross_validation_results(results))
    no_comparison = {**results, "comparison": None}
    assert "Paired differences" not in render_cross_validation_results(no_comparison)
    with pytest.raises(ValueError, match="not a cross-validated demo results file"):
        read_results_file("# Notes\n")
