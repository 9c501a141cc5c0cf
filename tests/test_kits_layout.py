import nibabel as nib
import numpy as np
import pytest

from utils.data.kits_layout import KITS_AXCODES, build_kits_affine, case_id_for_index, is_case_id, spacing_from_affine


def test_kits_affine_matches_the_published_convention():
    affine = build_kits_affine((0.5, 0.92, 0.92))
    expected = [[0, 0, -0.92, 0], [0, -0.92, 0, 0], [-0.5, 0, 0, 0], [0, 0, 0, 1]]
    np.testing.assert_allclose(affine, expected)
    assert nib.aff2axcodes(affine) == KITS_AXCODES


def test_spacing_is_read_from_affine_columns_not_the_diagonal():
    affine = build_kits_affine((3.0, 0.78, 0.7))
    assert np.allclose(np.diag(affine)[:3], [0.0, -0.78, 0.0])  # the diagonal would be wrong
    assert spacing_from_affine(affine) == pytest.approx((3.0, 0.78, 0.7))


def test_spacing_of_an_oblique_affine():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 1.5, 4.0])
    assert spacing_from_affine(affine) == pytest.approx((2.0, 1.5, 4.0))


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (1.0, -1.0, 1.0), (float("nan"), 1.0, 1.0)])
def test_bad_spacing_is_refused(spacing):
    with pytest.raises(ValueError, match="spacing must be three finite values > 0"):
        build_kits_affine(spacing)


def test_case_ids():
    assert case_id_for_index(7) == "case_00007"
    assert is_case_id("case_00209") and not is_case_id("case_7") and not is_case_id("notes")
    with pytest.raises(ValueError, match="between 0 and 99999"):
        case_id_for_index(-1)
