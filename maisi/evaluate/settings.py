"""The FID stage's settings (extractors, MAISI's preprocessing, device) and those of its independent
segmenter, read from the config. Torch-free."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    pass

from maisi.core.schema import schema_default, schema_enum
from maisi.core.settings import ConfigSettings

__all__ = ["FIDSettings", "SegmenterSettings", "PrivacySettings", "UtilitySettings", "EXTRACTORS"]

#: FID feature extractors (:mod:`maisi.evaluate.fid`).
EXTRACTORS = schema_enum("fid.extractors")


@dataclass(frozen=True)
class FIDSettings(ConfigSettings):
    """Feature extractors, preprocessing (MAISI's: spacing, size, central slices, HU window) and device."""

    extractors: tuple[str, ...] = schema_default("fid.extractors")
    weights: str | None = schema_default("fid.weights")
    spacing: tuple[float, float, float] | None = schema_default("fid.spacing")
    size: tuple[int, int, int] | None = schema_default("fid.size")
    central_fraction: float = schema_default("fid.central_fraction")
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    batch_size: int = schema_default("fid.batch_size")
    device: str = "auto"

    SECTION: ClassVar[str] = "fid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if "radimagenet_resnet50" in self.extractors and not self.weights:
            raise ValueError("fid.weights: the radimagenet_resnet50 extractor needs a local ResNet-50 weights file")
        if len(self.hu_range) != 2 or not self.hu_range[0] < self.hu_range[1]:  # not a config key: MAISI's window
            raise ValueError(f"fid.hu_range: expected [low, high] with low < high, got {self.hu_range}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FIDSettings:
        """From ``config["fid"]`` (whose ``enabled`` decides whether the stage runs at all, not how; the
        segmenter's training is :class:`SegmenterSettings`)."""
        return cls.from_dict({k: v for k, v in config.get("fid", {}).items() if k not in ("enabled", "segmenter")})

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> FIDSettings:
        """From the ``fid`` block's settings (numbers normalised: YAML may give ints for floats)."""
        kwargs: dict[str, Any] = {}
        for key, value in block.items():
            if key == "spacing" and value is not None:
                value = tuple(float(v) for v in value)
            elif key == "size" and value is not None:
                value = tuple(int(v) for v in value)
            elif key == "hu_range":
                value = tuple(float(v) for v in value)
            elif key == "central_fraction":
                value = float(value)
            elif key == "batch_size":
                value = int(value)
            elif key == "extractors":
                value = tuple(value)
            elif key == "weights" and value is not None:
                value = os.fspath(value)
            kwargs[key] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class SegmenterSettings(ConfigSettings):
    """How FID's independent segmenter is trained (:mod:`maisi.evaluate.segmenter`) and where it is cached."""

    steps: int = schema_default("fid.segmenter.steps")
    batch_size: int = schema_default("fid.segmenter.batch_size")
    lr: float = schema_default("fid.segmenter.lr")
    init_filters: int = schema_default("fid.segmenter.init_filters")
    seed: int = schema_default("fid.segmenter.seed")
    cache: str | None = schema_default("fid.segmenter.cache")
    device: str = "auto"

    SECTION: ClassVar[str] = "fid.segmenter"

    #: What the shared training loop reads besides the above: a linear decay, mixed precision on CUDA,
    #: no intermediate resume states (a few minutes of training at most).
    lr_power: ClassVar[float] = 1.0
    amp: ClassVar[bool] = True

    @property
    def checkpoint_every(self) -> int:
        return self.steps

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SegmenterSettings:
        block = dict(config.get("fid", {}).get("segmenter", {}))
        device = config.get("model", {}).get("device")
        return cls(**block, **({"device": device} if device else {}))

    def training_dict(self) -> dict[str, Any]:
        """What decides the trained weights (the cache folder and the device do not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("cache", "device")}


@dataclass(frozen=True)
class PrivacySettings(ConfigSettings):
    """The memorisation audit (:mod:`maisi.evaluate.privacy`): its feature network, threshold and what a flag does."""

    extractor: str = schema_default("privacy.extractor")
    percentile: float = schema_default("privacy.percentile")
    min_similarity: float = schema_default("privacy.min_similarity")
    on_copy: str = schema_default("privacy.on_copy")

    SECTION: ClassVar[str] = "privacy"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PrivacySettings:
        return cls(**{k: v for k, v in config.get("privacy", {}).items() if k != "enabled"})


@dataclass(frozen=True)
class UtilitySettings(ConfigSettings):
    """The downstream-utility stage (:mod:`maisi.evaluate.utility`): classes, each arm's budget, the bootstrap."""

    classes: tuple[str, ...] | None = schema_default("utility.classes")
    steps: int = schema_default("utility.steps")
    batch_size: int = schema_default("utility.batch_size")
    crop: tuple[int, int, int] = schema_default("utility.crop")
    lr: float = schema_default("utility.lr")
    init_filters: int = schema_default("utility.init_filters")
    blocks_down: tuple[int, ...] = schema_default("utility.blocks_down")
    norm: str = schema_default("utility.norm")
    seed: int = schema_default("utility.seed")
    n_boot: int = schema_default("utility.n_boot")
    level: float = schema_default("utility.level")
    device: str = "auto"

    SECTION: ClassVar[str] = "utility"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UtilitySettings:
        block = {k: v for k, v in config.get("utility", {}).items() if k != "enabled"}
        device = config.get("model", {}).get("device")
        return cls.from_dict({**block, **({"device": device} if device else {})})

    def training_dict(self) -> dict[str, Any]:
        """What decides an arm's trained weights (the bootstrap and the device do not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("n_boot", "level", "device")}
