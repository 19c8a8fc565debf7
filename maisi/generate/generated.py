"""The generated set: all shards' case tables in one, and a mid-slice montage of the cases."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import pandas as pd

from maisi.core.tables import read_tables, write_table

__all__ = ["collect_generated", "plot_generated"]

def collect_generated(tables: Sequence[str | os.PathLike], dest: str | os.PathLike) -> pd.DataFrame:
    """Concatenate the generation shard tables (sorted by request and case) and write ``dest``."""
    from maisi.generate.shard import GENERATED_COLUMNS

    cases = read_tables(tables, GENERATED_COLUMNS)
    write_table(cases.to_dict("records"), dest, "generated", GENERATED_COLUMNS)
    return cases


def plot_generated(cases: pd.DataFrame, dest: str | os.PathLike, requests: Mapping[str, str] | None = None, max_cases: int = 12) -> None:
    """Axial, coronal and sagittal mid-slices of the generated cases with their label maps overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np

    from maisi.core.figures import mid_slices, save_figure

    ok = cases[cases.status == "ok"] if "status" in cases else cases
    shown = ok.groupby("request", group_keys=False).head(max(1, max_cases // max(ok.request.nunique(), 1))).head(max_cases)
    n = max(len(shown), 1)
    fig, axes = plt.subplots(3, n, figsize=(2.4 * n, 7.6), squeeze=False)
    for j, r in enumerate(shown.itertuples()):
        img = np.asanyarray(nib.load(r.image).dataobj).astype(np.float32)
        lab = np.asanyarray(nib.load(r.label).dataobj)
        mid_slices(axes[:, j], img, lab, json.loads(r.spacing))
        source = r.mask_source.split("/")[-1] if r.mask_source else "no mask"
        axes[0, j].set_title(f"{r.case_id}\nmask: {source}\nseed {r.seed}", fontsize=7)
    for ax in axes.ravel():
        if not ax.images:
            ax.set_axis_off()
    title = f"Generated: {len(ok)} cases" + (f" ({len(cases) - len(ok)} failed)" if len(cases) > len(ok) else "")
    if requests:
        title += "\n" + "\n".join(f"{k}: {v}" for k, v in requests.items())
    fig.suptitle(title + "\nmid-slices: axial (top), coronal (middle), sagittal (bottom)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, dest)
