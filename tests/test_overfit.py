"""Overfit check: each quick model, trained and validated on one case, must segment its tumour.

A model that cannot fit the one case it is shown points at a defect in the data path, the loss
or the metric, not at the recipe. The case is a procedural synthetic CT with a 32 ml tumour;
it is written twice (``case_00000`` and ``case_00001``, identical files), so the run trains on
one copy and validates, through the engine's own validation, on the other.

Slow (about 5 minutes for the 3D model and 15 for the UNETR at 128 px on two cores): marked
``slow`` and left out of ``make test``; run it with ``make test-slow``.
"""

from __future__ import annotations

import shutil

import pytest

from utils.config.experiment import load_experiment_config
from utils.data.nifti_io import save_nifti
from utils.synthetic.dataset import SyntheticOptions, generate_case
from utils.training.engine import train

pytestmark = pytest.mark.slow

#: Procedural case index (seed 0, matrix 160) with a 32 ml tumour: ``configs/demo.yaml``'s case_00006.
CASE_INDEX = 6
#: Epochs per model.
EPOCHS = {"resunet3d": 60, "unetr2d": 60}
CONFIGS = {"resunet3d": "configs/resunet3d_quick.yaml", "unetr2d": "configs/unetr2d_quick.yaml"}
#: The UNETR sees its slices at the cache's own size (the case is about 120 px wide on the 3 mm
#: grid): at the quick config's 64 px the down- and up-sampling alone holds this case's tumour Dice
#: near 0.89 (measured: 0.89 from epoch 40 to 60 while the kidney reached 0.96), which would hide
#: what this check is for.
EXTRA = {"resunet3d": [], "unetr2d": ["slices.image_size=128"]}
BAR = 0.90


@pytest.fixture(scope="module")
def one_case_twice(tmp_path_factory):
    """A KiTS19-layout folder holding the same case under two ids."""
    root = tmp_path_factory.mktemp("overfit")
    data = root / "raw"
    image, labels, affine = generate_case(CASE_INDEX, 0, SyntheticOptions(matrix=160))
    first = data / "case_00000"
    first.mkdir(parents=True)
    save_nifti(image, affine, first / "imaging.nii.gz")
    save_nifti(labels, affine, first / "segmentation.nii.gz")
    shutil.copytree(first, data / "case_00001")
    return root


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_quick_model_fits_one_case(one_case_twice, model):
    root = one_case_twice
    config = load_experiment_config(CONFIGS[model], [
        f"preprocessing.cache_dir={root / 'cache'}", f"training.output_dir={root / 'runs'}",
        "split.validation_fraction=0.5", f"training.epochs={EPOCHS[model]}", "training.validate_every=10",
        "augmentation.affine_prob=0.0", "wandb.enabled=false", *EXTRA[model]])
    result = train(config, data_dir=root / "raw", show_progress=False)
    last = result.records[-1]
    curve = [(r["epoch"], round(r["kidney_dice"], 3), round(r["tumour_dice"], 3))
             for r in result.records if "tumour_dice" in r]
    assert last["tumour_dice"] >= BAR, f"{model} did not fit its one case's tumour: {curve}"
    assert last["kidney_dice"] >= BAR, f"{model} did not fit its one case's kidney: {curve}"
