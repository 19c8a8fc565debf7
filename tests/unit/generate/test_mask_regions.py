"""The body regions a mask-conditioned case's diffusion UNet is conditioned on: the mask's, derived as NVIDIA's
sampler derives them (``get_body_region_index_from_mask``), for generated maps, the user's own maps and resampled
database maps; the request's for exact database maps, for unmasked cases and for variants without region inputs."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.masks import COLUMNS, mask_row
from helpers.models import save_image_checkpoints
from helpers.nvidia import nvidia_module
from helpers.paths import ROOT
from helpers.volumes import write_nifti

from maisi.core.anatomy import BODY_REGIONS, one_hot
from maisi.core.io import read_json, sidecar_path
from maisi.core.labels import BODY, label_id
from maisi.generate.augment import AugmentSettings
from maisi.generate.mask_database import build_mask_database
from maisi.generate.mask_generation import GeneratedMasks
from maisi.generate.requests import GenerationRequest, parse_requests
from maisi.generate.sampling import load_models
from maisi.generate.settings import DecodeSettings, GenerateSettings
from maisi.generate.shard import case_paths, generate_case
from maisi.generate.user_masks import load_user_masks
from maisi.models.variants import variant

SIZE, SPACING = (32, 32, 32), (4.0, 4.0, 4.0)
SETTINGS = GenerateSettings(variant="tiny", device="cpu", decoder=DecodeSettings(devices=("cpu",)), augment=AugmentSettings())

#: Label maps by the organs they hold, head first (each organ a block of its own): MAISI's markers of one, two, three
#: and four regions, regions with a gap between them, and labels that mark no region in MAISI's rule (vertebrae, body).
MAPS: dict[str, tuple[int, ...]] = {
    "chest": (28, 30),
    "lower_body": (label_id("left femur"),),
    "chest-abdomen": (29, 1),
    "head_neck-chest": (label_id("skull"), 31),
    "abdomen-lower_body": (14, label_id("right femur")),
    "head_neck-abdomen-gap": (label_id("brain"), 5),
    "chest-lower_body": (32, 3, label_id("left femur")),
    "all_four": (label_id("brain"), 32, 4, label_id("right femur")),
    "chest-with-lumbar-vertebrae": (28, label_id("vertebrae L1"), label_id("vertebrae L3")),
}


def _map(ids: tuple[int, ...], n: int = 32) -> np.ndarray:
    """The body (200) with one block per organ, the first at the top (high z, RAS), well inside the volume."""
    m = np.zeros((n, n, n), np.uint8)
    m[n // 8 : n - n // 8, n // 8 : n - n // 8, :] = BODY
    lo, hi = n // 4, n - n // 4
    edges = np.linspace(hi, lo, len(ids) + 1).round().astype(int)
    for organ, top, bottom in zip(ids, edges[:-1], edges[1:], strict=True):
        m[n // 4 : n // 2, n // 4 : n // 2, bottom:top] = organ
    return m


def _nvidia_indices(mask: np.ndarray) -> tuple[list[int], list[int]]:
    return nvidia_module("utils").get_body_region_index_from_mask(torch.from_numpy(mask.astype(np.int64))[None])


def _request(**changes) -> GenerationRequest:
    fields = {"name": "r", "n_cases": 1, "size": SIZE, "spacing": SPACING, "top_region": "chest", "bottom_region": "abdomen",
              "masks": True, "sampler": "rflow", "steps": 2, "seed": 3, **changes}  # fmt: skip
    return GenerationRequest(**fields)


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("var", ["ddpm-ct", "tiny", "phantom-ct"])
def test_regions_derived_from_a_mask_match_nvidia(name, var):
    """Every variant with region inputs takes the mask's regions, as NVIDIA's function gives them."""
    from maisi.generate.sampling import conditioning_regions

    mask = _map(MAPS[name])
    used = conditioning_regions(variant(var), _request(), mask)
    top, bottom = _nvidia_indices(mask)
    assert (one_hot(used["top_region"]), one_hot(used["bottom_region"])) == (top, bottom)
    assert used["regions_from"] == "mask"


def test_variants_without_region_inputs_and_unmasked_cases_keep_the_request_regions():
    from maisi.generate.sampling import conditioning_regions

    request = {"top_region": "chest", "bottom_region": "abdomen", "regions_from": "request"}
    assert conditioning_regions(variant("rflow-ct"), _request(), _map(MAPS["all_four"])) == request  # NVIDIA's v2: no region input
    assert conditioning_regions(variant("ddpm-ct"), _request(masks=False), None) == request


def test_a_map_without_a_region_marker_keeps_the_request_regions_with_a_warning(caplog):
    """NVIDIA's function has no answer for such a map (it fails); the request's regions are used, said in the log."""
    from maisi.generate.sampling import conditioning_regions

    mask = _map((label_id("heart"), label_id("vertebrae T5")))
    with pytest.raises(ValueError):
        _nvidia_indices(mask)
    with caplog.at_level(logging.WARNING):
        used = conditioning_regions(variant("ddpm-ct"), _request(), mask, "label map own/c0.nii.gz")
    assert used == {"top_region": "chest", "bottom_region": "abdomen", "regions_from": "request"}
    assert "label map own/c0.nii.gz holds no body-region marker" in caplog.text


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    files = save_image_checkpoints(tmp_path_factory.mktemp("models"))
    return load_models(files["autoencoder"], files["diffusion"], files["controlnet"], "tiny", "cpu")


def _generate(models, request, masks, out, masks_sha256="x"):
    """Generate case 0; the region inputs the diffusion UNet got at its first step (one-hot rows) and the sidecar."""
    seen: list[dict] = []
    hook = models.unet.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        generate_case(models, request, request.cases()[0], masks, SETTINGS, out, progress=False, masks_sha256=masks_sha256)
    finally:
        hook.remove()
    inputs = seen[0]
    regions = [(inputs[k] / 100).round().int()[0].tolist() for k in ("top_region_index_tensor", "bottom_region_index_tensor")]
    return tuple(regions), read_json(sidecar_path(case_paths(out, request.name, request.cases()[0].case_id)["image"]))


@pytest.mark.parametrize("name", ["chest", "head_neck-chest", "chest-abdomen", "all_four"])
def test_a_case_on_the_users_own_map_is_conditioned_on_the_maps_regions(tmp_path, models, name, caplog):
    mask = _map(MAPS[name])
    write_nifti(tmp_path / "own" / "labels" / "c0.nii.gz", mask, spacing=SPACING)
    block = {"requests": {"own": {"n_cases": 1, "size": list(SIZE), "spacing": list(SPACING), "top_region": "chest",
                                  "bottom_region": "abdomen", "masks": "folder", "steps": 2,
                                  "mask_folder": {"path": str(tmp_path / "own"), "labels": "labels/{case}.nii.gz"}}},
             "user_masks": {"out_of_range": "warn"}}  # fmt: skip
    request = parse_requests(block, "tiny", "rflow")[0]
    own, digest = load_user_masks(request.mask_folder, "mask_folder")
    with caplog.at_level(logging.WARNING):
        unet_regions, record = _generate(models, request, own, tmp_path / "out", digest)
    top, bottom = _nvidia_indices(mask)
    assert unet_regions == (top, bottom)
    conditions = record["conditions"]
    assert (conditions["top_region"], conditions["bottom_region"]) == (BODY_REGIONS[top.index(1)], BODY_REGIONS[bottom.index(1)])
    assert conditions["regions_from"] == "mask"
    assert record["fingerprint"]["request"]["top_region"] == "chest"  # the request itself is kept as it was
    differs = name != "chest-abdomen"
    assert ("differ from the request's (chest -> abdomen)" in caplog.text) == differs


class _OneMap(GeneratedMasks):
    """Stands in for NVIDIA's mask-generation model: always the same map."""

    def __init__(self, mask: np.ndarray):
        super().__init__(models=None, size_conditions=[], steps=None, sha256="stub")  # type: ignore[arg-type]
        self.mask = mask

    def draw(self, request, seed, progress=True):
        return self.mask.copy(), {"case_id": "generated"}


