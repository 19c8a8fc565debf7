"""Install the factory's Snakemake profiles by name, so that ``snakemake --profile slurm all`` works.

Snakemake finds a profile given by name in the working directory, then in the user's configuration
folder (``~/.config/snakemake``, or ``$XDG_CONFIG_HOME/snakemake``), then in the site's
(``/etc/xdg/snakemake``). ``python -m maisi.profiles install`` links each profile of the checkout
(``profiles/local``, ``profiles/slurm``) into the user's folder: a link, not a copy, so edits and
updates of the checkout are seen at once. Site settings (partitions, account, GPU model, largest node)
stay in the config's ``cluster`` block, not in the profile. An existing profile of the same name that
is not this checkout's link is never replaced: the command stops and names it (use ``--prefix``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PROFILES", "ProfileConflict", "checkout_profiles", "install", "installed", "uninstall", "user_profile_dir"]

#: The profiles the checkout ships, by the name they are installed under.
PROFILES = ("local", "slurm")


class ProfileConflict(RuntimeError):
    """A profile of that name exists and is not a link to this checkout's profile."""


@dataclass(frozen=True)
class Link:
    name: str
    path: Path
    target: Path


def user_profile_dir() -> Path:
    """The folder in which Snakemake looks for profiles by name for this user (Snakemake's own rule)."""
    from snakemake.common import get_appdirs

    return Path(get_appdirs().user_config_dir)


def checkout_profiles(source: Path | None = None) -> Path:
    """The checkout's ``profiles/`` folder (``source`` when given); an error names what is missing."""
    folder = Path(source) if source else Path(__file__).resolve().parents[1] / "profiles"
    missing = [
        name
        for name in PROFILES
        if not (folder / name / "profile.yaml").is_file() and not (folder / name / "config.yaml").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no profile {', '.join(missing)} there (the profiles live in the factory's checkout: "
            "pass --source /path/to/checkout/profiles)"
        )
    return folder.resolve()


def _links(dest: Path, source: Path, prefix: str) -> list[Link]:
    return [Link(prefix + name, dest / (prefix + name), source / name) for name in PROFILES]


def installed(dest: Path | None = None, source: Path | None = None, prefix: str = "") -> dict[str, bool]:
    """For each profile name: whether ``dest`` holds a link to this checkout's profile."""
    dest = Path(dest) if dest else user_profile_dir()
    links = _links(dest, checkout_profiles(source), prefix)
    return {ln.name: ln.path.is_symlink() and ln.path.resolve() == ln.target for ln in links}


def install(dest: Path | None = None, source: Path | None = None, prefix: str = "", force: bool = False) -> list[Path]:
    """Link the checkout's profiles into ``dest`` (default: Snakemake's user profile folder); returns the links.

    A link that already points at this checkout is kept. Anything else under that name stops the
    install before a link is made (``force`` replaces an existing link, never a folder or file).
    """
    dest = Path(dest) if dest else user_profile_dir()
    links = _links(dest, checkout_profiles(source), prefix)
    for ln in links:
        if not os.path.lexists(ln.path) or (ln.path.is_symlink() and ln.path.resolve() == ln.target):
            continue
        if ln.path.is_symlink() and force:
            continue
        what = f"a link to {os.readlink(ln.path)}" if ln.path.is_symlink() else "a folder or file of its own"
        hint = "--force replaces a link" if ln.path.is_symlink() else "move it away"
        raise ProfileConflict(
            f"{ln.path} is {what}, not this checkout's profile {ln.target}: {hint}, or install under "
            f"other names with --prefix (e.g. --prefix maisi- gives --profile maisi-{ln.name.removeprefix(prefix)})"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for ln in links:
        if ln.path.is_symlink() and ln.path.resolve() == ln.target:
            continue
        tmp = ln.path.with_name(f".{ln.path.name}.link-tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(ln.target, target_is_directory=True)
        os.replace(tmp, ln.path)  # atomic: the name is the old link or the new one, never missing
    return [ln.path for ln in links]


def uninstall(dest: Path | None = None, source: Path | None = None, prefix: str = "") -> list[Path]:
    """Remove the links that point at this checkout's profiles (anything else is left alone); returns them."""
    dest = Path(dest) if dest else user_profile_dir()
    removed = []
    for ln in _links(dest, checkout_profiles(source), prefix):
        if ln.path.is_symlink() and ln.path.resolve() == ln.target:
            ln.path.unlink()
            removed.append(ln.path)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maisi.profiles", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("install", "uninstall", "status"))
    parser.add_argument("--dest", type=Path, help="profile folder (default: Snakemake's user folder, ~/.config/snakemake)")
    parser.add_argument("--source", type=Path, help="the checkout's profiles/ folder (default: the one beside this package)")
    parser.add_argument("--prefix", default="", help="install as <prefix>local and <prefix>slurm")
    parser.add_argument("--force", action="store_true", help="replace existing links of the same names")
    args = parser.parse_args(argv)
    dest = args.dest or user_profile_dir()
    try:
        if args.action == "install":
            for path in install(dest, args.source, args.prefix, args.force):
                print(f"{path} -> {path.resolve()}   (snakemake --profile {path.name})")
        elif args.action == "uninstall":
            for path in uninstall(dest, args.source, args.prefix):
                print(f"removed {path}")
        else:
            for name, ok in installed(dest, args.source, args.prefix).items():
                print(f"{name}: {'installed' if ok else 'not installed'} in {dest}")
    except (ProfileConflict, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
