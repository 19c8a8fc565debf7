"""How good is the released phantom model (variant ``phantom-ct``) at its own generation, with no fine-tuning?

The real workflow runs in a working directory of its own with a config made from the model's recipe
(``config/pretrain/phantom.yaml``): the same phantom source (name, seed, cases), so the same real phantoms
are prepared again and split the same way (the split is seeded); ``pretrained`` set to the checkpoints
under test, so no training rule runs; and two generation requests of one region pair the phantom covers
(chest to abdomen, 128x128x128 at 3 mm, as the default config's requests), ``--cases`` each:
mask-conditioned (the ControlNet on label maps of the mask database, made from the prepared training
cases) and image-only (the diffusion UNet alone). QC judges first attempts only (``qc.max_attempts: 1``,
``qc.on_fail: flag``: nothing is generated again, nothing dropped); FID uses the independent segmenter
extractor (on the request's grid, so generated volumes are read as they are); the privacy audit, utility
and label-fidelity stages are off. Only ``results/qc/cases.tsv`` and ``results/fid/fid.json`` are asked for.

Figures (all from that run's outputs; ``<out>/phantom_model.json`` holds them with their inputs):

- ``qc_pass`` / ``qc_pass_free``: share of the mask-conditioned / image-only cases whose first attempt
  passes QC (``qc_status`` ``pass`` in ``results/qc/cases.tsv``; a case generation could not make counts
  as a failure).
- Organ HU (mask-conditioned cases): for each of MAISI's QC organ groups (liver, spleen, pancreas, kidney,
  lung, bone, brain) measured in a case, the case's median HU inside the organ of its own label map (QC's
  ``medians``) minus the real reference, the **median** over the real training phantoms of their own
  organ medians (``results/qc/reference.json``, ``medians``: the training split only). Per organ, the
  median over cases of the absolute error (and of the signed error, in the table). ``organ_mae_hu`` is the
  mean over the organs of those medians; ``bone_err_hu`` is the bone's (``<out>/phantom_model_organs.tsv``).
- ``fid_ratio``: FID of the generated cases (both kinds together) over a real-vs-real floor, both region-
  and count-matched. The run's own ``fid.tsv`` compares the generated cases with *every* real phantom (all
  region pairs: heads and legs beside chest-abdomen volumes) and its floor is the even vs odd half of that
  whole set, so its ratio is above 1 for a perfect chest-abdomen generator and its floor has another count
  than the generated set; it is reported beside (``fid_all_real``), not used. Here the pool ``P`` is the
  real phantoms (both splits) of the requests' region pair, read with FID's loader and features (the run's
  segmenter, plane average). For each of ``--fid-repeats`` seeded draws, ``P`` is split into ``A`` (``k``
  cases) and the reference ``B`` (the rest), ``k = min(|P| // 2, generated cases)``, and ``k`` generated
  cases are drawn: floor = FID(A, B), FID = FID(drawn generated, B). Both are averaged over the draws, so
  the generated cases and the real stand-ins meet the same reference in the same numbers; a generator
  drawing from the real distribution scores about 1. The same is done for each kind alone.
- ``body_dice`` / ``lung_dice`` (image-only cases): FID's segmenter (trained on the real training cases
  only; ``results/fid/segmenter/segmenter.pt``) reads each case (body = any class but outside; lungs = its
  lung class) and each real phantom of the same region pair, brought to the request's grid by FID's loader
  (3 mm, centre crop / pad to 128^3). Each real reading is translated in-plane (whole voxels, x and y only)
  so its body's centroid falls on the generated body's, then the Dice is taken; the figure is the mean over
  the image-only cases of the mean over the real phantoms. A free case is no real case: this measures
  whether its body and lungs lie where, and are as large and shaped as, in real phantoms of that field of
  view. The yardstick is the same figure between distinct real phantoms of the pair
  (``body_dice_real`` / ``lung_dice_real``, printed beside): a generator whose anatomy is as plausible as a
  new real phantom's reaches about that value, not 1. So a lung Dice of 0.7 against a real-vs-real 0.8
  means lungs in roughly the right place and size, their shape or extent off by about a tenth of their
  volume more than one real phantom differs from another; far below it (e.g. 0.3) means lungs misplaced,
  much too small or large, or missing. The z position is not aligned: where the chest ends along z is
  what the region conditioning asks for. The unaligned values are in the JSON (``*_grid``).

Usage, on the model ``make pretrain PRETRAIN_DIR=<dir>`` trained (its checkpoints under
``<dir>/results/models``)::

    python benchmarks/phantom_model.py --pretrain-dir <dir> --out /tmp/phantom_model

``--models`` names another folder of ``autoencoder.pt``, ``diffusion_unet.pt`` and ``controlnet.pt``.
A small stand-in (random ``tiny`` weights, 12 real phantoms, 5 sampling steps; about 40 minutes on two busy
CPU cores, most of it FID's segmenter training), its checkpoints from ``tests/helpers/models.py``
(``save_image_checkpoints(root, variant="tiny")``, its ``diffusion.pt`` renamed ``diffusion_unet.pt``)::

    python benchmarks/phantom_model.py --models /tmp/standin --variant tiny --n-real 12 --steps 5 --cases 2 --out /tmp/pm

A finished run in ``--out`` (its QC table and FID) is not run again: the figures are recomputed from it.

The last line is machine-readable::

    phantom_model qc_pass=<rate> qc_pass_free=<rate> organ_mae_hu=<HU> bone_err_hu=<HU> fid_ratio=<fid/floor> body_dice=<d> lung_dice=<d>
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The workflow outputs the benchmark reads (nothing else is asked of the workflow).
TARGETS = ("results/qc/cases.tsv", "results/fid/fid.json")
#: The requests: one region pair the phantom covers, on the default config's grid.
MASKED, FREE = "phantom_masked", "phantom_free"
REQUEST = {"size": [128, 128, 128], "spacing": [3.0, 3.0, 3.0], "top_region": "chest", "bottom_region": "abdomen"}
MODEL_FILES = {"autoencoder": "autoencoder.pt", "diffusion": "diffusion_unet.pt", "controlnet": "controlnet.pt"}


# --- the run ---


def benchmark_config(recipe: Mapping[str, Any], models: Path, variant: str, cases: int, seed: int,
                     n_real: int | None = None, steps: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The workflow config: the recipe's data (phantom source, split, preprocessing), the given checkpoints, two
    requests of ``cases`` each, first-attempt QC, FID with the segmenter on the request grid, the rest off."""
    cfg = json.loads(json.dumps(dict(recipe)))
    cfg["run_name"] = "phantom-model-benchmark"
    catalog = Path(cfg.get("catalog", "config/datasets.yaml"))
    cfg["catalog"] = str(catalog if catalog.is_absolute() else ROOT / catalog)
    if n_real is not None:
        for source in cfg["sources"].values():
            if source.get("type") == "phantom":
                source["n_cases"] = int(n_real)
    for stage in ("train_vae", "cache_latents", "train_diffusion", "train_controlnet"):
        cfg.pop(stage, None)  # nothing trains: the checkpoints are given
    cfg.setdefault("model", {})["variant"] = variant
    cfg["pretrained"] = {role: str(models / name) for role, name in MODEL_FILES.items()}
    generate: dict[str, Any] = {"cases_per_shard": max(1, min(int(cases), 5)), "seed": int(seed)}
    if steps is not None:
        generate["steps"] = int(steps)
    generate["requests"] = {
        MASKED: {"n_cases": int(cases), **json.loads(json.dumps(REQUEST)), "masks": True},
        FREE: {"n_cases": int(cases), **json.loads(json.dumps(REQUEST)), "masks": False},
    }
    cfg["generate"] = generate
    cfg["qc"] = {"max_attempts": 1, "on_fail": "flag"}
    cfg["fid"] = {"extractors": ["segmenter"], "spacing": list(REQUEST["spacing"]), "size": list(REQUEST["size"])}
    for stage in ("privacy", "utility", "label_fidelity"):
        cfg[stage] = {"enabled": False}
    cfg.pop("release", None)
    return cfg


