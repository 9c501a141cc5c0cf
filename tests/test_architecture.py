"""The package's data flow runs one way: a module imports only from stages before its own."""

from __future__ import annotations

import ast
from pathlib import Path

UTILS = Path(__file__).resolve().parents[1] / "utils"

#: Stages in data-flow order; a module may import utils modules of earlier stages only.
#: The synthetic generator is a data source: it writes raw NIfTI and knows nothing of loaders.
STAGES: list[set[str]] = [
    {"kits_layout", "config", "parallel", "synthetic_shapes", "stop_signals"},
    {"nifti_io", "synthetic_anatomy", "slice_statistics", "experiment_config"},
    {"case_discovery", "nifti_checks", "synthetic_tissues"},
    {"case_validation", "synthetic_ct", "dataset_statistics"},
    {"synthetic_dataset", "intensity_separability", "dataset_fingerprint", "resampling", "data_splits",
     "statistics_tables"},
    {"preprocessed_cache"},
    {"preprocessing"},
    {"augmentation"},
    {"patch_dataset"},
    {"slice_dataset"},
    {"models", "losses", "optimisation", "segmentation_metrics", "sliding_window", "slice_inference", "checkpoints",
     "run_folder", "experiment_tracking", "search_space",
     "postprocessing", "performance"},
    {"training_setup", "inference", "evaluation_metrics"},
    {"training_engine", "evaluation", "ct_inference"},
    {"hyperparameter_search"},
    {"visualisation"},
    {"statistics_figures", "training_figures", "evaluation_figures", "comparison_figures", "slice_figures",
     "mesh_figures"},
    {"slice_viewer"},
    {"run_evaluation", "slice_animation"},
    {"model_comparison"},
    {"comparison_report", "demo_results"},
    {"demo_pipeline", "data_loading_benchmark", "training_command", "evaluation_command"},
    {"speed_benchmark"},
    {"benchmark_run"},
]


def _utils_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("utils.")}
    return found


def test_every_module_has_a_stage():
    modules = {p.stem for p in UTILS.glob("*.py")} - {"__init__"}
    staged = set().union(*STAGES)
    assert modules - staged == set(), "place new modules in STAGES"
    assert staged - modules == set(), "STAGES names a module that does not exist"


def test_imports_only_from_earlier_stages():
    stage_of = {name: index for index, stage in enumerate(STAGES) for name in stage}
    offences = [f"{path.stem} (stage {stage_of[path.stem]}) imports {name} (stage {stage_of.get(name)})"
                for path in sorted(UTILS.glob("*.py")) if path.stem in stage_of
                for name in _utils_imports(path) if stage_of.get(name, 99) >= stage_of[path.stem]]
    assert offences == []