def test_a_case_on_a_generated_map_is_conditioned_on_the_maps_regions(tmp_path, models):
    mask = _map(MAPS["all_four"])
    request = _request(mask_source="generated", anatomy_sizes=(("liver", 0.5),))
    unet_regions, record = _generate(models, request, _OneMap(mask), tmp_path)
    assert unet_regions == _nvidia_indices(mask) == (one_hot("head_neck"), one_hot("lower_body"))
    assert record["conditions"]["regions_from"] == "mask"


def test_database_maps_exact_keep_the_request_regions_resampled_take_the_maps(tmp_path, models):
    """As NVIDIA's sampler: an exact candidate keeps the regions the database holds for it (the request's), a map
    resampled to the request's grid has its regions derived again, from the resampled map (before augmentation)."""
    # the table's regions, not the map's own (as a manual region override gives them)
    exact = [mask_row(tmp_path, "exact", _map(MAPS["chest"]), SPACING, "chest", "abdomen")]
    entries = build_mask_database(pd.DataFrame(exact, columns=list(COLUMNS)))
    unet_regions, record = _generate(models, _request(), entries, tmp_path / "exact")
    assert record["mask"]["resampled"] is False
    assert unet_regions == (one_hot("chest"), one_hot("abdomen")) and record["conditions"]["regions_from"] == "request"

    coarse = _map(MAPS["all_four"], 24)
    other = [mask_row(tmp_path, "coarse", coarse, [6.0, 6.0, 6.0], "head_neck", "lower_body")]
    entries = build_mask_database(pd.DataFrame(other, columns=list(COLUMNS)))
    unet_regions, record = _generate(models, _request(), entries, tmp_path / "coarse")
    assert record["mask"]["resampled"] is True
    assert unet_regions == (one_hot("head_neck"), one_hot("lower_body"))
    assert record["conditions"]["regions_from"] == "mask" and record["conditions"]["top_region"] == "head_neck"


