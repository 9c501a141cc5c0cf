"""Slice-wise prediction of whole volumes with fake 2D models whose answer is known."""

from __future__ import annotations

import pytest
import torch

from utils.config.data import SliceDatasetConfig
from utils.config.experiment import SliceInferenceConfig
from utils.inference.predict import predict_slice_logits


class PointwiseSliceModel(torch.nn.Module):
    """``(N, 1, S, S)`` -> ``(N, 3, S, S)``: channels ``x + 1``, ``2x``, ``-x``; records batch sizes."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.batches = size, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and tuple(x.shape[1:]) == (1, self.size, self.size), tuple(x.shape)
        self.batches.append(x.shape[0])
        return torch.cat([x + 1, 2 * x, -x], dim=1)


def _volume(shape=(2, 1, 7, 12, 10)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_padded_slices_come_back_exactly_in_order():
    image = _volume()  # slices of 12 x 10 fit into 16 x 16 without scaling (fit="pad")
    model = PointwiseSliceModel(16)
    logits = predict_slice_logits(model, image, SliceDatasetConfig(image_size=16, fit="pad"),
                                  SliceInferenceConfig(batch_size=3), pad_value=-5.0)
    assert logits.shape == (2, 3, 7, 12, 10) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.cat([image + 1, 2 * image, -image], dim=1))
    assert model.batches == [3, 3, 1] * 2  # 7 slices in batches of 3, for each of the 2 volumes


def test_resized_slices_return_to_the_volume_grid():
    image = torch.zeros(1, 1, 4, 24, 12)
    image[:, :, 2] = 1.0  # slice 2 bright: it must stay slice 2, and the background stays 0
    logits = predict_slice_logits(PointwiseSliceModel(32), image, SliceDatasetConfig(image_size=32, fit="resize"),
                                  SliceInferenceConfig(batch_size=8))
    assert logits.shape == (1, 3, 4, 24, 12)
    torch.testing.assert_close(logits[0, 1, 2], torch.full((24, 12), 2.0))
    torch.testing.assert_close(logits[0, 1, [0, 1, 3]], torch.zeros(3, 24, 12))


def test_batch_size_does_not_change_the_result():
    image = _volume((1, 1, 9, 20, 16))
    conv = torch.nn.Conv2d(1, 3, 3, padding=1).eval()
    slices = SliceDatasetConfig(image_size=32, fit="resize")
    one = predict_slice_logits(conv, image, slices, SliceInferenceConfig(batch_size=1))
    many = predict_slice_logits(conv, image, slices, SliceInferenceConfig(batch_size=64))
    torch.testing.assert_close(one, many)


def test_bad_inputs_are_refused():
    slices, config = SliceDatasetConfig(image_size=16), SliceInferenceConfig()
    with pytest.raises(ValueError, match=r"\(B, C, Z, Y, X\)"):
        predict_slice_logits(PointwiseSliceModel(16), torch.zeros(1, 12, 10), slices, config)
    with pytest.raises(ValueError, match="empty"):
        predict_slice_logits(PointwiseSliceModel(16), torch.zeros(1, 1, 0, 12, 10), slices, config)
    with pytest.raises(ValueError, match="autocast_dtype"):
        predict_slice_logits(PointwiseSliceModel(16), _volume(), slices, config, autocast_dtype=torch.float64)
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        SliceInferenceConfig(batch_size=0)
