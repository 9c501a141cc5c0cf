"""Scoring KiTS23 predictions by hierarchical evaluation region (scripts/evaluate.py --dataset kits23), and
KiTS23 models end to end: inference, post-processing, run evaluation, comparison reports and figures."""

from __future__ import annotations

import csv
import html
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from test_ct_inference import NORMALISATION, TINY_3D
from test_dataset_definitions import _kits23_case

import utils.inference.segment as ct_inference
from utils.cli.evaluate import format_evaluation
from utils.config.experiment import ExperimentConfig
from utils.config.loading import build_config, config_as_dict
from utils.data.dataset_definitions import CYST_LABEL, KITS19, KITS23
from utils.data.kits_layout import build_kits_affine, spacing_from_affine
from utils.data.nifti_io import read_voxels, save_nifti
from utils.evaluation.predictions import dataset_settings, evaluate_predictions, metrics_csv_header, save_metrics
from utils.evaluation.report import write_comparison_report
from utils.evaluation.run import evaluate_run
from utils.figures.comparison import plot_metric_boxplots, plot_paired_scatter
from utils.figures.drawing import CYST_COLOUR, LABEL_COLOURS, label_colours, region_colours
from utils.figures.evaluation import plot_case_scores
from utils.figures.meshes import plot_meshes
from utils.figures.slice_viewer import OVERLAY_ALPHA, compose_slice_rgb
from utils.figures.slices import ERROR_COLOURS, FILL_ALPHA, error_map_structures, plot_error_map, plot_overlay
from utils.inference.postprocessing import mass_labels, postprocess_labels, remove_detached_tumour
from utils.inference.segment import load_segmentation_model, segment_ct, segment_file
from utils.metrics.scoring import dice_names, metric_names, score_case
from utils.networks.checkpoints import save_checkpoint
from utils.networks.models import build_model, model_input_size
from utils.preprocessing.preprocess import preprocess_volume
from utils.synthetic.dataset import SyntheticOptions, generate_dataset

