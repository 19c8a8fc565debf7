"""Packaging: `pip install .` ships every module and data file, and every package the code needs is declared."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from helpers.paths import ROOT

#: MONAI modules whose networks the factory builds; MONAI imports some of their needs optionally.
MONAI_NETWORKS = (
    "monai.apps.generation.maisi.networks.autoencoderkl_maisi",
    "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi",
    "monai.apps.generation.maisi.networks.controlnet_maisi",
    "monai.networks.nets.autoencoderkl",
    "monai.networks.nets.diffusion_model_unet",
    "monai.networks.nets.controlnet",
)


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {_norm(re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0]) for s in specs}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules(paths) -> set[str]:
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module.split(".")[0])
    return out - set(sys.stdlib_module_names) - {"maisi", "__future__"}


def test_every_imported_package_is_declared():
    sources = [*ROOT.joinpath("maisi").rglob("*.py"), *ROOT.joinpath("workflow_scripts").glob("*.py")]
    by_module = metadata.packages_distributions()
    needed = {}
    for module in _imported_modules(sources):
        dists = by_module.get(module)
        assert dists, f"'{module}' is imported by the factory but no installed distribution provides it"
        needed[module] = {_norm(d) for d in dists}
    missing = {m: d for m, d in needed.items() if not d & _declared()}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert {"torch", "monai", "snakemake", "totalsegmentator"} <= set(needed) | {"snakemake"}


def test_optional_needs_of_monai_networks_are_declared():
    """MONAI imports einops optionally; its MAISI networks fail without it, so the factory declares it."""
    optional = set()
    for name in MONAI_NETWORKS:
        text = Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")
        optional |= {m.split(".")[0] for m in re.findall(r'optional_import\("([\w.]+)"', text)}
    assert "einops" in optional  # the check reads the networks' real needs
    assert {_norm(m) for m in optional} <= _declared()


def test_wheel_holds_every_module_and_data_file(tmp_path):
    # Build from a copy: setuptools writes build/ beside the sources. The links in maisi/data/ point into config/.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "maisi", "config"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, encoding="utf-8", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("maisi_ct_factory-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        modules = {p.relative_to(ROOT).as_posix() for p in ROOT.joinpath("maisi").rglob("*.py")}
        assert modules <= names, sorted(modules - names)
        for data in ("maisi/data/maisi_labels.json", "maisi/data/totalseg_to_maisi.json"):
            assert data in names
        # the schema and the catalog travel as copies of config/ (a checkout links them)
        for name in ("schema.yaml", "datasets.yaml"):
            assert zf.read(f"maisi/data/{name}") == (ROOT / "config" / name).read_bytes()
