import pytest
import yaml
from helpers.paths import ROOT

from maisi.config import load_config, validate_config
from maisi.core.checks import ConfigError


def _default():
    return yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))


def test_default_config_is_valid_and_filled():
    cfg = load_config(ROOT / "config/config.yaml")
    assert cfg["sources"]["phantom"]["type"] == "phantom"
    assert cfg["preprocess"]["ct_check"]["min_below"] == -500
    assert cfg["sources"]["phantom"]["regions"]["overrides"] == {}


@pytest.mark.parametrize(
    "mutate,key",
    [
        (lambda c: c.update(on_error="ignore"), "on_error"),
        (lambda c: c.update(colour="blue"), "<top level>"),
        (lambda c: c["sources"]["phantom"].update(n_casess=3), "sources.phantom"),
        (lambda c: c["sources"]["phantom"].update(n_cases=0), "sources.phantom.n_cases"),
        (lambda c: c["preprocess"].update(divisor=100), "preprocess.divisor"),
        (lambda c: c["preprocess"].update(hu_range=[1000, -1000]), "preprocess.hu_range"),
        (lambda c: c["sources"].update(bad={"type": "local"}), "sources.bad"),
        (lambda c: c["sources"].update(bad={"type": "ftp"}), "sources.bad.type"),
        (lambda c: c["sources"]["phantom"].update(regions={"backend": "manual", "top": "chest"}), "sources.phantom.regions"),
        (
            lambda c: c["sources"]["phantom"].update(regions={"backend": "manual", "top": "lower_body", "bottom": "chest"}),
            "sources.phantom.regions",
        ),
        (lambda c: c["sources"].update(loc={"type": "local", "path": "x", "images": "*.nii.gz"}), "sources.loc.images"),
    ],
)
def test_config_errors_name_the_key(mutate, key):
    cfg = _default()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert f"'{key}'" in str(err.value)


def test_yaml_error_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sources: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(path)
