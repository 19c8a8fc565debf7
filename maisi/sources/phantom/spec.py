"""What a phantom case is: the population's options, each case's :class:`PhantomSpec`, and the
body outline by height (template keys) that both planning and drawing use."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from maisi.core.schema import source_default
from maisi.core.seeds import derive_seed

__all__ = ["PhantomOptions", "PhantomSpec", "REGION_FOV", "REGION_PAIRS", "plan_phantom_cases"]

#: Field of view of each body region along the body axis, template mm (top, bottom); the vertex is 0.
REGION_FOV: dict[str, tuple[float, float]] = {
    "head_neck": (10.0, -240.0),
    "chest": (-280.0, -485.0),
    "abdomen": (-530.0, -760.0),
    "lower_body": (-880.0, -1100.0),
}


#: (top, bottom) region of case ``i`` is ``REGION_PAIRS[i % 8]``: 8 cases cover every region as both.
REGION_PAIRS: tuple[tuple[str, str], ...] = (
    ("head_neck", "head_neck"),
    ("head_neck", "chest"),
    ("chest", "abdomen"),
    ("abdomen", "lower_body"),
    ("lower_body", "lower_body"),
    ("chest", "chest"),
    ("head_neck", "lower_body"),
    ("abdomen", "abdomen"),
)


HU_MIN, HU_MAX = -1024, 3071


def _as_range(name: str, value) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"phantom option {name!r} must be a [min, max] pair of numbers, got {value!r}") from None
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"phantom option {name!r} must satisfy 0 < min <= max, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class PhantomOptions:
    """Options of a phantom source.

    Args:
        n_cases: number of cases.
        seed: base seed; case ``i`` uses ``derive_seed(seed, source, i)``.
        spacing_xy: in-plane spacing range (mm), sampled per case.
        spacing_z: slice spacing range (mm), sampled per case.
        noise_hu: standard deviation of the (slightly smoothed) image noise.
    """

    n_cases: int = source_default("phantom", "n_cases")
    seed: int = source_default("phantom", "seed")
    spacing_xy: tuple[float, float] = source_default("phantom", "spacing_xy")
    spacing_z: tuple[float, float] = source_default("phantom", "spacing_z")
    noise_hu: float = source_default("phantom", "noise_hu")

    def __post_init__(self) -> None:
        if isinstance(self.n_cases, bool) or int(self.n_cases) != self.n_cases or self.n_cases < 0:
            raise ValueError(f"phantom option 'n_cases' must be a non-negative integer, got {self.n_cases!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"phantom option 'seed' must be a non-negative integer, got {self.seed!r}")
        noise = float(self.noise_hu)
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"phantom option 'noise_hu' must be >= 0, got {self.noise_hu!r}")
        object.__setattr__(self, "n_cases", int(self.n_cases))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "noise_hu", noise)
        object.__setattr__(self, "spacing_xy", _as_range("spacing_xy", self.spacing_xy))
        object.__setattr__(self, "spacing_z", _as_range("spacing_z", self.spacing_z))

    @classmethod
    def from_config(cls, cfg: Mapping) -> PhantomOptions:
        """Options from a source's config mapping; a ``type`` key is ignored, others must be fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in dict(cfg).items():
            if key == "type":
                continue
            if key not in names:
                raise ValueError(f"unknown phantom option {key!r}; expected one of {', '.join(names)}")
            kwargs[key] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class PhantomSpec:
    """Everything needed to generate one phantom case (JSON-serialisable via ``dataclasses.asdict``).

    ``shape`` is in voxels along (x, y, z) of the *stored* array, ``flip`` the axes stored
    reversed (the affine compensates, so world positions do not depend on it).
    """

    case_id: str
    seed: int
    top_region: str
    bottom_region: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    body_scale: tuple[float, float, float]
    flip: tuple[bool, bool, bool]
    noise_hu: float = 12.0


def fat_factor(body_scale: Sequence[float]) -> float:
    """Subcutaneous/visceral fat multiplier, derived from the body scale (wider bodies carry more fat)."""
    lat, ap, _ = body_scale
    return float(np.clip(1.0 + 2.5 * (lat - 1.0) + 2.0 * (ap - 1.0), 0.5, 1.8))


def fov_z(top: str, bottom: str) -> tuple[float, float]:
    return REGION_FOV[top][0], REGION_FOV[bottom][1]


def _max_half_extent(top: str, bottom: str, body_scale: Sequence[float]) -> tuple[float, float]:
    """Largest lateral and AP half extent (world mm) of the body inside the region FOV."""
    z_top, z_bot = fov_z(top, bottom)
    zs = np.linspace(z_bot, z_top, 200)
    fat = fat_factor(body_scale) * interp_keys(zs, FAT_KEYS)
    lat = np.zeros_like(zs)
    ap = np.zeros_like(zs)
    trunk = (zs <= TRUNK_KEYS[0][0]) & (zs >= TRUNK_KEYS[-1][0])
    k = TRUNK_KEYS
    lat = np.where(trunk, interp_keys(zs, k, 3) + fat, lat)
    ap = np.where(trunk, np.abs(interp_keys(zs, k, 2)) + interp_keys(zs, k, 4) + fat, ap)
    legs = zs <= LEG_KEYS[0][0]
    lk = LEG_KEYS
    lat = np.maximum(lat, np.where(legs, interp_keys(zs, lk, 1) + interp_keys(zs, lk, 3) + fat, 0))
    ap = np.maximum(ap, np.where(legs, np.abs(interp_keys(zs, lk, 2)) + interp_keys(zs, lk, 4) + fat, 0))
    head = zs >= -230
    lat = np.maximum(lat, np.where(head, 80.0, 0))
    ap = np.maximum(ap, np.where(head, 112.0, 0))
    return float(lat.max() * body_scale[0]), float(ap.max() * body_scale[1])


