"""Tests of utils/data/dataset_definitions.py and of scoring by a dataset's evaluation regions: KiTS19's
kidney and tumour, KiTS23's hierarchical evaluation regions (HECs) with the challenge's tolerances."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from utils.data.dataset_definitions import (
    CYST_LABEL,
    KITS19,
    KITS23,
    DatasetDefinition,
    EvaluationRegion,
    get_dataset,
)
from utils.metrics.scoring import METRIC_NAMES, dice_names, metric_names, score_case, summarise_scores

SPACING = (2.0, 0.8, 0.8)


def test_kits19_is_the_project_s_historical_labels_and_metrics():
    assert dict(KITS19.labels) == {0: "background", 1: "kidney", 2: "tumour"}
    assert KITS19.num_classes == 3 and KITS19.label("tumour") == 2 and not KITS19.has_label("cyst")
    assert KITS19.region_names == ("kidney", "tumour")
    assert metric_names(KITS19) == METRIC_NAMES and dice_names(KITS19) == ("kidney_dice", "tumour_dice")
    assert (KITS19.data_folder, KITS19.metadata_name) == ("data", "kits.json")
    labels = np.random.default_rng(0).integers(0, 3, size=(5, 6, 7))
    assert np.array_equal(KITS19.region("kidney").mask(labels), labels > 0)
    assert torch.equal(KITS19.region("tumour").mask(torch.from_numpy(labels)), torch.from_numpy(labels == 2))


def test_kits23_has_the_cyst_and_the_challenge_s_hecs():
    assert KITS23.num_classes == 4 and KITS23.label("cyst") == CYST_LABEL == 3
    assert [(r.name, sorted(r.labels)) for r in KITS23.regions] == [
        ("kidney_and_masses", [1, 2, 3]), ("masses", [2, 3]), ("tumour", [2])]
    assert [round(r.tolerance_mm, 2) for r in KITS23.regions] == [1.03, 1.13, 1.15]
    assert (KITS23.data_folder, KITS23.metadata_name) == ("dataset", "kits23.json")
    assert get_dataset("KiTS23") is KITS23 and get_dataset(KITS19) is KITS19


def test_an_unknown_dataset_or_label_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'kits21x'.*kits19, kits23"):
        get_dataset("kits21x")
    with pytest.raises(KeyError, match="KiTS19 has no label 'cyst'"):
        KITS19.label("cyst")
    with pytest.raises(ValueError, match="without gaps"):
        DatasetDefinition("bad", "Bad", {0: "background", 2: "tumour"}, (), "data", "x.json")
    with pytest.raises(ValueError, match=r"labels \[3\]"):
        DatasetDefinition("bad", "Bad", {0: "background", 1: "kidney"},
                          (EvaluationRegion("kidney", frozenset({1, 3})),), "data", "x.json")
    with pytest.raises(ValueError, match="foreground"):
        EvaluationRegion("all", frozenset({0, 1}))


def _kits23_case() -> np.ndarray:
    """A kidney block holding a 4 x 4 x 4 tumour and, apart from it, a 4 x 4 x 4 cyst."""
    labels = np.zeros((12, 20, 30), np.uint8)
    labels[2:10, 4:16, 4:26] = 1
    labels[4:8, 6:10, 6:10] = 2
    labels[4:8, 6:10, 18:22] = CYST_LABEL
    return labels


def test_a_perfect_kits23_prediction_scores_one_everywhere():
    truth = _kits23_case()
    scores = score_case(truth.copy(), truth, SPACING, dataset=KITS23)
    assert list(scores) == list(metric_names(KITS23))
    assert all(scores[f"{r}_dice"] == 1.0 and scores[f"{r}_surface_dice"] == 1.0 and scores[f"{r}_hd95"] == 0.0
               for r in KITS23.region_names)


def test_cyst_and_tumour_swapped_scores_as_computed_by_hand():
    truth = _kits23_case()
    swapped = truth.copy()
    swapped[truth == 2], swapped[truth == CYST_LABEL] = CYST_LABEL, 2
    scores = score_case(swapped, truth, SPACING, dataset=KITS23)
    # Kidney and masses, and masses, are the same voxels; the tumours do not overlap at all, and their
    # surfaces lie 9 voxels x 0.8 mm apart along x at the nearest, beyond every tolerance.
    assert scores["kidney_and_masses_dice"] == 1.0 and scores["masses_dice"] == 1.0
    assert scores["masses_surface_dice"] == 1.0
    assert scores["tumour_dice"] == 0.0 and scores["tumour_surface_dice"] == 0.0
    # Boundary voxels of either cube lie 9, 10, 11 and 12 voxels (x 0.8 mm) from the other's nearest face:
    # 16, 12, 12 and 16 of the 56; the 95th percentile falls among the last 16.
    assert scores["tumour_hd95"] == pytest.approx(12 * 0.8)

    # Half of the tumour (two of its four slices) called cyst: tumour Dice 2 x 32 / (32 + 64).
    half = truth.copy()
    half[4:6][truth[4:6] == 2] = CYST_LABEL
    scores = score_case(half, truth, SPACING, dataset=KITS23)
    assert scores["tumour_dice"] == pytest.approx(2 * 32 / 96) and scores["masses_dice"] == 1.0
    # On KiTS23 labels the KiTS19 scorer refuses label 3, naming the labels it knows.
    with pytest.raises(ValueError, match=r"labels 0 \(background\), 1 \(kidney\), 2 \(tumour\) \(KiTS19\)"):
        score_case(half, truth, SPACING)


def test_dice_only_scores_use_the_regions_too():
    truth = torch.from_numpy(_kits23_case())
    prediction = truth.clone()
    prediction[truth == CYST_LABEL] = 1  # the cyst called kidney
    scores = score_case(prediction, truth, dataset=KITS23)
    assert set(scores) == set(dice_names(KITS23))
    assert scores["kidney_and_masses_dice"] == 1.0 and scores["tumour_dice"] == 1.0
    assert scores["masses_dice"] == pytest.approx(2 * 64 / (64 + 128))


@pytest.mark.parametrize("seed", [0, 1])
def test_hec_surface_dice_agrees_with_monai_at_each_official_tolerance(seed):
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(seed)
    shape, spacing = (16, 24, 24), (1.5, 0.7, 0.9)

    def blob(level: float) -> np.ndarray:
        return ndimage.gaussian_filter(rng.normal(size=shape), 2.0) > level

    def label_map() -> np.ndarray:
        labels = np.where(blob(-0.1), 1, 0).astype(np.uint8)
        labels[blob(0.15)] = CYST_LABEL
        labels[blob(0.15)] = 2
        return labels

    prediction, truth = label_map(), label_map()
    scores = score_case(prediction, truth, spacing, dataset=KITS23)
    for region in KITS23.regions:
        pred, true = region.mask(prediction), region.mask(truth)

        def one_hot(mask: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            expected = compute_surface_dice(one_hot(pred), one_hot(true), [region.tolerance_mm],
                                            spacing=spacing).item()
        assert 0.05 < expected < 0.99  # a non-trivial comparison
        assert scores[f"{region.name}_surface_dice"] == pytest.approx(expected, abs=1e-6), region.name


def test_summaries_average_per_region_and_mean_dice_is_over_the_hecs():
    truth = _kits23_case()
    swapped = truth.copy()
    swapped[truth == 2], swapped[truth == CYST_LABEL] = CYST_LABEL, 2
    records = [score_case(truth, truth, SPACING, dataset=KITS23), score_case(swapped, truth, SPACING, dataset=KITS23)]
    summary = summarise_scores(records, dataset=KITS23)
    assert summary["tumour_dice"]["mean"] == 0.5 and summary["masses_dice"]["mean"] == 1.0
    assert summary["mean_dice"] == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="kidney_dice and tumour_dice"):
        summarise_scores(records)  # read as KiTS19: no kidney_dice


def test_the_experiment_config_selects_the_dataset_and_checks_channels_and_weights(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from utils.config.experiment import DATASET_LABEL_COUNTS, load_experiment_config
    from utils.data.dataset_definitions import DATASETS

    assert DATASET_LABEL_COUNTS == {name: definition.num_classes for name, definition in DATASETS.items()}

    repo = Path(__file__).resolve().parents[1]
    quick = repo / "configs" / "resunet3d_quick.yaml"
    assert load_experiment_config(quick).dataset == "kits19"
    with pytest.raises(ValueError, match=r"model.out_channels is 3, but dataset kits23 has 4 labels"):
        load_experiment_config(quick, ["dataset=kits23"])
    with pytest.raises(ValueError, match=r"loss.class_weights has 3 entries"):
        load_experiment_config(quick, ["dataset=kits23", "model.out_channels=4"])
    with pytest.raises(ValueError, match="unknown dataset 'kits20'"):
        load_experiment_config(quick, ["dataset=kits20"])
    config = load_experiment_config(quick, ["dataset=kits23", "model.out_channels=4", "loss.class_weights=[1,1,3,2]"])
    assert get_dataset(config.dataset).num_classes == config.model.out_channels == 4
    # Preprocessing takes the KiTS23 config (training on it: tests/test_kits23_training.py); an empty
    # folder then fails for want of cases, not as a usage error.
    path = tmp_path / "kits23.yaml"
    path.write_text(quick.read_text() + "\ndataset: kits23\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    ran = subprocess.run([sys.executable, str(repo / "scripts" / "preprocess.py"), "--config", str(path),
                          "--set", "model.out_channels=4", "--set", "loss.class_weights=[1,1,3,2]",
                          "--set", f"preprocessing.cache_dir={tmp_path / 'cache'}", "--data", str(empty)],
                         capture_output=True, text=True, cwd=repo, timeout=120)
    assert ran.returncode == 1 and "no usable case" in ran.stderr, ran.stderr
