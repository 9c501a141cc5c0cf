"""The comparison report of two evaluated runs: one list of blocks rendered to Markdown and to
self-contained HTML (figures embedded as base64 PNG), so both say the same, plus ``comparison.json``.

The numbers come from :func:`utils.evaluation.comparison.compare_reports`; the figures from
:mod:`utils.figures.comparison`. A side whose report is the out-of-fold evaluation of a
cross-validated experiment is said to be so, with its k, in the table and in a sentence below it.
The tables list the metrics of the runs' dataset: KiTS19's by their keys (``kidney_dice``, as
always); another dataset's by region in words (KiTS23: ``kidney and masses Dice``, ``masses
surface Dice``, ``tumour HD95 (mm)``), with how the regions are built and their surface-Dice
tolerances stated once, below the table of runs.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.data.dataset_definitions import KITS19
from utils.data.nifti_io import save_json_atomic, write_bytes_atomic
from utils.data.output_guard import check_output_location, check_overwrite, is_own_json, is_own_text
from utils.evaluation.comparison import (
    MIN_WILCOXON_PAIRS,
    compare_reports,
    dataset_of_comparison,
    load_evaluation_report,
)
from utils.evaluation.predictions import describe_metric, describe_regions
from utils.figures.comparison import plot_metric_boxplots, plot_paired_scatter
from utils.metrics.scoring import dice_names, metric_names

logger = logging.getLogger(__name__)

#: A report block: ``("heading", level, text)``, ``("paragraph", text)``, ``("list", items)``,
#: ``("table", header, rows)`` (cells are strings) or ``("figure", caption, PNG path)``.
Block = tuple

READING_NOTES = (
    "Differences are B - A, case by case, over the cases where both runs have a value: a positive Dice or "
    "surface-Dice difference favours B, a positive HD95 difference (mm) favours A.",
    "The confidence interval is a percentile bootstrap of the mean difference over cases; an interval that "
    "excludes 0 suggests the difference is not an accident of which cases were drawn.",
    "The Wilcoxon signed-rank test asks whether the paired differences are centred on 0 (two-sided; zero "
    "differences dropped); it is not computed with fewer than {min_pairs} non-zero differences. Tests of "
    "{metric_count} metrics are not corrected for multiple comparisons.",
)
#: How many metrics the reading notes say were tested, in words.
_COUNT_WORDS = {6: "six", 9: "nine"}


def _count_word(count: int) -> str:
    """``6`` -> ``"six"``, ``9`` -> ``"nine"``; other counts as digits."""
    return _COUNT_WORDS.get(count, str(count))


def _format_number(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    text = f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.000"


def _run_table(comparison: Mapping[str, Any]) -> Block:
    a, b = comparison["runs"]["a"], comparison["runs"]["b"]
    rows = [[label, *(str(run[key]) if run.get(key) is not None else "-" for run in (a, b))]
            for label, key in (("run", "run_name"), ("model", "model"), ("predictions", "predictions"),
                               ("checkpoint", "checkpoint"),
                               ("device", "device"), ("parameters", "parameters"), ("report folder", "report_folder"),
                               ("cases evaluated", "cases_evaluated"))]
    return ("table", ["", "A", "B"], rows)


def _summary_table(comparison: Mapping[str, Any]) -> Block:
    dataset = dataset_of_comparison(comparison)
    rows = []
    for metric in metric_names(dataset):
        row = [describe_metric(metric, dataset)]
        for side in ("a", "b"):
            s = comparison["summary"][side][metric]
            row += [f"{_format_number(s['mean'])} ± {_format_number(s['std'])}", _format_number(s["median"]),
                    f"{s['n']} ({s['missing']})"]
        rows.append(row)
    return ("table", ["metric", "A mean ± std", "A median", "A n (missing)", "B mean ± std", "B median",
                      "B n (missing)"], rows)


def _paired_table(comparison: Mapping[str, Any]) -> Block:
    dataset = dataset_of_comparison(comparison)
    rows = []
    for metric in metric_names(dataset):
        p = comparison["paired"][metric]
        interval = "-" if p["ci_low"] is None else f"[{_format_number(p['ci_low'])}, {_format_number(p['ci_high'])}]"
        p_value = f"{p['p_value']:.3g}" if p["p_value"] is not None else f"not computed: {p['p_value_reason']}"
        rows.append([describe_metric(metric, dataset), str(p["n_pairs"]), str(p["excluded"]),
                     _format_number(p["mean_difference"]), interval, p_value])
    level = f"{comparison['bootstrap']['confidence']:.0%}"
    return ("table", ["metric", "pairs", "excluded (missing)", "mean B - A", f"{level} CI", "Wilcoxon p"], rows)


def _inference_table(comparison: Mapping[str, Any]) -> Block:
    runs, cost = comparison["runs"], comparison["inference"]
    rows = [["parameters", *(_format_number(runs[s]["parameters"]) for s in ("a", "b"))],
            ["cases timed", *(str(cost[s]["n"]) for s in ("a", "b"))],
            *([f"{label} s per case" if label != "total" else "total s",
               *(_format_number(cost[s][label], 2) for s in ("a", "b"))] for label in ("mean", "median", "total"))]
    return ("table", ["", "A", "B"], rows)


def _out_of_fold_note(comparison: Mapping[str, Any]) -> str | None:
    """A sentence on the out-of-fold side(s) of the comparison (``None`` when both are single runs)."""
    sides = [(side.upper(), comparison["runs"][side]) for side in ("a", "b")]
    out = [(side, run) for side, run in sides if str(run.get("predictions", "")).startswith("out-of-fold")]
    if not out:
        return None
    described = "; ".join(f"{side}: {run['run_name']}, k = {(run.get('experiment') or {}).get('k')} folds, split seed "
                          f"{(run.get('experiment') or {}).get('split_seed')}" for side, run in out)
    who = "Both sides' predictions are" if len(out) == 2 else f"{out[0][0]}'s predictions are"
    return (f"{who} out-of-fold ({described}): each case was segmented by the model of the one fold that held it "
            "out and never trained on it, so every case of the experiment is scored once, by a model that did not "
            "see it.")


def build_report_blocks(comparison: Mapping[str, Any], figures: Mapping[str, Path]) -> list[Block]:
    """The report's content as blocks, from :func:`compare_reports`'s result and ``{caption: PNG path}``."""
    a, b = comparison["runs"]["a"], comparison["runs"]["b"]
    settings = a["settings"]
    boot = comparison["bootstrap"]
    dataset = dataset_of_comparison(comparison)
    if dataset is KITS19:
        scored = f"Surface-Dice tolerance {settings.get('tolerance_mm', '-')} mm; "
    else:
        scored = f"{describe_regions(dataset, settings.get('tolerance_mm'))} "
    blocks: list[Block] = [
        ("heading", 1, f"Model comparison: {a['run_name']} (A) vs {b['run_name']} (B)"),
        ("heading", 2, "What was compared"), _run_table(comparison),
        ("paragraph", f"{len(comparison['shared_cases'])} cases evaluated by both runs are compared "
                      f"({len(comparison['only_a'])} only in A, {len(comparison['only_b'])} only in B, left out). "
                      f"{scored}"
                      f"HD{settings.get('hd_percentile', 95):g} in mm. "
                      f"Bootstrap: {boot['n_resamples']} resamples, seed {boot['seed']}.")]
    out_of_fold = _out_of_fold_note(comparison)
    if out_of_fold:
        blocks.append(("paragraph", out_of_fold))
    if comparison["warnings"]:
        blocks += [("heading", 2, "Warnings"), ("list", list(comparison["warnings"]))]
    blocks += [("heading", 2, "Metrics per model (shared cases)"), _summary_table(comparison),
               ("paragraph", "Standard deviation over cases (ddof 0); missing values (HD95 when exactly one of "
                             "prediction and truth is empty) are counted, not averaged."),
               ("heading", 2, "Paired differences (B - A)"), _paired_table(comparison),
               ("heading", 2, "Inference cost"), _inference_table(comparison),
               ("heading", 2, "Figures"), *(("figure", caption, path) for caption, path in figures.items()),
               ("heading", 2, "How to read this"),
               ("list", [note.format(min_pairs=MIN_WILCOXON_PAIRS, metric_count=_count_word(len(metric_names(dataset))))
                         for note in READING_NOTES]),
               ("paragraph", f"Empty masks: {comparison['empty_mask_rules']}.")]
    return blocks


def render_markdown(blocks: Sequence[Block], out_dir: Path) -> str:
    """Markdown text of the blocks; figures are linked relative to ``out_dir`` (the report's folder)."""
    lines: list[str] = []
    for kind, *body in blocks:
        if kind == "heading":
            lines += ["#" * body[0] + " " + body[1], ""]
        elif kind == "paragraph":
            lines += [body[0], ""]
        elif kind == "list":
            lines += [*(f"- {item}" for item in body[0]), ""]
        elif kind == "table":
            cells = [[cell.replace("|", "\\|") for cell in row] for row in (body[0], *body[1])]
            lines += ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0]),
                      *("| " + " | ".join(row) + " |" for row in cells[1:]), ""]
        elif kind == "figure":
            lines += [f"![{body[0]}]({Path(os.path.relpath(body[1], out_dir)).as_posix()})", "", f"*{body[0]}*", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_html(blocks: Sequence[Block]) -> str:
    """Self-contained HTML of the blocks: figures embedded as base64 PNG."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(blocks[0][2])}</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:left}img{max-width:100%}</style>",
             "</head><body>"]
    for kind, *body in blocks:
        if kind == "heading":
            parts.append(f"<h{body[0]}>{html.escape(body[1])}</h{body[0]}>")
        elif kind == "paragraph":
            parts.append(f"<p>{html.escape(body[0])}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in body[0]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in body[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body[1])
            parts.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif kind == "figure":
            data = base64.b64encode(Path(body[1]).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{html.escape(body[0])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(body[0])}</figcaption></figure>")
    return "\n".join([*parts, "</body></html>", ""])


def save_comparison_report(out_dir: str | os.PathLike, comparison: Mapping[str, Any],
                           figures: Mapping[str, Path]) -> dict[str, Path]:
    """Write ``comparison.md``, ``comparison.html`` and ``comparison.json`` into ``out_dir`` atomically.

    Args:
        comparison: the result of :func:`compare_reports`.
        figures: ``{caption: PNG path}``, the PNGs already written, normally inside ``out_dir``.

    Returns:
        ``{"markdown", "html", "json"}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = build_report_blocks(comparison, figures)
    paths = {"markdown": out / "comparison.md", "html": out / "comparison.html", "json": out / "comparison.json"}
    write_bytes_atomic(paths["markdown"], render_markdown(blocks, out).encode("utf-8"))
    write_bytes_atomic(paths["html"], render_html(blocks).encode("utf-8"))
    save_json_atomic(paths["json"], {**comparison, "figures": {c: p.name for c, p in figures.items()}})
    return paths


#: Top-level keys of every ``comparison.json``: how an earlier comparison is recognised.
COMPARISON_KEYS = ("runs", "shared_cases", "summary", "paired")
#: The first line of every ``comparison.md`` starts with this.
MARKDOWN_FIRST_LINE = "# Model comparison: "


def check_comparison_folder(out_dir: str | os.PathLike, report_folders: Sequence[str | os.PathLike], *,
                            allow_inside_input: bool = False) -> Path:
    """Refuse a comparison folder that is, or lies inside, a report folder, or holds another's report.

    Returns:
        ``out_dir`` resolved.

    Raises:
        OutputGuardError: (a ``ValueError``) ``out_dir`` is a report folder, lies inside one
            (unless ``allow_inside_input``), or its ``comparison.json``, ``comparison.md`` or
            ``comparison.html`` exists and was not written by a comparison.
    """
    out = check_output_location(out_dir, report_folders, what="comparison folder",
                                allow_inside_input=allow_inside_input)
    check_overwrite(out / "comparison.json", is_own_json(COMPARISON_KEYS), what="comparison file")
    check_overwrite(out / "comparison.md", is_own_text(MARKDOWN_FIRST_LINE), what="comparison file")
    check_overwrite(out / "comparison.html", is_own_text("<!DOCTYPE html>"), what="comparison file")
    return out


def write_comparison_report(folder_a: str | os.PathLike, folder_b: str | os.PathLike, out_dir: str | os.PathLike, *,
                            n_resamples: int = 10000, seed: int = 0,
                            allow_inside_input: bool = False) -> dict[str, Path]:
    """Compare two report folders (A, then B; differences are B - A), draw the figures, write the report.

    Args:
        folder_a, folder_b: report folders holding ``metrics.json`` (and ``inference.json``).
        out_dir: the comparison's folder (created), not one of the two report folders nor
            inside one (unless ``allow_inside_input``); see :func:`check_comparison_folder`.
        n_resamples, seed: the bootstrap.

    Returns:
        ``{"markdown", "html", "json"}`` paths, plus ``"boxplots"`` and ``"scatter"`` figures.

    Raises:
        ValueError: an invalid report, reports of two datasets (a KiTS19 and a KiTS23 run; the message
            names both folders and datasets), or no shared case; ``OutputGuardError`` (a
            ``ValueError``): ``out_dir`` is refused by :func:`check_comparison_folder`.
        FileNotFoundError: a report file is missing.
    """
    out = Path(out_dir)
    check_comparison_folder(out, (folder_a, folder_b), allow_inside_input=allow_inside_input)
    report_a, report_b = (load_evaluation_report(folder) for folder in (folder_a, folder_b))
    comparison = compare_reports(report_a, report_b, n_resamples=n_resamples, seed=seed)
    dataset = dataset_of_comparison(comparison)
    # short axis labels: the run names are in the report's table
    labels = [f"A: {report_a.model or report_a.run_name}", f"B: {report_b.model or report_b.run_name}"]
    records_a = [comparison["per_case"][c]["a"] for c in comparison["shared_cases"]]
    records_b = [comparison["per_case"][c]["b"] for c in comparison["shared_cases"]]
    out.mkdir(parents=True, exist_ok=True)
    boxes, scatter = out / "boxplots.png", out / "dice_scatter.png"
    plot_metric_boxplots(records_a, records_b, labels, metrics=metric_names(dataset), path=boxes)
    plot_paired_scatter(records_a, records_b, labels, metrics=dice_names(dataset), path=scatter)
    figures = {"Metrics per case, A and B": boxes, "Dice per case, A against B (above the line: B higher)": scatter}
    paths = save_comparison_report(out, comparison, figures)
    logger.info("%d shared cases compared; %d warning(s)", len(comparison["shared_cases"]), len(comparison["warnings"]))
    return {**paths, "boxplots": boxes, "scatter": scatter}

