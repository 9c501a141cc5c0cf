"""Sliding-window prediction with fake models whose whole-volume answer is known."""

from __future__ import annotations

import logging

import pytest
import torch

from utils.config.experiment import SlidingWindowConfig
from utils.inference.predict import predict_sliding_window_logits


class PointwiseModel(torch.nn.Module):
    """``(N, 1, *roi)`` -> ``(N, 3, *roi)``: channels ``x + 1``, ``2x``, ``-x``; checks every window's size."""

    def __init__(self, roi_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.roi_size = roi_size
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[2:]) == self.roi_size, f"window {tuple(x.shape[2:])}"
        self.windows += x.shape[0]
        return torch.cat([x + 1, 2 * x, -x], dim=1)


class WindowMinimumModel(torch.nn.Module):
    """Every voxel of a window gets the window's minimum (shows what padding a window saw)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amin(dim=(2, 3, 4), keepdim=True).expand(-1, 3, *x.shape[2:]).clone()


def _volume(shape=(2, 1, 10, 12, 14)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_stitched_logits_equal_the_model_on_the_whole_volume(blend, overlap):
    image = _volume()
    model = PointwiseModel((4, 6, 8)).eval()
    config = SlidingWindowConfig(roi_size=(4, 6, 8), overlap=overlap, blend=blend, sw_batch_size=3)
    logits = predict_sliding_window_logits(model, image, config)
    assert logits.shape == (2, 3, 10, 12, 14) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.cat([image + 1, 2 * image, -image], dim=1), rtol=1e-5, atol=1e-5)
    assert model.windows >= 2 * (3 * 2 * 2)  # batch 2; at least 3, 2, 2 windows along Z, Y, X


def test_more_overlap_means_more_windows():
    counts = []
    for overlap in (0.0, 0.5):
        model = PointwiseModel((4, 6, 8)).eval()
        predict_sliding_window_logits(model, _volume((1, 1, 8, 12, 16)),
                                      SlidingWindowConfig(roi_size=(4, 6, 8), overlap=overlap))
        counts.append(model.windows)
    assert counts == [2 * 2 * 2, 3 * 3 * 3]


def test_volume_smaller_than_the_window_is_padded_and_cropped_back():
    image = _volume((1, 1, 3, 12, 5))
    model = PointwiseModel((4, 6, 8)).eval()
    logits = predict_sliding_window_logits(model, image, SlidingWindowConfig(roi_size=(4, 6, 8), overlap=0.5))
    assert logits.shape == (1, 3, 3, 12, 5)
    torch.testing.assert_close(logits, torch.cat([image + 1, 2 * image, -image], dim=1))


def test_padding_uses_pad_value():
    image = torch.full((1, 1, 3, 4, 4), 5.0)
    config = SlidingWindowConfig(roi_size=(4, 4, 4), overlap=0.0, blend="constant")
    model = WindowMinimumModel().eval()
    assert torch.all(predict_sliding_window_logits(model, image, config) == 0.0)  # MONAI's default
    assert torch.all(predict_sliding_window_logits(model, image, config, pad_value=-3.0) == -3.0)
    inside = torch.full((1, 1, 4, 4, 4), 5.0)
    assert torch.all(predict_sliding_window_logits(model, inside, config, pad_value=-3.0) == 5.0)


def test_the_argmax_of_stitched_logits_is_the_pointwise_label():
    image = _volume((1, 1, 6, 6, 6))
    logits = predict_sliding_window_logits(PointwiseModel((4, 4, 4)).eval(), image,
                                           SlidingWindowConfig(roi_size=(4, 4, 4)))
    labels = logits.argmax(dim=1).to(torch.uint8)
    expected = torch.cat([image + 1, 2 * image, -image], dim=1).argmax(dim=1)
    assert labels.shape == (1, 6, 6, 6) and labels.dtype == torch.uint8
    assert torch.equal(labels, expected.to(torch.uint8))
    assert set(labels.unique().tolist()) == {0, 1, 2}


def test_autocast_runs_the_model_in_bfloat16_and_returns_float32():
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 3, 1)

        def forward(self, x):
            out = self.conv(x)
            seen.append(out.dtype)
            return out

    model = Recording().eval()
    logits = predict_sliding_window_logits(model, _volume((1, 1, 4, 4, 4)), SlidingWindowConfig(roi_size=(4, 4, 4)),
                            autocast_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32 and not logits.requires_grad


def test_bad_inputs_are_rejected_and_training_mode_is_reported(caplog):
    config = SlidingWindowConfig(roi_size=(4, 4, 4))
    model = PointwiseModel((4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, Z, Y, X\) float tensor, got \(1, 4, 4, 4\)"):
        predict_sliding_window_logits(model, torch.zeros(1, 4, 4, 4), config)
    with pytest.raises(ValueError, match="autocast_dtype"):
        predict_sliding_window_logits(model, torch.zeros(1, 1, 4, 4, 4), config, autocast_dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        predict_sliding_window_logits(model.train(), torch.zeros(1, 1, 4, 4, 4), config)
    assert "training mode" in caplog.text