def plan_phantom_cases(options: PhantomOptions, source: str = "phantom") -> list[PhantomSpec]:
    """The specs of the ``options.n_cases`` cases of a phantom source (cheap, no array work).

    Case ``i`` depends only on ``(options.seed, source, i)`` and the options, so adding cases
    leaves the earlier ones unchanged. Region pairs cycle through :data:`REGION_PAIRS`.
    """
    specs = []
    for i in range(options.n_cases):
        seed = derive_seed(options.seed, source, i)
        rng = np.random.default_rng(derive_seed(seed, "plan"))
        top, bottom = REGION_PAIRS[i % len(REGION_PAIRS)]
        sxy = round(float(rng.uniform(*options.spacing_xy)), 3)
        sz = round(float(rng.uniform(*options.spacing_z)), 3)
        lat = float(rng.uniform(0.88, 1.12))
        ap = float(np.clip(lat + rng.uniform(-0.08, 0.08), 0.85, 1.15))
        height = float(rng.uniform(0.9, 1.1))
        scale = (round(lat, 3), round(ap, 3), round(height, 3))
        flip = tuple(bool(f) for f in rng.random(3) < 0.3)
        margin = float(rng.uniform(25.0, 45.0))
        half_lat, half_ap = _max_half_extent(top, bottom, scale)
        fov = float(np.clip(2.0 * (max(half_lat, half_ap) + margin), 380.0, 500.0))
        nxy = int(round(fov / sxy))
        z_top, z_bot = fov_z(top, bottom)
        nz = int(math.floor((z_top - z_bot) * scale[2] / sz + 1e-6)) + 1
        specs.append(
            PhantomSpec(
                case_id=f"{source}_{i:04d}",
                seed=seed,
                top_region=top,
                bottom_region=bottom,
                spacing=(sxy, sxy, sz),
                shape=(nxy, nxy, nz),
                body_scale=scale,
                flip=flip,  # type: ignore[arg-type]
                noise_hu=options.noise_hu,
            )
        )
    return specs


def interp_keys(z, keys: Sequence[Sequence[float]], col: int = 1) -> np.ndarray:
    """Linear interpolation of column ``col`` of z-keyed rows (any z order), clamped at the ends."""
    k = np.asarray(keys, dtype=float)
    order = np.argsort(k[:, 0])
    return np.interp(z, k[order, 0], k[order, col])


#: Fascia (inside of the subcutaneous fat) of neck and trunk: (z, cx, cy, a, b).
TRUNK_KEYS = (
    (-140.0, 0, -12, 53, 55),
    (-238.0, 0, -12, 52, 54),
    (-250.0, 0, -13, 68, 60),
    (-262.0, 0, -13, 112, 74),
    (-275.0, 0, -11, 145, 86),
    (-290.0, 0, -8, 162, 94),
    (-305.0, 0, -6, 168, 99),
    (-340.0, 0, -5, 160, 103),
    (-450.0, 0, -3, 150, 105),
    (-520.0, 0, 0, 144, 102),
    (-600.0, 0, 4, 134, 96),
    (-680.0, 0, 5, 132, 93),
    (-760.0, 0, 2, 147, 93),
    (-840.0, 0, -6, 156, 100),
    (-900.0, 0, -6, 150, 98),
    (-935.0, 0, -4, 128, 74),
)


#: Fascia of the right leg (the left is mirrored): (z, cx, cy, a, b).
LEG_KEYS = (
    (-875.0, 84, 0, 66, 76),
    (-960.0, 88, 4, 64, 70),
    (-1100.0, 92, 8, 54, 60),
    (-1300.0, 95, 10, 44, 48),
)


#: Reference subcutaneous fat thickness (z, mm), scaled per case by the fat factor.
FAT_KEYS = (
    (20.0, 3),
    (-140.0, 3),
    (-200.0, 5),
    (-245.0, 6),
    (-262.0, 8),
    (-320.0, 10),
    (-450.0, 12),
    (-520.0, 14),
    (-620.0, 18),
    (-760.0, 18),
    (-880.0, 20),
    (-960.0, 14),
    (-1300.0, 10),
)


#: Inside of the rib cage: (z, cx, cy, A, B).
CAGE_KEYS = (
    (-250.0, 0, -22, 36, 32),
    (-268.0, 0, -18, 64, 50),
    (-285.0, 0, -14, 96, 68),
    (-320.0, 0, -9, 118, 82),
    (-370.0, 0, -5, 130, 90),
    (-430.0, 0, -3, 134, 93),
    (-500.0, 0, -1, 134, 92),
    (-560.0, 0, 1, 128, 90),
)


#: y of the vertebral body centres along z.
SPINE_KEYS = (
    (-130.0, -20),
    (-200.0, -13),
    (-245.0, -17),
    (-280.0, -28),
    (-350.0, -44),
    (-420.0, -48),
    (-500.0, -43),
    (-560.0, -36),
    (-620.0, -28),
    (-690.0, -22),
    (-712.0, -28),
)
