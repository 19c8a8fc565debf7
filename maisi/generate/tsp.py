"""Decoding MAISI latents for generation: the slab-streamed TSP decoder, MONAI's decode, MONAI's sliding window.

:class:`~maisi.models.tsp.TSPDecoder` (exact, memory-lean; see :mod:`maisi.models.tsp`) is the
default; MONAI's own decode (unsplit or with ``num_splits``) and MONAI's sliding-window inference
stay available through :func:`decode_latent` for comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from maisi.generate.settings import STORAGE_DTYPES, DecodeSettings
from maisi.models.tsp import TSPDecoder, prompt_host_release, split_bounds

__all__ = ["TSPDecoder", "decode_latent", "monai_decode", "sliding_window_decode", "split_bounds", "prompt_host_release"]

_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}


@contextlib.contextmanager
def _monai_splits(autoencoder: nn.Module, num_splits: int, dim_split: int) -> Iterator[None]:
    """Set MONAI's ``num_splits``/``dim_split`` on every ``MaisiConvolution`` for the duration."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    convs = [m for m in autoencoder.modules() if isinstance(m, MaisiConvolution)]
    saved = [(m.num_splits, m.dim_split) for m in convs]
    for m in convs:
        m.num_splits, m.dim_split = num_splits, dim_split
    try:
        yield
    finally:
        for m, (n, d) in zip(convs, saved, strict=True):
            m.num_splits, m.dim_split = n, d


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def _norms(autoencoder: nn.Module, device: torch.device):
    from maisi.models.networks import float32_norms

    return contextlib.nullcontext() if device.type == "cuda" else float32_norms(autoencoder)


@torch.no_grad()
def monai_decode(autoencoder: nn.Module, z: torch.Tensor, num_splits: int = 1, dim_split: int = 1) -> torch.Tensor:
    """MONAI's ``decode_stage_2_outputs`` with ``num_splits`` segments along ``dim_split`` (1 = unsplit);
    float16 autocast on CUDA (as MAISI runs it), float32 on the CPU."""
    with _monai_splits(autoencoder, num_splits, dim_split), _autocast(z.device), _norms(autoencoder, z.device):
        return autoencoder.decode_stage_2_outputs(z).float()


@torch.no_grad()
def sliding_window_decode(
    autoencoder: nn.Module, z: torch.Tensor, roi: Sequence[int], overlap: float = 0.25, device: torch.device | None = None
) -> torch.Tensor:
    """MONAI's sliding-window inference over latent windows of ``roi`` (Gaussian blending). Faster than
    nothing when memory is short, but not exact: each window has its own group-norm statistics."""
    from monai.inferers import sliding_window_inference

    device = device or z.device
    roi = [min(int(r), int(n)) for r, n in zip(roi, z.shape[2:], strict=True)]
    with _monai_splits(autoencoder, 1, 1), _autocast(device), _norms(autoencoder, device):
        out = sliding_window_inference(
            z, roi, 1, lambda w: autoencoder.decode_stage_2_outputs(w).float(), overlap=overlap, mode="gaussian",
            sw_device=device, device=z.device,
        )  # fmt: skip
    return torch.as_tensor(out).float()


def decode_latent(autoencoder: nn.Module, z: torch.Tensor, settings: DecodeSettings, progress: bool = False) -> torch.Tensor:
    """Decode ``z`` (``(1, C, x, y, z)``, already divided by the scale factor) as ``settings`` says;
    returns a float32 ``(1, 1, X, Y, Z)`` tensor on the CPU."""
    devices = settings.compute_devices()
    if settings.method == "tsp":
        storage = devices[0] if settings.storage == "device" else torch.device("cpu")
        engine = TSPDecoder(
            autoencoder, devices, axis=settings.axis, slab=settings.slab, storage=storage,
            storage_dtype=_DTYPES[settings.storage_dtype], progress=progress,
        )  # fmt: skip
        return engine.decode(z).cpu()
    autoencoder = autoencoder.to(devices[0])
    z = z.to(devices[0])
    if settings.method == "monai":
        return monai_decode(autoencoder, z, settings.num_splits, settings.dim_split).cpu()
    return sliding_window_decode(autoencoder, z, settings.roi, settings.overlap, devices[0]).cpu()
