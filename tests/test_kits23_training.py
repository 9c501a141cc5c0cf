"""KiTS23 preprocessing and training: cyst locations in the cache, cyst-centred sampling, region-scored runs.

Every test reads a tiny synthetic KiTS23-style folder (four 64 x 64 cases, each with a cyst,
labels 0 background, 1 kidney, 2 tumour, 3 cyst) preprocessed once at its own 5 x 6 x 6 mm
spacing; the KiTS19 checks read the shared tiny KiTS19 cache of ``conftest.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from utils.config.data import PatchDatasetConfig, PreprocessingConfig, SliceDatasetConfig, SplitConfig
from utils.config.experiment import DATASETS_WITH_CYST, ExperimentConfig, load_experiment_config
from utils.config.loading import build_config, config_as_dict
from utils.data.dataset_definitions import CYST_LABEL, DATASETS, KITS23, DatasetLayoutError
from utils.datasets.patches import PatchDataset, background_value
from utils.datasets.slices import SLICE_CYST, SliceDataset
from utils.figures.training_curves import plot_training_progress
from utils.networks.checkpoints import load_checkpoint
from utils.networks.models import build_model, model_input_size
from utils.preprocessing.cache import LOCATIONS_FILE, CachedCase, PreprocessedCache, open_cache, write_case_folder
from utils.preprocessing.preprocess import PLAN_VERSION, plan_name, preprocess_dataset
from utils.synthetic.dataset import SyntheticOptions, generate_dataset
from utils.training.engine import train
from utils.training.setup import build_training_datasets

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: Seed 0 gives four cases that all hold a cyst (and a tumour), so every split has cysts to train on.
OPTIONS = SyntheticOptions(matrix=64, spacing=(5.0, 6.0, 6.0), coverage_mm=(240.0, 300.0), dataset="kits23")
SPACING = [5.0, 6.0, 6.0]
REGION_KEYS = ("kidney_and_masses_dice", "masses_dice", "tumour_dice")
#: Overrides shrinking a quick config to a few seconds: 2 epochs of 8 samples, validated after each.
#: (The quick configs already train on the CPU: no mixed precision, no loader workers, deterministic.)
TINY_RUN = ["training.epochs=2", "training.validate_every=1", "training.batch_size=2",
            f"preprocessing.target_spacing={SPACING}"]
TINY_3D = ["patches.patch_size=[8,16,16]", "patches.samples_per_epoch=8", "model.channels=[4,8,16]",
           "model.strides=[2,2]", "sliding_window.roi_size=[8,16,16]", "sliding_window.sw_batch_size=2"]
TINY_2D = ["model.hidden_size=32", "model.mlp_dim=64", "model.num_heads=2", "model.feature_size=4",
           "slices.image_size=32", "slices.samples_per_epoch=8", "slice_inference.batch_size=16"]


@pytest.fixture(scope="module")
def kits23_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic KiTS23-style cases (``kits23.json``), each with kidney, tumour and cyst."""
    folder = tmp_path_factory.mktemp("kits23") / "data"
    # seed 249: every case has a cyst of >= 169 voxels (about half the procedural patients have none)
    summaries = generate_dataset(folder, 4, seed=249, options=OPTIONS, show_progress=False)
    assert all(summary.cyst_ml > 0 for summary in summaries)
    return folder


@pytest.fixture(scope="module")
def kits23_cache(kits23_data: Path) -> PreprocessedCache:
    """The KiTS23 cache of ``kits23_data`` at its own spacing; the training runs below reuse it."""
    config = PreprocessingConfig(cache_dir=str(kits23_data.parent / "cache"), target_spacing=tuple(SPACING),
                                 image_dtype="float32")  # the quick configs' settings: the runs reuse it
    result = preprocess_dataset(kits23_data, config, SplitConfig(validation_fraction=0.25), show_progress=False,
                                dataset="kits23")
    assert not result.failed and not result.excluded
    return open_cache(result.folder)


