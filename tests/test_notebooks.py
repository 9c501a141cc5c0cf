"""Every notebook runs top to bottom on a small synthetic set (parameters shrunk after its parameters cell),
once per model key where its ``MODEL`` parameter picks the model."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMALL = {
    "synthetic_data.ipynb": "N_CASES = 2\nMATRIX = 64",
    "dataset_statistics.ipynb": "N_CASES = 2\nMATRIX = 64\nWORKERS = 1",
    "2D_data_stats.ipynb": "N_CASES = 2\nMATRIX = 64\nIMAGE_SIZE = 64\nN_SAMPLES = 40\nWORKERS = 1",
    "train.ipynb": "N_CASES = 2\nMATRIX = 64\nEPOCHS = 1",
    "evaluate_run.ipynb": "N_CASES = 2\nMATRIX = 64\nEPOCHS = 1",
    "compare_models.ipynb": "N_CASES = 2\nMATRIX = 64\nEPOCHS = 1\nBOOTSTRAP = 200",
}
#: Notebooks whose ``MODEL`` parameter picks the model: each runs once per model key.
MODELS = {"train.ipynb": ("resunet3d", "unetr2d"), "evaluate_run.ipynb": ("resunet3d", "unetr2d")}
RUNS = [pytest.param(name, model, id=f"{name}-{model}" if model else name)
        for name in sorted(SMALL) for model in MODELS.get(name, (None,))]


def _with_overrides(notebook: nbformat.NotebookNode, overrides: str) -> nbformat.NotebookNode:
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    return notebook


def test_every_notebook_has_small_settings():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(SMALL)


@pytest.mark.parametrize(("name", "model"), RUNS)
def test_notebook_runs(name, model, tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit without outputs"
    folders = {"DATA_DIR": "data", "SYNTHETIC_DIR": "synthetic", "CACHE_DIR": "cache", "REPORTS_DIR": "reports",
               "CHECKPOINTS_DIR": "checkpoints"}
    overrides = SMALL[name] + (f"\nMODEL = {model!r}" if model else "") + "".join(
        f"\n{variable} = Path({str(tmp_path / folder)!r})" for variable, folder in folders.items())
    client = NotebookClient(_with_overrides(notebook, overrides), timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    executed = client.execute()
    outputs = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the gallery figure was not shown"
    assert (tmp_path / "data" / "case_00001" / "imaging.nii.gz").is_file()
