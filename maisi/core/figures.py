"""Figure helpers shared by the stages' pictures: atomic PNG output and mid-slice views with label overlays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from maisi.core.io import atomic_path  # noqa: E402

__all__ = ["overlay", "save_figure", "mid_slices"]

def save_figure(fig, dest) -> None:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def overlay(ax, img: np.ndarray, lab: np.ndarray | None, aspect: float) -> None:
    # Arrays are RAS; flip x so the patient's right is on the viewer's left (radiological convention).
    img = img[::-1]
    lab = None if lab is None else lab[::-1]
    ax.imshow(img.T, cmap="gray", vmin=-1000, vmax=1000, origin="lower", aspect=aspect, interpolation="nearest")
    if lab is not None:
        masked = np.ma.masked_where((lab == 0) | (lab == 200), lab).T
        ax.imshow(masked, cmap="tab20", alpha=0.45, origin="lower", aspect=aspect, interpolation="nearest", vmin=0, vmax=132)
    ax.set_axis_off()


def mid_slices(axes, img: np.ndarray, lab: np.ndarray | None, spacing) -> None:
    """Axial, coronal and sagittal mid-slices of a RAS volume on three axes, labels overlaid."""
    sx, sy, sz = (float(v) for v in spacing)
    x, y, z = (s // 2 for s in img.shape)
    overlay(axes[0], img[:, :, z], None if lab is None else lab[:, :, z], aspect=sy / sx)
    overlay(axes[1], img[:, y, :], None if lab is None else lab[:, y, :], aspect=sz / sx)
    overlay(axes[2], img[x, :, :][::-1], None if lab is None else lab[x, :, :][::-1], aspect=sz / sy)
