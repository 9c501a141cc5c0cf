"""One call predicts a volume with either model: sliding windows in 3D, slice by slice in 2D."""

from __future__ import annotations

import torch

from utils.config.data import SliceDatasetConfig
from utils.config.experiment import ExperimentConfig, SliceInferenceConfig, SlidingWindowConfig
from utils.config.loading import build_config
from utils.inference.predict import predict_slice_logits, predict_sliding_window_logits, predict_volume_logits


def test_a_3d_experiment_uses_sliding_windows():
    config = build_config(ExperimentConfig, {"model": {"channels": [4, 8], "strides": [2]},
                                             "patches": {"patch_size": [4, 8, 8]},
                                             "sliding_window": {"roi_size": [4, 8, 8], "overlap": 0.25}})
    model = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    image = torch.randn(1, 1, 6, 10, 12, generator=torch.Generator().manual_seed(1))
    expected = predict_sliding_window_logits(model, image, SlidingWindowConfig(roi_size=(4, 8, 8), overlap=0.25),
                                             pad_value=-1.0)
    torch.testing.assert_close(predict_volume_logits(model, image, config, pad_value=-1.0), expected)


def test_a_2d_experiment_predicts_every_axial_slice():
    config = build_config(ExperimentConfig, {"model": {"name": "unetr2d"}, "slices": {"image_size": 16},
                                             "slice_inference": {"batch_size": 4}})
    model = torch.nn.Conv2d(1, 3, 3, padding=1).eval()
    image = torch.randn(1, 1, 5, 10, 12, generator=torch.Generator().manual_seed(2))
    logits = predict_volume_logits(model, image, config, pad_value=-1.0)
    expected = predict_slice_logits(model, image, SliceDatasetConfig(image_size=16), SliceInferenceConfig(batch_size=4),
                                    pad_value=-1.0)
    assert logits.shape == (1, 3, 5, 10, 12)
    torch.testing.assert_close(logits, expected)
