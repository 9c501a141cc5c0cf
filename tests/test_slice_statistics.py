from dataclasses import dataclass

import numpy as np
import pytest

from utils.analysis.slice_statistics import (
    SamplingShares,
    classify_slices,
    compare_sampled_classes,
    compute_case_slice_areas,
    compute_sampling_shares,
    compute_slice_areas,
    compute_slice_class_counts,
    compute_slice_pixel_counts,
    count_slice_classes_per_case,
)

SPACING = (4.0, 2.5, 2.0)  # 5 mm² per pixel


@dataclass
class _Case:
    """Stands in for a CachedCase: only the attributes the statistics read."""

    case_id: str
    label: np.ndarray
    spacing: tuple[float, float, float] = SPACING

    @property
    def slice_classes(self) -> np.ndarray:
        return classify_slices(self.label).astype(np.int8)


class _AlternatingSampler:
    """Stands in for a SliceDataset: never background, tumour and kidney in turn."""

    slices = {2: np.zeros((1, 2)), 1: np.zeros((1, 2)), 0: np.zeros((0, 2))}  # keys in the sampler's order
    class_probabilities = np.array([0.5, 0.5, 0.0])

    def __getitem__(self, index: int) -> dict:
        return {"slice_class": (2, 1)[index % 2]}


def test_slice_pixel_counts_and_classes(hand_made_labels):
    labels = hand_made_labels()
    kidney, tumour = compute_slice_pixel_counts(labels)
    assert kidney.tolist() == [9, 8, 9, 1, 0, 0] and tumour.tolist() == [0, 1, 0, 0, 4, 0]
    assert kidney.dtype == np.int64
    assert classify_slices(labels).tolist() == [1, 2, 1, 1, 2, 0]
    assert compute_slice_class_counts([labels, np.zeros((3, 2, 2), np.uint8)]).tolist() == [4, 3, 2]
    with pytest.raises(ValueError, match="labels must be a non-empty 3D integer array"):
        classify_slices(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"case_00003: label values must be in \{0, 1, 2\}, got values from 0 to 5"):
        compute_slice_pixel_counts(np.full((1, 2, 2), 5, np.uint8) * np.array([0, 1]), name="case_00003")


def test_slice_classes_per_case_from_stored_classes(hand_made_labels):
    cases = [_Case("case_00000", hand_made_labels()), _Case("case_00001", np.zeros((2, 3, 3), np.uint8))]
    counts = count_slice_classes_per_case(cases)
    assert list(counts) == ["case_00000", "case_00001"]
    assert counts["case_00000"].tolist() == [1, 3, 2] and counts["case_00001"].tolist() == [2, 0, 0]
    assert counts["case_00000"].dtype == np.int64
    with pytest.raises(ValueError, match="case ids must be distinct, got case_00000 twice"):
        count_slice_classes_per_case([cases[0], cases[0]])
    with pytest.raises(ValueError, match="at least one case"):
        count_slice_classes_per_case([])


def test_slice_areas_by_hand(hand_made_labels):
    kidney, tumour = compute_slice_areas(hand_made_labels(), SPACING)
    assert kidney.tolist() == [45.0, 45.0, 45.0, 5.0, 20.0, 0.0]  # label > 0 pixels x 5 mm²
    assert tumour.tolist() == [0.0, 5.0, 0.0, 0.0, 20.0, 0.0]
    areas = compute_case_slice_areas([_Case("case_00000", hand_made_labels()),
                                      _Case("case_00001", hand_made_labels()[4:], (1.0, 1.0, 1.0))])
    assert areas.kidney_mm2.tolist() == [45, 45, 45, 5, 20, 4] and areas.tumour_mm2.tolist() == [5, 20, 4]
    with pytest.raises(ValueError, match="spacing must be three finite values > 0"):
        compute_slice_areas(hand_made_labels(), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"case_00002: spacing must be .* got \(1.0, 1.0\)"):
        compute_case_slice_areas([_Case("case_00002", hand_made_labels(), (1.0, 1.0))])
    with pytest.raises(ValueError, match="at least one case"):
        compute_case_slice_areas([])


