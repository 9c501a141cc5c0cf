import pytest

from utils.config.data import SyntheticDataConfig
from utils.config.demo import DemoConfig
from utils.config.loading import config_as_dict, load_config, parse_override

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_demo_config_loads_into_frozen_typed_objects():
    config = load_config(REPO / "configs" / "demo.yaml", DemoConfig)
    assert isinstance(config.synthetic, SyntheticDataConfig)
    assert config.synthetic.spacing is None and config.synthetic.cases >= 1
    with pytest.raises(AttributeError):
        config.synthetic.cases = 3  # frozen


def test_overrides_and_conversions(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("synthetic:\n  cases: 3\n")
    config = load_config(path, DemoConfig, ["synthetic.spacing=[3, 0.8, 0.8]", "reports_dir=out"])
    assert config.synthetic.spacing == (3.0, 0.8, 0.8) and config.reports_dir == "out"
    assert config_as_dict(config)["synthetic"]["cases"] == 3
    assert parse_override("a.b=null") == (["a", "b"], None)


@pytest.mark.parametrize("text, message", [
    ("synthetic:\n  casez: 3\n", r"unknown key\(s\) \['casez'\]; allowed keys: \['cases'"),
    ("synthetic:\n  cases: three\n", r"synthetic.cases must be of type int, got 'three'"),
    ("synthetic:\n  cases: true\n", r"synthetic.cases must be of type int"),
    ("synthetic:\n  spacing: [1, 2]\n", r"synthetic.spacing must be a list of 3 values"),
    ("synthetic: [1, 2]\n", r"synthetic must be a mapping"),
    ("synthetic: {cases: 3\n", r"not valid YAML"),
])
def test_bad_configs_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_config(path, DemoConfig)
    assert "bad.yaml" in str(error.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", DemoConfig)
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("novalue")


def _experiment_yaml(tmp_path, text):
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    return path


def test_a_top_level_list_is_a_named_error_with_or_without_overrides(tmp_path):
    from utils.config.experiment import load_experiment_config

    path = _experiment_yaml(tmp_path, "- model\n- training\n")
    for overrides in ((), ("model.name=resunet3d",)):
        with pytest.raises(ValueError, match=r"experiment\.yaml: the top level must be a mapping.*got a list"):
            load_experiment_config(path, overrides)


def test_an_unparsable_override_value_is_a_named_error(tmp_path):
    from utils.config.experiment import load_experiment_config

    with pytest.raises(ValueError, match=r"model\.strides=\[2,2.*model\.strides is not valid YAML"):
        parse_override("model.strides=[2,2")
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("model..strides=1")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_experiment_config(REPO / "configs" / "resunet3d_quick.yaml", ["patches.patch_size=[16, 64"])


def test_an_override_into_an_empty_section_works(tmp_path):
    from utils.config.experiment import load_experiment_config

    config = load_experiment_config(_experiment_yaml(tmp_path, "model:\n"), ["model.num_res_units=1"])
    assert config.model.num_res_units == 1


@pytest.mark.parametrize("override, named", [
    ("model.strides=[2,0,2]", "strides must be > 0"),
    ("model.strides=[2,-2,2]", "strides must be > 0"),
    ("model.out_channels=0", "out_channels must be > 0"),
    ("model.num_res_units=-1", "num_res_units must be >= 0"),
    ("patches.patch_size=[16,64,0]", "patch_size must be > 0"),
    ("sliding_window.roi_size=[-16,64,64]", "roi_size must be > 0"),
    ("patches.patch_size=[16,64,60]", r"patches\.patch_size \[16, 64, 60\] must be a multiple of 8.*model\.strides"),
    ("sliding_window.roi_size=[12,64,64]", r"sliding_window\.roi_size \[12, 64, 64\] must be a multiple of 8"),
])
def test_impossible_geometry_is_refused_when_the_config_is_read(override, named):
    from utils.config.experiment import load_experiment_config

    path = REPO / "configs" / "resunet3d_quick.yaml"
    with pytest.raises(ValueError, match=named) as caught:
        load_experiment_config(path, [override])
    assert str(path) in str(caught.value)


def test_a_unetr_slice_size_must_be_a_multiple_of_its_patches():
    from utils.config.experiment import load_experiment_config

    with pytest.raises(ValueError, match=r"slices\.image_size 40 must be a multiple of 16.*e\.g\. 48"):
        load_experiment_config(REPO / "configs" / "unetr2d_quick.yaml", ["slices.image_size=40"])


def test_the_training_command_exits_2_on_these_config_errors(tmp_path, capsys):
    from utils.cli.train import run_training_script

    bad_list = _experiment_yaml(tmp_path, "- a\n")
    quick = str(REPO / "configs" / "resunet3d_quick.yaml")
    for argv in (["--config", str(bad_list)], ["--config", quick, "--set", "model.strides=[2,0,2]"],
                 ["--config", quick, "--set", "model.strides=[2,2"]):
        assert run_training_script("resunet3d", "Train.", argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error" in err


def test_an_unquoted_no_for_a_text_setting_says_how_to_quote_it():
    from utils.config.experiment import load_experiment_config

    quick = REPO / "configs" / "resunet3d_quick.yaml"
    with pytest.raises(ValueError, match=r"training\.mixed_precision must be of type str, got False; .*quote"):
        load_experiment_config(quick, ["training.mixed_precision=no"])
    assert load_experiment_config(quick, ['training.mixed_precision="no"']).training.mixed_precision == "no"
