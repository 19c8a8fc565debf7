"""Model variants: the factory's small networks (``tiny``) and NVIDIA's released CT models (``ddpm-ct``, ``rflow-ct``).

A variant is data, not code (``maisi/data/variants/<name>.json``): the networks' MONAI keyword
arguments, the noise scheduler and its settings, the default number of sampling steps, the
intensity mapping and, for released models, the output grids they were trained for. Which
conditions the diffusion UNet takes follows from its arguments: top/bottom body regions when
``include_top_region_index_input`` is set, a modality class label when ``num_class_embeds`` is.
A later NVIDIA release is a new file: :func:`read_network_config` reads NVIDIA's own network
configs (``config_network_*.json``) into a variant.

Torch-free, so that settings can be validated and the workflow planned without importing torch
(:mod:`maisi.models.networks` builds the networks).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "LATENT_CHANNELS", "DOWNSAMPLE", "VARIANTS", "MODALITIES", "CT_MODALITY_MAX", "DEFAULT_STEPS", "Variant", "variant",
    "read_network_config", "modality_code", "scheduler_spec",
]  # fmt: skip

LATENT_CHANNELS = 4


DOWNSAMPLE = 4  # per axis, every variant


#: Variants shipped with the factory (``maisi/data/variants``).
VARIANTS = ("tiny", "phantom-ct", "ddpm-ct", "rflow-ct")


#: Modality class labels of NVIDIA's MAISI v2 models (``modality_mapping.json`` of the release);
#: 0 is the unconditional label of classifier-free guidance.
MODALITIES = {
    "unknown": 0, "ct": 1, "ct_wo_contrast": 2, "ct_contrast": 3, "mri": 8, "mri_t1": 9, "mri_t2": 10, "mri_flair": 11, "mri_pd": 12,
    "mri_dwi": 13, "mri_adc": 14, "mri_ssfp": 15, "mri_mra": 16, "mri_t1c": 17, "mri_swi": 20, "mri_t1_skull_stripped": 29,
    "mri_t2_skull_stripped": 30, "mri_flair_skull_stripped": 31, "mri_swi_skull_stripped": 32, "mri_mra_skull_stripped": 33,
}  # fmt: skip


#: Codes 1-7 are CT (NVIDIA maps them to [-1000, 1000] HU); the factory generates CT only.
CT_MODALITY_MAX = 7


#: Default sampling steps per scheduler kind (MAISI: rectified flow 30, DDPM 1000).
DEFAULT_STEPS = {"rflow": 30, "ddpm": 1000}


#: The variant whose scheduler a project variant is trained with when ``train_diffusion.scheduler`` asks
#: for another kind than its own: the factory's rectified flow (``tiny``), MAISI's DDPM (``ddpm-ct``).
_SCHEDULER_OF_KIND = {"rflow": "tiny", "ddpm": "ddpm-ct"}


@dataclass(frozen=True)
class Variant:
    """One model variant; ``networks`` maps ``autoencoder``, ``diffusion``, ``controlnet``, ``discriminator``
    to MONAI keyword arguments (copies are handed out: see :meth:`network`)."""

    name: str
    description: str
    released: bool
    scheduler: dict[str, Any]
    inference_steps: int
    intensity: dict[str, list[float]]
    networks: dict[str, dict[str, Any]]
    grid: dict[str, Any] | None = None
    mask_generation: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def sampler(self) -> str:
        """The scheduler kind the variant is trained and sampled with (``rflow`` or ``ddpm``)."""
        return str(self.scheduler["kind"])

    @property
    def takes_body_region(self) -> bool:
        return bool(self.networks["diffusion"].get("include_top_region_index_input", False))

    @property
    def takes_modality(self) -> bool:
        return self.networks["diffusion"].get("num_class_embeds") is not None

    @property
    def unet_levels(self) -> int:
        return len(self.networks["diffusion"]["num_channels"])

    def network(self, name: str) -> dict[str, Any]:
        """A copy of one network's keyword arguments."""
        if name not in self.networks:
            raise KeyError(f"variant {self.name!r} defines no {name!r} network")
        return copy.deepcopy(self.networks[name])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "released": self.released, "scheduler": self.scheduler,
                "inference_steps": self.inference_steps, "intensity": self.intensity, "networks": self.networks, "grid": self.grid,
                "mask_generation": self.mask_generation}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Variant:
        missing = [k for k in ("name", "scheduler", "networks") if k not in data]
        if missing:
            raise ValueError(f"variant definition lacks {', '.join(missing)}")
        kind = data["scheduler"].get("kind")
        if kind not in DEFAULT_STEPS:
            raise ValueError(f"variant {data['name']!r}: scheduler kind {kind!r} is not one of {', '.join(DEFAULT_STEPS)}")
        nets = data["networks"]
        for net in ("autoencoder", "diffusion", "controlnet"):
            if net not in nets:
                raise ValueError(f"variant {data['name']!r} defines no {net!r} network")
        return cls(
            name=str(data["name"]), description=str(data.get("description", "")), released=bool(data.get("released", False)),
            scheduler=dict(data["scheduler"]), inference_steps=int(data.get("inference_steps") or DEFAULT_STEPS[kind]),
            intensity=dict(data.get("intensity") or {"hu": [-1000.0, 1000.0], "autoencoder": [0.0, 1.0]}),
            networks={k: dict(v) for k, v in nets.items()}, grid=data.get("grid"), mask_generation=data.get("mask_generation"),
        )  # fmt: skip


@functools.cache
def _shipped(name: str) -> Variant:
    text = resources.files("maisi.data").joinpath(f"variants/{name}.json").read_text(encoding="utf-8")
    return Variant.from_json(json.loads(text))