def test_sampled_classes_against_configured_shares():
    shares = compare_sampled_classes([0, 2, 2, 1], [0.2, 0.4, 0.4])
    assert shares.counts.tolist() == [1, 1, 2] and shares.n_samples == 4
    assert shares.realised.tolist() == [0.25, 0.25, 0.5]
    assert shares.standard_errors == pytest.approx([0.2, 0.06**0.5, 0.06**0.5])
    with pytest.raises(ValueError, match="sampled must be a non-empty 1D array of slice classes"):
        compare_sampled_classes([0, 3], [0.2, 0.4, 0.4])
    with pytest.raises(ValueError, match="configured must be 3 probabilities >= 0 summing to 1"):
        compare_sampled_classes([0], [0.5, 0.4, 0.4])


def test_sampling_shares_read_the_sampler_order():
    shares = compute_sampling_shares(_AlternatingSampler(), 4)
    assert shares.configured.tolist() == [0.0, 0.5, 0.5] and shares.counts.tolist() == [0, 2, 2]
    assert compute_sampling_shares(_AlternatingSampler(), 3, start=1).counts.tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="n_samples must be >= 1, got 0"):
        compute_sampling_shares(_AlternatingSampler(), 0)
    with pytest.raises(ValueError, match="start must be >= 0, got -1"):
        compute_sampling_shares(_AlternatingSampler(), 1, start=-1)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """Two synthetic cases (64 x 64 in-plane, the generator's smallest) preprocessed with default settings."""
    from utils.config.data import PreprocessingConfig, SplitConfig
    from utils.preprocessing.cache import open_cache
    from utils.preprocessing.preprocess import preprocess_dataset
    from utils.synthetic.dataset import SyntheticOptions, generate_dataset

    root = tmp_path_factory.mktemp("slice_statistics")
    generate_dataset(root / "data", 2, options=SyntheticOptions(matrix=64), show_progress=False)
    result = preprocess_dataset(root / "data", PreprocessingConfig(cache_dir=str(root / "cache")), SplitConfig(),
                                show_progress=False)
    return open_cache(result.folder)


def test_cache_statistics_agree_with_its_labels(tiny_cache):
    cases = tiny_cache.cases()
    counts = count_slice_classes_per_case(cases)
    for case in cases:
        assert counts[case.case_id].tolist() == np.bincount(classify_slices(case.label), minlength=3).tolist()
        assert counts[case.case_id].sum() == case.shape[0]
    areas = compute_case_slice_areas(cases)
    per_class = np.sum(list(counts.values()), axis=0)
    assert areas.kidney_mm2.size == per_class[1] + per_class[2] and areas.tumour_mm2.size == per_class[2]
    pixel_mm2 = cases[0].spacing[1] * cases[0].spacing[2]
    assert areas.kidney_mm2[0] / pixel_mm2 == pytest.approx(round(areas.kidney_mm2[0] / pixel_mm2))


def test_sampling_shares_of_a_slice_dataset(tiny_cache):
    from utils.config.data import SliceDatasetConfig
    from utils.datasets.slices import build_slice_dataset

    only_tumour = SliceDatasetConfig(image_size=16, tumour_share=1.0, kidney_share=0.0, background_share=0.0)
    shares = compute_sampling_shares(build_slice_dataset(tiny_cache, only_tumour, None), 5)
    assert shares.configured.tolist() == [0.0, 0.0, 1.0] and shares.counts.tolist() == [0, 0, 5]
    balanced = compute_sampling_shares(build_slice_dataset(tiny_cache, SliceDatasetConfig(image_size=16), None), 30)
    assert isinstance(balanced, SamplingShares) and balanced.n_samples == 30
    assert balanced.configured == pytest.approx([0.2, 0.4, 0.4])
    assert np.all(np.abs(balanced.realised - balanced.configured) < 4 * balanced.standard_errors)
