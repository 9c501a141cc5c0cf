"""The shared output guard: outputs inside input data, onto input files, or over foreign files are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils.data.nifti_io import save_nifti
from utils.data.output_guard import (
    OWN_NIFTI_DESCRIPTION,
    OutputGuardError,
    check_output_location,
    check_overwrite,
    is_own_json,
    is_own_prediction,
    is_own_text,
)


@pytest.fixture()
def data(tmp_path):
    case = tmp_path / "data" / "case_00003"
    case.mkdir(parents=True)
    (case / "imaging.nii.gz").write_bytes(b"ct")
    (case / "segmentation.nii.gz").write_bytes(b"truth")
    return tmp_path / "data"


def test_output_inside_an_input_folder_is_refused_naming_both_paths(data):
    out = data / "case_00003" / "report.json"
    with pytest.raises(OutputGuardError) as error:
        check_output_location(out, [data], what="--json")
    message = str(error.value)
    assert str(out.resolve()) in message and str(data.resolve()) in message and "--allow-inside-input" in message


def test_output_in_the_case_folder_of_an_input_file_is_refused(data):
    ct = data / "case_00003" / "imaging.nii.gz"
    with pytest.raises(OutputGuardError, match="inside the input data folder"):
        check_output_location(data / "case_00003" / "segmentation.nii.gz", [ct])
    with pytest.raises(OutputGuardError, match="inside the input data folder"):
        check_output_location(data / "case_00003", [ct])


def test_output_onto_an_input_file_is_refused_even_when_inside_input_is_allowed(data):
    ct = data / "case_00003" / "imaging.nii.gz"
    with pytest.raises(OutputGuardError, match="would overwrite the input"):
        check_output_location(ct, [ct], allow_inside_input=True)
    assert check_output_location(data / "case_00003" / "new.json", [ct], allow_inside_input=True).name == "new.json"


def test_output_through_a_symbolic_link_to_the_data_is_refused(data, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(OutputGuardError):
        check_output_location(link / "case_00003" / "x.json", [data])


def test_outputs_outside_the_inputs_pass_and_none_inputs_are_ignored(data, tmp_path):
    out = tmp_path / "reports" / "run"
    assert check_output_location(out, [data, None]) == out.resolve()
    assert check_output_location(tmp_path / "data_other", [data]) == (tmp_path / "data_other").resolve()


def test_overwrite_only_of_own_outputs(tmp_path):
    report = tmp_path / "report.json"
    check_overwrite(report, is_own_json(["cases"]))  # absent: fine
    report.write_text(json.dumps({"cases": []}))
    check_overwrite(report, is_own_json(["cases"]))  # our own report: fine
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"mine": 1}))
    with pytest.raises(OutputGuardError, match="was not written by this command"):
        check_overwrite(notes, is_own_json(["cases"]))
    binary = tmp_path / "ct.json"
    binary.write_bytes(b"\x1f\x8b\x00\xff")
    with pytest.raises(OutputGuardError):
        check_overwrite(binary, is_own_json(["cases"]))
    with pytest.raises(OutputGuardError, match="existing folder"):
        check_overwrite(tmp_path, is_own_json(["cases"]))


def test_text_and_prediction_recognisers(tmp_path):
    table = tmp_path / "metrics.csv"
    table.write_text("case_id,kidney_dice\n")
    assert is_own_text("case_id,")(table) and not is_own_text("other")(table)
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    plain = save_nifti(labels, np.eye(4), tmp_path / "plain.nii.gz")
    assert not is_own_prediction(plain)
    import nibabel as nib
    image = nib.Nifti1Image(labels, np.eye(4))
    image.header["descrip"] = OWN_NIFTI_DESCRIPTION
    nib.save(image, str(tmp_path / "ours.nii.gz"))
    assert is_own_prediction(tmp_path / "ours.nii.gz")
    assert not is_own_prediction(tmp_path / "metrics.csv")
