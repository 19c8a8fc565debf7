"""Checkpoints in the released files' layout, so NVIDIA's weights load unchanged.

autoencoder = a plain state dict (or ``{"autoencoder_state_dict": ...}``); diffusion =
``{"unet_state_dict", "scale_factor", "num_train_timesteps"}``; ControlNet = ``{"controlnet_state_dict"}``.
All are read with ``torch.load(..., weights_only=True)``. The factory's own checkpoints also record
their ``variant``; for a released file without that record the variant is recognised from its
weights' names and shapes, so a config/checkpoint mismatch says which variant each looks like.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from maisi.models.networks import (
    build_autoencoder,
    build_controlnet,
    build_diffusion_unet,
    build_mask_autoencoder,
    build_mask_diffusion,
)
from maisi.models.variants import VARIANTS, Variant, variant

__all__ = [
    "CheckpointError", "read_checkpoint", "load_weights", "load_autoencoder", "load_diffusion", "diffusion_scheduler", "load_controlnet",
    "recognise_variants", "load_mask_models", "load_parent",
]  # fmt: skip

_BUILDERS = {"autoencoder": build_autoencoder, "diffusion UNet": build_diffusion_unet, "ControlNet": build_controlnet}


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit the chosen variant; the message names the file."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return dict(data)


def _state_dict(data: Mapping[str, Any], keys: Sequence[str], path) -> Mapping[str, torch.Tensor]:
    for key in keys:
        if key in data and isinstance(data[key], Mapping):
            return data[key]
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data  # a plain state dict
    raise CheckpointError(f"{path}: no state dict under {' / '.join(repr(k) for k in keys)} and not a plain state dict")


@functools.cache
def _shapes(what: str, variant_name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = _BUILDERS[what](variant_name)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def recognise_variants(state: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """The shipped variants whose ``what`` network (``autoencoder``, ``diffusion UNet``, ``ControlNet``)
    has exactly these weight names and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return [name for name in VARIANTS if _shapes(what, name) == shapes]


def _check_recorded(data: Mapping[str, Any], variant_name: str, path, what: str) -> None:
    recorded = data.get("variant")
    if isinstance(recorded, str) and recorded != variant_name:
        raise CheckpointError(f"{path}: the {what} checkpoint records variant {recorded!r}, but model.variant is {variant_name!r}; "
                              f"set model.variant: {recorded}")  # fmt: skip


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path, what: str, variant_name: str | None = None) -> None:
    """Load ``state`` strictly; a key or shape mismatch is a :class:`CheckpointError` that lists it and,
    given the configured ``variant_name``, says which shipped variant the weights fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            k, got, want = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {got}, variant {want})")
        hint = ""
        if variant_name is not None and what in _BUILDERS:
            fits = recognise_variants(state, what)
            hint = (f"; the weights look like variant {' or '.join(repr(f) for f in fits)}: set model.variant: {fits[0]}" if fits
                    else "; they fit none of the shipped variants (" + ", ".join(VARIANTS) + ")")  # fmt: skip
        configured = f" {variant_name!r}" if variant_name else ""
        raise CheckpointError(f"{path}: the {what} checkpoint does not fit the chosen variant{configured}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=True)


#: Where each network's weights lie in a checkpoint dict.
_STATE_KEYS = {"autoencoder": ("autoencoder_state_dict", "state_dict"), "diffusion UNet": ("unet_state_dict",),
               "ControlNet": ("controlnet_state_dict",)}  # fmt: skip


def _read_into(model: torch.nn.Module, path, what: str, variant_name: str) -> tuple[Mapping[str, Any], Mapping[str, torch.Tensor]]:
    """Read a checkpoint, check its recorded variant, load its ``what`` weights strictly into ``model``; returns
    ``(checkpoint, state dict)`` (the same object for a plain state dict)."""
    data = read_checkpoint(path)
    _check_recorded(data, variant_name, path, what)
    state = _state_dict(data, _STATE_KEYS[what], path)
    load_weights(model, state, path, what, variant_name)
    return data, state


def load_autoencoder(path, variant_name: str):
    model = build_autoencoder(variant_name)
    _read_into(model, path, "autoencoder", variant_name)
    return model


def load_diffusion(path, variant_name: str):
    """(unet, scale_factor, num_train_timesteps) from a diffusion checkpoint."""
    unet = build_diffusion_unet(variant_name)
    data, _ = _read_into(unet, path, "diffusion UNet", variant_name)
    if "scale_factor" not in data:
        raise CheckpointError(f"{path}: the diffusion checkpoint has no 'scale_factor'")
    scale = float(torch.as_tensor(data["scale_factor"]).reshape(-1)[0])
    return unet, scale, int(data.get("num_train_timesteps", 1000))


def diffusion_scheduler(path: str | os.PathLike, default: str) -> str:
    """The scheduler a diffusion checkpoint was trained with: its record, else ``default`` (the variant's:
    NVIDIA's released files do not record it)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip checkpoint: mmap is unsupported
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    return str(data.get("scheduler", default)) if isinstance(data, Mapping) else default


def load_controlnet(path, variant_name: str):
    controlnet = build_controlnet(variant_name)
    _read_into(controlnet, path, "ControlNet", variant_name)
    return controlnet


def load_parent(
    model: torch.nn.Module, path: str | os.PathLike, what: str, variant_name: str, key: str | None = None
) -> dict[str, Any]:
    """Fine-tuning: load a parent checkpoint's ``what`` weights (``diffusion UNet``, ``ControlNet`` or ``autoencoder``;
    the factory's layout or NVIDIA's) strictly into ``model``; returns the checkpoint's other entries (e.g. its
    ``scale_factor``).

    A file of another variant (recorded in the file, or weights that do not fit ``variant_name``) is a
    :class:`CheckpointError` naming the file, the variant it holds and the configured one (and the config ``key``
    that named the file, when given).
    """
    if what not in _STATE_KEYS:
        raise ValueError(f"unknown network {what!r}; expected one of {', '.join(_STATE_KEYS)}")
    keys = _STATE_KEYS[what]
    try:
        data, state = _read_into(model, path, what, variant_name)
    except CheckpointError as exc:
        if key is None:
            raise
        raise CheckpointError(f"config key {key!r}: {exc}") from None
    return {} if state is data else {k: v for k, v in data.items() if k not in keys}  # a plain state dict holds nothing else


def load_mask_models(autoencoder_path, diffusion_path, var: str | Variant):
    """NVIDIA's mask-generation models: (autoencoder, diffusion UNet, scale factor). The autoencoder file is a
    plain state dict, the diffusion file ``{unet_state_dict, scale_factor}`` (the variant's value when absent)."""
    var = var if isinstance(var, Variant) else variant(var)
    autoencoder = build_mask_autoencoder(var)
    data = read_checkpoint(autoencoder_path)
    load_weights(autoencoder, _state_dict(data, ("autoencoder_state_dict", "state_dict"), autoencoder_path), autoencoder_path,
                 "mask-generation autoencoder")  # fmt: skip
    unet = build_mask_diffusion(var)
    data = read_checkpoint(diffusion_path)
    load_weights(unet, _state_dict(data, ("unet_state_dict",), diffusion_path), diffusion_path, "mask-generation diffusion UNet")
    scale = data.get("scale_factor", var.mask_generation["scale_factor"])
    return autoencoder, unet, float(torch.as_tensor(scale).reshape(-1)[0])
