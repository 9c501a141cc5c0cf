"""scripts/benchmark_quality.py (utils/benchmarks/quality.py): the held-out split, fallback, reports, refusals."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from utils.benchmarks.quality import (
    TEST_CASE_IDS,
    QualityPlan,
    describe_dice,
    generate_split_data,
    plan_data_split,
    prepare_quality_benchmark,
    split_case_ids,
)
from utils.config.experiment import load_experiment_config
from utils.data.kits_layout import build_kits_affine
from utils.data.nifti_io import save_nifti
from utils.synthetic.dataset import generate_from_masks

REPO = Path(__file__).resolve().parents[1]

# Tiny networks, coarse voxels, 8 samples and one validated epoch: seconds per model on one core.
TINY_BOTH = ["preprocessing.target_spacing=[5,6,6]", "patches.samples_per_epoch=8", "slices.samples_per_epoch=8",
             "training.validate_every=1"]
TINY_3D = ["model.channels=[4,8,16,32]", "patches.patch_size=[16,32,32]", "sliding_window.roi_size=[16,32,32]"]
TINY_2D = ["model.hidden_size=32", "model.mlp_dim=64", "model.num_heads=2", "model.feature_size=4",
           "slices.image_size=32", "training.batch_size=4"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_masks(folder: Path, case_numbers: list[int]) -> None:
    """Small two-kidney masks with a tumour, ``(12, 48, 48)`` at 5 x 4 x 4 mm, in the KiTS19 layout."""
    z, y, x = np.ogrid[:12, :48, :48]
    labels = np.zeros((12, 48, 48), np.uint8)
    for cx in (14, 34):
        labels[((z - 6) / 4) ** 2 + ((y - 28) / 6) ** 2 + ((x - cx) / 5) ** 2 <= 1] = 1
    labels[((z - 6) / 2) ** 2 + ((y - 28) / 3) ** 2 + ((x - 12) / 3) ** 2 <= 1] = 2
    for number in case_numbers:
        (folder / f"case_{number:05d}").mkdir(parents=True)
        save_nifti(labels, build_kits_affine((5.0, 4.0, 4.0)), folder / f"case_{number:05d}" / "segmentation.nii.gz")


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """The quality table's rows by model (the first table of quality.md)."""
    table = markdown[markdown.index("| model | kidney Dice"):].split("\n\n")[0].splitlines()[2:]
    return {cells[0]: cells for cells in ([c.strip() for c in row.strip("|").split("|")] for row in table)}


