"""Model factory: the tiny and the default resunet3d, the unbuilt unetr2d, input-size checks."""

from __future__ import annotations

import pytest
import torch

from utils.config.experiment import ModelConfig
from utils.networks.models import build_model, check_input_size, count_parameters, spatial_dims

TINY = ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def test_tiny_resunet3d_maps_a_patch_to_logits_of_the_same_size():
    torch.manual_seed(0)
    model = build_model(TINY)
    logits = model(torch.randn(1, 1, 16, 32, 32))
    assert logits.shape == (1, 3, 16, 32, 32) and logits.dtype == torch.float32
    logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_follows_every_architecture_setting():
    model = build_model(ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0, norm="batch",
                                    act="RELU", dropout=0.2, out_channels=2))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm3d", "ReLU"} <= kinds and "InstanceNorm3d" not in kinds
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.2 for p in dropouts)
    assert model(torch.zeros(2, 1, 8, 8, 8)).shape == (2, 2, 8, 8, 8)


def test_default_resunet3d_builds_with_about_17_million_parameters():
    model = build_model(ModelConfig())
    assert count_parameters(model) == 16_673_151
    assert count_parameters(model, trainable_only=True) == count_parameters(model)
    assert spatial_dims(ModelConfig()) == 3


TINY_UNETR = ModelConfig(name="unetr2d", feature_size=4, hidden_size=32, mlp_dim=64, num_heads=2)


def test_unetr2d_maps_slices_to_class_logits_of_the_same_size():
    model = build_model(TINY_UNETR, input_size=(32, 32))
    assert spatial_dims(TINY_UNETR) == 2
    assert model.vit.patch_embedding.patch_embeddings.kernel_size == (16, 16)  # MONAI's fixed ViT patch
    logits = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 3, 32, 32) and logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unetr2d_sizes_come_from_the_config():
    small = count_parameters(build_model(TINY_UNETR, input_size=(32, 32)))
    wider = count_parameters(build_model(ModelConfig(name="unetr2d", feature_size=8, hidden_size=32, mlp_dim=64,
                                                     num_heads=2), input_size=(32, 32)))
    assert wider > small
    # position embeddings are learnt per patch: one per 16 x 16 patch of the input size
    assert build_model(TINY_UNETR, input_size=(64, 64)).vit.patch_embedding.position_embeddings.shape[1] == 16


def test_unetr2d_needs_a_valid_input_size():
    with pytest.raises(ValueError, match="pass input_size"):
        build_model(TINY_UNETR)
    with pytest.raises(ValueError, match="16-pixel patches.*slices.image_size"):
        build_model(TINY_UNETR, input_size=(40, 40))
    with pytest.raises(ValueError, match="must have 2 values"):
        check_input_size(TINY_UNETR, (16, 32, 32))
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_heads"):
        ModelConfig(name="unetr2d", hidden_size=30, num_heads=4)


def test_check_input_size_accepts_multiples_of_the_stride_product():
    check_input_size(ModelConfig(), (80, 160, 160))
    check_input_size(TINY, (4, 8, 12))


def test_check_input_size_names_the_size_divisor_and_fix():
    with pytest.raises(ValueError, match=r"\(80, 160, 150\).*axis/axes \[2\].*multiples of 16.*roi_size"):
        check_input_size(ModelConfig(), (80, 160, 150))
    with pytest.raises(ValueError, match="must have 3 values"):
        check_input_size(ModelConfig(), (160, 160))
    with pytest.raises(ValueError, match="multiples of 4"):
        check_input_size(TINY, (0, 8, 8))


def test_sizes_that_fail_the_check_do_break_the_model():
    with pytest.raises(RuntimeError):
        build_model(TINY)(torch.zeros(1, 1, 6, 8, 8))
