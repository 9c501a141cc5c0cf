"""The KiTS23 demo (configs/demo_kits23.yaml) runs end to end on a tiny KiTS23-style synthetic set,
scores by evaluation region, and refuses settings that mix datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_demo import _tiny_demo_args
from utils.cli.demo import _validation_table, check_demo_datasets, format_evaluation_table, is_synthetic_data_folder
from utils.config.demo import DemoConfig
from utils.config.loading import load_config
from utils.data.dataset_definitions import KITS19, KITS23
from utils.metrics.scoring import metric_names
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

REPO = Path(__file__).resolve().parents[1]
HEC_DICE = ("kidney_and_masses_dice", "masses_dice", "tumour_dice")


def test_kits23_demo_end_to_end(tmp_path):
    command = [sys.executable, "scripts/demo.py", "--config", "configs/demo_kits23.yaml",
               *_tiny_demo_args(tmp_path, 2)]
    readme_before = (REPO / "README.md").read_bytes()
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (REPO / "README.md").read_bytes() == readme_before  # a KiTS23 demo never writes the README
    assert "cyst ml" in run.stdout and "validation (full): ok: 2" in run.stdout
    assert json.loads((tmp_path / "data" / "kits23.json").read_text())[0] == {"case_id": "case_00000"}
    summary = json.loads((tmp_path / "reports" / "dataset_summary.json").read_text())
    assert summary["config"]["dataset"] == "kits23"
    table = run.stdout[run.stdout.index("validation Dice per case"):].splitlines()
    assert "KiTS23" in table[0] and "resunet3d kidney and masses" in table[1] and "masses" in table[1]
    validation_ids = summary["cache"]["split"]["val"]
    assert table[2].startswith(validation_ids[0]) and table[3].startswith("mean") and len(table[3].split()) == 7
    for model in ("resunet3d", "unetr2d"):
        trained = summary["training"][model]
        assert trained["best_epoch"] == 1 and all(0 <= trained[key] <= 1 for key in HEC_DICE)
        assert "kidney_dice" not in trained
        report = Path(summary["evaluation"][model]["report"])
        metrics = json.loads((report / "metrics.json").read_text())
        assert metrics["settings"]["dataset"] == "kits23"
        assert [case["case_id"] for case in metrics["cases"]] == validation_ids
        assert set(metric_names(KITS23)) <= set(metrics["cases"][0])
    evaluation = run.stdout[run.stdout.index("evaluation in each CT's original grid"):].splitlines()
    assert "kidney_and_masses_surface_dice" in evaluation[1] and "masses_hd95" in evaluation[1]
    comparison = Path(summary["comparison"]["markdown"])
    assert comparison.is_file() and "resunet3d" in comparison.read_text()


def test_kits23_demo_config_refusals(tmp_path):
    config = load_config(REPO / "configs" / "demo_kits23.yaml", DemoConfig)
    assert config.dataset == "kits23" and config.readme is None
    check_demo_datasets(config)  # both KiTS23 quick experiments
    with pytest.raises(ValueError, match="README's results block holds the KiTS19 demo's figures"):
        load_config(REPO / "configs" / "demo_kits23.yaml", DemoConfig, ["readme=README.md"])
    with pytest.raises(ValueError, match="cross-validated demo runs on KiTS19 only"):
        load_config(REPO / "configs" / "demo_kits23.yaml", DemoConfig, ["split.scheme=kfold"])
    with pytest.raises(ValueError, match="unknown dataset 'kits21'"):
        load_config(REPO / "configs" / "demo_kits23.yaml", DemoConfig, ["dataset=kits21"])
    mixed = load_config(REPO / "configs" / "demo_kits23.yaml", DemoConfig,
                        ["train_configs=[configs/resunet3d_quick.yaml]"])
    with pytest.raises(ValueError, match=r"configs/resunet3d_quick.yaml: the experiment trains on dataset kits19, "
                                         r"but the demo generates kits23 data"):
        check_demo_datasets(mixed)
    kits19 = load_config(REPO / "configs" / "demo.yaml", DemoConfig)
    assert kits19.dataset == "kits19"
    check_demo_datasets(kits19)


def test_generated_kits23_folders_are_the_demos_own(tmp_path):
    generate_dataset(tmp_path / "k23", 1, seed=0, options=SyntheticOptions(matrix=64, spacing=(6.0, 6.0, 6.0),
                                                                            dataset="kits23"), show_progress=False)
    assert is_synthetic_data_folder(tmp_path / "k23")
    (tmp_path / "k23" / "kits23.json").write_text(json.dumps([{"case_id": "case_00000", "age_at_nephrectomy": 60}]))
    assert not is_synthetic_data_folder(tmp_path / "k23")  # the challenge's own file: clinical fields


def test_demo_tables_follow_the_dataset():
    per_case = [{"case_id": "case_00003", "kidney_and_masses_dice": 0.9, "masses_dice": 0.5, "tumour_dice": 0.25}]
    lines = _validation_table("title", [("resunet3d", per_case, (0.9, 0.5, 0.25))], KITS23)
    assert lines[1].split() == ["validation", "case", "resunet3d", "kidney", "and", "masses", "masses", "tumour"]
    assert lines[2].split() == ["case_00003", "0.900", "0.500", "0.250"]
    assert lines[3].split() == ["mean", "0.900", "0.500", "0.250"]
    kits19 = _validation_table("title", [("unetr2d", [{"case_id": "case_00001", "kidney_dice": 0.8,
                                                       "tumour_dice": None}], (0.8, None))], KITS19)
    assert kits19[1] == f"{'validation case':<16} {'unetr2d kidney':>17} {'tumour':>7}"
    assert kits19[2].split() == ["case_00001", "0.800", "-"]

    class Evaluated:  # what the table reads of a run evaluation
        inference = {"model": "resunet3d"}

        class evaluation:  # noqa: N801
            summary = {name: {"mean": 0.5, "missing": 1 if name.endswith("hd95") else 0}
                       for name in metric_names(KITS23)}

    table = format_evaluation_table((Evaluated(),), KITS23)
    assert table[1].split()[1:] == list(metric_names(KITS23))
    assert table[2].split()[:4] == ["resunet3d", "0.500", "0.500", "0.500"] and "(1 missing)" in table[2]
