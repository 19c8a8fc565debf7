import subprocess
import sys
from pathlib import Path

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


def test_yaml_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nsources: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:3:1: not valid YAML: expected ',' or ']', but got '<stream end>'")
    assert "while parsing a flow sequence at line 2, column 10" in str(err.value)


#: A config whose third line opens a list it never closes: PyYAML notices at line 4, column 4.
BROKEN_YAML = "seed: 1\nsources:\n  a: [unclosed\n  b: 2\n"


def test_workflow_names_the_line_and_column_of_a_yaml_error(tmp_path):
    """Snakemake's own message ('Config file is not valid JSON or YAML') names neither the file nor the line."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(BROKEN_YAML, encoding="utf-8")
    cmd = [str(Path(sys.executable).with_name("snakemake")), "-n", "--quiet", "--directory", str(tmp_path), "--snakefile", str(ROOT / "Snakefile")]
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config/config.yaml:4:4: not valid YAML: expected ',' or ']', but got ':'" in out, out[-3000:]
    assert "while parsing a flow sequence at line 3, column 6" in out


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


def test_config_files_are_checked_as_snakemake_merges_them(tmp_path, capsys):
    """`--configfile` files are read by Snakemake before the workflow starts, with no file or line in its message:
    `python -m maisi.config` checks them (merged over the default config, as Snakemake merges them)."""
    from maisi.config import main

    default = tmp_path / "config.yaml"
    default.write_text((ROOT / "config/config.yaml").read_text(encoding="utf-8").replace("catalog: config/", f"catalog: {ROOT}/config/"),
                       encoding="utf-8")  # fmt: skip
    broken = tmp_path / "my.yaml"
    broken.write_text(BROKEN_YAML, encoding="utf-8")
    assert main([str(default), str(broken)]) == 1
    assert f"{broken}:4:4: not valid YAML" in capsys.readouterr().err
    broken.write_text("sources:\n  phantom:\n    n_cases: 0\n", encoding="utf-8")  # merged key by key: only n_cases is wrong
    assert main([str(default), str(broken)]) == 1
    assert "'sources.phantom.n_cases'" in capsys.readouterr().err
    broken.write_text("sources:\n  phantom:\n    n_cases: 3\n", encoding="utf-8")
    assert main([str(default), str(broken)]) == 0
    assert "valid" in capsys.readouterr().out