def run_workflow(work: Path, config: Mapping[str, Any], targets: Sequence[str] = TARGETS) -> None:
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config/config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), "--cores", "2",
           "--rerun-incomplete", *targets]  # fmt: skip
    with open(work / "snakemake.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"snakemake failed in {work} (see {work / 'snakemake.log'})")


def finished(work: Path) -> bool:
    """Whether ``work`` holds a finished run (its config, QC table and FID)."""
    return (work / "config/config.yaml").is_file() and all((work / t).is_file() for t in TARGETS)


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Keys (dotted) where two configs differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b), key=str) for d in config_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


# --- pure measures (unit-tested) ---


def organ_errors(cases: Sequence[Mapping[str, float]], real: Mapping[str, Sequence[float]], organs: Sequence[str] | None = None,
                 ranges: Mapping[str, tuple[float, float]] | None = None) -> pd.DataFrame:  # fmt: skip
    """Per organ of ``organs`` (MAISI's QC groups by default) measured in at least one case: the real reference
    (median of the real cases' organ medians ``real[organ]``), the cases' medians against it: median of the
    absolute and of the signed errors over the cases, mean absolute error, median of the case medians, and with
    ``ranges`` the share of the cases inside QC's range. ``cases`` holds one case's organ medians each."""
    if organs is None:
        from maisi.evaluate.qc import ORGAN_GROUPS

        organs = tuple(ORGAN_GROUPS)
    rows = []
    for organ in organs:
        values = np.array([float(c[organ]) for c in cases if organ in c], dtype=np.float64)
        reals = np.array([float(v) for v in real.get(organ, ())], dtype=np.float64)
        if not values.size or not reals.size:
            continue
        reference = float(np.median(reals))
        error = values - reference
        row = {"organ": organ, "n_cases": int(values.size), "n_real": int(reals.size), "real_reference_hu": reference,
               "generated_median_hu": float(np.median(values)), "median_abs_error_hu": float(np.median(np.abs(error))),
               "median_signed_error_hu": float(np.median(error)), "mean_abs_error_hu": float(np.mean(np.abs(error)))}  # fmt: skip
        if ranges is not None and organ in ranges:
            low, high = ranges[organ]
            row |= {"qc_low_hu": float(low), "qc_high_hu": float(high), "in_qc_range": float(np.mean((values >= low) & (values <= high)))}
        rows.append(row)
    return pd.DataFrame(rows)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks on one grid; NaN when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks {a.shape} and {b.shape} are not on one grid")
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else float("nan")


