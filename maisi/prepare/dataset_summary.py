"""Pictures of the prepared dataset: dims and spacings (like MAISI's Fig. S1) and a mid-slice montage."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import matplotlib

from maisi.core.figures import overlay, save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from maisi.core.anatomy import BODY_REGIONS  # noqa: E402
from maisi.core.io import write_text  # noqa: E402
from maisi.core.provenance import provenance  # noqa: E402

__all__ = ["plot_dims_spacing", "plot_montage", "write_summary_html"]

_AXES = ("x", "y", "z")


def plot_dims_spacing(cases: pd.DataFrame, dest: str | os.PathLike) -> None:
    """Histograms of prepared dims and spacings per axis, plus the body-region pairs."""
    dims = np.array([json.loads(d) for d in cases.dim]) if len(cases) else np.zeros((0, 3))
    spac = np.array([json.loads(s) for s in cases.spacing]) if len(cases) else np.zeros((0, 3))
    orig = np.array([json.loads(s) for s in cases.orig_spacing]) if len(cases) else np.zeros((0, 3))
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for i, ax_name in enumerate(_AXES):
        ax = axes[0, i]
        values, counts = np.unique(dims[:, i], return_counts=True) if len(dims) else ([], [])
        ax.bar([str(int(v)) for v in values], counts, color="tab:blue")
        ax.set_title(f"prepared dim {ax_name} (voxels)")
        ax.set_ylabel("cases")
        ax = axes[1, i]
        if len(spac):
            bins = np.linspace(0, max(float(spac[:, i].max()), float(orig[:, i].max())) * 1.05 + 1e-6, 20)
            ax.hist(orig[:, i], bins=bins, alpha=0.5, label="original", color="tab:gray")
            ax.hist(spac[:, i], bins=bins, alpha=0.7, label="prepared", color="tab:orange")
            ax.legend()
        ax.set_title(f"spacing {ax_name} (mm)")
    ax = axes[0, 3]
    grid = np.zeros((4, 4), dtype=int)
    for t, b in zip(cases.get("top_region", []), cases.get("bottom_region", []), strict=True):
        grid[BODY_REGIONS.index(t), BODY_REGIONS.index(b)] += 1
    ax.imshow(grid, cmap="Blues")
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, str(v), ha="center", va="center")
    short = ["head-neck", "chest", "abdomen", "lower body"]
    ax.set_xticks(range(4), short, rotation=45)
    ax.set_yticks(range(4), short)
    ax.set_xlabel("bottom region")
    ax.set_ylabel("top region")
    ax.set_title("body regions (cases)")
    ax = axes[1, 3]
    for src, grp in cases.groupby("source") if len(cases) else []:
        fov = np.array([np.array(json.loads(d)) * np.array(json.loads(s)) for d, s in zip(grp.dim, grp.spacing, strict=True)])
        ax.scatter(fov[:, 0], fov[:, 2], label=src, s=25)
    ax.set_xlabel("field of view x (mm)")
    ax.set_ylabel("field of view z (mm)")
    ax.set_title("field of view")
    if len(cases):
        ax.legend(fontsize=8)
    fig.suptitle(f"Prepared dataset: {len(cases)} cases")
    fig.tight_layout()
    save_figure(fig, dest)


def plot_montage(cases: pd.DataFrame, dest: str | os.PathLike, max_cases: int = 12) -> None:
    """Axial and coronal mid-slices (HU window [-1000, 1000]) with label overlays, one column per case."""
    shown = cases.head(max_cases)
    n = max(len(shown), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False)
    for j, r in enumerate(shown.itertuples()):
        path = r.image_hu or r.image
        img = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
        if not r.image_hu:
            img = img * 2000.0 - 1000.0
        lab = np.asanyarray(nib.load(r.label).dataobj) if r.label else None
        sx, sy, sz = json.loads(r.spacing)
        z, y = img.shape[2] // 2, img.shape[1] // 2
        overlay(axes[0, j], img[:, :, z], None if lab is None else lab[:, :, z], aspect=sy / sx)
        overlay(axes[1, j], img[:, y, :], None if lab is None else lab[:, y, :], aspect=sz / sx)
        origin = getattr(r, "label_source", "") or "no labels"
        axes[0, j].set_title(f"{r.case_id}\n{r.top_region}->{r.bottom_region}\n{origin}", fontsize=8)
    for ax in axes.ravel()[2 * len(shown):]:
        ax.set_axis_off()
    fig.suptitle("Mid-slices: axial (top) and coronal (bottom), labels overlaid")
    fig.tight_layout()
    save_figure(fig, dest)


def _img_tag(path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img style="max-width:100%" src="data:image/png;base64,{data}"/>'


def write_summary_html(cases: pd.DataFrame, rejected: pd.DataFrame, figures: list, dest, run_name: str) -> None:
    """One self-contained HTML page: figures, the case table and the rejected cases."""
    prov = provenance("dataset_summary")
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v != "absent")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Prepared dataset</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>",
        f"<h1>Prepared dataset &mdash; run {html.escape(run_name)}</h1>",
        f"<p>{len(cases)} cases prepared, {len(rejected)} rejected. Produced {prov['created_utc']} with {html.escape(versions)}.</p>",
    ]
    if len(cases) and "label_source" in cases:
        counts = cases.label_source.replace("", "none").value_counts().sort_index()
        parts.append("<p>Label maps by origin: " + ", ".join(f"{html.escape(k)}: {v}" for k, v in counts.items()) + ".</p>")
    parts += [_img_tag(f) for f in figures]
    parts += ["<h2>Cases</h2>", cases.drop(columns=["image", "image_hu", "label"], errors="ignore").to_html(index=False)]
    parts += ["<h2>Rejected cases</h2>", rejected.to_html(index=False) if len(rejected) else "<p>None.</p>"]
    parts.append("</body></html>")
    write_text(dest, "\n".join(parts))
