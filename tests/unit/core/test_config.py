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
        (lambda c: c.update(run_name=".."), "run_name"),
        (lambda c: c.update(run_name=".hidden"), "run_name"),
        (lambda c: c["sources"].update(loc={"type": "local", "path": "x", "images": "{case}.nii.gz", "label_map": {1: "not an organ"}}),
         "sources.loc.label_map"),  # fmt: skip
        (lambda c: c["sources"].update(loc={"type": "local", "path": "x", "images": "{case}.nii.gz", "label_map": {"-1": "liver"}}),
         "sources.loc.label_map.-1"),  # fmt: skip
        (lambda c: c["dataset"].update(held_out=1.0), "dataset.held_out"),
        (lambda c: c.update(privacy={"on_copy": "delete"}), "privacy.on_copy"),
        (lambda c: c.update(utility={"init_filters": 12}), "utility.init_filters"),
        (lambda c: c.update(utility={"classes": ["heart"]}), "utility.classes.0"),
        (lambda c: c.update(label_fidelity={"segmenter": "totalsegmentator"}), "label_fidelity.segmenter"),
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


def test_label_map_keys_above_255_are_valid():
    cfg = _default()
    cfg["sources"]["loc"] = {"type": "local", "path": "x", "images": "{case}.nii.gz", "label_map": {300: "liver", 1000: 3}}
    assert validate_config(cfg)["sources"]["loc"]["label_map"] == {300: "liver", 1000: 3}


def test_unknown_catalog_dataset_names_the_key_the_catalog_and_the_choices():
    cfg = _default()
    cfg["catalog"] = str(ROOT / "config/datasets.yaml")
    cfg["sources"]["spleen"] = {"type": "dataset", "dataset": "msd_task99_nothing"}
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "'sources.spleen.dataset'" in msg and "'msd_task99_nothing'" in msg and "datasets.yaml" in msg
    assert "msd_task09_spleen" in msg  # the valid names
    cfg["sources"]["spleen"]["dataset"] = "msd_task09_spleen"
    validate_config(cfg)
    cfg["catalog"] = str(ROOT / "config/nope.yaml")
    with pytest.raises(ConfigError, match="'catalog': catalog file .*nope.yaml does not exist"):
        validate_config(cfg)
