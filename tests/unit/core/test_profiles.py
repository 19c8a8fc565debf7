"""Installing the factory's Snakemake profiles by name (maisi.profiles): links into Snakemake's user folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.paths import ROOT

from maisi.profiles import PROFILES, ProfileConflict, install, installed, uninstall, user_profile_dir


def test_install_links_each_profile_to_the_checkout(tmp_path):
    dest = tmp_path / "snakemake"
    links = install(dest)
    assert sorted(p.name for p in links) == sorted(PROFILES)
    for name in PROFILES:
        assert (dest / name).is_symlink() and (dest / name).resolve() == (ROOT / "profiles" / name).resolve()
    assert installed(dest) == dict.fromkeys(PROFILES, True)
    assert install(dest) == links  # again: nothing changes
    assert sorted(p.name for p in uninstall(dest)) == sorted(PROFILES) and not list(dest.iterdir())


def test_existing_profile_of_the_same_name_is_never_replaced(tmp_path):
    dest = tmp_path / "snakemake"
    (dest / "slurm").mkdir(parents=True)
    (dest / "slurm" / "config.yaml").write_text("executor: slurm\n", encoding="utf-8")
    with pytest.raises(ProfileConflict, match=r"slurm is a folder or file of its own.*--prefix"):
        install(dest)
    assert not (dest / "local").exists()  # nothing was linked before the conflict was found
    assert (dest / "slurm" / "config.yaml").read_text(encoding="utf-8") == "executor: slurm\n"
    assert sorted(p.name for p in install(dest, prefix="maisi-")) == ["maisi-local", "maisi-slurm"]
    assert uninstall(dest) == []  # the user's own profile stays

    other = tmp_path / "other"
    other.mkdir()
    (dest / "local").symlink_to(other)
    with pytest.raises(ProfileConflict, match="--force replaces a link"):
        install(dest)
    (dest / "slurm" / "config.yaml").unlink()
    (dest / "slurm").rmdir()
    install(dest, force=True)
    assert (dest / "local").resolve() == (ROOT / "profiles" / "local").resolve()


def test_missing_profiles_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no profile local, slurm there.*--source"):
        install(tmp_path / "dest", source=tmp_path / "nowhere")


def test_snakemake_finds_the_installed_profiles_by_name(tmp_path):
    """`snakemake --profile slurm` and `--profile local`, as users type them, in a folder without profiles/."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "maisi.profiles", "install"], env=env, capture_output=True, encoding="utf-8")
    assert proc.returncode == 0 and "(snakemake --profile slurm)" in proc.stdout, proc.stderr
    assert (tmp_path / "xdg" / "snakemake" / "slurm").resolve() == (ROOT / "profiles" / "slurm").resolve()
    run = tmp_path / "run"
    (run / "config").mkdir(parents=True)
    cfg = (ROOT / "config" / "config.yaml").read_text(encoding="utf-8").replace("catalog: config/", f"catalog: {ROOT}/config/")
    (run / "config" / "config.yaml").write_text(cfg, encoding="utf-8")

    def dry_run(profile, xdg):
        cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--profile",
            profile,
            "-n",
            "--quiet",
            "rules",
        ]
        proc = subprocess.run(cmd, cwd=run, env={**env, "XDG_CONFIG_HOME": str(xdg)}, capture_output=True, encoding="utf-8")
        return proc.returncode, proc.stdout + proc.stderr

    for name in PROFILES:
        code, out = dry_run(name, tmp_path / "xdg")
        assert code == 0 and f"Using profile {name} for setting default command line arguments" in out, out[-3000:]
    code, out = dry_run("slurm", tmp_path / "empty")  # not installed: Snakemake's own error
    assert code != 0 and "no profile.yaml (or config.yaml) found" in out


def test_user_profile_dir_is_snakemakes(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    from snakemake.cli import get_profile_dir

    install()
    assert user_profile_dir() == tmp_path / "snakemake"
    assert get_profile_dir("slurm")[0].resolve() == (ROOT / "profiles" / "slurm").resolve()
