"""Generation requests: what a user asks the factory to synthesise, checked before any job starts.

A request (one entry of ``generate.requests`` in the config) asks for ``n_cases`` volumes of one
output size and spacing, spanning ``top_region`` to ``bottom_region``, optionally with anatomy that
must be present (which needs mask-conditioned generation with the ControlNet). Each case has an
id ``<request>_<index>`` and its own seed derived from the request's seed, name and index; cases
are grouped into shards of ``cases_per_shard`` consecutive indices, so adding cases only adds
shards (or fills the last one) and never changes another case's seed.

The checks follow MAISI's inference rules: a released variant (``ddpm-ct``, ``rflow-ct``) generates
the grids its file names (x = y in {256, 384, 512} and z in {128, 256, ..., 768}, the spacing x = y
in [0.5, 3] mm and z in [0.5, 5] mm, the x field of view at least 256 mm); the ``tiny`` variant takes
any size that is a multiple of its latent factor. The sampler is the diffusion model's, the
modality a CT code, and classifier-free guidance needs something to drop: a modality input or a mask. The field of view along z must be able to reach from the
top region to the bottom region (typical adult region lengths, :data:`REGION_LENGTH_MM`), and a
required organ must lie in one of the requested regions.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from maisi.core.anatomy import BODY_REGIONS, REGION_LABELS
from maisi.core.labels import label_name, resolve_label
from maisi.core.schema import schema_default
from maisi.core.seeds import derive_seed
from maisi.core.shards import shard_name
from maisi.generate.anatomy_sizes import check_anatomy_sizes
from maisi.models.variants import DEFAULT_STEPS, DOWNSAMPLE, MODALITIES, modality_code, variant
from maisi.train.settings import resolve_scheduler

__all__ = ["RequestError", "GenerationRequest", "GenCase", "latent_factor", "validate_request", "parse_requests", "config_requests", "REGION_LENGTH_MM", "DEFAULT_STEPS"]

#: Typical cranio-caudal extent of each body region in adults (mm), for the field-of-view check.
REGION_LENGTH_MM = {"head_neck": 250.0, "chest": 300.0, "abdomen": 250.0, "lower_body": 450.0}


log = logging.getLogger(__name__)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")




class RequestError(ValueError):
    """An impossible generation request; the message names the config key and the reason."""


def latent_factor(variant_name: str) -> int:
    """What every output size must be a multiple of: the autoencoder's 4x times the UNet's halvings."""
    return DOWNSAMPLE * 2 ** (variant(variant_name).unet_levels - 1)


@dataclass(frozen=True)
class GenCase:
    """One case to generate: its request, index, id and seed."""

    request: str
    index: int
    case_id: str
    seed: int

    def attempt_seed(self, attempt: int) -> int:
        """The seed of a regeneration attempt (attempt 0 is the case's own seed)."""
        return self.seed if attempt == 0 else derive_seed(self.seed, "attempt", attempt)


@dataclass(frozen=True)
class GenerationRequest:
    """One entry of ``generate.requests``; anatomy is held as MAISI label ids."""

    name: str
    n_cases: int
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    top_region: str
    bottom_region: str
    anatomy: tuple[int, ...] = ()
    masks: bool = True
    sampler: str = "rflow"
    steps: int = 30
    seed: int = 0
    cases_per_shard: int = 2
    allow_tumour: bool = False
    modality: int = MODALITIES["ct"]
    cfg_guidance_scale: float = 0.0
    #: Where a masked case's label map comes from: ``database`` or ``generated`` (NVIDIA's mask model).
    mask_source: str = "database"
    #: With generated masks: the (name, size) pairs the map is generated for.
    anatomy_sizes: tuple[tuple[str, float], ...] = ()
    #: With ``mask_source`` ``folder``: the request's ``mask_folder`` (path, labels, images, label_map).
    mask_folder: dict | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(s // DOWNSAMPLE for s in self.size)  # type: ignore[return-value]

    def cases(self) -> list[GenCase]:
        return [GenCase(self.name, i, f"{self.name}_{i:05d}", derive_seed(self.seed, "generate", self.name, i)) for i in range(self.n_cases)]

    def shards(self) -> dict[str, list[GenCase]]:
        """Non-empty shards by name: shard ``k`` holds indices ``k * cases_per_shard ...`` (stable as cases are added)."""
        out: dict[str, list[GenCase]] = {}
        for case in self.cases():
            out.setdefault(shard_name(case.index // self.cases_per_shard), []).append(case)
        return out

    def to_json(self) -> dict[str, Any]:
        """The settings that decide the request's outputs (stable; a Snakemake param)."""
        return {
            "name": self.name, "size": list(self.size), "spacing": list(self.spacing), "top_region": self.top_region,
            "bottom_region": self.bottom_region, "anatomy": list(self.anatomy), "masks": self.masks, "sampler": self.sampler,
            "steps": self.steps, "seed": self.seed, "allow_tumour": self.allow_tumour, "modality": self.modality,
            "cfg_guidance_scale": self.cfg_guidance_scale, "mask_source": self.mask_source,
            "controllable_anatomy_size": [list(p) for p in self.anatomy_sizes], "mask_folder": self.mask_folder,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GenerationRequest:
        return cls(
            name=d["name"], n_cases=int(d.get("n_cases", 0)), size=tuple(d["size"]), spacing=tuple(d["spacing"]),
            top_region=d["top_region"], bottom_region=d["bottom_region"], anatomy=tuple(d["anatomy"]), masks=bool(d["masks"]),
            sampler=d["sampler"], steps=int(d["steps"]), seed=int(d["seed"]), allow_tumour=bool(d.get("allow_tumour", False)),
            modality=int(d.get("modality", MODALITIES["ct"])), cfg_guidance_scale=float(d.get("cfg_guidance_scale", 0.0)),
            mask_source=str(d.get("mask_source", "database")),
            anatomy_sizes=tuple((str(n), float(v)) for n, v in d.get("controllable_anatomy_size", [])),
            mask_folder=d.get("mask_folder"),
        )  # fmt: skip

    def _mask_words(self) -> str:
        if not self.masks:
            return "no mask"
        if self.mask_source == "generated":
            return "generated mask (" + ", ".join(f"{n} {v:g}" for n, v in self.anatomy_sizes) + ")"
        if self.mask_source == "folder":
            return f"own masks ({(self.mask_folder or {}).get('path')})"
        return "mask-conditioned"

    def describe(self, count: bool = True) -> str:
        anatomy = ", ".join(label_name(i) for i in self.anatomy) or "none required"
        return (f"{f'{self.n_cases} x ' if count else ''}{'x'.join(map(str, self.size))} at {'x'.join(f'{s:g}' for s in self.spacing)} mm, "
                f"{self.top_region} -> {self.bottom_region}, anatomy: {anatomy}, {self._mask_words()}, "
                f"{self.sampler} {self.steps} steps{f', guidance {self.cfg_guidance_scale:g}' if self.cfg_guidance_scale else ''}")  # fmt: skip


def _triple(value: Any, key: str, kind: type) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise RequestError(f"{key}: expected three numbers, got {value!r}")
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise RequestError(f"{key}: expected three numbers, got {value!r}") from None
    if kind is int and any(float(v) != int(float(v)) for v in value):
        raise RequestError(f"{key}: sizes must be whole numbers, got {value!r}")
    return out


def _region(value: Any, key: str) -> str:
    if value not in BODY_REGIONS:
        raise RequestError(f"{key}: unknown body region {value!r}; expected one of {', '.join(BODY_REGIONS)}")
    return str(value)


def _organ_regions() -> dict[int, str]:
    return {label: region for region, labels in REGION_LABELS.items() for label in labels}


def validate_request(req: GenerationRequest, variant_name: str, where: str = "generate.requests") -> None:
    """Refuse an impossible request with a :class:`RequestError` naming the key and the reason."""
    key = f"{where}.{req.name}"
    if req.n_cases < 0:
        raise RequestError(f"{key}.n_cases: must be >= 0, got {req.n_cases}")
    if req.cases_per_shard < 1:
        raise RequestError(f"{key}.cases_per_shard: must be >= 1, got {req.cases_per_shard}")
    factor = latent_factor(variant_name)
    bad = [s for s in req.size if s < factor or s % factor]
    if bad:
        raise RequestError(f"{key}.size: {list(req.size)} is not a multiple of the latent factor {factor} of variant '{variant_name}' "
                           f"(4x autoencoder downsampling x the diffusion UNet's halvings)")  # fmt: skip
    if any(not 0 < s <= 10 for s in req.spacing):
        raise RequestError(f"{key}.spacing: {list(req.spacing)} mm is outside (0, 10] mm")
    var = variant(variant_name)
    if var.grid:
        _check_grid(req, var.grid, f"variant {var.name}", key)
    top, bottom = BODY_REGIONS.index(req.top_region), BODY_REGIONS.index(req.bottom_region)
    if top > bottom:
        raise RequestError(f"{key}: top_region {req.top_region} lies below bottom_region {req.bottom_region}")
    fov_z = req.size[2] * req.spacing[2]
    between = sum(REGION_LENGTH_MM[r] for r in BODY_REGIONS[top + 1 : bottom])
    spanned = sum(REGION_LENGTH_MM[r] for r in BODY_REGIONS[top : bottom + 1])
    if fov_z < 0.8 * between:
        raise RequestError(f"{key}: a z field of view of {fov_z:g} mm cannot reach from {req.top_region} to {req.bottom_region} "
                           f"(the regions between need about {between:g} mm)")  # fmt: skip
    if fov_z > 2 * spanned + 100:
        raise RequestError(f"{key}: a z field of view of {fov_z:g} mm is far longer than {req.top_region} to {req.bottom_region} "
                           f"(about {spanned:g} mm); widen the regions or reduce size or spacing")  # fmt: skip
    if req.anatomy and not req.masks:
        raise RequestError(f"{key}.anatomy: required anatomy needs mask-conditioned generation (masks: true)")
    if req.mask_source == "generated":
        if not (req.masks and var.mask_generation):
            raise RequestError(f"{key}.masks: generated masks need a released variant with NVIDIA's mask-generation model, "
                               f"not {var.name}")  # fmt: skip
        if not req.anatomy_sizes:
            raise RequestError(f"{key}.controllable_anatomy_size: generated masks need at least one [name, size] pair")
        try:
            check_anatomy_sizes(req.anatomy_sizes, f"{key}.controllable_anatomy_size")
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    elif req.anatomy_sizes:
        raise RequestError(f"{key}.controllable_anatomy_size: only generated masks take anatomy sizes (masks: generated)")
    if (req.mask_source == "folder") != bool(req.mask_folder):
        raise RequestError(f"{key}.mask_folder: masks 'folder' and mask_folder go together")
    regions = set(BODY_REGIONS[top : bottom + 1])
    where_organ = _organ_regions()
    outside = [label_name(a) for a in req.anatomy if a in where_organ and where_organ[a] not in regions]
    if outside:
        raise RequestError(f"{key}.anatomy: {', '.join(outside)} lie outside {req.top_region} -> {req.bottom_region}")
    if req.sampler not in DEFAULT_STEPS:
        raise RequestError(f"{key}.sampler: expected one of {', '.join(DEFAULT_STEPS)}, got {req.sampler!r}")
    if var.released and req.sampler != var.sampler:
        raise RequestError(f"{key}.sampler: variant {var.name} is sampled with '{var.sampler}', not '{req.sampler}'")
    if req.steps < 1:
        raise RequestError(f"{key}.steps: must be >= 1, got {req.steps}")
    if not var.takes_modality and req.modality != MODALITIES["ct"]:
        raise RequestError(f"{key}.modality: variant {var.name} takes no modality input (it generates CT); "
                           f"only 'ct' applies, got code {req.modality}")  # fmt: skip
    if req.cfg_guidance_scale < 0:
        raise RequestError(f"{key}.cfg_guidance_scale: must be >= 0, got {req.cfg_guidance_scale}")
    if req.cfg_guidance_scale > 0 and not var.takes_modality and not req.masks:
        raise RequestError(f"{key}.cfg_guidance_scale: guidance would change nothing: variant {var.name} has no modality input and "
                           f"the request no mask (the unconditional branch drops the modality label and the mask's tumours)")  # fmt: skip


def _check_grid(req: GenerationRequest, grid: Mapping[str, Any], what: str, key: str) -> None:
    """The output grids a released model was trained for (its variant file's ``grid``)."""
    x, y, z = req.size
    if x != y or x not in grid["xy_sizes"] or z not in grid["z_sizes"]:
        raise RequestError(f"{key}.size: {what} generates x = y in {list(grid['xy_sizes'])} and z in {list(grid['z_sizes'])}, "
                           f"got {list(req.size)}")  # fmt: skip
    sx, sy, sz = req.spacing
    (xy_lo, xy_hi), (z_lo, z_hi) = grid["spacing_xy_mm"], grid["spacing_z_mm"]
    if sx != sy or not xy_lo <= sx <= xy_hi or not z_lo <= sz <= z_hi:
        raise RequestError(f"{key}.spacing: {what} takes x = y in [{xy_lo:g}, {xy_hi:g}] mm and z in [{z_lo:g}, {z_hi:g}] mm, "
                           f"got {list(req.spacing)}")  # fmt: skip
    if x * sx < grid["min_fov_xy_mm"]:
        raise RequestError(f"{key}: the x field of view {x * sx:g} mm is below the minimum of {grid['min_fov_xy_mm']:g} mm of {what}")


def parse_requests(
    block: Mapping[str, Any], variant_name: str, trained_sampler: str | None = None, where: str = "generate"
) -> list[GenerationRequest]:
    """Every request of the ``generate`` config block, validated; sorted by name.

    ``block`` holds ``requests`` (name -> request) and defaults for ``sampler``, ``steps``,
    ``cases_per_shard``, ``seed``, ``modality`` and ``cfg_guidance_scale``. ``trained_sampler`` is the
    scheduler the diffusion model is trained with, when known: a request for the other sampler is refused.
    """
    var = variant(variant_name)
    requests = block.get("requests") or {}
    if not isinstance(requests, Mapping):
        raise RequestError(f"{where}.requests: expected a mapping of request name -> settings")
    out = []
    for name, raw in sorted(requests.items()):
        key = f"{where}.requests.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise RequestError(f"{key}: request names use letters, digits, '_' and '-' only")
        if not isinstance(raw, Mapping):
            raise RequestError(f"{key}: expected a mapping")
        sampler = raw.get("sampler") or block.get("sampler") or trained_sampler or var.sampler
        if trained_sampler and sampler != trained_sampler:
            raise RequestError(f"{key}.sampler: the diffusion model is trained with '{trained_sampler}', cannot sample with '{sampler}'")
        default_steps = var.inference_steps if sampler == var.sampler else DEFAULT_STEPS.get(sampler, 30)
        steps = raw.get("steps") or block.get("steps") or default_steps
        try:
            modality = modality_code(raw.get("modality", block.get("modality", "ct")), f"{key}.modality")
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        masks = raw.get("masks", True)
        if masks not in (True, False, "database", "generated", "folder"):
            raise RequestError(f"{key}.masks: expected true, false, 'database', 'generated' or 'folder', got {masks!r}")
        sizes = raw.get("controllable_anatomy_size") or []
        if not isinstance(sizes, Sequence) or isinstance(sizes, str) or any(
            not isinstance(p, Sequence) or isinstance(p, str) or len(p) != 2 for p in sizes
        ):
            raise RequestError(f"{key}.controllable_anatomy_size: expected a list of [name, size] pairs, got {sizes!r}")
        anatomy = raw.get("anatomy") or []
        if isinstance(anatomy, (str, int)):
            anatomy = [anatomy]
        try:
            ids = tuple(sorted({resolve_label(a) for a in anatomy}))
        except (KeyError, ValueError) as exc:
            raise RequestError(f"{key}.anatomy: {exc.args[0] if exc.args else exc}") from None
        try:
            req = GenerationRequest(
                name=name, n_cases=int(raw["n_cases"]), size=_triple(raw["size"], f"{key}.size", int),
                spacing=_triple(raw["spacing"], f"{key}.spacing", float),
                top_region=_region(raw["top_region"], f"{key}.top_region"),
                bottom_region=_region(raw["bottom_region"], f"{key}.bottom_region"), anatomy=ids,
                masks=masks is not False, sampler=str(sampler), steps=int(steps),
                mask_source=masks if masks in ("generated", "folder") else "database",
                mask_folder=dict(raw["mask_folder"]) if raw.get("mask_folder") else None,
                anatomy_sizes=tuple((str(n), float(v)) for n, v in sizes),
                seed=int(raw.get("seed", block.get("seed", 0))),
                cases_per_shard=int(raw.get("cases_per_shard", block.get("cases_per_shard", 2))),
                allow_tumour=bool(raw.get("allow_tumour", False)), modality=modality,
                cfg_guidance_scale=float(raw.get("cfg_guidance_scale", block.get("cfg_guidance_scale", 0.0))),
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            if isinstance(exc, RequestError):
                raise
            raise RequestError(f"{key}: {exc}") from None
        validate_request(req, variant_name, f"{where}.requests")
        if req.mask_source == "folder":
            _check_user_masks(req, block.get("user_masks") or {}, f"{where}.requests.{name}")
        out.append(req)
    return out


def config_requests(config: Mapping[str, Any]) -> dict[str, GenerationRequest]:
    """The requests of a whole config by name, checked against the diffusion model's sampler.

    Parsed once per process for the same config: config validation and the rules both ask.
    """
    variant_name = config.get("model", {}).get("variant", "tiny")
    trained = _trained_sampler(config, variant_name)
    key = json.dumps([config.get("generate", {}), variant_name, trained], sort_keys=True, default=str)
    return _parsed(key)


def _check_user_masks(req: GenerationRequest, policy: Mapping[str, Any], key: str) -> None:
    """The request's own maps exist and their fields of view suit its regions (NVIDIA's recommendation; where
    it gives none for the regions, the log says the maps are not checked)."""
    from maisi.generate.user_masks import find_user_masks, fov_problem, recommended_ct
    from maisi.sources.cases import resolve_label_map

    tolerance = float(policy.get("fov_tolerance", schema_default("generate.user_masks.fov_tolerance")))
    action = policy.get("out_of_range", schema_default("generate.user_masks.out_of_range"))
    resolve_label_map((req.mask_folder or {}).get("label_map"), f"{key}.mask_folder.label_map")
    masks = find_user_masks(req.mask_folder or {}, f"{key}.mask_folder")
    if recommended_ct(req.top_region, req.bottom_region) is None:
        log.warning("%s.mask_folder: NVIDIA recommends no CT field of view for %s -> %s (docs/inference.md, 'Recommended Spacing for CT', "
                    "has no such row): the %d maps' fields of view are not checked", key, req.top_region, req.bottom_region, len(masks))  # fmt: skip
    problems = [f"{m.case_id}: {p}" for m in masks if (p := fov_problem(m.dim, m.spacing, req.top_region, req.bottom_region, tolerance))]
    if problems and action == "refuse":
        raise RequestError(f"{key}.mask_folder: {len(problems)} of {len(masks)} maps: {problems[0]}"
                           f"{' (and more)' if len(problems) > 1 else ''}; set generate.user_masks.out_of_range: warn to go on")  # fmt: skip
    for p in problems:
        log.warning("%s.mask_folder: %s", key, p)


def _trained_sampler(config: Mapping[str, Any], variant_name: str) -> str | None:
    """The diffusion model's scheduler as far as the config tells: a released variant's own; the one it
    is trained with here; unknown (None) for a project variant's given checkpoint (generation checks
    the checkpoint's record)."""
    var = variant(variant_name)
    if var.released:
        return var.sampler
    if config.get("pretrained", {}).get("diffusion"):
        return None
    return resolve_scheduler(variant_name, config.get("train_diffusion", {}).get("scheduler"))


@functools.lru_cache(maxsize=8)
def _parsed(key: str) -> dict[str, GenerationRequest]:
    block, variant_name, trained = json.loads(key)
    return {r.name: r for r in parse_requests(block, variant_name, trained)}