def test_unmasked_case_records_the_request_regions(tmp_path, models):
    unet_regions, record = _generate(models, _request(masks=False, top_region="abdomen"), None, tmp_path)
    assert unet_regions == (one_hot("abdomen"), one_hot("abdomen"))
    assert record["conditions"]["regions_from"] == "request" and record["conditions"]["top_region"] == "abdomen"


def test_the_default_runs_masks_give_the_request_regions(tmp_path):
    """The embedded default's masked request (tiny, chest -> abdomen) draws a phantom map of its regions, resampled to
    its grid: the regions derived from that map are the request's, so the default's images do not change."""
    from maisi.generate.mask_database import MaskQuery, load_mask
    from maisi.generate.sampling import conditioning_regions
    from maisi.prepare.preprocess import PreprocessSettings, preprocess_case
    from maisi.sources.cases import CaseInput, phantom_specs
    from maisi.sources.phantom.writing import write_phantom_case

    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    requests = parse_requests({"requests": cfg["generate"]["requests"]}, cfg["model"]["variant"], "rflow")
    masked = [r for r in requests if r.masks]
    assert masked and all(r.mask_source == "database" for r in masked)
    (name, src), = ((n, s) for n, s in cfg["sources"].items() if s["type"] == "phantom")  # fmt: skip
    block = cfg["preprocess"]
    settings = PreprocessSettings(divisor=int(block["divisor"]), hu_range=tuple(block["hu_range"]), keep_hu=False)
    checked = 0
    for spec in phantom_specs(name, src, int(cfg["seed"])):
        fitting = [r for r in masked if (r.top_region, r.bottom_region) == (spec.top_region, spec.bottom_region)]
        if not fitting:
            continue
        image, label = tmp_path / "src" / f"{spec.case_id}.nii.gz", tmp_path / "src" / f"{spec.case_id}_label.nii.gz"
        write_phantom_case(spec, image, label)
        row = preprocess_case(CaseInput(name, spec.case_id, str(image), str(label)), tmp_path / "prepared", settings)
        entry, = build_mask_database(pd.DataFrame([{**row, "case_id": spec.case_id, "top_region": spec.top_region,
                                                    "bottom_region": spec.bottom_region}]))  # fmt: skip
        for request in fitting:
            query = MaskQuery(request.size, request.spacing, request.top_region, request.bottom_region, request.anatomy)
            mask, _ = load_mask(entry, query)
            used = conditioning_regions(variant(cfg["model"]["variant"]), request, mask)
            assert (used["top_region"], used["bottom_region"]) == (request.top_region, request.bottom_region), spec.case_id
            checked += 1
    assert checked >= 1
