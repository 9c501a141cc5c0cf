"""Two-stage segmentation: a locator finds the kidneys, a second model segments the boxes around them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ct_inference import NORMALISATION, TINY_3D, write_tiny_checkpoint
from test_training_engine import tiny_config

import utils.inference.segment as ct_inference
from utils.config.experiment import CascadeConfig
from utils.datasets.patches import VolumeDataset, labelled_region
from utils.inference.cascade import (
    LOCATOR_NAME,
    box_affine,
    check_locator_state,
    copy_locator,
    located_boxes,
    near_located,
)
from utils.inference.segment import load_segmentation_model, segment_ct
from utils.metrics.scoring import score_case
from utils.training.engine import train
from utils.training.setup import build_training_datasets


def test_boxes_are_grown_by_the_margin_and_merged_when_they_overlap():
    labels = np.zeros((40, 50, 60), np.uint8)
    labels[10:14, 5:9, 5:9] = 1
    labels[12, 6, 6] = 2
    labels[20:24, 30:34, 40:44] = 1
    boxes = located_boxes(labels, (2.0, 1.0, 1.0), margin_mm=4.0)
    assert boxes == [(slice(8, 16), slice(1, 13), slice(1, 13)), (slice(18, 26), slice(26, 38), slice(36, 48))]
    # a wider margin makes them overlap: one box holding both
    assert located_boxes(labels, (2.0, 1.0, 1.0), margin_mm=16.0) == [(slice(2, 32), slice(0, 50), slice(0, 60))]
    # grown to a minimum size about the centre, clipped to the volume, shifted inside when at an edge
    (box,) = located_boxes(labels[:, :, :20], (2.0, 1.0, 1.0), margin_mm=0.0, min_size_mm=(16.0, 20.0, 30.0))
    assert [s.stop - s.start for s in box] == [8, 20, 20] and box[1] == slice(0, 20)
    assert located_boxes(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), 5.0) == []
    with pytest.raises(ValueError, match="spacing_mm"):
        located_boxes(labels, (0.0, 1.0, 1.0), 5.0)


def test_only_labels_near_the_located_kidneys_count():
    located = np.zeros((10, 40, 40), np.uint8)
    located[4:6, 10:12, 10:12] = 1
    near = near_located(located, (4.0, 1.0, 1.0), margin_mm=5.0)
    assert near[4:6, 10:12, 10:12].all()
    assert near[5, 10, 16] and not near[5, 10, 17]  # 5 mm in-plane, then 6 mm
    assert near[6, 10, 10] and not near[7, 10, 10]  # one 4 mm slice, then 8 mm
    assert not near_located(np.zeros_like(located), (1, 1, 1), 5.0).any()


def test_a_box_affine_puts_the_sub_volume_where_it_was():
    affine = np.array([[0.0, 0.0, -0.8, 100.0], [0.0, -0.8, 0.0, 50.0], [3.0, 0.0, 0.0, -20.0], [0, 0, 0, 1]])
    box = (slice(5, 9), slice(10, 30), slice(7, 8))
    corner = affine @ np.array([5, 10, 7, 1.0])
    np.testing.assert_allclose(box_affine(affine, box) @ np.array([0, 0, 0, 1.0]), corner)
    np.testing.assert_allclose(box_affine(affine, box)[:3, :3], affine[:3, :3])


def test_validation_volumes_are_cut_to_the_labelled_region_plus_margin(make_cached_case, tmp_path):
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[4:6, 5:7, 6:9] = 1
    assert labelled_region(labels, (1, 2, 3)) == (slice(3, 7), slice(3, 9), slice(3, 12))
    assert labelled_region(np.zeros_like(labels), (1, 1, 1)) == (slice(None),) * 3
    case = make_cached_case(tmp_path, "case_00000", labels)
    item = VolumeDataset([case], roi_margin=(1, 2, 3))[0]
    assert tuple(item["image"].shape) == (1, 4, 6, 9) and int(item["label"].sum()) == int(labels.sum())
    whole = VolumeDataset([case])[0]
    assert tuple(whole["image"].shape) == (1, 10, 12, 14)


def _hu_of_normalised(z: torch.Tensor) -> torch.Tensor:
    return z * NORMALISATION["std_hu"] + NORMALISATION["mean_hu"]


@pytest.mark.parametrize("combine", ["mean", "second"])
def test_the_second_stage_sees_only_the_located_kidneys(tmp_path, monkeypatch, combine):
    """A CT whose HU encode its labels; a distractor that the second model alone would call tumour."""
    labels = np.zeros((48, 64, 64), np.uint8)
    labels[10:22, 8:24, 8:22] = 1
    labels[14:18, 12:18, 12:16] = 2
    labels[10:22, 8:24, 44:58] = 1
    image_hu = np.where(labels == 1, 150.0, np.where(labels == 2, 280.0, 0.0)).astype(np.float32)
    image_hu[36:44, 48:60, 28:40] = 280.0  # far from both kidneys: tumour-like, no label
    affine = np.diag([4.0, 4.0, 4.0, 1.0])

    locator_run = tmp_path / "locator"
    write_tiny_checkpoint(locator_run, TINY_3D, name="last.pt")
    second_run = tmp_path / "second"
    sections = {**TINY_3D, "cascade": {"locator": str(locator_run), "margin_mm": 8.0, "combine": combine}}
    write_tiny_checkpoint(second_run, sections, name="last.pt", seed=1)
    with pytest.raises(FileNotFoundError, match="locator"):
        load_segmentation_model(second_run)
    shutil.copyfile(locator_run / "last.pt", second_run / LOCATOR_NAME)
    segmenter = load_segmentation_model(second_run)
    assert segmenter.locator is not None and segmenter.locator.locator is None
    assert segmenter.locator.checkpoint == second_run / LOCATOR_NAME

    seen = {"locator": [], "second": []}

    def by_intensity(model, image, config, **kwargs):
        hu = _hu_of_normalised(image[0, 0])
        is_locator = model is segmenter.locator.model
        seen["locator" if is_locator else "second"].append(tuple(hu.shape))
        classes = (hu > 75).long() + (hu > 215).long()
        if is_locator:  # the locator calls tumour only next to kidney: the distractor stays background
            kidney = ((hu > 75) & (hu <= 215)).float()[None, None]
            near = torch.nn.functional.max_pool3d(kidney, 7, 1, 3)[0, 0] > 0
            classes[(hu > 215) & ~near] = 0
        return torch.nn.functional.one_hot(classes, 3).permute(3, 0, 1, 2)[None].float() * 10

    monkeypatch.setattr(ct_inference, "predict_volume_logits", by_intensity)
    prediction = segment_ct(image_hu, affine, segmenter)
    # one box per kidney; with the mean, the locator segments each box too
    assert len(seen["second"]) == 2 and len(seen["locator"]) == (3 if combine == "mean" else 1)
    if combine == "mean":  # both on the same boxes (the tiny models share one grid)
        assert seen["locator"][1:] == seen["second"]
    whole = seen["locator"][0]
    assert all(np.prod(shape) < np.prod(whole) / 2 for shape in seen["second"])
    assert not prediction[36:44, 48:60, 28:40].any()  # outside every box: background
    scores = score_case(prediction, labels)
    assert scores["kidney_dice"] > 0.95 and scores["tumour_dice"] > 0.9, scores
    # the same model without its locator calls the distractor tumour
    alone = segment_ct(image_hu, affine, ct_inference.SegmentationModel(
        segmenter.model, segmenter.config, segmenter.preprocessing, segmenter.normalisation, "alone",
        segmenter.checkpoint, segmenter.device))
    assert (alone[36:44, 48:60, 28:40] == 2).mean() > 0.5


@pytest.mark.parametrize("restore", ["probabilities", "labels"])
def test_the_mean_of_both_stages_follows_the_more_confident_model(tmp_path, monkeypatch, restore):
    """In a kidney with a tumour-bright region, the locator is sure it is kidney and the second model
    leans to tumour: the mean says kidney. In a tumour-brighter region the locator is unsure and the
    second model sure of tumour: the mean says tumour. The second model alone says tumour in both."""
    labels = np.zeros((40, 48, 48), np.uint8)
    labels[8:32, 10:38, 10:38] = 1
    image_hu = np.where(labels == 1, 150.0, 0.0).astype(np.float32)
    image_hu[12:20, 16:26, 16:26] = 250.0  # the locator: kidney, sure; the second model: tumour, leaning
    image_hu[22:30, 24:34, 24:34] = 290.0  # the locator: unsure; the second model: tumour, sure
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    scores = {}
    for combine in ("mean", "second"):
        locator_run, second_run = tmp_path / combine / "locator", tmp_path / combine / "second"
        write_tiny_checkpoint(locator_run, TINY_3D, name="last.pt")
        write_tiny_checkpoint(second_run, {**TINY_3D, "cascade": {"locator": str(locator_run), "combine": combine}},
                              name="last.pt", seed=1)
        shutil.copyfile(locator_run / "last.pt", second_run / LOCATOR_NAME)
        segmenter = load_segmentation_model(second_run)

        def by_intensity(model, image, config, segmenter=segmenter, **kwargs):
            hu = _hu_of_normalised(image[0, 0])
            logits = torch.zeros((1, 3, *hu.shape))
            if model is segmenter.locator.model:
                logits[0, 0] = 10.0 * (hu <= 75)
                logits[0, 1] = 10.0 * ((hu > 75) & (hu <= 270))  # above 270 HU: no opinion
            else:
                logits[0, 0] = 10.0 * (hu <= 75)
                logits[0, 1] = 10.0 * ((hu > 75) & (hu <= 200))
                logits[0, 2] = torch.where(hu > 270, 10.0, 1.0) * (hu > 200)  # tumour: leaning, or sure
            return logits

        monkeypatch.setattr(ct_inference, "predict_volume_logits", by_intensity)
        prediction = segment_ct(image_hu, affine, segmenter, restore=restore, postprocess=True)
        scores[combine] = (prediction[13:19, 17:25, 17:25], prediction[23:29, 25:33, 25:33], prediction)
    leaning, sure, whole = scores["mean"]
    assert (leaning == 1).all() and (sure == 2).all()
    assert ((whole > 0) == (labels > 0)).mean() > 0.99
    leaning, sure, _ = scores["second"]
    assert (leaning == 2).all() and (sure == 2).all()


def test_nothing_located_gives_an_empty_segmentation(tmp_path, monkeypatch, caplog):
    write_tiny_checkpoint(tmp_path / "locator", TINY_3D, name="last.pt")
    run = tmp_path / "second"
    write_tiny_checkpoint(run, {**TINY_3D, "cascade": {"locator": str(tmp_path / "locator")}}, name="last.pt")
    shutil.copyfile(tmp_path / "locator" / "last.pt", run / LOCATOR_NAME)
    segmenter = load_segmentation_model(run)

    def background(model, image, config, **kwargs):
        logits = torch.zeros((1, 3, *image.shape[2:]))
        logits[:, 0] = 10
        return logits

    monkeypatch.setattr(ct_inference, "predict_volume_logits", background)
    prediction = segment_ct(np.zeros((20, 30, 30), np.float32), np.diag([4.0, 4.0, 4.0, 1.0]), segmenter)
    assert prediction.shape == (20, 30, 30) and not prediction.any()
    assert "found no kidney" in caplog.text


def test_a_second_stage_validates_on_the_labelled_regions_and_refuses_a_bad_locator(tiny_cache, tmp_path):
    """(Training with a locator, its copy and a two-stage evaluation: tests/test_benchmark_quality.py.)"""
    config = tiny_config(tmp_path, cascade={"locator": str(tmp_path / "nowhere"), "margin_mm": 8.0})
    _, validation = build_training_datasets(config, tiny_cache)
    assert validation.roi_margin == (2, 2, 2)  # 8 mm on the 4 mm cache grid
    _, whole = build_training_datasets(tiny_config(tmp_path), tiny_cache)
    assert whole.roi_margin is None
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(replace(config, training=replace(config.training, run_name="refused")),
              data_dir=Path(tiny_cache.plan["source_data"]), show_progress=False)
    assert not (tmp_path / "runs" / "refused").exists()  # refused before a run folder was made


def test_a_locator_must_be_a_single_stage_model_of_the_same_dataset(tmp_path):
    state = {"model": {}, "config": {"dataset": "kits19"}}
    check_locator_state(state, tmp_path / "a.pt", "kits19")
    with pytest.raises(ValueError, match="kits23"):
        check_locator_state(state, tmp_path / "a.pt", "kits23")
    with pytest.raises(ValueError, match="itself a second stage"):
        check_locator_state({"model": {}, "config": {"cascade": {"locator": "x"}}}, tmp_path / "a.pt", "kits19")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        check_locator_state({"config": {}}, tmp_path / "a.pt", "kits19")
    source = write_tiny_checkpoint(tmp_path / "locator", TINY_3D, name="last.pt")
    run = tmp_path / "run"
    run.mkdir()
    copied = copy_locator(run, source, "kits19")
    assert copied == run / LOCATOR_NAME and copied.read_bytes() == source.read_bytes()
    assert [p.name for p in run.iterdir()] == [LOCATOR_NAME]  # no temporary file left behind
    with pytest.raises(ValueError, match="kits23"):
        copy_locator(tmp_path / "other", source, "kits23")


def test_the_quality_benchmark_names_a_second_stage_s_locator_and_its_epochs(tmp_path):
    from utils.benchmarks.quality import describe_locator
    from utils.config.experiment import ExperimentConfig
    from utils.config.loading import build_config

    assert describe_locator(build_config(ExperimentConfig, {})) is None
    run = tmp_path / "locator"
    run.mkdir()
    (run / "training_progress.json").write_text(json.dumps([{"epoch": 1, "epoch_seconds": 30.0},
                                                            {"epoch": 2, "epoch_seconds": 90.0}]))
    for named in (run, run / "last.pt"):
        config = build_config(ExperimentConfig, {"cascade": {"locator": str(named)}})
        assert describe_locator(config) == {"run_folder": str(run), "epochs": 2, "epoch_minutes": 2.0}


@pytest.mark.parametrize("rank_components", ["kidney", "foreground"])
def test_a_large_tumour_like_organ_pushes_out_a_kidney_only_when_ranked_by_volume(tmp_path, monkeypatch,
                                                                                   rank_components):
    """Two kidneys and, apart from both, a larger organ both models call tumour: ranked by kidney voxels
    (the default) the post-processing keeps both kidneys; ranked by whole volume the organ is kept in
    place of the smaller kidney, whose box is then never segmented."""
    labels = np.zeros((48, 64, 64), np.uint8)
    labels[4:16, 4:20, 4:18] = 1  # 2688 voxels of 64 mm^3: 172 ml
    labels[4:12, 4:14, 46:56] = 1  # 800 voxels: 51 ml
    image_hu = np.where(labels == 1, 150.0, 0.0).astype(np.float32)
    image_hu[28:42, 40:56, 24:40] = 280.0  # 3584 voxels, tumour-bright, unlabelled
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    locator_run, second_run = tmp_path / "locator", tmp_path / "second"
    write_tiny_checkpoint(locator_run, TINY_3D, name="last.pt")
    cascade = {"locator": str(locator_run), "rank_components": rank_components}
    write_tiny_checkpoint(second_run, {**TINY_3D, "cascade": cascade}, name="last.pt", seed=1)
    shutil.copyfile(locator_run / "last.pt", second_run / LOCATOR_NAME)
    segmenter = load_segmentation_model(second_run)
    assert segmenter.config.cascade.rank_components == rank_components

    def by_intensity(model, image, config, **kwargs):
        hu = _hu_of_normalised(image[0, 0])
        classes = (hu > 75).long() + (hu > 215).long()
        return torch.nn.functional.one_hot(classes, 3).permute(3, 0, 1, 2)[None].float() * 10

    monkeypatch.setattr(ct_inference, "predict_volume_logits", by_intensity)
    prediction = segment_ct(image_hu, affine, segmenter, postprocess=True)
    assert not prediction[28:42, 40:56, 24:40].any()  # a mass touching no kidney: dropped either way
    assert (prediction[4:16, 4:20, 4:18] == 1).all()
    assert (prediction[4:12, 4:14, 46:56] == 1).all() == (rank_components == "kidney")
    assert score_case(prediction, labels)["kidney_dice"] > (0.99 if rank_components == "kidney" else 0.0)


def test_an_unknown_component_ranking_is_refused():
    assert CascadeConfig().rank_components == "kidney"
    with pytest.raises(ValueError, match="rank_components must be one of foreground, kidney, got 'tumour'"):
        CascadeConfig(rank_components="tumour")
