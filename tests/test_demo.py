"""The demo runs end to end as `make demo` runs it, on a tiny synthetic set; so does the cross-validated
demo (configs/demo_cv.yaml), whose folds, out-of-fold reports and comparison cover every case."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from utils.cli.demo_results import (
    read_readme_results,
    read_results_file,
    render_cross_validation_results,
    render_demo_results,
)
from utils.config.demo import DemoConfig
from utils.config.experiment import load_experiment_config
from utils.config.loading import load_config
from utils.evaluation.comparison import MIN_WILCOXON_PAIRS
from utils.metrics.scoring import METRIC_NAMES

REPO = Path(__file__).resolve().parents[1]


def test_demo_script_end_to_end(tmp_path):
    command = [sys.executable, "scripts/demo.py", "--config", "configs/demo.yaml",
               "--set", "synthetic.cases=2", "--set", "synthetic.matrix=64", "--set", "synthetic.workers=1",
               "--set", f"synthetic.out_dir={tmp_path / 'data'}", "--set", f"reports_dir={tmp_path / 'reports'}",
               "--set", f"preprocessing.cache_dir={tmp_path / 'cache'}",
               "--set", "preprocessing.target_spacing=[4,4,4]",
               "--set", "patches.patch_size=[8,16,16]", "--set", "slices.image_size=32",
               "--set", "bootstrap_resamples=200",
               "--set", f"train_overrides=[training.epochs=1, preprocessing.cache_dir={tmp_path / 'cache'}, "
                        f"training.output_dir={tmp_path / 'runs'}, patches.samples_per_epoch=8, "
                        "slices.samples_per_epoch=8]",
               "--set", f"readme={tmp_path / 'README.md'}"]
    (tmp_path / "README.md").write_text((REPO / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "case_00001" in run.stdout and "validation (full): ok: 2" in run.stdout
    assert "split: 1 train, 1 validation cases" in run.stdout
    summary = json.loads((tmp_path / "reports" / "dataset_summary.json").read_text())
    assert summary["validation"] == {"ok": 2, "inference_only": 0, "unusable": 0}
    assert 0.0 < summary["intensity_only_floor"]["kidney_interval_dice"] < 1.0
    cache = summary["cache"]
    assert sorted(cache["written"]) == ["case_00000", "case_00001"] and cache["failed"] == {}
    assert (Path(cache["folder"]) / "plan.json").is_file() and Path(cache["folder"]).is_relative_to(tmp_path)
    low, high = cache["normalisation"]["clip_hu"]
    assert low < cache["normalisation"]["mean_hu"] < high
    assert "training resunet3d:" in run.stdout and "training unetr2d:" in run.stdout
    table = run.stdout[run.stdout.index("validation Dice per case"):].splitlines()
    assert "resunet3d kidney" in table[1] and "unetr2d kidney" in table[1]
    validation_ids = cache["split"]["val"]
    assert table[2].startswith(validation_ids[0]) and table[3].startswith("mean") and len(table[3].split()) == 5
    for model in ("resunet3d", "unetr2d"):
        trained = summary["training"][model]
        assert trained["best_epoch"] == 1 and 0 <= trained["kidney_dice"] <= 1
        assert [case["case_id"] for case in trained["per_case"]] == validation_ids
        assert (Path(trained["run_folder"]) / "best.pt").is_file()
    assert "evaluation in each CT's original grid (validation cases, post-processed predictions" in run.stdout
    assert "comparison report:" in run.stdout
    for model in ("resunet3d", "unetr2d"):
        report = Path(summary["evaluation"][model]["report"])
        assert json.loads((report / "inference.json").read_text())["postprocess"] is True  # configs/demo.yaml says so
        metrics = json.loads((report / "metrics.json").read_text())
        assert [case["case_id"] for case in metrics["cases"]] == validation_ids
        assert (report / "predictions" / f"{validation_ids[0]}.nii.gz").is_file()
    results, table = read_readme_results((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert results["cases"] == 2 and [m["model"] for m in results["models"]] == ["resunet3d", "unetr2d"]
    assert results["models"][0]["kidney_dice"] == summary["evaluation"]["resunet3d"]["summary"]["kidney_dice"]["mean"]
    assert table == render_demo_results(results) and results["seconds"] == round(summary["seconds"], 1)
    assert results["postprocess"] is True and "Predictions post-processed" in table
    assert "case figures:" in run.stdout and len(summary["visuals"]) == 3
    for visual in summary["visuals"]:
        assert Path(visual).is_relative_to(tmp_path / "reports") and Path(visual).stat().st_size > 1000
    assert Path(summary["visuals"][2]).read_bytes()[:3] == b"GIF"
    comparison = Path(summary["comparison"]["markdown"])
    assert comparison.parent == tmp_path / "reports" / "comparison" and "resunet3d" in comparison.read_text()
    for figure in ("synthetic_cases.png", "training_samples.png", "training_progress_resunet3d.png",
                   "training_progress_unetr2d.png", "training_progress_models.png", "comparison/boxplots.png"):
        assert (tmp_path / "reports" / figure).read_bytes()[:4] == b"\x89PNG"


def test_demo_refuses_a_bad_config(tmp_path):
    run = subprocess.run([sys.executable, "scripts/demo.py", "--set", "synthetic.cases=zero"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "synthetic.cases must be of type int" in run.stderr


def test_demo_refuses_to_write_over_or_into_data_it_did_not_generate(tmp_path, capsys, monkeypatch):
    """Checked before anything is generated: the data stay byte for byte as they were."""
    import hashlib
    import importlib.util

    import numpy as np

    from utils.data.kits_layout import build_kits_affine
    from utils.data.nifti_io import save_nifti

    monkeypatch.chdir(REPO)
    data = tmp_path / "kits"
    (data / "case_00000").mkdir(parents=True)
    ct = data / "case_00000" / "imaging.nii.gz"
    save_nifti(np.zeros((4, 8, 8), np.int16), build_kits_affine((2.0, 1.0, 1.0)), ct)
    (data / "kits.json").write_text(json.dumps([{"case_id": "case_00000", "age_at_nephrectomy": 60}]))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*") if p.is_file()}
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--set", f"preprocessing.cache_dir={tmp_path / 'cache'}", "--set", "readme=null",
              "--set", f"train_overrides=[training.output_dir={tmp_path / 'runs'}]"]
    assert script.main(["--set", f"synthetic.out_dir={data}", "--set", f"reports_dir={tmp_path / 'r'}",
                        *common]) == 2
    assert f"synthetic.out_dir {data.resolve()} holds KiTS19 cases the demo did not generate" in capsys.readouterr().err
    synthetic = tmp_path / "synthetic"
    assert script.main(["--set", f"synthetic.out_dir={synthetic}", "--set", f"reports_dir={synthetic / 'reports'}",
                        *common]) == 2
    err = capsys.readouterr().err
    assert f"reports_dir {(synthetic / 'reports').resolve()} is inside the input data folder" in err
    assert not synthetic.exists() and not (tmp_path / "r").exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*") if p.is_file()} == before


CV_CASES, CV_FOLDS = 6, 3


def _tiny_demo_args(tmp_path: Path, cases: int) -> list[str]:
    return ["--set", f"synthetic.cases={cases}", "--set", "synthetic.matrix=64", "--set", "synthetic.workers=1",
            "--set", f"synthetic.out_dir={tmp_path / 'data'}", "--set", f"reports_dir={tmp_path / 'reports'}",
            "--set", f"preprocessing.cache_dir={tmp_path / 'cache'}", "--set", "preprocessing.target_spacing=[4,4,4]",
            "--set", "patches.patch_size=[8,16,16]", "--set", "slices.image_size=32",
            "--set", "bootstrap_resamples=200",
            "--set", f"train_overrides=[training.epochs=1, preprocessing.cache_dir={tmp_path / 'cache'}, "
                     f"training.output_dir={tmp_path / 'runs'}, patches.samples_per_epoch=8, "
                     "slices.samples_per_epoch=8]"]


def test_cross_validated_demo_end_to_end(tmp_path):
    """Three folds of both models on six cases; each model evaluated out-of-fold on every case, compared on all."""
    readme = (REPO / "README.md").read_bytes()
    command = [sys.executable, "scripts/demo.py", "--config", "configs/demo_cv.yaml",
               *_tiny_demo_args(tmp_path, CV_CASES), "--set", f"split.folds={CV_FOLDS}"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    case_ids = [f"case_{i:05d}" for i in range(CV_CASES)]
    summary = json.loads((tmp_path / "reports" / "dataset_summary.json").read_text())
    folds = summary["cache"]["split"]["folds"]
    assert len(folds) == CV_FOLDS and sorted(c for fold in folds for c in fold["val"]) == case_ids
    assert f"split: {CV_FOLDS} folds, each case validated by exactly one fold" in run.stdout
    for model in ("resunet3d", "unetr2d"):
        trained = summary["training"][model]
        experiment = Path(trained["experiment"])
        assert experiment.parent == tmp_path / "runs" and experiment.name.startswith(f"{model}_cv{CV_FOLDS}_")
        manifest = json.loads((experiment / "cross_validation.json").read_text())
        assert [fold["status"] for fold in manifest["folds"]] == ["finished"] * CV_FOLDS
        assert trained["folds_finished"] == CV_FOLDS and all((experiment / f"fold_{k}" / "best.pt").is_file()
                                                              for k in range(CV_FOLDS))
        assert [case["case_id"] for case in trained["per_case"]] == case_ids  # out-of-fold cache-grid Dice
        assert f"cross-validation {model}: {experiment}, {CV_FOLDS} of {CV_FOLDS} folds finished" in run.stdout
        report = Path(summary["evaluation"][model]["report"])
        assert report.parent == tmp_path / "reports" and report.name == experiment.name
        metrics = json.loads((report / "metrics.json").read_text())
        assert [case["case_id"] for case in metrics["cases"]] == case_ids  # every case, each exactly once
        held_out = {c: k for k, fold in enumerate(folds) for c in fold["val"]}
        assert {case["case_id"]: case["fold"] for case in metrics["cases"]} == held_out
        assert all((report / "predictions" / f"{c}.nii.gz").is_file() for c in case_ids)
        assert summary["evaluation"][model]["cases"] == CV_CASES
    comparison = json.loads((tmp_path / "reports" / "comparison" / "comparison.json").read_text())
    assert comparison["shared_cases"] == case_ids and not comparison["only_a"] and not comparison["only_b"]
    computed = 0
    for metric in METRIC_NAMES:
        pairs = [(v["a"][metric], v["b"][metric]) for v in comparison["per_case"].values()]
        differences = [b - a for a, b in pairs if a is not None and b is not None]
        paired = comparison["paired"][metric]
        assert paired["n_pairs"] == len(differences)
        if sum(d != 0 for d in differences) >= MIN_WILCOXON_PAIRS:
            assert paired["p_value"] == pytest.approx(stats.wilcoxon(differences).pvalue)
            computed += 1
        else:  # e.g. no case with a predicted tumour in both models: no HD95 pair at all
            reason = "no complete pairs" if not differences else "fewer than"
            assert paired["p_value"] is None and reason in paired["p_value_reason"]
    assert computed >= 1, "no metric had six non-zero differences: the Wilcoxon test was never computed"
    assert summary["paired_comparison"]["cases"] == CV_CASES
    results, table = read_results_file((tmp_path / "reports" / "results.md").read_text(encoding="utf-8"))
    assert table == render_cross_validation_results(results) and table in run.stdout
    assert results["cases"] == CV_CASES and results["folds"] == CV_FOLDS
    assert [m["model"] for m in results["models"]] == ["resunet3d", "unetr2d"]
    assert results["models"][1]["kidney_dice"] == summary["evaluation"]["unetr2d"]["summary"]["kidney_dice"]["mean"]
    assert [row["p_value"] for row in results["comparison"]["metrics"]] == \
        [comparison["paired"][m]["p_value"] for m in METRIC_NAMES]
    assert len(summary["visuals"]) == 3 and all(Path(v).is_relative_to(tmp_path / "reports")
                                                for v in summary["visuals"])
    for figure in ("synthetic_cases.png", "training_samples.png", "training_progress_resunet3d.png",
                   "training_progress_unetr2d.png", "training_progress_models.png", "comparison/boxplots.png"):
        assert (tmp_path / "reports" / figure).read_bytes()[:4] == b"\x89PNG"
    assert (REPO / "README.md").read_bytes() == readme


def test_the_cross_validated_demo_config_and_its_refusals(tmp_path):
    from utils.cli.demo import check_demo_outputs, train_overrides
    from utils.data.output_guard import OutputGuardError

    holdout = load_config(REPO / "configs" / "demo.yaml", DemoConfig)
    assert not holdout.cross_validation  # every model trains and validates on the demo's own split
    assert train_overrides(holdout) == ("split.scheme=holdout",
                                        f"split.validation_fraction={holdout.split.validation_fraction}",
                                        f"split.seed={holdout.split.seed}", *holdout.train_overrides)
    changed = load_config(REPO / "configs" / "demo.yaml", DemoConfig, ["split.validation_fraction=0.5"])
    experiment = load_experiment_config(REPO / "configs" / "resunet3d_quick.yaml", train_overrides(changed))
    assert experiment.split.validation_fraction == 0.5
    config = load_config(REPO / "configs" / "demo_cv.yaml", DemoConfig)
    assert config.cross_validation and config.readme is None and config.split.folds == 3
    assert config.synthetic.cases >= 2 * MIN_WILCOXON_PAIRS  # enough paired differences for the test
    assert train_overrides(config)[:3] == ("split.scheme=kfold", "split.folds=3", "split.seed=0")
    with pytest.raises(ValueError, match="set readme: null"):
        load_config(REPO / "configs" / "demo_cv.yaml", DemoConfig, ["readme=README.md"])
    with pytest.raises(ValueError, match="must be at least split.folds"):
        load_config(REPO / "configs" / "demo_cv.yaml", DemoConfig, ["synthetic.cases=2"])
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "results.md").write_text("# Notes typed by hand\n")
    tiny = load_config(REPO / "configs" / "demo_cv.yaml", DemoConfig,
                       [arg for arg in _tiny_demo_args(tmp_path, CV_CASES) if arg != "--set"])
    with pytest.raises(OutputGuardError, match="results file .* was not written by this command"):
        check_demo_outputs(tiny)
    assert not (tmp_path / "data").exists()


def test_the_demo_reads_cases_one_at_a_time_and_draws_the_first_few(tmp_path, monkeypatch):
    """The intensity floor covers every generated case; the gallery only the first GALLERY_CASES."""
    from matplotlib.figure import Figure

    from utils.analysis.intensity_separability import measure_separability
    from utils.cli import demo
    from utils.data.case_validation import load_case, select_cases, validate_dataset
    from utils.synthetic.dataset import SyntheticOptions, generate_dataset

    generate_dataset(tmp_path / "data", 3, seed=0, options=SyntheticOptions(matrix=64), show_progress=False)
    report = validate_dataset(tmp_path / "data", full=True, show_progress=False)
    drawn = []
    monkeypatch.setattr(demo, "GALLERY_CASES", 2)
    monkeypatch.setattr(demo, "plot_case_gallery",
                        lambda cases, dataset: drawn.extend(c[0] for c in cases) or Figure())
    pooled, path = demo._look_at_cases(report, demo.KITS19, tmp_path / "reports" / "gallery.png")
    assert drawn == ["case_00000", "case_00001"]
    assert path.is_file() and path.stat().st_size > 0
    every_case = [load_case(files) for files in select_cases(report, on_bad="error")]
    expected, _ = measure_separability((case.image, case.segmentation) for case in every_case)
    assert pooled == expected
