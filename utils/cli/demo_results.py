"""The demo's results table in the README, written by the demo itself (never typed by hand).

:func:`demo_results` takes the figures the README shows from the demo's summary
(``reports/demo/dataset_summary.json``); :func:`render_demo_results` turns them into Markdown;
:func:`update_readme_results` replaces the block between :data:`BEGIN` and :data:`END` in the
README with that Markdown, preceded by the figures themselves as a JSON comment, so a test can
re-render the block and prove that every number in it came from a demo run.
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
    models = []
    for name, training in summary.get("training", {}).items():
        evaluation = summary.get("evaluation", {}).get(name, {})
        means = {key: evaluation.get("summary", {}).get(key, {}).get("mean") for key, _, _ in COLUMNS}
        models.append({"model": name, "validation_kidney_dice": training.get("kidney_dice"),
                       "validation_tumour_dice": training.get("tumour_dice"), "training_seconds": training["seconds"],
                       "inference_seconds_per_case": evaluation.get("seconds_per_case"), **means})
    validation_cases = len(summary["cache"]["split"]["val"])
    return {"cases": len(summary["cases"]), "matrix": synthetic["matrix"], "validation_cases": validation_cases,
            "seconds": round(seconds, 1), "machine": machine, "models": models}


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
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
