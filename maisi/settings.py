"""The settings of the model stages, as frozen dataclasses read from the config.

They live apart from the stages' code (:mod:`maisi.train_vae`, :mod:`maisi.latents`,
:mod:`maisi.train_diffusion`, :mod:`maisi.train_controlnet`, :mod:`maisi.tsp`, :mod:`maisi.generate`,
:mod:`maisi.fid`, which re-export them) and import nothing heavy: the workflow validates them and
turns them into job parameters while planning, and planning must not pay for importing torch
(about 1.3 s of every Snakemake start).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Self

from maisi.mask_augment import AugmentSettings
from maisi.presets import DOWNSAMPLE, preset

if TYPE_CHECKING:
    import torch

__all__ = [
    "VaeSettings",
    "LatentSettings",
    "SettingsIO",
    "DiffusionSettings",
    "ControlNetSettings",
    "check_settings",
    "DecodeSettings",
    "GenerateSettings",
    "FIDSettings",
    "DECODE_METHODS",
    "STORAGE_DTYPES",
    "EXTRACTORS",
    "Patch",
]

Patch = tuple[int, int, int]
DECODE_METHODS = ("tsp", "monai", "sliding_window")
#: Precisions of the decoder's full-size maps (:mod:`maisi.tsp` maps them to torch dtypes).
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
#: FID feature extractors (:mod:`maisi.fid`).
EXTRACTORS = ("autoencoder", "radimagenet_resnet50")


# --------------------------------------------------------------------------- training

@dataclass(frozen=True)
class VaeSettings:
    """Settings of the autoencoder stage (``config["train_vae"]`` plus ``config["model"]``)."""

    preset: str = "tiny"
    device: str = "auto"
    steps: int = 60
    batch_size: int = 2
    patch_sizes: tuple[tuple[int, int, int], ...] = ((32, 32, 32),)  # steps split evenly over them, in order
    lr: float = 1e-4
    kl_weight: float = 1e-7
    adv_weight: float = 0.1
    adv_start: int = 0  # first step that uses the adversarial loss
    perceptual_weight: float = 0.3
    perceptual_cache_dir: str | None = None  # torch.hub folder with checkpoints/squeezenet1_1-b8a52dc0.pth
    checkpoint_every: int = 20  # resume-state interval in steps; 0: never
    seed: int = 0

    def __post_init__(self) -> None:
        # Normalise types (YAML/JSON give lists, and PyYAML reads "1e-4" as a string) and validate.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        try:
            for name in ("steps", "batch_size", "adv_start", "checkpoint_every", "seed"):
                value = getattr(self, name)
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError(f"train_vae.{name} must be an integer, got {value!r}")
                put(name, int(value))
            for name in ("lr", "kl_weight", "adv_weight", "perceptual_weight"):
                put(name, float(getattr(self, name)))
            sizes = self.patch_sizes
            if sizes and not isinstance(sizes[0], (list, tuple)):  # a single size
                sizes = [sizes]
            put("patch_sizes", tuple(tuple(int(n) for n in size) for size in sizes))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid train_vae settings: {exc}") from None
        put("preset", str(self.preset))
        put("device", str(self.device))
        if self.perceptual_cache_dir is not None:
            put("perceptual_cache_dir", os.fspath(self.perceptual_cache_dir))
        autoencoder = preset(self.preset)["autoencoder"]  # unknown preset -> ValueError
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if not self.patch_sizes:
            problems.append("patch_sizes is empty")
        for size in self.patch_sizes:
            if len(size) != 3 or any(n < DOWNSAMPLE or n % DOWNSAMPLE for n in size):
                problems.append(f"patch size {list(size)} must be 3 positive multiples of {DOWNSAMPLE}")
        # AutoencoderKlMaisi splits its convolutions' input along one axis; at the deepest level each part
        # needs at least 3 voxels (the 'maisi' preset: 48 voxels along the second axis).
        splits, axis = int(autoencoder.get("num_splits", 1)), int(autoencoder.get("dim_split", 0))
        least = 3 * splits * DOWNSAMPLE
        if splits > 1 and any(len(size) == 3 and size[axis] < least for size in self.patch_sizes):
            problems.append(f"preset {self.preset!r} needs patch sizes of at least {least} along axis {axis}")
        if len(self.patch_sizes) > self.steps:
            problems.append(f"{len(self.patch_sizes)} patch sizes but only {self.steps} steps")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        for name in ("kl_weight", "adv_weight", "perceptual_weight"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.adv_start < 0 or self.checkpoint_every < 0:
            problems.append("adv_start and checkpoint_every must be >= 0")
        if problems:
            raise ValueError("invalid train_vae settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, block: Mapping[str, Any], model: Mapping[str, Any]) -> VaeSettings:
        """From ``config["train_vae"]`` and ``config["model"]`` (whose ``preset`` and ``device`` are used)."""
        own = {f.name for f in fields(cls)} - {"preset", "device"}
        unknown = sorted(set(block) - own)
        if unknown:
            raise ValueError(f"unknown train_vae settings: {', '.join(unknown)}; expected some of {', '.join(sorted(own))}")
        kwargs = dict(block)
        for key in ("preset", "device"):
            if key in model:
                kwargs[key] = model[key]
        return cls(**kwargs)

    def to_json(self) -> str:
        """Stable JSON text (a Snakemake param: any change reruns the stage)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VaeSettings:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class LatentSettings:
    """How images are encoded (``config["cache_latents"]`` plus ``config["model"]``)."""

    preset: str = "tiny"
    device: str = "auto"
    #: Sliding-window encoding window in image voxels (multiples of 4); ``None`` encodes the whole volume at once.
    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.25
    #: How overlapping windows are blended: ``gaussian`` (less weight at window edges) or ``constant``.
    mode: str = "gaussian"

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            roi = tuple(int(r) for r in self.roi_size)
            if len(roi) != 3 or any(r < DOWNSAMPLE or r % DOWNSAMPLE for r in roi):
                raise ValueError(f"cache_latents.roi_size must be three positive multiples of {DOWNSAMPLE}, got {self.roi_size}")
            if not 0.0 <= float(self.overlap) < 1.0:
                raise ValueError(f"cache_latents.overlap must be in [0, 1), got {self.overlap}")
            steps = [int(r * (1.0 - float(self.overlap))) for r in roi]
            if any(s % DOWNSAMPLE for s in steps):
                raise ValueError(
                    f"cache_latents: roi_size {list(roi)} with overlap {self.overlap} moves the window by {steps} voxels; "
                    f"the step must be a multiple of {DOWNSAMPLE} so that windows fall on the latent grid (e.g. overlap 0.25 or 0.5)"
                )
            object.__setattr__(self, "roi_size", roi)
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"cache_latents.mode must be 'gaussian' or 'constant', got {self.mode!r}")
        object.__setattr__(self, "overlap", float(self.overlap))

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None, model: Mapping[str, Any] | None) -> LatentSettings:
        """``block`` = ``config["cache_latents"]`` (``roi_size``, ``overlap``, ``mode``), ``model`` = ``config["model"]``."""
        block, model = block or {}, model or {}
        roi = block.get("roi_size", cls.roi_size)
        if isinstance(roi, int):
            roi = (roi, roi, roi)
        return cls(
            preset=str(model.get("preset", cls.preset)),
            device=str(model.get("device", cls.device)),
            roi_size=tuple(int(r) for r in roi) if roi is not None else None,
            overlap=float(block.get("overlap", cls.overlap)),
            mode=str(block.get("mode", cls.mode)),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatentSettings:
        data = json.loads(text)
        if data.get("roi_size") is not None:
            data["roi_size"] = tuple(data["roi_size"])
        return cls(**data)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the latents' values (the device does not)."""
        data = asdict(self)
        data.pop("device")
        data["roi_size"] = list(self.roi_size) if self.roi_size is not None else None
        return data


def _coerce(cls: type, values: Mapping[str, Any]) -> Any:
    """A settings dataclass from a mapping: lists become tuples, unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown settings {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class SettingsIO:
    """``from_config`` / ``to_json`` / ``from_json`` shared by the training settings."""

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None, model: Mapping[str, Any] | None = None) -> Self:
        """Settings from the stage's config block and the ``model`` block (``preset``, ``device``)."""
        model = model or {}
        values = {k: model[k] for k in ("preset", "device") if k in model}
        values.update(block or {})
        return _coerce(cls, values)

    def to_json(self) -> str:
        """Stable JSON text (a Snakemake param: any change reruns the stage)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        """The inverse of :meth:`to_json`."""
        return _coerce(cls, json.loads(text))

    def run_fingerprint(self) -> dict[str, Any]:
        """The settings that decide the trained weights (all but the device)."""
        d = asdict(self)
        d.pop("device", None)
        return d


def check_settings(s: Any) -> None:
    """The checks both stages' settings share (a ValueError names the problem)."""
    preset(s.preset)
    if s.steps < 1 or s.batch_size < 1 or s.checkpoint_every < 1:
        raise ValueError("steps, batch_size and checkpoint_every must be at least 1")
    if s.latent_patch is not None and (len(s.latent_patch) != 3 or min(s.latent_patch) < 1):
        raise ValueError(f"latent_patch must be three positive sizes or None, got {s.latent_patch!r}")
    if not s.lr > 0 or s.lr_power < 0:
        raise ValueError(f"lr must be > 0 and lr_power >= 0 (got {s.lr}, {s.lr_power})")


@dataclass(frozen=True)
class DiffusionSettings(SettingsIO):
    """The ``train_diffusion`` config block (plus ``model.preset`` and ``model.device``)."""

    preset: str = "tiny"
    device: str = "auto"
    scheduler: str = "rflow"  # rflow | ddpm
    num_train_timesteps: int = 1000
    steps: int = 60
    batch_size: int = 2
    latent_patch: Patch | None = (16, 16, 16)  # None = whole latents (as MAISI trains)
    lr: float = 1e-4
    lr_power: float = 2.0
    amp: bool = True  # mixed precision, CUDA only
    checkpoint_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        check_settings(self)
        if self.scheduler not in ("rflow", "ddpm"):
            raise ValueError(f"scheduler must be 'rflow' or 'ddpm', got {self.scheduler!r}")
        if self.num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be at least 1")


@dataclass(frozen=True)
class ControlNetSettings(SettingsIO):
    """The ``train_controlnet`` config block (plus ``model.preset`` and ``model.device``)."""

    preset: str = "tiny"
    device: str = "auto"
    steps: int = 40
    batch_size: int = 2
    latent_patch: Patch | None = (16, 16, 16)  # None = whole latents
    lr: float = 1e-4
    lr_power: float = 2.0
    amp: bool = True  # mixed precision, CUDA only
    tumour_weight: float = 100.0
    tumour_labels: tuple[int, ...] = (23, 24, 26, 27, 128, 129)
    checkpoint_every: int = 20
    seed: int = 0
    #: The diffusion model's scheduler, used when its checkpoint does not record one (NVIDIA's
    #: released files do not): the workflow fills it from ``train_diffusion.scheduler``.
    scheduler: str = "rflow"

    def __post_init__(self) -> None:
        check_settings(self)
        if self.scheduler not in ("rflow", "ddpm"):
            raise ValueError(f"scheduler must be 'rflow' or 'ddpm', got {self.scheduler!r}")
        if self.tumour_weight < 0:
            raise ValueError(f"tumour_weight must be >= 0, got {self.tumour_weight}")
        if any(not 0 < int(v) < 256 for v in self.tumour_labels):
            raise ValueError(f"tumour_labels must be MAISI ids 1-255, got {self.tumour_labels}")


# --------------------------------------------------------------------------- generation and FID


@dataclass(frozen=True)
class DecodeSettings:
    """How latents are decoded (the ``generate.decoder`` config block).

    ``method``: ``tsp`` (this module), ``monai`` (MONAI's decode, split ``num_splits`` ways along
    ``dim_split``) or ``sliding_window`` (MONAI's sliding-window inference over latent windows of
    ``roi`` voxels with ``overlap``). For ``tsp``: ``axis`` is the spatial axis the slabs run along,
    ``slab`` their thickness in latent voxels (0 = automatic: 2 on the CPU, 4 on GPUs), ``devices`` the compute devices
    (``auto`` = every visible GPU, else the CPU), ``storage`` where full-size maps live (``device``
    = the first compute device, ``cpu`` = host memory), ``storage_dtype`` their precision.
    """

    method: str = "tsp"
    axis: int = 0
    slab: int = 0
    devices: tuple[str, ...] = ("auto",)
    storage: str = "device"
    storage_dtype: str = "float32"
    num_splits: int = 4
    dim_split: int = 1
    roi: tuple[int, int, int] = (32, 32, 32)
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.method not in DECODE_METHODS:
            raise ValueError(f"decoder.method must be one of {', '.join(DECODE_METHODS)}, got {self.method!r}")
        if self.axis not in (0, 1, 2) or self.dim_split not in (0, 1, 2):
            raise ValueError("decoder.axis and decoder.dim_split must be 0, 1 or 2")
        if self.slab < 0 or self.num_splits < 1:
            raise ValueError("decoder.slab must be >= 0 and decoder.num_splits >= 1")
        if self.storage not in ("device", "cpu"):
            raise ValueError(f"decoder.storage must be 'device' or 'cpu', got {self.storage!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"decoder.storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if not self.devices:
            raise ValueError("decoder.devices must name at least one device")
        if len(self.roi) != 3 or min(self.roi) < 1 or not 0 <= self.overlap < 1:
            raise ValueError("decoder.roi must be three positive sizes and decoder.overlap in [0, 1)")

    @classmethod
    def from_config(cls, block: dict[str, Any] | None) -> DecodeSettings:
        block = dict(block or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - names)
        if unknown:
            raise ValueError(f"decoder: unknown settings {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in block.items()})

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

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
class GenerateSettings:
    """How a shard is generated: model preset and device, decoding, mask augmentation, error policy."""

    preset: str = "tiny"
    device: str = "auto"
    decoder: DecodeSettings = DecodeSettings()
    augment: AugmentSettings = AugmentSettings()
    on_error: str = "stop"

    @classmethod
    def from_config(cls, block: Mapping[str, Any], model: Mapping[str, Any], on_error: str = "stop") -> GenerateSettings:
        return cls(
            preset=model.get("preset", "tiny"), device=model.get("device", "auto"),
            decoder=DecodeSettings.from_config(block.get("decoder")), augment=AugmentSettings.from_config(block.get("augment") or {}),
            on_error=on_error,
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(
            {"preset": self.preset, "device": self.device, "decoder": self.decoder.to_json(),
             "augment": json.loads(self.augment.to_json()), "on_error": self.on_error}, sort_keys=True,
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> GenerateSettings:
        d = json.loads(text)
        return cls(d["preset"], d["device"], DecodeSettings.from_config(d["decoder"]), AugmentSettings.from_config(d["augment"]), d["on_error"])


@dataclass(frozen=True)
class FIDSettings:
    """Feature extractor, preprocessing (MAISI's: spacing, size, central slices, HU window) and device."""

    extractor: str = "autoencoder"
    weights: str | None = None
    spacing: tuple[float, float, float] | None = (1.5, 1.5, 1.5)
    size: tuple[int, int, int] | None = (256, 256, 256)
    central_fraction: float = 0.4
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    batch_size: int = 16
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"fid.extractor: unknown extractor {self.extractor!r}; expected one of {', '.join(EXTRACTORS)}")
        if self.extractor == "radimagenet_resnet50" and not self.weights:
            raise ValueError("fid.weights: the radimagenet_resnet50 extractor needs a local ResNet-50 weights file")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"fid.spacing: expected three positive numbers or null, got {self.spacing}")
        if self.size is not None and (len(self.size) != 3 or min(self.size) < 1):
            raise ValueError(f"fid.size: expected three positive integers or null, got {self.size}")
        if not 0.0 < self.central_fraction <= 1.0:
            raise ValueError(f"fid.central_fraction: expected a number in (0, 1], got {self.central_fraction}")
        if len(self.hu_range) != 2 or not self.hu_range[0] < self.hu_range[1]:
            raise ValueError(f"fid.hu_range: expected [low, high] with low < high, got {self.hu_range}")
        if self.batch_size < 1:
            raise ValueError(f"fid.batch_size: expected a positive integer, got {self.batch_size}")

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | None) -> FIDSettings:
        block = dict(block or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(block) - names)
        if unknown:
            raise ValueError(f"fid: unknown settings {', '.join(unknown)}")
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

    def to_json(self) -> str:
        """Stable JSON text (a Snakemake param: any change reruns the stage)."""
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FIDSettings:
        return cls.from_config(json.loads(text))
