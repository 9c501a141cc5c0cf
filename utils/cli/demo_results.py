"""The demo's results table in the README, written by the demo itself (never typed by hand).

:func:`demo_results` takes the figures the README shows from the demo's summary
(``reports/demo/dataset_summary.json``); :func:`render_demo_results` turns them into Markdown;
:func:`update_readme_results` replaces the block between :data:`BEGIN` and :data:`END` in the
README with that Markdown, preceded by the figures themselves as a JSON comment, so a test can
re-render the block and prove that every number in it came from a demo run.

The cross-validated demo (``configs/demo_cv.yaml``) never touches a README: :func:`cross_validation_results`
takes its out-of-fold figures and paired tests from its summary, and :func:`write_results_file`
writes them, with the same JSON comment, to ``<reports_dir>/results.md`` (:func:`read_results_file`
reads them back).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from utils.data.nifti_io import write_bytes_atomic

BEGIN = "<!-- demo-results:begin -->"
END = "<!-- demo-results:end -->"
_DATA = re.compile(r"<!-- demo-results:data (\{.*?\}) -->", re.S)

#: Original-grid metrics shown per model: summary key, column title, decimals.
COLUMNS = (("kidney_dice", "kidney Dice", 3), ("tumour_dice", "tumour Dice", 3),
           ("kidney_surface_dice", "kidney surface Dice (2 mm)", 3), ("kidney_hd95", "kidney HD95 (mm)", 1),
           ("tumour_hd95", "tumour HD95 (mm)", 1))


def demo_results(summary: dict[str, Any], *, seconds: float, machine: str) -> dict[str, Any]:
    """The README's figures from the demo's summary.

    Args:
        summary: the demo's ``dataset_summary.json`` content (training, evaluation, cases, config).
        seconds: the demo's wall time. machine: a short description of where it ran.
    """
    synthetic = summary["config"]["synthetic"]
    models = _model_rows(summary)
    validation_cases = len(summary["cache"]["split"]["val"])
    return {"cases": len(summary["cases"]), "matrix": synthetic["matrix"], "validation_cases": validation_cases,
            "seconds": round(seconds, 1), "machine": machine, "models": models,
            "postprocess": bool(summary["config"].get("postprocess", False))}


def _model_rows(summary: dict[str, Any], *, cross_validated: bool = False) -> list[dict[str, Any]]:
    """One row per trained model of the demo's summary: validation Dice, original-grid means and timings
    (with the folds finished and the cases evaluated for a cross-validated demo)."""
    rows = []
    for name, training in summary.get("training", {}).items():
        evaluation = summary.get("evaluation", {}).get(name, {})
        means = {key: evaluation.get("summary", {}).get(key, {}).get("mean") for key, _, _ in COLUMNS}
        row = {"model": name, "validation_kidney_dice": training.get("kidney_dice"),
               "validation_tumour_dice": training.get("tumour_dice"), "training_seconds": training["seconds"],
               "inference_seconds_per_case": evaluation.get("seconds_per_case"), **means}
        if cross_validated:
            row.update(folds_finished=training.get("folds_finished"), cases_evaluated=evaluation.get("cases"))
        rows.append(row)
    return rows


def render_demo_results(results: dict[str, Any]) -> str:
    """Markdown of :func:`demo_results`: one row per model, and a line saying where the numbers come from."""
    header = ["model", "validation Dice, cache grid (kidney / tumour)", *(title for _, title, _ in COLUMNS),
              "training (s)", "segmentation (s per CT)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in results["models"]:
        cells = [model["model"], f"{_number(model['validation_kidney_dice'], 3)} / "
                                 f"{_number(model['validation_tumour_dice'], 3)}"]
        cells += [_number(model[key], digits) for key, _, digits in COLUMNS]
        cells += [_number(model["training_seconds"], 0), _number(model["inference_seconds_per_case"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Produced by `make demo` ({results['seconds']:.0f} s on {results['machine']}): "
                  f"{results['cases']} synthetic cases of {results['matrix']} x {results['matrix']} pixels, "
                  f"means over {results['validation_cases']} validation cases. Original-grid metrics follow "
                  "KiTS19 (kidney = label > 0, tumour = label 2); HD95 is left out of a mean when a mask is empty."]
    if "postprocess" in results:  # blocks written before the demo could post-process say nothing of it
        lines[-1] += (" Predictions post-processed: the largest kidney components, tumour touching kidney only."
                      if results["postprocess"] else " Raw predictions, not post-processed.")
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int) -> str:
    """As :func:`_number`, without a minus sign on a value that rounds to zero."""
    text = _number(value, digits)
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text


def readme_block(results: dict[str, Any]) -> str:
    """The whole README block: markers, the figures as a JSON comment, the table."""
    data = json.dumps(results, sort_keys=True)
    return f"{BEGIN}\n<!-- demo-results:data {data} -->\n{render_demo_results(results)}\n{END}"


def read_readme_results(text: str) -> tuple[dict[str, Any], str]:
    """The figures and the rendered Markdown of the README's block.

    Raises:
        ValueError: no block, or no figures in it.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no demo results block ({BEGIN} ... {END})")
    block = text[start + len(BEGIN):end]
    match = _DATA.search(block)
    if match is None:
        raise ValueError("the demo results block holds no demo-results:data comment")
    return json.loads(match.group(1)), block[match.end():].strip("\n")


