"""Publishing a model the factory trained as a released model: its three checkpoints in the package, a model card,
and their entries in the weights catalog (so that they load as NVIDIA's do: catalog, digest check, ``pretrained`` or
``init_from``; see :mod:`maisi.models.weights`).

The model card (``card.json`` and ``MODEL_CARD.md`` beside the checkpoints) says what a user of a released model
asks: the recipe (the config the workflow trained it with, and its digest), the training data (the sources, the
training and held-out cases and a digest of the prepared files), each stage's steps, losses, time and hardware, the
quality figures measured on its own generation (``benchmarks/phantom_model.py``), the files' digests and the licence.

Command line (after ``make pretrain``)::

    python -m maisi.release.model publish --workdir pretrain/phantom [--quality <out>/phantom_model.json --montage <png>]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from maisi.core.io import atomic_path, read_json, sha256_file, write_json
from maisi.core.tables import read_table

__all__ = ["CHECKPOINTS", "LICENCE", "model_card", "card_markdown", "catalog_entries", "update_catalog", "publish", "main"]

#: Catalog role -> (file name in the workflow's results/models and in the package, training stage).
CHECKPOINTS = {"autoencoder": ("autoencoder.pt", "train_vae"), "diffusion": ("diffusion_unet.pt", "train_diffusion"),
               "controlnet": ("controlnet.pt", "train_controlnet")}  # fmt: skip

#: The licence of the factory's own released models: the factory's, since they are trained on procedural phantoms
#: that the factory generates (no patient data, no third-party weights).
LICENCE = "Apache-2.0"


def _package_data() -> Path:
    return Path(str(resources.files("maisi.data")))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _benchmark(workdir: Path, stage: str) -> dict[str, float]:
    """The stage's last job as Snakemake's benchmark file measured it (wall and CPU seconds, peak memory)."""
    path = workdir / "results/benchmarks" / f"{stage}.tsv"
    if not path.is_file():
        return {}
    row = pd.read_csv(path, sep="\t").iloc[-1]
    return {"last_job_wall_s": round(float(row["s"]), 1), "last_job_cpu_s": round(float(row["cpu_time"]), 1),
            "last_job_max_rss_mb": round(float(row["max_rss"]), 1)}  # fmt: skip


def _data_digest(workdir: Path, rows: pd.DataFrame) -> str:
    """sha256 over each case's id and the sha256 of its prepared image and label map (none for a case without one), in
    case order."""
    h = hashlib.sha256()
    for r in rows.sort_values("case_id").itertuples():
        label = sha256_file(workdir / r.label) if r.label else ""
        h.update(f"{r.case_id}\t{sha256_file(workdir / r.image)}\t{label}\n".encode())
    return h.hexdigest()


def model_card(workdir: str | os.PathLike, quality: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model card of the models a workflow run trained in ``workdir`` (its ``config/config.yaml`` is the recipe)."""
    workdir = Path(workdir)
    recipe_path = workdir / "config/config.yaml"
    recipe_text = recipe_path.read_text(encoding="utf-8")
    recipe = yaml.safe_load(recipe_text)
    variant_name = recipe["model"]["variant"]
    cases = read_table(workdir / "results/prepared/cases.tsv")
    training, held_out = cases[cases["split"] != "held_out"], cases[cases["split"] == "held_out"]
    stages: dict[str, Any] = {}
    for role, (name, stage) in CHECKPOINTS.items():
        sidecar = read_json(workdir / "results/models" / f"{name}.json")
        settings = sidecar.get("settings", {})
        stages[role] = {
            "stage": stage, "steps": settings.get("steps"), "settings": settings, "metrics": sidecar.get("metrics", {}),
            "train_seconds": sidecar.get("train_seconds"), "device": sidecar.get("device"), "cases": sidecar.get("cases"),
            "sha256_trained": sidecar.get("sha256"), "versions": sidecar.get("provenance", {}).get("versions", {}),
            **_benchmark(workdir, stage),
        }  # fmt: skip
    seconds = [s["train_seconds"] for s in stages.values() if s["train_seconds"] is not None]
    return {
        "name": variant_name,
        "variant": variant_name,
        "licence": LICENCE,
        "intended_use": "A starting point to fine-tune (init_from) or generate from, at the phantom's scale: the factory's "
                        "embedded default and tests. Trained on procedural phantoms only: not a model of patients' anatomy.",
        "recipe": {"file": "config/pretrain/phantom.yaml", "sha256": hashlib.sha256(recipe_text.encode()).hexdigest(), "config": recipe},
        "training_data": {
            "sources": recipe["sources"], "run_seed": recipe.get("seed", 0), "held_out_fraction": recipe.get("dataset", {}).get("held_out"),
            "n_training": len(training), "n_held_out": len(held_out),
            "training_cases": sorted(training["case_id"]), "held_out_cases": sorted(held_out["case_id"]),
            "region_pairs": {f"{t}-{b}": int(n) for (t, b), n in training.groupby(["top_region", "bottom_region"]).size().items()},
            "digest": _data_digest(workdir, cases),
        },
        "training": {"stages": stages, "total_train_seconds": round(sum(seconds), 1) if seconds else None,
                     "hardware": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": f"{platform.system()}-{platform.machine()}"}},  # fmt: skip
        "quality": dict(quality or {}),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, float) else ("n/a" if value is None else str(value))


def card_markdown(card: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> str:
    """The card as Markdown (``MODEL_CARD.md``)."""
    data, training, quality = card["training_data"], card["training"], card.get("quality") or {}
    name = card["name"]
    lines = [
        f"# Model card: {name}", "",
        f"The factory's released `{name}` model: an autoencoder, a latent diffusion UNet (rectified flow, conditioned on spacing "
        "and top/bottom body region) and a ControlNet (conditioned on MAISI label maps), trained by the factory's own workflow.",
        "", f"**Intended use.** {card['intended_use']}", "", f"**Licence.** {card['licence']}.", "",
        "## Use", "", "```yaml", "model:", f"  variant: {name}", "pretrained:", f"  autoencoder: catalog:{name}",
        "train_diffusion:", f"  init_from: catalog:{name}     # fine-tune; or pretrained.diffusion: catalog:" + name,
        "train_controlnet:", f"  init_from: catalog:{name}", "```", "",
        "## Training data", "",
        f"{data['n_training']} training and {data['n_held_out']} held-out cases (never trained on) of the phantom source(s) "
        f"{', '.join(f'`{k}`' for k in data['sources'])} (run seed {data['run_seed']}); region pairs of the training cases: "
        + ", ".join(f"{k} {v}" for k, v in data["region_pairs"].items()) + f". Digest of the prepared cases: `{data['digest']}`.",
        "", "## Recipe", "", f"`{card['recipe']['file']}` (sha256 `{card['recipe']['sha256']}`), run with `make pretrain`.", "",
        "| stage | steps | final loss | training time | device | last job CPU time |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for role, s in training["stages"].items():
        loss = s["metrics"].get("final_l1", s["metrics"].get("final_loss"))
        hours = f"{s['train_seconds'] / 3600:.2f} h" if s.get("train_seconds") else "n/a"
        cpu = f"{s['last_job_cpu_s'] / 3600:.2f} h" if s.get("last_job_cpu_s") else "n/a"
        lines.append(f"| {role} ({s['stage']}) | {s['steps']} | {_fmt(loss)} | {hours} | {s.get('device') or 'n/a'} | {cpu} |")
    hw = training["hardware"]
    lines += ["", f"Hardware: {hw['cpu']} ({hw['cpu_count']} cores), {hw['platform']}. Training time is summed over every "
              "run a resumed training spans.", "", "## Quality", ""]  # fmt: skip
    if quality:
        figures = quality.get("figures") or {k: v for k, v in quality.items() if not isinstance(v, (dict, list))}
        lines += ["Measured on the model's own generation, without fine-tuning (`benchmarks/phantom_model.py`):", ""]
        lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in figures.items() if not isinstance(v, (dict, list))]
        organs = quality.get("organs") or []
        if organs:
            lines += ["", "| organ | cases | real median HU | generated median HU | median abs. error HU | share in QC range |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            lines += [f"| {o['organ']} | {o['n_cases']} | {_fmt(o['real_reference_hu'])} | {_fmt(o['generated_median_hu'])} | "
                      f"{_fmt(o['median_abs_error_hu'])} | {_fmt(o['in_qc_range'])} |" for o in organs]  # fmt: skip
        if quality.get("montage"):
            lines += ["", "![generated cases](montage.png)"]
    else:
        lines += ["Not measured yet: run `benchmarks/phantom_model.py` and publish again with `--quality`."]
    lines += ["", "## Files", "", "| role | file | bytes | sha256 |", "|---|---|---|---|"]
    lines += [f"| {role} | `{f['path']}` | {f['size_bytes']} | `{f['sha256']}` |" for role, f in files.items()]
    return "\n".join(lines) + "\n"


def catalog_entries(variant_name: str, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The weights catalog's lines (flow mappings, as the catalog writes every entry) for a published model."""
    return [f"  - {{repo: package, path: {f['path']}, variants: [{variant_name}], role: {role}, sha256: {f['sha256']}, "
            f"size_bytes: {f['size_bytes']}, licence: {LICENCE}}}" for role, f in files.items()]  # fmt: skip


def update_catalog(path: str | os.PathLike, variant_name: str, files: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace the catalog's package entries of ``variant_name`` by ``files`` (other lines, comments included, stay)."""
    path = Path(path)
    mine = f"variants: [{variant_name}], "
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if not ("repo: package," in line and mine in line)]
    text = "\n".join(kept + catalog_entries(variant_name, files)) + "\n"
    yaml.safe_load(text)  # still a catalog
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def publish(
    workdir: str | os.PathLike,
    *,
    data_root: str | os.PathLike | None = None,
    catalog: str | os.PathLike | None = None,
    quality: Mapping[str, Any] | None = None,
    montage: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Copy the three checkpoints a workflow run trained in ``workdir`` into ``<data_root>/weights/<variant>/`` (the
    package's data folder by default) after loading each strictly into its variant's network; write the model card
    there and the catalog entries into ``catalog`` (the package's ``weights.yaml`` by default). Returns the card."""
    from maisi.models.checkpoints import load_autoencoder, load_controlnet, load_diffusion

    workdir = Path(workdir)
    data_root = Path(data_root) if data_root is not None else _package_data()
    catalog = Path(catalog) if catalog is not None else data_root / "weights.yaml"
    card = model_card(workdir, quality)
    variant_name = card["variant"]
    models = workdir / "results/models"
    for loader, (name, _) in zip((load_autoencoder, load_diffusion, load_controlnet), CHECKPOINTS.values(), strict=True):
        loader(models / name, variant_name)  # fits the variant, strictly
    dest = data_root / "weights" / variant_name
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    for role, (name, _) in CHECKPOINTS.items():
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(models / name, tmp)
        files[role] = {"path": f"weights/{variant_name}/{name}", "sha256": sha256_file(dest / name), "size_bytes": (dest / name).stat().st_size}
    if montage is not None:
        with atomic_path(dest / "montage.png") as tmp:
            shutil.copyfile(montage, tmp)
        card["quality"]["montage"] = "montage.png"
    card["files"] = files
    write_json(dest / "card.json", card)
    with atomic_path(dest / "MODEL_CARD.md") as tmp:
        Path(tmp).write_text(card_markdown(card, files), encoding="utf-8")
    update_catalog(catalog, variant_name, files)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maisi.release.model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="copy a trained model into the package with its card and catalog entries")
    pub.add_argument("--workdir", required=True, help="the folder make pretrain ran the workflow in (PRETRAIN_DIR)")
    pub.add_argument("--quality", help="the quality benchmark's JSON (benchmarks/phantom_model.py)")
    pub.add_argument("--montage", help="a montage of generated cases to show on the card")
    args = parser.parse_args(argv)
    try:
        quality = json.loads(Path(args.quality).read_text(encoding="utf-8")) if args.quality else None
        card = publish(args.workdir, quality=quality, montage=args.montage)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for role, f in card["files"].items():
        print(f"{role}: maisi/data/{f['path']} ({f['size_bytes']} bytes, sha256 {f['sha256']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
