"""The generation stage's settings (decoder, augmentation, error policy), read from the config.

Torch-free, like every stage's settings: planning turns them into job parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from maisi.core.schema import schema_default, schema_enum
from maisi.core.settings import ConfigSettings
from maisi.generate.augment import AugmentSettings

if TYPE_CHECKING:
    import torch

__all__ = ["DecodeSettings", "GenerateSettings", "DECODE_METHODS", "STORAGE_DTYPES"]

DECODE_METHODS = schema_enum("generate.decoder.method")


#: Precisions of the decoder's full-size maps (:mod:`maisi.generate.tsp` maps them to torch dtypes).
STORAGE_DTYPES = schema_enum("generate.decoder.storage_dtype")


@dataclass(frozen=True)
class DecodeSettings(ConfigSettings):
    """How latents are decoded (the ``generate.decoder`` config block).

    ``method``: ``tsp`` (this module), ``monai`` (MONAI's decode, split ``num_splits`` ways along
    ``dim_split``) or ``sliding_window`` (MONAI's sliding-window inference over latent windows of
    ``roi`` voxels with ``overlap``). For ``tsp``: ``axis`` is the spatial axis the slabs run along,
    ``slab`` their thickness in latent voxels (0 = automatic: 2 on the CPU, 4 on GPUs), ``devices`` the compute devices
    (``auto`` = every visible GPU, else the CPU), ``storage`` where full-size maps live (``device``
    = the first compute device, ``cpu`` = host memory), ``storage_dtype`` their precision.
    """

    method: str = schema_default("generate.decoder.method")
    axis: int = schema_default("generate.decoder.axis")
    slab: int = schema_default("generate.decoder.slab")
    devices: tuple[str, ...] = schema_default("generate.decoder.devices")
    storage: str = schema_default("generate.decoder.storage")
    storage_dtype: str = schema_default("generate.decoder.storage_dtype")
    num_splits: int = schema_default("generate.decoder.num_splits")
    dim_split: int = schema_default("generate.decoder.dim_split")
    roi: tuple[int, int, int] = schema_default("generate.decoder.roi")
    overlap: float = schema_default("generate.decoder.overlap")

    SECTION: ClassVar[str] = "generate.decoder"

    def compute_devices(self) -> list[torch.device]:
        """The devices slabs are computed on (``auto``: every visible GPU, else the CPU)."""
        import torch

        out: list[torch.device] = []
        for name in self.devices:
            if name == "auto":
                n = torch.cuda.device_count()
                out += [torch.device("cuda", i) for i in range(n)] if n else [torch.device("cpu")]
            else:
                dev = torch.device(name)
                if dev.type == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError(f"decoder device {name!r} requested but CUDA is not available")
                out.append(dev)
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class GenerateSettings(ConfigSettings):
    """How a shard is generated: model variant and device, decoding, mask augmentation, error policy."""

    variant: str = schema_default("model.variant")
    device: str = schema_default("model.device")
    decoder: DecodeSettings = DecodeSettings()
    augment: AugmentSettings = AugmentSettings()
    on_error: str = "stop"
    mask_steps: int | None = schema_default("generate.mask_generation.steps")  # generated masks' DDPM steps (None: the variant's)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GenerateSettings:
        """From ``config["generate"]`` (``decoder``, ``augment``), ``config["model"]`` and ``config["on_error"]``."""
        block, model = config.get("generate", {}), config.get("model", {})
        return cls.from_dict({
            "variant": model.get("variant", cls.variant), "device": model.get("device", cls.device),
            "decoder": block.get("decoder", {}), "augment": block.get("augment", {}), "on_error": config.get("on_error", cls.on_error),
            "mask_steps": block.get("mask_generation", {}).get("steps"),
        })  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerateSettings:
        return cls(variant=data["variant"], device=data["device"], decoder=DecodeSettings.from_dict(data["decoder"]),
                   augment=AugmentSettings.from_dict(data["augment"]), on_error=data["on_error"], mask_steps=data.get("mask_steps"))  # fmt: skip