def update_readme_results(readme: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Replace the README's demo block with these results, atomically; the rest of the file is kept byte for byte.

    Raises:
        FileNotFoundError: no README. ValueError: it has no block to replace.
    """
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no demo results block ({BEGIN} ... {END}) to replace")
    updated = text[:start] + readme_block(results) + text[end + len(END):]
    write_bytes_atomic(path, updated.encode("utf-8"))
    return path


# --- the cross-validated demo (configs/demo_cv.yaml): <reports_dir>/results.md, never the README ------

#: The first line of the cross-validated demo's results file.
CV_TITLE = "# Cross-validated demo results"
_CV_DATA = re.compile(r"<!-- demo-cv-results:data (\{.*?\}) -->", re.S)
#: Paired statistics shown per metric in the cross-validated results: key, column title.
PAIRED_COLUMNS = (("n_pairs", "pairs"), ("mean_difference", "mean B - A"), ("ci", "95% CI of the mean"),
                  ("p_value", "Wilcoxon p"))


def cross_validation_results(summary: dict[str, Any], *, seconds: float, machine: str) -> dict[str, Any]:
    """The cross-validated demo's figures from its summary (``dataset_summary.json`` content).

    Per model: the out-of-fold means in the original grid (every case segmented by the fold that
    did not train on it), the out-of-fold cache-grid validation Dice, the training time of all
    folds and the segmentation time per CT; then the paired comparison of the first two models
    (B - A over every case: mean difference, bootstrap interval and Wilcoxon p-value per metric).
    """
    synthetic = summary["config"]["synthetic"]
    models = _model_rows(summary, cross_validated=True)
    comparison = summary.get("paired_comparison")
    paired = None
    if comparison:
        paired = {"a": comparison["a"], "b": comparison["b"], "cases": comparison["cases"],
                  "metrics": [{"metric": metric, **{key: stats.get(key) for key in
                                                    ("n_pairs", "mean_difference", "ci_low", "ci_high", "p_value",
                                                     "p_value_reason")}}
                              for metric, stats in comparison["paired"].items()]}
    return {"cases": len(summary["cases"]), "matrix": synthetic["matrix"],
            "folds": summary["config"]["split"]["folds"], "seconds": round(seconds, 1), "machine": machine,
            "models": models, "comparison": paired}


def render_cross_validation_results(results: dict[str, Any]) -> str:
    """Markdown of :func:`cross_validation_results`: a row per model, the paired tests, where the numbers come from."""
    header = ["model", "out-of-fold validation Dice, cache grid (kidney / tumour)",
              *(title for _, title, _ in COLUMNS), "training, all folds (s)", "segmentation (s per CT)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in results["models"]:
        cells = [model["model"], f"{_number(model['validation_kidney_dice'], 3)} / "
                                 f"{_number(model['validation_tumour_dice'], 3)}"]
        cells += [_number(model[key], digits) for key, _, digits in COLUMNS]
        cells += [_number(model["training_seconds"], 0), _number(model["inference_seconds_per_case"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    comparison = results.get("comparison")
    if comparison:
        lines += ["", f"Paired differences over the {comparison['cases']} cases, B ({comparison['b']}) - "
                      f"A ({comparison['a']}):", "",
                  "| metric | " + " | ".join(title for _, title in PAIRED_COLUMNS) + " |",
                  "|" + "---|" * (len(PAIRED_COLUMNS) + 1)]
        for row in comparison["metrics"]:
            digits = 1 if row["metric"].endswith("hd95") else 3
            interval = "-" if row["ci_low"] is None else \
                f"[{_signed(row['ci_low'], digits)}, {_signed(row['ci_high'], digits)}]"
            p_value = f"{row['p_value']:.3g}" if row["p_value"] is not None else \
                f"not computed ({row['p_value_reason']})"
            lines.append(f"| {row['metric']} | {row['n_pairs']} | {_signed(row['mean_difference'], digits)} | "
                         f"{interval} | {p_value} |")
    lines += ["", f"Produced by `python scripts/demo.py --config configs/demo_cv.yaml` ({results['seconds']:.0f} s "
                  f"on {results['machine']}): {results['cases']} synthetic cases of {results['matrix']} x "
                  f"{results['matrix']} pixels, {results['folds']}-fold cross-validation; every mean is over all "
                  f"{results['cases']} cases, each segmented by the fold that did not train on it (out of fold). "
                  "Original-grid metrics follow KiTS19 (kidney = label > 0, tumour = label 2); HD95 is left out "
                  "of a mean when a mask is empty. Wilcoxon: two-sided signed-rank test of the paired "
                  "differences (zero differences dropped), not corrected for multiple comparisons."]
    return "\n".join(lines)


def results_file_text(results: dict[str, Any]) -> str:
    """The whole ``results.md``: title, the figures as a JSON comment, the rendered Markdown."""
    data = json.dumps(results, sort_keys=True)
    return f"{CV_TITLE}\n\n<!-- demo-cv-results:data {data} -->\n{render_cross_validation_results(results)}\n"


def read_results_file(text: str) -> tuple[dict[str, Any], str]:
    """The figures and the rendered Markdown of a ``results.md`` written by :func:`write_results_file`.

    Raises:
        ValueError: not such a file, or no figures in it.
    """
    match = _CV_DATA.search(text)
    if not text.startswith(CV_TITLE) or match is None:
        raise ValueError(f"not a cross-validated demo results file ({CV_TITLE}, demo-cv-results:data)")
    return json.loads(match.group(1)), text[match.end():].strip("\n")


def write_results_file(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write ``results.md`` atomically (see :func:`results_file_text`)."""
    path = Path(path)
    write_bytes_atomic(path, results_file_text(results).encode("utf-8"))
    return path