def variant(name: str) -> Variant:
    """A shipped variant by name (``tiny``, ``ddpm-ct``, ``rflow-ct``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return _shipped(name)


def modality_code(value: str | int, where: str = "modality") -> int:
    """A modality name of :data:`MODALITIES` or its code, as the code; MR codes are refused (CT only)."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a modality name or code, got {value!r}")
    if isinstance(value, str):
        if value not in MODALITIES:
            raise ValueError(f"{where}: unknown modality {value!r}; CT modalities: "
                             f"{', '.join(k for k, v in MODALITIES.items() if 1 <= v <= CT_MODALITY_MAX)}")  # fmt: skip
        code = MODALITIES[value]
    else:
        code = int(value)
    if not 1 <= code <= CT_MODALITY_MAX:
        raise ValueError(f"{where}: modality {value!r} (code {code}) is not a CT modality (codes 1-{CT_MODALITY_MAX}); "
                         f"the factory generates CT")  # fmt: skip
    return code


def scheduler_spec(var: Variant, kind: str | None = None, num_train_timesteps: int | None = None) -> dict[str, Any]:
    """The scheduler to train or sample ``var`` with: its own, or for a project variant the default one of ``kind``.

    A released variant's weights were trained with its own scheduler; another kind is refused.
    """
    if kind is None or kind == var.sampler:
        spec = dict(var.scheduler)
    elif var.released:
        raise ValueError(f"variant {var.name!r} is trained with the {var.sampler!r} scheduler, not {kind!r}")
    elif kind in _SCHEDULER_OF_KIND:
        spec = dict(variant(_SCHEDULER_OF_KIND[kind]).scheduler)
    else:
        raise ValueError(f"unknown scheduler {kind!r}; expected one of {', '.join(_SCHEDULER_OF_KIND)}")
    if num_train_timesteps is not None:
        spec["num_train_timesteps"] = int(num_train_timesteps)
    return spec


#: NVIDIA's network-config blocks and the factory's network names.
_NVIDIA_BLOCKS = {
    "autoencoder_def": "autoencoder", "diffusion_unet_def": "diffusion", "controlnet_def": "controlnet",
    "mask_generation_autoencoder_def": "mask_autoencoder", "mask_generation_diffusion_def": "mask_diffusion",
}  # fmt: skip


#: MONAI scheduler classes (the tail of NVIDIA's ``_target_``) and the factory's kinds.
_SCHEDULER_CLASSES = {"RFlowScheduler": "rflow", "DDPMScheduler": "ddpm"}


def read_network_config(path: str | os.PathLike, name: str, description: str = "", released: bool = True) -> Variant:
    """A variant from one of NVIDIA's network configs (``configs/config_network_*.json`` of the release).

    Their ``@key`` references are resolved and ``_target_`` dropped. ``use_flash_attention`` is
    switched off: it adds no weights, and MONAI's flash attention needs a GPU. The discriminator
    (not part of those files) and the grid and intensity rules are NVIDIA's CT ones.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable network config ({exc})") from None

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("@"):
            if value[1:] not in raw:
                raise ValueError(f"{path}: reference {value} names no key of the file")
            return resolve(raw[value[1:]])
        return value

    def block(key: str) -> dict[str, Any]:
        if key not in raw:
            raise ValueError(f"{path}: no {key!r} block")
        out = {k: resolve(v) for k, v in raw[key].items() if k != "_target_"}
        if "use_flash_attention" in out:
            out["use_flash_attention"] = False
        return out

    def scheduler(key: str) -> dict[str, Any]:
        target = str(raw.get(key, {}).get("_target_", "")).rsplit(".", 1)[-1]
        if target not in _SCHEDULER_CLASSES:
            raise ValueError(f"{path}: {key} is {target or 'missing'}; expected one of {', '.join(_SCHEDULER_CLASSES)}")
        return {"kind": _SCHEDULER_CLASSES[target], **{k: resolve(v) for k, v in raw[key].items() if k != "_target_"}}

    networks = {ours: block(theirs) for theirs, ours in _NVIDIA_BLOCKS.items() if theirs in raw}
    controlnet = networks.get("controlnet")
    if controlnet is not None:
        controlnet["use_checkpointing"] = False  # inference and the factory's training run without activation checkpointing
    networks["discriminator"] = variant("ddpm-ct").network("discriminator")
    mask = None
    if "mask_autoencoder" in networks and "mask_diffusion" in networks:
        mask = {
            "latent_shape": list(raw["mask_generation_latent_shape"]), "scale_factor": float(raw["mask_generation_scale_factor"]),
            "inference_steps": 1000, "scheduler": scheduler("mask_generation_noise_scheduler"),
            "networks": {"autoencoder": networks.pop("mask_autoencoder"), "diffusion": networks.pop("mask_diffusion")},
            # the MAISI id of each of the mask autoencoder's output channels (not part of the network configs)
            "classes": (variant("ddpm-ct").mask_generation or {})["classes"],
            "spacing_mm": (variant("ddpm-ct").mask_generation or {})["spacing_mm"],  # the grid the model generates (NVIDIA: 1.5 mm)
        }  # fmt: skip
    sched = scheduler("noise_scheduler")
    reference = variant("ddpm-ct")
    return Variant.from_json({
        "name": name, "description": description or f"read from {path.name}", "released": released, "scheduler": sched,
        "inference_steps": DEFAULT_STEPS[sched["kind"]], "intensity": reference.intensity, "grid": reference.grid,
        "networks": networks, "mask_generation": mask,
    })  # fmt: skip
