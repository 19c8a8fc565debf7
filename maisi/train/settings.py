"""The training stages' settings (autoencoder, latent cache, diffusion, ControlNet), read from the config.

Torch-free: the workflow turns them into job parameters while planning, and planning must not pay for
importing torch (about 1.3 s of every Snakemake start).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

from maisi.core.schema import check_values, schema_default
from maisi.core.settings import ConfigSettings
from maisi.models.variants import DOWNSAMPLE, scheduler_spec, variant

if TYPE_CHECKING:
    pass

__all__ = [
    "TrainedSettings", "VaeSettings", "LatentSettings", "TrainSettings", "DiffusionSettings", "ControlNetSettings", "Patch",
    "resolve_scheduler", "CONTRASTIVE_LOSS", "CONTRASTIVE_MAX",
]  # fmt: skip

Patch = tuple[int, int, int]


#: MAISI v2's region-contrastive ControlNet loss (weight, bound) of the variants NVIDIA trains with it
#: (``configs/config_maisi_controlnet_train_rflow-ct.json`` of NV-Generate-CTMR); the others are trained without it.
CONTRASTIVE_LOSS: dict[str, tuple[float, float]] = {"rflow-ct": (0.01, 2.0)}


#: The contrastive term's bound where the variant gives none (NVIDIA's default).
CONTRASTIVE_MAX = 2.0


class TrainedSettings(ConfigSettings):
    """The settings of a stage that trains weights: which of them decide the weights (for resume states)."""

    def run_fingerprint(self) -> dict[str, Any]:
        """The settings that decide the trained weights (all but the device, the number of processes and the small-data
        threshold)."""
        d = asdict(self)  # type: ignore[call-overload]
        d.pop("device", None)
        d.pop("processes", None)
        d.pop("min_cases", None)
        return d


@dataclass(frozen=True)
class VaeSettings(TrainedSettings):
    """Settings of the autoencoder stage (``config["train_vae"]`` plus ``config["model"]``)."""

    variant: str = schema_default("model.variant")
    device: str = schema_default("model.device")
    min_cases: int = schema_default("model.min_training_cases")  # fewer training cases: a small-data warning
    steps: int = schema_default("train_vae.steps")
    batch_size: int = schema_default("train_vae.batch_size")
    patch_sizes: tuple[tuple[int, int, int], ...] = schema_default("train_vae.patch_sizes")  # steps split evenly over them, in order
    lr: float = schema_default("train_vae.lr")
    lr_power: float = schema_default("train_vae.lr_power")
    kl_weight: float = schema_default("train_vae.kl_weight")
    adv_weight: float = schema_default("train_vae.adv_weight")
    adv_start: int = schema_default("train_vae.adv_start")  # first step that uses the adversarial loss
    perceptual_weight: float = schema_default("train_vae.perceptual_weight")
    perceptual_cache_dir: str | None = schema_default("train_vae.perceptual_cache_dir")  # torch.hub folder with checkpoints/squeezenet1_1-b8a52dc0.pth
    checkpoint_every: int = schema_default("train_vae.checkpoint_every")  # resume-state interval in steps; 0: never
    seed: int = schema_default("train_vae.seed")

    SECTION: ClassVar[str] = "train_vae"

    def __post_init__(self) -> None:
        sizes = self.patch_sizes
        if sizes and not isinstance(sizes[0], (list, tuple)):  # a single size
            sizes = [sizes]
        object.__setattr__(self, "patch_sizes", tuple(tuple(int(n) for n in size) for size in sizes))
        super().__post_init__()
        # What the schema cannot say: sizes against the variant, and patch sizes against steps.
        autoencoder = variant(self.variant).networks["autoencoder"]
        problems = [f"patch size {list(size)} must be 3 positive multiples of {DOWNSAMPLE}"
                    for size in self.patch_sizes if any(n < DOWNSAMPLE or n % DOWNSAMPLE for n in size)]  # fmt: skip
        # AutoencoderKlMaisi splits its convolutions' input along one axis; at the deepest level each part
        # needs at least 3 voxels (the released variants: 48 voxels along the second axis).
        splits, axis = int(autoencoder.get("num_splits", 1)), int(autoencoder.get("dim_split", 0))
        least = 3 * splits * DOWNSAMPLE
        if splits > 1 and any(size[axis] < least for size in self.patch_sizes):
            problems.append(f"variant {self.variant!r} needs patch sizes of at least {least} along axis {axis}")
        if len(self.patch_sizes) > self.steps:
            problems.append(f"{len(self.patch_sizes)} patch sizes but only {self.steps} steps")
        if problems:
            raise ValueError("invalid train_vae settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VaeSettings:
        """From ``config["train_vae"]`` and ``config["model"]`` (whose ``variant`` and ``device`` are used)."""
        return cls(**config.get("train_vae", {}), **_training(config))


@dataclass(frozen=True)
class LatentSettings(ConfigSettings):
    """How images are encoded (``config["cache_latents"]`` plus ``config["model"]``)."""

    variant: str = schema_default("model.variant")
    device: str = schema_default("model.device")
    #: Sliding-window encoding window in image voxels (multiples of 4); ``None`` encodes the whole volume at once.
    roi_size: tuple[int, int, int] | None = schema_default("cache_latents.roi_size")
    overlap: float = schema_default("cache_latents.overlap")
    #: How overlapping windows are blended: ``gaussian`` (less weight at window edges) or ``constant``.
    mode: str = schema_default("cache_latents.mode")
    #: Whole volumes: ``tsp`` (the exact slab-streamed encoder) or ``monai`` (MONAI's ``encode``).
    encoder: str = schema_default("cache_latents.encoder")
    #: The ``tsp`` encoder's slab thickness (latent voxels, 0 = automatic), map storage and precision, memory bound.
    slab: int = schema_default("cache_latents.slab")
    storage: str = schema_default("cache_latents.storage")
    storage_dtype: str = schema_default("cache_latents.storage_dtype")
    max_stored_maps: float | None = schema_default("cache_latents.max_stored_maps")

    SECTION: ClassVar[str] = "cache_latents"

    def __post_init__(self) -> None:
        object.__setattr__(self, "overlap", float(self.overlap))
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", tuple(int(r) for r in self.roi_size))
        super().__post_init__()
        if self.roi_size is not None:  # windows must fall on the latent grid
            roi = self.roi_size
            if any(r < DOWNSAMPLE or r % DOWNSAMPLE for r in roi):
                raise ValueError(f"cache_latents.roi_size must be three positive multiples of {DOWNSAMPLE}, got {list(roi)}")
            steps = [int(r * (1.0 - self.overlap)) for r in roi]
            if any(s % DOWNSAMPLE for s in steps):
                raise ValueError(
                    f"cache_latents: roi_size {list(roi)} with overlap {self.overlap} moves the window by {steps} voxels; "
                    f"the step must be a multiple of {DOWNSAMPLE} so that windows fall on the latent grid (e.g. overlap 0.25 or 0.5)"
                )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LatentSettings:
        """From ``config["cache_latents"]`` (``roi_size``, ``overlap``, ``mode``) and ``config["model"]``."""
        block = dict(config.get("cache_latents", {}))
        if isinstance(block.get("roi_size"), int):
            block["roi_size"] = (block["roi_size"],) * 3
        return cls.from_dict({**block, **_model(config)})

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the latents' values (the device and the ``tsp`` encoder's memory layout do not:
        it gives MONAI's values up to float32 rounding whatever its slabs, storage or memory bound)."""
        data = asdict(self)
        for key in ("device", "slab", "storage", "max_stored_maps"):
            data.pop(key)
        data["roi_size"] = list(self.roi_size) if self.roi_size is not None else None
        return data


