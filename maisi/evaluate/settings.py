"""The FID stage's settings (extractor, MAISI's preprocessing, device), read from the config. Torch-free."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    pass

from maisi.core.schema import schema_default, schema_enum
from maisi.core.settings import ConfigSettings

__all__ = ["FIDSettings", "EXTRACTORS"]

#: FID feature extractors (:mod:`maisi.evaluate.fid`).
EXTRACTORS = schema_enum("fid.extractor")


@dataclass(frozen=True)
class FIDSettings(ConfigSettings):
    """Feature extractor, preprocessing (MAISI's: spacing, size, central slices, HU window) and device."""

    extractor: str = schema_default("fid.extractor")
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
        if self.extractor == "radimagenet_resnet50" and not self.weights:
            raise ValueError("fid.weights: the radimagenet_resnet50 extractor needs a local ResNet-50 weights file")
        if len(self.hu_range) != 2 or not self.hu_range[0] < self.hu_range[1]:  # not a config key: MAISI's window
            raise ValueError(f"fid.hu_range: expected [low, high] with low < high, got {self.hu_range}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FIDSettings:
        """From ``config["fid"]`` (whose ``enabled`` decides whether the stage runs at all, not how)."""
        return cls.from_dict({k: v for k, v in config.get("fid", {}).items() if k != "enabled"})

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
            elif key == "weights" and value is not None:
                value = os.fspath(value)
            kwargs[key] = value
        return cls(**kwargs)