REPO = Path(__file__).resolve().parents[1]
SPACING = (3.0, 0.8, 0.8)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Ground truth for three KiTS23 cases; predictions: one perfect, one with cyst and tumour swapped, one missing."""
    gt, pred = tmp_path / "dataset", tmp_path / "predictions"
    pred.mkdir()
    affine = build_kits_affine(SPACING)
    truth = _kits23_case()
    for case_id in ("case_00400", "case_00401", "case_00402"):
        (gt / case_id).mkdir(parents=True)
        save_nifti(np.where(truth > 0, 150, -1000).astype(np.int16), affine, gt / case_id / "imaging.nii.gz")
        save_nifti(truth, affine, gt / case_id / "segmentation.nii.gz")
    (gt / "kits23.json").write_text(json.dumps([{"case_id": f"case_0040{i}"} for i in range(3)]))
    swapped = truth.copy()
    swapped[truth == 2], swapped[truth == CYST_LABEL] = CYST_LABEL, 2
    save_nifti(truth, affine, pred / "case_00400.nii.gz")
    save_nifti(swapped, affine, pred / "case_00401.nii.gz")
    return gt, pred


def test_kits23_predictions_are_scored_by_hec_with_missing_ones_as_failures(folders, tmp_path):
    gt, pred = folders
    result = evaluate_predictions(gt, pred, tmp_path / "report", dataset="kits23")
    perfect, swapped, missing = result.cases
    assert all(perfect[f"{r}_dice"] == 1.0 for r in KITS23.region_names)
    assert swapped["kidney_and_masses_dice"] == 1.0 and swapped["masses_dice"] == 1.0
    assert swapped["tumour_dice"] == 0.0 and swapped["tumour_surface_dice"] == 0.0
    assert missing == {"case_id": "case_00402", **{name: None if name.endswith("hd95") else 0.0
                                                   for name in metric_names(KITS23)}}
    assert result.summary["tumour_dice"]["mean"] == pytest.approx(1 / 3)
    assert result.summary["mean_dice"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    report = json.loads(result.json_path.read_text())
    assert report["settings"]["dataset"] == "kits23"
    assert report["settings"]["regions"]["masses"] == {"labels": [2, 3], "tolerance_mm": KITS23.region("masses")
                                                       .tolerance_mm}
    with open(result.csv_path) as handle:
        rows = list(csv.reader(handle))
    assert ",".join(rows[0]) == metrics_csv_header(KITS23) and len(rows) == 4


def test_evaluate_script_takes_the_dataset_and_refuses_a_kits23_folder_read_as_kits19(folders, tmp_path):
    gt, pred = folders
    command = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--gt", str(gt), "--pred", str(pred)]
    refused = subprocess.run([*command, "--out", str(tmp_path / "a")], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
    assert refused.returncode == 2 and "'dataset: kits23'" in refused.stderr and "Traceback" not in refused.stderr
    scored = subprocess.run([*command, "--out", str(tmp_path / "b"), "--dataset", "kits23"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert scored.returncode == 0, scored.stderr
    assert "kidney_and_masses_dice" in scored.stdout and "masses_surface_dice" in scored.stdout
    assert "2 predictions scored, 1 cases without a prediction (scored as failures)" in scored.stdout


def test_a_kits23_prediction_against_kits19_truth_is_refused_naming_the_label(tmp_path):
    gt, pred = tmp_path / "data", tmp_path / "predictions"
    (gt / "case_00000").mkdir(parents=True)
    pred.mkdir()
    affine = build_kits_affine(SPACING)
    truth = np.minimum(_kits23_case(), 2)
    save_nifti(truth, affine, gt / "case_00000" / "segmentation.nii.gz")
    save_nifti(_kits23_case(), affine, pred / "case_00000.nii.gz")
    result = evaluate_predictions(gt, pred, tmp_path / "report")
    assert result.refused and "labels outside {0, 1, 2}" in result.refused[0]["reason"]


# --- KiTS23 models: inference, post-processing, run evaluation, comparison and figures -------------

KITS23_3D = {**TINY_3D, "dataset": "kits23", "model": {**TINY_3D["model"], "out_channels": 4},
             "loss": {"class_weights": [0.0, 1.0, 3.0, 2.0]}}
SMALL_23 = SyntheticOptions(matrix=64, spacing=(5.0, 6.0, 6.0), coverage_mm=(240.0, 300.0), dataset="kits23")


def _write_kits23_checkpoint(folder: Path, label: int) -> Path:
    """A KiTS23 checkpoint as the training engine writes it: an untrained 4-channel tiny 3D model whose
    last layer is set so that ``label`` wins the argmax everywhere."""
    config = build_config(ExperimentConfig, KITS23_3D)
    torch.manual_seed(0)
    model = build_model(config.model, model_input_size(config))
    last = model.model[2][1].conv.unit0.conv  # the network's last convolution, one output per label
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([100.0 if channel == label else 0.0 for channel in range(4)]))
    folder.mkdir(parents=True, exist_ok=True)
    plan = {"preprocessing": config_as_dict(config.preprocessing), "normalisation": dict(NORMALISATION)}
    return save_checkpoint(folder / "best.pt", {"model": model.state_dict(), "config": config_as_dict(config),
                                                "preprocessing_plan": plan})


@pytest.fixture(scope="module")
def kits23_data(tmp_path_factory) -> Path:
    """Two tiny synthetic KiTS23 cases (kits23.json layout), both with tumour and cyst."""
    folder = tmp_path_factory.mktemp("kits23") / "dataset"
    generate_dataset(folder, 2, seed=249, options=SMALL_23, show_progress=False)  # both with a cyst
    return folder


@pytest.fixture(scope="module")
def tumour_run(tmp_path_factory) -> Path:
    """A KiTS23 run folder whose model predicts tumour (label 2) everywhere it looks."""
    return _write_kits23_checkpoint(tmp_path_factory.mktemp("runs") / "tiny23", label=2).parent


def test_a_kits23_checkpoint_segments_a_raw_ct_in_its_own_labels(kits23_data, tmp_path):
    segmenter = load_segmentation_model(_write_kits23_checkpoint(tmp_path / "cyst_run", label=CYST_LABEL).parent)
    assert segmenter.dataset is KITS23 and segmenter.config.model.out_channels == KITS23.num_classes
    ct = kits23_data / "case_00000" / "imaging.nii.gz"
    written = nib.load(segment_file(ct, tmp_path / "out" / "case_00000.nii.gz", segmenter))
    source = nib.load(ct)
    labels = np.asarray(written.dataobj)
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert set(np.unique(labels)) <= {0, CYST_LABEL} and (labels == CYST_LABEL).any()  # channel 3 is the cyst
    # post-processing learns the model's dataset: a cyst touching no kidney is a detached mass, removed
    # (read as KiTS19, label 3 would be refused as no label at all)
    cleaned = segment_ct(read_voxels(source), source.affine, segmenter, postprocess=True, min_component_ml=0.0)
    assert cleaned.shape == source.shape and not cleaned.any()


def test_labels_0_to_3_come_back_on_the_ct_grid(kits23_data, tumour_run, monkeypatch):
    image = nib.load(kits23_data / "case_00000" / "imaging.nii.gz")
    truth = np.asarray(nib.load(kits23_data / "case_00000" / "segmentation.nii.gz").dataobj).astype(np.uint8)
    assert set(np.unique(truth)) == {0, 1, 2, CYST_LABEL}
    segmenter = load_segmentation_model(tumour_run)
    image_hu = read_voxels(image)
    _, cache_labels, _ = preprocess_volume(image_hu.copy(), truth, image.affine, segmenter.preprocessing,
                                           segmenter.normalisation)

    def perfect(model, volume, config, **kwargs):  # the 4-channel logits of the truth on the cache grid
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(cache_labels).long(), KITS23.num_classes)
        return one_hot.permute(3, 0, 1, 2)[None].float() * 10

    monkeypatch.setattr(ct_inference, "predict_volume_logits", perfect)
    prediction = segment_ct(image_hu, image.affine, segmenter)
    assert prediction.shape == truth.shape and prediction.dtype == np.uint8
    assert set(np.unique(prediction)) == {0, 1, 2, CYST_LABEL}
    scores = score_case(prediction, truth, spacing_from_affine(image.affine), dataset=KITS23)
    assert scores["kidney_and_masses_dice"] >= 0.9 and scores["masses_dice"] >= 0.8, scores


def _kidney_with_cysts() -> np.ndarray:
    """A 27-voxel kidney block with a cyst touching it, a cyst and a tumour apart, and a tumour touching the cyst."""
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[0:3, 0:3, 0:3] = 1
    labels[3, 0:2, 0:2] = CYST_LABEL          # touches the kidney's face: kept
    labels[4, 0, 0] = 2                        # touches only that cyst: one mass with it, kept
    labels[8:10, 8:10, 8:10] = CYST_LABEL      # touches nothing: dropped
    labels[8, 0, 11] = 2                       # touches nothing: dropped
    return labels


def test_post_processing_treats_the_cyst_as_a_mass(tmp_path):
    labels = _kidney_with_cysts()
    cleaned = remove_detached_tumour(labels, KITS23)
    expected = labels.copy()
    expected[8:10, 8:10, 8:10] = 0
    expected[8, 0, 11] = 0
    np.testing.assert_array_equal(cleaned, expected)
    np.testing.assert_array_equal(labels, _kidney_with_cysts())  # input untouched
    assert mass_labels(KITS23) == (2, CYST_LABEL) and mass_labels(KITS19) == (2,)
    # the cyst is kidney foreground: kidney 27 + cyst 4 + tumour 1 voxels outrank a 30-voxel kidney elsewhere
    rival = labels.copy()
    rival[8:10, 8:10, 8:10] = 0
    rival[6:11, 6:9, 9:11] = 1
    kept = postprocess_labels(rival, (1.0, 1.0, 1.0), min_component_ml=0.0, max_components=1, dataset="kits23")
    np.testing.assert_array_equal(kept[0:5], expected[0:5])
    assert kept[5:].sum() == 0
    with pytest.raises(ValueError, match=r"KiTS19 labels 0 \(background\), 1 \(kidney\), 2 \(tumour\)"):
        remove_detached_tumour(labels)  # KiTS19 (the default) has no label 3


def test_evaluate_run_scores_a_kits23_run_by_region(kits23_data, tumour_run, tmp_path):
    result = evaluate_run(tumour_run, data_dir=kits23_data, cases="all", out_dir=tmp_path / "report",
                          show_progress=False)
    assert result.dataset is KITS23
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["settings"]["dataset"] == "kits23" and metrics["refused"] == []
    assert [case["case_id"] for case in metrics["cases"]] == ["case_00000", "case_00001"]
    for case in metrics["cases"]:
        assert set(metric_names(KITS23)) <= set(case) and "kidney_dice" not in case
        assert case["masses_dice"] > 0  # tumour predicted everywhere overlaps tumour and cyst
    assert (tmp_path / "report" / "metrics.csv").read_text().splitlines()[0] == metrics_csv_header(KITS23)
    assert json.loads((tmp_path / "report" / "inference.json").read_text())["dataset"] == "kits23"
    for name in ("case_scores.png", "figures/case_00000_overlay.png", "figures/case_00001_errors.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
    printed = format_evaluation(result)
    assert printed.count(KITS23.region_rule) == 1 and "1.033 mm" in printed
    assert "kidney and masses surface Dice" in printed and "masses HD95 (mm)" in printed
    kits19_layout = tmp_path / "kits19_data"
    kits19_layout.mkdir()
    (kits19_layout / "kits.json").write_text("[]")
    with pytest.raises(ValueError, match=r"holds kits\.json, the KiTS19 layout, but tiny23 is a KiTS23 model"):
        evaluate_run(tumour_run, data_dir=kits19_layout, cases="all", out_dir=tmp_path / "r2", show_progress=False)


def _hand_made_report(folder: Path, cases: list[dict], dataset) -> Path:
    """A report folder as an evaluation writes it: metrics.json (with the dataset's settings) and inference.json."""
    settings = {"tolerance_mm": 2.0, "hd_percentile": 95, **dataset_settings(dataset, 2.0)}
    save_metrics(folder, cases, {}, settings, dataset=dataset)
    (folder / "inference.json").write_text(json.dumps({
        "run_name": folder.name, "model": "resunet3d", "parameters": 10, "device": "cpu", "checkpoint": "best.pt",
        "cases": [{"case_id": c["case_id"], "seconds": 1.0} for c in cases]}))
    return folder


def _scores(dataset, case_id: str, value: float) -> dict:
    return {"case_id": case_id, **{name: value * 10 if name.endswith("hd95") else value
                                   for name in metric_names(dataset)}}


def test_two_kits23_reports_compare_by_region_and_a_kits19_one_is_refused(tmp_path):
    ids = [f"case_0040{i}" for i in range(7)]
    a = _hand_made_report(tmp_path / "a", [_scores(KITS23, c, 0.5 + 0.05 * i) for i, c in enumerate(ids)], KITS23)
    b = _hand_made_report(tmp_path / "b", [_scores(KITS23, c, 0.6 + 0.04 * i) for i, c in enumerate(ids)], KITS23)
    paths = write_comparison_report(a, b, tmp_path / "comparison", n_resamples=200)
    comparison = json.loads(paths["json"].read_text())
    assert comparison["dataset"] == "kits23" and list(comparison["paired"]) == list(metric_names(KITS23))
    assert comparison["warnings"] == []
    for text in (paths["markdown"].read_text(), paths["html"].read_text()):
        assert "| kidney and masses Dice |" in text or "<td>kidney and masses Dice</td>" in text
        assert "masses surface Dice" in text and "tumour HD95 (mm)" in text and "kidney_and_masses_dice" not in text
        assert text.count(html.escape(KITS23.region_rule)) == 1 and text.count("1.133 mm") == 1
        assert "Tests of nine metrics" in text
    old = _hand_made_report(tmp_path / "kits19", [_scores(KITS19, c, 0.7) for c in ids], KITS19)
    with pytest.raises(ValueError) as refused:
        write_comparison_report(old, b, tmp_path / "mixed", n_resamples=200)
    message = str(refused.value)
    assert str(old) in message and str(b) in message and "KiTS19" in message and "KiTS23" in message
    assert "different datasets" in message


def test_kits23_figures_draw_the_cyst_in_its_own_colour():
    image = np.full((12, 20, 30), 40.0, np.float32)  # mid-window: grey 0.5
    truth = _kits23_case()  # tumour at x 6..9, cyst at x 18..21, rows 6..9, slices 4..7
    figure = plot_overlay(image, truth, truth, spacing=SPACING, dataset="kits23")
    FigureCanvasAgg(figure).draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(float) / 255
    truth_ax = figure.axes[0]
    x, y = truth_ax.transData.transform((19, 7))  # column 19, row 7: inside the cyst
    blend = (1 - FILL_ALPHA) * 0.5 + FILL_ALPHA * np.array(to_rgb(CYST_COLOUR))
    np.testing.assert_allclose(rgba[int(round(rgba.shape[0] - y)), int(round(x))], blend, atol=2 / 255)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [
        "kidney (label 1)", "tumour (label 2)", "cyst (label 3)"]
    assert to_rgb(CYST_COLOUR) not in {to_rgb(c) for c in (*LABEL_COLOURS.values(), *ERROR_COLOURS.values())}
    assert label_colours(KITS23) == {**LABEL_COLOURS, CYST_LABEL: CYST_COLOUR}
    assert label_colours(KITS19) == LABEL_COLOURS and list(error_map_structures(KITS19)) == ["kidney", "tumour"]
    errors = plot_error_map(image, truth, np.where(truth == CYST_LABEL, 2, truth), SPACING, dataset=KITS23)
    assert [ax.get_title().split(",")[0] for ax in errors.axes] == ["kidney and masses", "masses", "tumour", "cyst"]
    frame = compose_slice_rgb(image[5], truth[5])
    np.testing.assert_array_equal(frame[7, 19], np.rint(255 * ((1 - OVERLAY_ALPHA) * 0.5 + OVERLAY_ALPHA
                                                               * np.array(to_rgb(CYST_COLOUR)))))
    meshes = plot_meshes(truth, truth, SPACING, layout="toggle", dataset=KITS23, max_faces=2000)
    assert [trace.color for trace in meshes.data] == [LABEL_COLOURS[1], LABEL_COLOURS[2], CYST_COLOUR] * 2
    assert len(meshes.layout.updatemenus[0].buttons[0].args[0]["visible"]) == 6


def test_case_score_and_comparison_figures_use_the_kits23_regions():
    cases = [_scores(KITS23, "case_00400", 0.8), {**_scores(KITS23, "case_00401", 0.0), "masses_hd95": None}]
    figure = plot_case_scores(cases, title="run")
    dice_ax = figure.axes[0]
    assert [t.get_text() for t in dice_ax.get_legend().get_texts()] == [
        "kidney and masses (labels 1, 2, 3)", "masses (labels 2, 3)", "tumour (label 2)"]
    assert len(dice_ax.patches) == 3 * len(cases)
    assert {to_rgb(p.get_facecolor()) for p in dice_ax.patches} == {to_rgb(c) for c in region_colours(KITS23).values()}
    boxes = plot_metric_boxplots(cases, cases, ["a", "b"])
    assert len([ax for ax in boxes.axes if ax.get_visible()]) == len(metric_names(KITS23))
    scatter = plot_paired_scatter(cases, cases, ["a", "b"])
    assert [ax.get_title().split(":")[0] for ax in scatter.axes] == list(dice_names(KITS23))