def shift_xy(array: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``array`` moved by whole voxels along axes 0 and 1 (what moves out is lost, what comes in is 0)."""
    out = np.zeros_like(array)
    nx, ny = array.shape[:2]
    if abs(dx) >= nx or abs(dy) >= ny:
        return out
    src_x, dst_x = slice(max(-dx, 0), nx - max(dx, 0)), slice(max(dx, 0), nx - max(-dx, 0))
    src_y, dst_y = slice(max(-dy, 0), ny - max(dy, 0)), slice(max(dy, 0), ny - max(-dy, 0))
    out[dst_x, dst_y] = array[src_x, src_y]
    return out


def centroid_shift(fixed: np.ndarray, moving: np.ndarray) -> tuple[int, int]:
    """Whole-voxel (x, y) shift that brings the centroid of mask ``moving`` onto that of ``fixed`` ((0, 0) when one is empty)."""
    if not fixed.any() or not moving.any():
        return 0, 0
    cf, cm = np.argwhere(fixed).mean(axis=0), np.argwhere(moving).mean(axis=0)
    return int(round(cf[0] - cm[0])), int(round(cf[1] - cm[1]))


def reading_dice(fixed: np.ndarray, moving: np.ndarray, lung: int | None, align: bool = True) -> dict[str, float]:
    """Dice of the body (any class > 0) and of the lungs (class ``lung``) between two segmenter readings (class
    maps on one grid); with ``align`` the ``moving`` reading is first translated in-plane so its body's centroid
    falls on ``fixed``'s."""
    if fixed.shape != moving.shape:
        raise ValueError(f"readings {fixed.shape} and {moving.shape} are not on one grid")
    if align:
        moving = shift_xy(moving, *centroid_shift(fixed > 0, moving > 0))
    out = {"body": dice(fixed > 0, moving > 0)}
    out["lung"] = dice(fixed == lung, moving == lung) if lung is not None else float("nan")
    return out


def reason_kind(reason: str) -> str:
    """A QC reason with its numbers replaced, so that reasons of one kind count together."""
    return re.sub(r"(?<![\d.])-?\d+(?:\.\d+)?", "#", reason.strip())[:120]


def split_reasons(text: str) -> list[str]:
    """A QC table's ``qc_reasons`` cell as its reasons: they are joined with "; ", and a reason of the intensity or
    one-body check ends in "; real cases <range>" itself, which stays with it."""
    out: list[str] = []
    for part in (p.strip() for p in str(text).split(";")):
        if part.startswith("real cases") and out:
            out[-1] += f"; {part}"
        elif part:
            out.append(part)
    return out


# --- reading the run ---


def _resolve(work: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else work / p


def request_kinds(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Request names by kind: ``masked`` (a label map conditions the ControlNet) and ``free`` (image only)."""
    out: dict[str, list[str]] = {"masked": [], "free": []}
    for name, r in config["generate"]["requests"].items():
        out["free" if r.get("masks", True) is False else "masked"].append(name)
    return out


def qc_figures(qc: pd.DataFrame, kinds: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Per kind: cases, first-attempt passes, pass rate, and the commonest reasons of the failures."""
    out = {}
    for kind, names in kinds.items():
        rows = qc[qc.request.isin(list(names))]
        passed = int((rows.qc_status == "pass").sum())
        reasons = Counter(reason_kind(r) for text in rows.qc_reasons[rows.qc_status != "pass"] for r in split_reasons(text))
        out[kind] = {"n_cases": int(len(rows)), "n_pass": passed, "pass_rate": passed / len(rows) if len(rows) else float("nan"),
                     "n_not_generated": int((rows.status != "ok").sum()), "reasons": dict(reasons.most_common(6))}  # fmt: skip
    return out


def _plane_fid(a: Sequence[Mapping[str, np.ndarray]], b: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    from maisi.evaluate.fid import PLANES, feature_stats, frechet_distance

    out = {}
    for plane in PLANES:
        fa = np.concatenate([f[plane] for f in a], axis=0)
        fb = np.concatenate([f[plane] for f in b], axis=0)
        out[plane] = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    out["average"] = float(np.mean([out[p] for p in PLANES]))
    return out


def matched_fid(generated: Sequence[Mapping[str, np.ndarray]], real: Sequence[Mapping[str, np.ndarray]], repeats: int, seed: int) -> dict[str, Any]:
    """FID of ``generated`` and the real-vs-real floor, both against the same real reference and in the same counts:
    per draw the real pool is split into ``k`` stand-ins and the reference (the rest), and ``k`` generated cases are
    drawn, ``k = min(len(real) // 2, len(generated))``; the plane-average FIDs are averaged over the draws."""
    k = min(len(real) // 2, len(generated))
    if k < 1:
        return {"fid": float("nan"), "floor": float("nan"), "ratio": float("nan"), "k": k, "n_reference": len(real) - k,
                "repeats": 0, "note": f"{len(real)} real and {len(generated)} generated cases: too few for a matched FID"}  # fmt: skip
    rng = np.random.default_rng(seed)
    fids, floors = [], []
    for _ in range(repeats):
        perm = rng.permutation(len(real))
        stand_in, reference = [real[i] for i in perm[:k]], [real[i] for i in perm[k:]]
        drawn = [generated[i] for i in rng.choice(len(generated), k, replace=False)]
        floors.append(_plane_fid(stand_in, reference))
        fids.append(_plane_fid(drawn, reference))
    planes = list(fids[0])
    fid = {p: float(np.mean([f[p] for f in fids])) for p in planes}
    floor = {p: float(np.mean([f[p] for f in floors])) for p in planes}
    return {"fid": fid["average"], "floor": floor["average"], "ratio": fid["average"] / floor["average"], "fid_planes": fid,
            "floor_planes": floor, "fid_sd": float(np.std([f["average"] for f in fids])),
            "floor_sd": float(np.std([f["average"] for f in floors])), "k": k, "n_reference": len(real) - k, "repeats": repeats}  # fmt: skip


def evaluate(work: Path, config: Mapping[str, Any], repeats: int, seed: int) -> dict[str, Any]:
    """Every figure of the finished run in ``work`` (made with ``config``)."""
    import torch

    from maisi.core.tables import read_table
    from maisi.evaluate.features import load_volume
    from maisi.evaluate.segmenter import SegmenterFeatures, segment_volume
    from maisi.evaluate.settings import FIDSettings

    torch.set_num_threads(2)
    kinds = request_kinds(config)
    qc = read_table(work / "results/qc/cases.tsv")
    result: dict[str, Any] = {"qc": qc_figures(qc, kinds)}

    # organ HU of the mask-conditioned cases against the real training phantoms' medians
    reference = json.loads((work / "results/qc/reference.json").read_text(encoding="utf-8"))
    real_medians: dict[str, list[float]] = {}
    for medians in reference["medians"].values():
        for organ, value in medians.items():
            real_medians.setdefault(organ, []).append(float(value))
    ranges = {organ: (float(r["low"]), float(r["high"])) for organ, r in reference["ranges"].items()}
    masked = qc[qc.request.isin(kinds["masked"]) & (qc.status == "ok")]
    case_medians = [json.loads(m) if m else {} for m in masked.medians]
    organs = organ_errors(case_medians, real_medians, ranges=ranges)
    result["organs"] = organs.to_dict("records")
    result["organ_reference"] = "median over the real training phantoms of their organ medians (results/qc/reference.json)"
    result["organ_mae_hu"] = float(organs.median_abs_error_hu.mean()) if len(organs) else float("nan")
    bone = organs[organs.organ == "bone"] if len(organs) else organs
    result["bone_err_hu"] = float(bone.median_abs_error_hu.iloc[0]) if len(bone) else float("nan")
    result["bone_signed_err_hu"] = float(bone.median_signed_error_hu.iloc[0]) if len(bone) else float("nan")

    # the run's own FID (every real phantom, even/odd halves as the floor): reported, not the headline
    fid_record = json.loads((work / "results/fid/fid.json").read_text(encoding="utf-8"))
    entry = next((e for e in fid_record.get("extractors", []) if e["extractor"]["name"] == "fid-segmenter"), None)
    if entry is not None:
        result["fid_all_real"] = {"fid": float(entry["fid"]["average"]), "floor": float(entry["real_floor"]["average"]),
                                  "n_generated": fid_record["n_generated"], "n_real": fid_record["n_real"],
                                  "note": "against every real phantom (all region pairs); floor: even vs odd half of them"}  # fmt: skip

    # region-matched FID and the segmenter's reading of the image-only cases against real phantoms of the pair
    requests = config["generate"]["requests"]
    pairs = {(r["top_region"], r["bottom_region"]) for r in requests.values()}
    if len(pairs) != 1:
        raise SystemExit(f"the requests span several region pairs {sorted(pairs)}; the benchmark compares one")
    (top, bottom), = pairs
    prepared = read_table(work / "results/prepared/cases.tsv")
    pool = prepared[(prepared.top_region == top) & (prepared.bottom_region == bottom)].sort_values("case_id")
    fid_settings = FIDSettings.from_config(config)
    segmenter = work / "results/fid/segmenter/segmenter.pt"
    extractor = SegmenterFeatures(segmenter, fid_settings)
    lung = extractor.classes.index("lung") if "lung" in extractor.classes else None
    features: dict[str, dict[str, np.ndarray]] = {}
    readings: dict[str, np.ndarray] = {}
    generated = qc[qc.status == "ok"]
    free_ids = set(generated.case_id[generated.request.isin(kinds["free"])])
    jobs = [(r.case_id, _resolve(work, r.image), r.case_id in free_ids) for r in generated.itertuples()]
    jobs += [(f"real:{r.case_id}", _resolve(work, r.image_hu), True) for r in pool.itertuples()]  # HU, as FID reads them
    t0 = time.perf_counter()
    for key, path, read in jobs:
        volume = load_volume(path, fid_settings)
        features[key] = extractor.plane_features(volume)
        if read:
            readings[key] = segment_volume(extractor.model, volume, extractor.device, fid_settings.batch_size)
    real_keys = [f"real:{c}" for c in pool.case_id]
    print(f"features and readings of {len(jobs)} volumes: {time.perf_counter() - t0:.0f} s")
    sets = {"all": list(generated.case_id), **{kind: list(generated.case_id[generated.request.isin(names)]) for kind, names in kinds.items()}}
    result["fid"] = {kind: matched_fid([features[c] for c in ids], [features[k] for k in real_keys], repeats, seed) for kind, ids in sets.items()}
    result["fid"]["pool"] = {"region_pair": [top, bottom], "real_cases": list(pool.case_id), "splits": dict(Counter(pool.split))}

    per_case = {}
    for case in sorted(free_ids):
        scores = {align: [reading_dice(readings[case], readings[k], lung, align) for k in real_keys] for align in (True, False)}
        per_case[case] = {f"{part}{'' if align else '_grid'}": float(np.nanmean([s[part] for s in scores[align]])) if scores[align] else float("nan")
                          for align in (True, False) for part in ("body", "lung")}  # fmt: skip
    real_pairs = [(a, b) for i, a in enumerate(real_keys) for b in real_keys[i + 1 :]]
    yardstick = {}
    for align in (True, False):
        scores = [reading_dice(readings[a], readings[b], lung, align) for a, b in real_pairs]
        for part in ("body", "lung"):
            yardstick[f"{part}{'' if align else '_grid'}"] = float(np.nanmean([s[part] for s in scores])) if scores else float("nan")
    summary = {key: float(np.nanmean([c[key] for c in per_case.values()])) if per_case else float("nan") for key in ("body", "lung", "body_grid", "lung_grid")}
    trained = json.loads((segmenter.parent / "segmenter.pt.json").read_text(encoding="utf-8"))
    result["dice"] = {"free": summary, "real_vs_real": yardstick, "n_free": len(per_case), "n_real": len(real_keys), "n_real_pairs": len(real_pairs),
                      "per_case": per_case, "segmenter_training_dice": {k: trained.get("dice_training_cases", {}).get(k) for k in ("body", "lung")}}  # fmt: skip
    return result


def same_real_cases(work: Path, pretrain: Path) -> bool | None:
    """Whether the run's prepared phantoms are the pretraining's (case ids, splits, regions); None when it has none."""
    from maisi.core.tables import read_table

    theirs = pretrain / "results/prepared/cases.tsv"
    if not theirs.is_file():
        return None
    cols = ["source", "case_id", "split", "top_region", "bottom_region"]
    key = lambda t: sorted(map(tuple, t[cols].to_numpy().tolist()))  # noqa: E731
    return key(read_table(work / "results/prepared/cases.tsv")) == key(read_table(theirs))


# --- report ---


def _fmt(v: float, digits: int = 3) -> str:
    return "nan" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def report(result: Mapping[str, Any], organs: pd.DataFrame) -> str:
    lines = ["", "QC, first attempts (no regeneration):"]
    for kind, q in result["qc"].items():
        lines.append(f"  {kind:7s} {q['n_pass']:3d} / {q['n_cases']:3d} pass ({_fmt(q['pass_rate'])}); not generated {q['n_not_generated']}")
        for reason, n in q["reasons"].items():
            lines.append(f"           {n:3d} x {reason}")
    lines += ["", f"Organ median HU of the mask-conditioned cases against the real reference ({result['organ_reference']}):"]
    if len(organs):
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            lines.append(organs.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    lines.append(f"  organ_mae_hu (mean over organs of the median |error|) {_fmt(result['organ_mae_hu'], 1)}; bone "
                 f"{_fmt(result['bone_err_hu'], 1)} (signed {_fmt(result['bone_signed_err_hu'], 1)})")
    pool = result["fid"]["pool"]
    lines += ["", f"FID (segmenter features, plane average), region-matched ({' -> '.join(pool['region_pair'])}: {len(pool['real_cases'])} real phantoms, "
                  f"splits {pool['splits']}):"]  # fmt: skip
    for kind in ("all", "masked", "free"):
        f = result["fid"][kind]
        lines.append(f"  {kind:7s} FID {_fmt(f['fid'])}  floor {_fmt(f['floor'])}  ratio {_fmt(f['ratio'], 2)}  ({f['k']} vs {f['n_reference']} real, "
                     f"{f['repeats']} draws)")  # fmt: skip
    if "fid_all_real" in result:
        w = result["fid_all_real"]
        lines.append(f"  the run's fid.tsv (against all {w['n_real']} real phantoms, any region): FID {_fmt(w['fid'])}  floor {_fmt(w['floor'])}")
    d = result["dice"]
    lines += ["", f"Segmenter reading of the image-only cases against the {d['n_real']} real phantoms of the pair (Dice, in-plane centroid-aligned; "
                  "unaligned in brackets):"]  # fmt: skip
    for part in ("body", "lung"):
        lines.append(f"  {part:5s} generated {_fmt(d['free'][part])} ({_fmt(d['free'][part + '_grid'])})   real vs real {_fmt(d['real_vs_real'][part])} "
                     f"({_fmt(d['real_vs_real'][part + '_grid'])}, {d['n_real_pairs']} pairs)   segmenter on its training cases {_fmt(d['segmenter_training_dice'][part] or float('nan'))}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-dir", default=str(ROOT / "pretrain/phantom"), help="make pretrain's PRETRAIN_DIR (default: the Makefile's)")
    p.add_argument("--models", help="folder of autoencoder.pt, diffusion_unet.pt, controlnet.pt (default: <pretrain-dir>/results/models)")
    p.add_argument("--variant", default="phantom-ct")
    p.add_argument("--recipe", default=str(ROOT / "config/pretrain/phantom.yaml"))
    p.add_argument("--out", required=True, help="working directory of the run (a finished run there is reused)")
    p.add_argument("--cases", type=int, default=20, help="cases per request kind (mask-conditioned, image-only)")
    p.add_argument("--seed", type=int, default=0, help="generation seed, and the seed of the FID draws")
    p.add_argument("--n-real", type=int, help="override the phantom source's n_cases (small stand-in runs)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the variant's)")
    p.add_argument("--fid-repeats", type=int, default=20, help="draws of the matched FID and its floor")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    pretrain = Path(args.pretrain_dir).resolve()
    models = Path(args.models).resolve() if args.models else pretrain / "results/models"
    recipe = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
    config = benchmark_config(recipe, models, args.variant, args.cases, args.seed, args.n_real, args.steps)
    wall = None
    if finished(out):
        existing = yaml.safe_load((out / "config/config.yaml").read_text(encoding="utf-8"))
        differ = config_differences(existing, config)
        if differ:
            print(f"note: {out} holds a finished run made with another config ({', '.join(differ)}); its figures are recomputed as it is")
        config = existing
        print(f"reusing the finished run in {out}")
    else:
        missing = [str(models / f) for f in MODEL_FILES.values() if not (models / f).is_file()]
        if missing:
            raise SystemExit(f"checkpoints not found: {', '.join(missing)} (--models or --pretrain-dir)")
        out.mkdir(parents=True, exist_ok=True)
        print(f"running the workflow in {out} (log: {out / 'snakemake.log'})", flush=True)
        t0 = time.perf_counter()
        run_workflow(out, config)
        wall = time.perf_counter() - t0
        print(f"workflow: {wall / 60:.1f} min")
    result = evaluate(out, config, args.fid_repeats, args.seed)
    organs = pd.DataFrame(result["organs"])
    organs.to_csv(out / "phantom_model_organs.tsv", sep="\t", index=False, float_format="%.2f")
    same = same_real_cases(out, pretrain) if args.n_real is None else None
    free = result["dice"]["free"]
    figures = {
        "qc_pass": result["qc"]["masked"]["pass_rate"], "qc_pass_free": result["qc"]["free"]["pass_rate"],
        "organ_mae_hu": result["organ_mae_hu"], "bone_err_hu": result["bone_err_hu"], "fid_ratio": result["fid"]["all"]["ratio"],
        "body_dice": free["body"], "lung_dice": free["lung"],
    }  # fmt: skip
    record = {"figures": figures, **result, "run": {"work": str(out), "models": config["pretrained"], "variant": config["model"]["variant"],
              "workflow_wall_s": wall, "same_real_cases_as_pretrain": same, "arguments": vars(args)}}  # fmt: skip
    (out / "phantom_model.json").write_text(json.dumps(record, indent=1, default=float), encoding="utf-8")
    req = config["generate"]["requests"]
    first = next(iter(req.values()))
    counts = ", ".join(f"{name} {r['n_cases']}" for name, r in req.items())
    steps = config["generate"].get("steps") or "the variant's"
    print(f"phantom model: variant {config['model']['variant']}, {first['top_region']} -> {first['bottom_region']} "
          f"{'x'.join(map(str, first['size']))} at {'x'.join(map(str, first['spacing']))} mm, {counts}; sampling steps {steps}")  # fmt: skip
    if same is False:
        print("warning: the prepared real phantoms differ from the pretraining's (case ids, splits or regions)")
    print(report(result, organs))
    print(f"tables: {out / 'phantom_model.json'}, {out / 'phantom_model_organs.tsv'}")
    print("phantom_model " + " ".join(f"{k}={_fmt(v, 1 if k.endswith('_hu') else 3)}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
