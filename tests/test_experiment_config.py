"""Every shipped experiment config loads, builds its model at its input size, and pairs the two models fairly."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.config.experiment import ModelConfig, load_experiment_config
from utils.networks.models import build_model, check_input_size, model_input_size, spatial_dims

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = ["resunet3d.yaml", "resunet3d_quick.yaml", "resunet3d_kidney_quick.yaml", "unetr2d.yaml",
               "unetr2d_quick.yaml"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_shipped_experiments_load_and_their_inputs_fit_the_model(name):
    config = load_experiment_config(CONFIGS / name)
    assert config.model.name == name.split("_")[0].removesuffix(".yaml")
    check_input_size(config.model, model_input_size(config))
    if spatial_dims(config.model) == 3:
        check_input_size(config.model, config.sliding_window.roi_size)


def test_the_quick_models_share_one_cache_and_split_so_the_demo_compares_like_with_like():
    resunet, unetr = (load_experiment_config(CONFIGS / n) for n in ("resunet3d_quick.yaml", "unetr2d_quick.yaml"))
    assert resunet.preprocessing == unetr.preprocessing and resunet.split == unetr.split
    assert resunet.data_dir == unetr.data_dir and resunet.training.seed == unetr.training.seed


def test_the_full_recipes_share_the_split():
    resunet, unetr = (load_experiment_config(CONFIGS / n) for n in ("resunet3d.yaml", "unetr2d.yaml"))
    assert resunet.split == unetr.split and resunet.training.fold == unetr.training.fold


def test_the_quick_unetr_is_small_enough_for_a_cpu():
    config = load_experiment_config(CONFIGS / "unetr2d_quick.yaml")
    model = build_model(config.model, model_input_size(config))
    assert sum(p.numel() for p in model.parameters()) < 10_000_000
    assert model_input_size(config) == (64, 64)


def test_a_model_config_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"name must be one of \['resunet3d', 'unetr2d'\]"):
        ModelConfig(name="unet2d")