def _old_digest(data: dict) -> str:
    """The plan digest as it was computed before datasets were known (the KiTS19 plan hashes)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


def _old_parameters(config: PreprocessingConfig) -> dict:
    parameters = config_as_dict(config)
    parameters.pop("cache_dir")
    return {"plan_version": PLAN_VERSION, **parameters}


# --- preprocessing ---------------------------------------------------------------------------------------------------


def test_a_kits23_cache_stores_cyst_locations_and_its_plan_names_the_dataset(kits23_cache: PreprocessedCache):
    plan = kits23_cache.plan
    assert plan["dataset"] == "kits23" and kits23_cache.dataset is KITS23
    config = build_config(PreprocessingConfig, plan["preprocessing"])
    assert kits23_cache.folder.name == plan_name(config, "kits23") != plan_name(config)
    # the dataset enters the hash: the same parameters and normalisation hash otherwise for KiTS19
    assert plan["plan_hash"] != _old_digest({**_old_parameters(config), "normalisation": plan["normalisation"]})
    for case in kits23_cache.cases():
        assert case.location_names == ("kidney", "tumour", "cyst")
        with np.load(case.folder / LOCATIONS_FILE) as stored:
            assert sorted(stored.files) == ["cyst", "kidney", "tumour"]
        for name, label in (("kidney", 1), ("tumour", 2), ("cyst", CYST_LABEL)):
            np.testing.assert_array_equal(case.locations(name), np.argwhere(case.label == label))
        assert len(case.locations("cyst")) > 0
        counts = np.bincount(np.asarray(case.label).ravel(), minlength=4)
        assert case.meta["label_voxels"] == {str(label): int(n) for label, n in enumerate(counts)}


def test_kits19_caches_keep_their_plan_hash_folder_and_locations(tiny_cache: PreprocessedCache):
    plan = tiny_cache.plan
    config = build_config(PreprocessingConfig, plan["preprocessing"])
    assert plan["plan_hash"] == _old_digest({**_old_parameters(config), "normalisation": plan["normalisation"]})
    spacing = "x".join(f"{s:g}" for s in config.target_spacing)
    assert tiny_cache.folder.name == plan_name(config) == plan_name(config, "kits19")
    assert plan_name(config) == f"spacing_{spacing}_{_old_digest(_old_parameters(config))[:8]}"
    assert tiny_cache.dataset.name == "kits19"
    case = tiny_cache.case(tiny_cache.case_ids[0])
    with np.load(case.folder / LOCATIONS_FILE) as stored:
        assert sorted(stored.files) == ["kidney", "tumour"]
    assert sorted(case.meta["label_voxels"]) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="name must be one of"):
        case.locations("cyst")


def test_a_folder_of_the_other_dataset_is_refused_before_any_work(kits23_data: Path, tiny_data: Path,
                                                                  tmp_path: Path):
    config = PreprocessingConfig(cache_dir=str(tmp_path / "cache"), target_spacing=tuple(SPACING))
    with pytest.raises(DatasetLayoutError, match="holds kits23.json, .* read as KiTS19"):
        preprocess_dataset(kits23_data, config, SplitConfig(), show_progress=False)  # KiTS19 by default
    with pytest.raises(DatasetLayoutError, match="holds kits.json, .* read as KiTS23"):
        preprocess_dataset(tiny_data, config, SplitConfig(), show_progress=False, dataset="kits23")
    assert not (tmp_path / "cache").exists()


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_preprocess_script_reads_the_dataset_of_the_config_or_of_dataset(kits23_data: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture):
    preprocess = _load_script("preprocess")
    spacing = f"preprocessing.target_spacing={SPACING}"
    common = ["--config", str(CONFIGS / "preprocessing.yaml"), "--data", str(kits23_data), "--set", spacing]
    assert preprocess.main([*common, "--out", str(tmp_path / "as19")]) == 1  # read as KiTS19: refused
    assert "kits23.json" in capsys.readouterr().err
    assert preprocess.main([*common, "--out", str(tmp_path / "as23"), "--dataset", "kits23"]) == 0
    assert json.loads(next((tmp_path / "as23").glob("spacing_*/plan.json")).read_text())["dataset"] == "kits23"
    capsys.readouterr()
    experiment = ["--config", str(CONFIGS / "resunet3d_kits23_quick.yaml"), *common[2:]]
    assert preprocess.main([*experiment, "--dataset", "kits19"]) == 2
    assert "--dataset is kits19" in capsys.readouterr().err
    assert preprocess.main([*experiment, "--set", f"preprocessing.cache_dir={tmp_path / 'quick'}"]) == 0
    assert "reads this plan folder" in capsys.readouterr().out  # the one training with the config reads


# --- sampling --------------------------------------------------------------------------------------------------------


def test_cyst_share_one_centres_every_patch_on_a_cyst_voxel(kits23_cache: PreprocessedCache):
    config = PatchDatasetConfig(patch_size=(8, 16, 16), tumour_share=0.0, kidney_share=0.0, cyst_share=1.0,
                                anywhere_share=0.0, samples_per_epoch=12)
    dataset = PatchDataset(kits23_cache.cases(), config, None, seed=0, pad_value=background_value(kits23_cache))
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["centre_class"] == "cyst"
        assert item["label"][0, 4, 8, 8] == CYST_LABEL  # the centre voxel: start = centre - size // 2


def _case_without_cyst(folder: Path) -> CachedCase:
    """A hand-made KiTS23 case with kidney and tumour but no cyst (its cyst locations are empty)."""
    labels = np.zeros((6, 8, 8), np.uint8)
    labels[1:4, 2:5, 2:5] = 1
    image = np.zeros(labels.shape, np.float32)
    meta = {"case_id": "case_00000", "shape": list(labels.shape), "mapping": {"resampled_spacing": [2.0, 1.0, 1.0]},
            "slice_classes": [0, 1, 1, 1, 0, 0]}
    locations = {name: np.argwhere(labels == label) for name, label in (("kidney", 1), ("tumour", 2), ("cyst", 3))}
    return CachedCase(write_case_folder(folder, "case_00000", {"image.npy": image, "label.npy": labels}, locations,
                                        meta), meta, "kits23")


def test_a_case_without_cyst_falls_back_to_kidney_then_anywhere(tmp_path: Path, make_cached_case):
    config = PatchDatasetConfig(patch_size=(2, 4, 4), tumour_share=0.0, kidney_share=0.0, cyst_share=1.0,
                                anywhere_share=0.0, samples_per_epoch=6)
    dataset = PatchDataset([_case_without_cyst(tmp_path)], config, None, seed=0, pad_value=0.0)
    assert {dataset[i]["centre_class"] for i in range(6)} == {"kidney"}
    assert all(dataset[i]["label"][0, 1, 2, 2] == 1 for i in range(6))
    kits19_case = make_cached_case(tmp_path / "kits19", "case_00001", np.zeros((4, 6, 6), np.uint8))
    with pytest.raises(ValueError, match="patches.cyst_share is 1.0, but case_00001 comes from a KiTS19 cache"):
        PatchDataset([kits19_case], config, None, seed=0, pad_value=0.0)


def test_cyst_share_one_draws_only_slices_holding_cyst(kits23_cache: PreprocessedCache):
    config = SliceDatasetConfig(image_size=32, tumour_share=0.0, kidney_share=0.0, background_share=0.0,
                                cyst_share=1.0, samples_per_epoch=12)
    cases = kits23_cache.cases()
    dataset = SliceDataset(cases, config, None, seed=0, pad_value=background_value(kits23_cache))
    assert list(dataset.class_probabilities) == [0.0, 0.0, 0.0, 1.0]
    for index in range(len(dataset)):
        item = dataset[index]
        case = next(c for c in cases if c.case_id == item["case_id"])
        assert item["slice_class"] == SLICE_CYST and (case.label[item["slice_index"]] == CYST_LABEL).any()
    # without a cyst share the sampler is the KiTS19 one: three classes, the same draws
    plain = SliceDataset(cases, SliceDatasetConfig(image_size=32, samples_per_epoch=4), None, seed=0, pad_value=0.0)
    assert sorted(plain.slices) == [0, 1, 2] and len(plain.class_probabilities) == 3


# --- configs ---------------------------------------------------------------------------------------------------------


def test_a_cyst_share_is_refused_for_a_dataset_without_cysts():
    assert DATASETS_WITH_CYST == {name for name, definition in DATASETS.items() if definition.has_label("cyst")}
    patches = PatchDatasetConfig(tumour_share=0.3, kidney_share=0.25, cyst_share=0.15, anywhere_share=0.3)
    with pytest.raises(ValueError, match=r"patches.cyst_share is 0.15, but dataset kits19 has no cyst label"):
        ExperimentConfig(patches=patches)
    slices = SliceDatasetConfig(tumour_share=0.4, kidney_share=0.3, cyst_share=0.1, background_share=0.2)
    with pytest.raises(ValueError, match=r"slices.cyst_share is 0.1, but dataset kits19 has no cyst label"):
        ExperimentConfig(slices=slices)
    with pytest.raises(ValueError, match="must be >= 0 and add up to 1"):
        PatchDatasetConfig(tumour_share=0.33, kidney_share=0.33, cyst_share=0.1, anywhere_share=0.34)
    with pytest.raises(ValueError, match="patches.cyst_share is 0.15"):
        load_experiment_config(CONFIGS / "resunet3d_kits23_quick.yaml",
                               ["dataset=kits19", "model.out_channels=3", "loss.class_weights=[1,1,3]"])


@pytest.mark.parametrize("name", ["resunet3d_kits23_quick.yaml", "unetr2d_kits23_quick.yaml", "resunet3d_kits23.yaml",
                                  "unetr2d_kits23.yaml"])
def test_the_kits23_configs_follow_their_kits19_recipe_with_the_cyst_label(name: str):
    config = load_experiment_config(CONFIGS / name)
    recipe = load_experiment_config(CONFIGS / name.replace("_kits23", ""))
    assert config.dataset == "kits23" and config.model.out_channels == len(config.loss.class_weights) == 4
    assert (config.patches if config.model.name == "resunet3d" else config.slices).cyst_share > 0
    assert config.preprocessing.cache_dir != recipe.preprocessing.cache_dir
    assert config.model.name == recipe.model.name and config.optimiser == recipe.optimiser
    assert config.preprocessing.target_spacing == recipe.preprocessing.target_spacing
    assert config.training == recipe.training and config.split == recipe.split


def test_a_cache_of_another_dataset_than_the_config_is_refused(kits23_cache: PreprocessedCache):
    with pytest.raises(ValueError, match="caches KiTS23 data .* the config's dataset is 'kits19'"):
        build_training_datasets(ExperimentConfig(), kits23_cache)


# --- training --------------------------------------------------------------------------------------------------------


def _run(config_name: str, overrides: list[str], cache: PreprocessedCache, data: Path, tmp_path: Path):
    """Train the quick KiTS23 config shrunk by ``overrides`` on ``cache`` (reused: up to date)."""
    config = load_experiment_config(CONFIGS / config_name, [
        *TINY_RUN, *overrides, f"preprocessing.cache_dir={cache.folder.parent}",
        f"training.output_dir={tmp_path / 'runs'}", "training.run_name=kits23"])
    return config, train(config, data_dir=data, show_progress=False)


def _check_kits23_run(config: ExperimentConfig, result, cache: PreprocessedCache) -> None:
    """Region Dice records, best.pt following their mean, a checkpoint of a 4-channel KiTS23 model."""
    records = result.records
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert all(0 <= record[key] <= 1 for key in REGION_KEYS) and "kidney_dice" not in record
        assert record["mean_dice"] == pytest.approx(np.mean([record[key] for key in REGION_KEYS]))
        assert all(set(REGION_KEYS) <= set(case) for case in record["per_case"])
    assert [case["case_id"] for case in records[-1]["per_case"]] == sorted(cache.split(0)[1])
    best = max(records, key=lambda r: r["mean_dice"])
    assert result.best_epoch == best["epoch"] and result.best_score == pytest.approx(best["mean_dice"])
    for name in ("best.pt", "last.pt"):
        checkpoint = load_checkpoint(result.run_folder / name)
        assert checkpoint["config"]["dataset"] == "kits23" and checkpoint["preprocessing_plan"]["dataset"] == "kits23"
        model = build_model(config.model, model_input_size(config))
        model.load_state_dict(checkpoint["model"])
        size = model_input_size(config)
        with torch.no_grad():
            assert model(torch.zeros(1, 1, *size)).shape == (1, 4, *size)
    assert "kidney and masses Dice" in (result.run_folder / "train.log").read_text()
    dice_ax = plot_training_progress(records).axes[1]
    assert [line.get_label() for line in dice_ax.get_lines()] == [
        "kidney and masses (label > 0)", "masses (labels 2, 3)", "tumour (label 2)"]


def test_the_3d_residual_unet_trains_on_kits23_and_is_scored_by_region(kits23_data: Path,
                                                                        kits23_cache: PreprocessedCache,
                                                                        tmp_path: Path):
    config, result = _run("resunet3d_kits23_quick.yaml", TINY_3D, kits23_cache, kits23_data, tmp_path)
    assert config.patches.cyst_share > 0 and result.run_folder.parent == tmp_path / "runs"
    _check_kits23_run(config, result, kits23_cache)


def test_the_unetr_trains_on_kits23_slices_and_is_scored_by_region(kits23_data: Path,
                                                                   kits23_cache: PreprocessedCache, tmp_path: Path):
    config, result = _run("unetr2d_kits23_quick.yaml", TINY_2D, kits23_cache, kits23_data, tmp_path)
    assert config.slices.cyst_share > 0
    _check_kits23_run(config, result, kits23_cache)