def test_end_to_end_on_procedural_fallback(tmp_path, caplog):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--masks", str(tmp_path / "no_masks_here"), "--train-cases", "3", "--test-cases", "2", "--matrix", "64",
            "--out", str(out), "--work", str(work), "--epochs3d", "1", "--epochs2d", "1", "--bootstrap", "50",
            "--restore", "labels"]
    argv += [f"--set3d={o}" for o in TINY_BOTH + TINY_3D] + [f"--set2d={o}" for o in TINY_BOTH + TINY_2D]
    with caplog.at_level("INFO"):
        status = _load_script("benchmark_quality").main(argv)
    assert status == 0
    assert any(r.levelname == "WARNING" and "NOT comparable with the README" in r.getMessage()
               and "no_masks_here" in r.getMessage() for r in caplog.records)
    quality = json.loads((out / "quality.json").read_text())
    split = quality["split"]
    assert split["source"] == "procedural" and split["disjoint_by"] == "master seed"
    assert split["train_ids"] == ["case_00000", "case_00001", "case_00002"]
    assert split["test_ids"] == ["case_00000", "case_00001"] and split["train_dir"] != split["test_dir"]
    assert quality["machine"]["cpu_cores"] >= 1 and quality["machine"]["torch"]
    assert "--train-cases 3" in quality["command"]
    assert set(quality["models"]) == {"resunet3d", "unetr2d"}
    for name, model in quality["models"].items():
        budget = model["budget"]
        assert budget["epochs"] == 1 and budget["samples_per_epoch"] == 8
        assert budget["optimiser_steps"] > 0 and budget["wall_minutes"] > 0 and budget["cpu_seconds"] > 0
        assert [c["case_id"] for c in model["cases"]] == split["test_ids"] and model["failures"] == []
        assert [c["case_id"] for c in model["tumour_dice_per_case"]] == split["test_ids"]
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert sorted(c["case_id"] for c in metrics["cases"]) == split["test_ids"]
        assert model["summary"]["kidney_dice"] == metrics["summary"]["kidney_dice"]  # nothing failed: the same
        spread = model["tumour_dice_distribution"]
        assert spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"]
        assert spread["cases"] == 2
        assert [r["epoch"] for r in model["learning_curve"]] == [1]
        assert 0 <= model["learning_curve"][0]["kidney_dice"] <= 1
        inference = json.loads((out / name / "inference.json").read_text())
        assert "last.pt" in inference["checkpoint"] and inference["restore"] == "labels"
    assert "nearest-neighbour copy of the coarse labels" in (out / "quality.md").read_text()
    for name, model in quality["models"].items():  # a class the final model hardly predicts is flagged, or none is
        final = model["learning_curve"][-1]["unpredicted"]
        assert isinstance(final, str)
        flagged = f"**WARNING:** {name}'s final validation (held-out train cases, cache grid) hardly predicts"
        assert (flagged + f" {final} " in (out / "quality.md").read_text()) == bool(final)
        assert (flagged in (out / "quality.md").read_text()) == bool(final)
    rows = _table_rows((out / "quality.md").read_text())
    assert sorted(rows) == ["resunet3d", "unetr2d"]
    for cells in rows.values():
        kidney, tumour = (float(re.match(r"[\d.]+", cell).group()) for cell in cells[1:3])
        assert 0 <= kidney <= 1 and 0 <= tumour <= 1 and cells[-1] == "1"
    assert "python scripts/benchmark_quality.py" in (out / "quality.md").read_text()
    # every test tumour profiled from its raw files; each model's tumour Dice regrouped by them
    profiles = quality["test_tumours"]
    assert [p["case_id"] for p in profiles] == split["test_ids"]
    for model in quality["models"].values():
        dice = {c["case_id"]: c["tumour_dice"] for c in model["cases"]}
        groups = model["tumour_dice_by_group"]
        for key in ("contrast_group", "size_group"):
            for group in {p[key] for p in profiles if p[key] is not None}:
                ids = [p["case_id"] for p in profiles if p[key] == group]
                assert groups[group]["case_ids"] == ids
                assert groups[group]["mean"] == pytest.approx(np.mean([dice[i] for i in ids]))
        assert sum(groups[g]["cases"] for g in ("small", "large")) == sum(p["tumour_ml"] > 0 for p in profiles)
    assert "Tumour Dice by kind of test tumour" in (out / "quality.md").read_text()
    assert (out / "comparison" / "comparison.md").is_file()
    for figure in ("learning_curves.png", "dice_per_case.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"


def test_case_ids_select_exactly_those_masks_and_refuse_unknown_ones(tmp_path):
    masks = tmp_path / "masks"
    _write_masks(masks, [0, 1, 2, 7])
    summaries = generate_from_masks(masks, tmp_path / "out", case_ids=["case_00007", "case_00001"],
                                    show_progress=False)
    assert sorted(s.case_id for s in summaries) == ["case_00001", "case_00007"]
    assert sorted(p.name for p in (tmp_path / "out").glob("case_*")) == ["case_00001", "case_00007"]
    with pytest.raises(ValueError, match=r"masks: no case_XXXXX/segmentation.nii.gz for 1 requested case id\(s\): "
                                         r"case_00099"):
        generate_from_masks(masks, tmp_path / "other", case_ids=["case_00001", "case_00099"], show_progress=False)
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="not both"):
        generate_from_masks(masks, tmp_path / "other", cases=1, case_ids=["case_00001"], show_progress=False)
    script = _load_script("make_synthetic_data")
    assert script.main(["--out", str(tmp_path / "cli"), "--from-masks", str(masks), "--case-ids",
                        "case_00002, case_00000"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").glob("case_*")) == ["case_00000", "case_00002"]
    assert script.main(["--out", str(tmp_path / "cli2"), "--from-masks", str(masks), "--case-ids", "case_00005"]) == 2


def test_outputs_inside_the_mask_folder_are_refused_before_any_file_is_written(tmp_path, capsys):
    masks = tmp_path / "masks"
    _write_masks(masks, [0, 150])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    script = _load_script("benchmark_quality")
    for option, inside in (("--out", masks / "reports"), ("--work", masks)):
        others = {"--out": tmp_path / "out", "--work": tmp_path / "work"}
        others[option] = inside
        argv = ["--masks", str(masks), "--train-cases", "1", "--test-cases", "1",
                *(item for pair in others.items() for item in (pair[0], str(pair[1])))]
        assert script.main(argv) == 2
        error = capsys.readouterr().err
        assert f"{option} {inside} lies inside the mask folder" in error and "only ever read" in error
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_input_is_a_usage_error_naming_the_folder(tmp_path, capsys):
    script = _load_script("benchmark_quality")
    missing = tmp_path / "nowhere"
    assert script.main(["--masks", str(missing), "--require-masks", "--out", str(tmp_path / "o"),
                        "--work", str(tmp_path / "w")]) == 2
    assert f"{missing}: mask folder not found" in capsys.readouterr().err
    masks = tmp_path / "masks"
    _write_masks(masks, [0, 1, 150])  # no case_00002
    assert script.main(["--masks", str(masks), "--train-cases", "3", "--test-cases", "1",
                        "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]) == 2
    assert "requested case id(s): case_00002" in capsys.readouterr().err
    assert script.main(["--masks", str(masks), "--models", "3d,4d", "--out", str(tmp_path / "o")]) == 2
    assert "models must name each of" in capsys.readouterr().err
    emulated = {"_is_avx512_bf16_supported": lambda: False, "_is_amx_tile_supported": lambda: False}
    with pytest.MonkeyPatch.context() as patch:  # a CPU without bf16: refused before any data is generated
        for name, value in emulated.items():
            patch.setattr(torch.cpu, name, value)
        assert script.main(["--masks", str(masks), "--train-cases", "2", "--test-cases", "1", "--models", "3d",
                            "--set3d", "training.mixed_precision=bf16",
                            "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]) == 2
    assert "neither AVX512-BF16 nor AMX" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_the_split_is_fixed_by_case_id():
    train, test = split_case_ids(30)
    assert train == tuple(f"case_{i:05d}" for i in range(30)) and test == TEST_CASE_IDS
    assert test[0] == "case_00150" and test[-1] == "case_00169" and len(test) == 20
    assert split_case_ids(5, 3)[1] == ("case_00150", "case_00151", "case_00152")
    with pytest.raises(ValueError, match="train_cases must be between 1 and 150"):
        split_case_ids(151)
    with pytest.raises(ValueError, match="test_cases must be between 1 and 20"):
        split_case_ids(3, 21)
    with pytest.raises(ValueError, match="restore must be one of probabilities, labels"):
        QualityPlan(restore="nearest")


def test_dice_distribution_by_hand():
    spread = describe_dice([0.0, 0.2, 0.6, 1.0])
    assert spread["min"] == 0.0 and spread["max"] == 1.0 and spread["median"] == pytest.approx(0.4)
    assert spread["q1"] == pytest.approx(0.15) and spread["q3"] == pytest.approx(0.7)
    assert spread["share_at_least_0.5"] == 0.5 and spread["cases"] == 4


def test_split_of_the_real_kits19_masks(real_kits19_dir, tmp_path):
    plan = QualityPlan(masks_dir=real_kits19_dir, out_dir=tmp_path / "out", work_dir=tmp_path / "work",
                       require_masks=True)
    prepared = prepare_quality_benchmark(plan)  # checks masks, ids and configs; writes nothing
    split = plan_data_split(plan)
    assert split == prepared.split and split.source == "kits19_masks" and split.warning is None
    assert split.test_ids == tuple(f"case_{i:05d}" for i in range(150, 170))
    assert plan.train_cases == 60  # the default: the first 60 cases train
    assert split.train_ids == tuple(f"case_{i:05d}" for i in range(60))
    assert not set(split.train_ids) & set(split.test_ids) and split.train_dir != split.test_dir
    own = {key: load_experiment_config(path).training.epochs
           for key, path in (("3d", plan.config_3d), ("2d", plan.config_2d))}
    assert {key: c.training.epochs for key, c in prepared.configs.items()} == own  # the quick configs' own
    assert all(c.data_dir == str(split.train_dir) for c in prepared.configs.values())
    assert list(tmp_path.iterdir()) == []


def test_a_two_stage_3d_model_trains_its_locator_first_and_counts_both_budgets(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--masks", str(tmp_path / "no_masks_here"), "--train-cases", "3", "--test-cases", "2", "--matrix", "64",
            "--out", str(out), "--work", str(work), "--models", "3d", "--epochs3d", "1", "--locator-epochs", "1",
            "--config3d", str(REPO / "configs" / "resunet3d_kidney_quick.yaml"),
            "--locator3d", str(REPO / "configs" / "resunet3d_quick.yaml")]
    tiny = TINY_BOTH + TINY_3D
    refused = argv + [f"--set3d={o}" for o in tiny] + ["--set3d=cascade.locator=somewhere"]
    assert _load_script("benchmark_quality").main(refused) == 2
    assert "give one or the other" in capsys.readouterr().err
    argv += [f"--set3d={o}" for o in tiny] + [f"--set-locator={o}" for o in tiny]
    assert _load_script("benchmark_quality").main(argv + ["--choose-postprocessing"]) == 2  # needs --postprocess
    assert "needs postprocess" in capsys.readouterr().err
    assert _load_script("benchmark_quality").main(argv + ["--postprocess", "--choose-postprocessing"]) == 0
    model = json.loads((out / "quality.json").read_text())["models"]["resunet3d"]
    # the smallest tumour component was chosen on the run's validation cases, then used on the test cases
    chosen = model["postprocessing"]
    validation = json.loads((out / "resunet3d_validation" / "inference.json").read_text())
    assert validation["cases_selected"] == "validation" and validation["postprocess"] is True
    assert [c["case_id"] for c in validation["cases"]] == chosen["validation_cases"]
    assert not set(chosen["validation_cases"]) & {"case_00150", "case_00151"}  # never a test case
    assert (out / "resunet3d_validation" / "postprocessing_choice.md").is_file()
    stored = json.loads((Path(model["run_folder"]) / "postprocessing.json").read_text())
    assert stored["checkpoint"] == "last.pt" and stored["min_tumour_ml"] == chosen["min_tumour_ml"]
    assert chosen["min_tumour_ml"] in chosen["candidates_ml"]
    locator = model["locator"]
    assert locator["budget"]["epochs"] == 1 and locator["budget"]["wall_minutes"] > 0
    assert Path(locator["run_folder"]).is_dir() and Path(locator["run_folder"]) != Path(model["run_folder"])
    assert (Path(model["run_folder"]) / "locator.pt").is_file()
    inference = json.loads((out / "resunet3d" / "inference.json").read_text())
    assert inference["locator"]["checkpoint"] == str((Path(model["run_folder"]) / "locator.pt").resolve())
    assert inference["locator"]["combine"] == "mean"  # the config's default: both stages label each box
    assert inference["locator"]["rank_components"] == "kidney"  # the default ranking of components
    assert inference["postprocess"] is True and inference["min_tumour_ml"] == chosen["min_tumour_ml"]
    markdown = (out / "quality.md").read_text()
    assert "post-processing was chosen on its" in markdown
    cells = _table_rows(markdown)["resunet3d (two stages)"]
    assert cells[-1] == "2"  # epochs of both stages
    assert float(cells[-3]) == pytest.approx(model["budget"]["wall_minutes"] + locator["budget"]["wall_minutes"],
                                             abs=0.01)
    assert "resunet3d's locator" in markdown


def test_extra_train_masks_join_the_train_set_only_with_kits19_labels(tmp_path, capsys, caplog):
    masks, extra, out, work = tmp_path / "masks", tmp_path / "kits23", tmp_path / "out", tmp_path / "work"
    _write_masks(masks, [0, 1, 150, 151])
    _write_masks(extra, [1, 400, 401])  # case_00001 is a KiTS19 patient: left out
    for path in extra.glob("case_*/segmentation.nii.gz"):
        image = nib.load(path)
        labels = np.asarray(image.dataobj).astype(np.uint8)
        labels[6, 28, 33:36] = 3  # a small cyst in the right kidney
        save_nifti(labels, image.affine, path)
    (extra / "kits23.json").write_text(json.dumps([{"case_id": f"case_{n:05d}"} for n in (1, 400, 401)]))
    before = {p: p.read_bytes() for p in extra.rglob("*") if p.is_file()}
    script = _load_script("benchmark_quality")
    common = ["--masks", str(masks), "--extra-train-masks", str(extra), "--train-cases", "2", "--test-cases", "2",
              "--models", "3d", "--epochs3d", "1", "--bootstrap", "50"]
    assert script.main([*common, "--out", str(out), "--work", str(extra / "work")]) == 2
    assert f"--work {extra / 'work'} lies inside the mask folder {extra}" in capsys.readouterr().err
    assert script.main(["--masks", str(tmp_path / "none"), *common[2:], "--out", str(out), "--work", str(work)]) == 2
    assert "extra training masks" in capsys.readouterr().err and not work.exists()
    with caplog.at_level("INFO"):
        assert script.main([*common, "--out", str(out), "--work", str(work),
                            *(f"--set3d={o}" for o in TINY_BOTH + TINY_3D)]) == 0
    assert any("1 of 3 masks left out" in r.getMessage() for r in caplog.records)
    split = json.loads((out / "quality.json").read_text())["split"]
    assert split["train_ids"] == ["case_00000", "case_00001"] and split["test_ids"] == ["case_00150", "case_00151"]
    assert split["extra_ids"] == ["case_00400", "case_00401"] and split["extra_masks_dir"] == str(extra)
    train_dir = Path(split["train_dir"])
    cases = ["case_00000", "case_00001", "case_00400", "case_00401"]
    assert sorted(p.name for p in train_dir.glob("case_*")) == cases
    assert [e["case_id"] for e in json.loads((train_dir / "kits.json").read_text())] == cases
    for case_id in ("case_00400", "case_00401"):
        written = np.asarray(nib.load(train_dir / case_id / "segmentation.nii.gz").dataobj)
        assert set(np.unique(written).tolist()) == {0, 1, 2} and written[6, 28, 34] == 1  # the cyst is kidney
    assert not (Path(split["test_dir"]) / "case_00400").exists()
    assert "plus case_00400 … case_00401 (2 cases) around the masks of" in (out / "quality.md").read_text()
    model = json.loads((out / "quality.json").read_text())["models"]["resunet3d"]
    assert model["failures"] == [] and model["budget"]["optimiser_steps"] > 0
    assert {p: p.read_bytes() for p in extra.rglob("*") if p.is_file()} == before
    plan = QualityPlan(masks_dir=masks, extra_masks_dir=extra, train_cases=2, test_cases=2, out_dir=out,
                       work_dir=work, models=("3d",))
    caplog.clear()
    with caplog.at_level("INFO"):
        generate_split_data(plan_data_split(plan), plan, show_progress=False)  # everything reused
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records if "reusing" in r.getMessage()) == [
        "combined cases", "extra cases", "test cases", "train cases"]
