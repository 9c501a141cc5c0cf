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