def _model(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` block's ``variant`` and ``device``, which every model stage's settings carry."""
    model = config.get("model", {})
    return {k: model[k] for k in ("variant", "device") if k in model}


def _training(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the training stages take from the ``model`` block: :func:`_model`'s keys and ``min_training_cases``."""
    model = config.get("model", {})
    return {**_model(config), **({"min_cases": model["min_training_cases"]} if "min_training_cases" in model else {})}


#: The ``model`` keys of validation on held-out cases (diffusion and ControlNet stages), under their own names.
VALIDATION_KEYS = ("validation_every", "validation_fold", "validation_samples")


def _processes(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the diffusion and ControlNet stages take from ``model`` besides :func:`_training`'s keys: the number of
    training processes (``model.resources.gpu``, at least 1) and the validation keys."""
    model = config.get("model", {})
    gpus = model.get("resources", {}).get("gpu")
    return {**({} if gpus is None else {"processes": max(int(gpus), 1)}), **{k: model[k] for k in VALIDATION_KEYS if k in model}}


class TrainSettings(TrainedSettings):
    """The protocol, for the diffusion and ControlNet stages (``config[SECTION]`` plus ``config["model"]``)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        return cls.from_dict({**config.get(cls.SECTION, {}), **_training(config), **_processes(config)})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_values("model", {k: getattr(self, k) for k in VALIDATION_KEYS if hasattr(self, k)})
        processes, batch_size = getattr(self, "processes", 1), getattr(self, "batch_size", 1)
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"{self.SECTION}: model.resources.gpu, the number of processes, must be 1 or more: {processes!r}")
        if batch_size % processes:
            raise ValueError(
                f"config key '{self.SECTION}.batch_size' ({batch_size}) must be a multiple of model.resources.gpu ({processes}), "
                "the number of training processes: each process computes an equal share of the global batch"
            )


@dataclass(frozen=True)
class DiffusionSettings(TrainSettings):
    """The ``train_diffusion`` config block (plus ``model.variant`` and ``model.device``)."""

    SECTION: ClassVar[str] = "train_diffusion"

    variant: str = schema_default("model.variant")
    device: str = schema_default("model.device")
    min_cases: int = schema_default("model.min_training_cases")  # fewer training cases: a small-data warning
    scheduler: str | None = schema_default("train_diffusion.scheduler")  # rflow | ddpm | None = the variant's
    num_train_timesteps: int = schema_default("train_diffusion.num_train_timesteps")
    steps: int = schema_default("train_diffusion.steps")
    batch_size: int = schema_default("train_diffusion.batch_size")
    latent_patch: Patch | None = schema_default("train_diffusion.latent_patch")  # None = whole latents (as MAISI trains)
    lr: float = schema_default("train_diffusion.lr")
    lr_power: float = schema_default("train_diffusion.lr_power")
    amp: bool = schema_default("train_diffusion.amp")  # mixed precision, CUDA only
    checkpoint_every: int = schema_default("train_diffusion.checkpoint_every")
    seed: int = schema_default("train_diffusion.seed")
    processes: int = schema_default("model.resources.gpu")  # training processes, one GPU each (DistributedDataParallel)
    validation_every: int = schema_default("model.validation_every")  # 0: no validation loss, every case trains
    validation_fold: int | None = schema_default("model.validation_fold")  # held out; -1: the highest fold with cases
    validation_samples: int = schema_default("model.validation_samples")
    init_from: str | None = schema_default("train_diffusion.init_from")  # a checkpoint to fine-tune; None = random weights
    recompute_scale_factor: bool = schema_default("train_diffusion.recompute_scale_factor")  # False keeps the parent's

    def __post_init__(self) -> None:
        _path_as_text(self)
        super().__post_init__()
        resolve_scheduler(self.variant, self.scheduler)

    @property
    def kind(self) -> str:
        """The scheduler the UNet is trained with: ``scheduler``, else the variant's."""
        return resolve_scheduler(self.variant, self.scheduler)

    def scheduler_spec(self) -> dict[str, Any]:
        return scheduler_spec(variant(self.variant), self.kind, self.num_train_timesteps)


def _path_as_text(settings: Any) -> None:
    """``init_from`` as text (a ``Path`` given in Python), as the config and the job's JSON parameter hold it."""
    if settings.init_from is not None:
        object.__setattr__(settings, "init_from", str(settings.init_from))


def resolve_scheduler(variant_name: str, scheduler: str | None) -> str:
    """``train_diffusion.scheduler`` against the variant: the kind to use; a released variant allows only its own."""
    try:
        return str(scheduler_spec(variant(variant_name), scheduler)["kind"])
    except ValueError as exc:
        raise ValueError(f"config key 'train_diffusion.scheduler': {exc}; set it to null (the variant's) or change model.variant") from None


@dataclass(frozen=True)
class ControlNetSettings(TrainSettings):
    """The ``train_controlnet`` config block (plus ``model.variant`` and ``model.device``)."""

    SECTION: ClassVar[str] = "train_controlnet"

    variant: str = schema_default("model.variant")
    device: str = schema_default("model.device")
    min_cases: int = schema_default("model.min_training_cases")  # fewer training cases: a small-data warning
    steps: int = schema_default("train_controlnet.steps")
    batch_size: int = schema_default("train_controlnet.batch_size")
    latent_patch: Patch | None = schema_default("train_controlnet.latent_patch")  # None = whole latents
    lr: float = schema_default("train_controlnet.lr")
    lr_power: float = schema_default("train_controlnet.lr_power")
    amp: bool = schema_default("train_controlnet.amp")  # mixed precision, CUDA only
    tumour_weight: float = schema_default("train_controlnet.tumour_weight")
    tumour_labels: tuple[int, ...] = schema_default("train_controlnet.tumour_labels")
    checkpoint_every: int = schema_default("train_controlnet.checkpoint_every")
    seed: int = schema_default("train_controlnet.seed")
    processes: int = schema_default("model.resources.gpu")  # training processes, one GPU each (DistributedDataParallel)
    validation_every: int = schema_default("model.validation_every")  # 0: no validation loss, every case trains
    validation_fold: int | None = schema_default("model.validation_fold")  # held out; -1: the highest fold with cases
    validation_samples: int = schema_default("model.validation_samples")
    init_from: str | None = schema_default("train_controlnet.init_from")  # a ControlNet to fine-tune; None = the UNet's copy
    contrastive_weight: float | None = schema_default("train_controlnet.contrastive_weight")  # None = CONTRASTIVE_LOSS's
    contrastive_max: float | None = schema_default("train_controlnet.contrastive_max")  # None = the variant's
    #: The diffusion model's scheduler, used when its checkpoint does not record one (NVIDIA's
    #: released files do not): ``train_diffusion.scheduler``, else the variant's.
    scheduler: str | None = schema_default("train_diffusion.scheduler")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ControlNetSettings:
        scheduler = config.get("train_diffusion", {}).get("scheduler", cls.scheduler)
        return cls.from_dict({**config.get(cls.SECTION, {}), **_training(config), **_processes(config), "scheduler": scheduler})

    def __post_init__(self) -> None:
        _path_as_text(self)
        super().__post_init__()
        check_values("train_diffusion", {"scheduler": self.scheduler})
        resolve_scheduler(self.variant, self.scheduler)

    @property
    def kind(self) -> str:
        """The diffusion model's scheduler when its checkpoint does not say."""
        return resolve_scheduler(self.variant, self.scheduler)

    @property
    def contrastive(self) -> tuple[float, float]:
        """The region-contrastive loss's (weight, bound): the settings', else the variant's (:data:`CONTRASTIVE_LOSS`;
        weight 0, off, for the variants NVIDIA trains without it)."""
        weight, bound = CONTRASTIVE_LOSS.get(self.variant, (0.0, CONTRASTIVE_MAX))
        weight = weight if self.contrastive_weight is None else self.contrastive_weight
        bound = bound if self.contrastive_max is None else self.contrastive_max
        return float(weight), float(bound)
