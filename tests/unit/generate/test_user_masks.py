"""Images from the user's own label maps: NVIDIA's body envelope, the field-of-view check, and a generated case."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.models import save_image_checkpoints
from helpers.nvidia import nvidia_module
from helpers.volumes import write_nifti

from maisi.core.labels import BODY
from maisi.generate.user_masks import RECOMMENDED_CT, add_body_envelope, fov_problem, recommended_ct


def _ct_and_seg(shape=(48, 40, 24)):
    """A chest: body (40 HU) with two lung lobes (-850 HU, labelled), the liver (labelled), a gas pocket,
    and a table under it (100 HU) with air trapped between them."""
    x, y, _ = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ct = np.full(shape, -1000.0, np.float32)
    body = ((x - 24) / 18.0) ** 2 + ((y - 18) / 13.0) ** 2 <= 1.0
    body = np.broadcast_to(body, shape)
    ct[body] = 40.0
    seg = np.zeros(shape, np.int64)
    seg[14:22, 12:24, 4:20], ct[14:22, 12:24, 4:20] = 28, -850.0
    seg[26:34, 12:24, 4:20], ct[26:34, 12:24, 4:20] = 29, -850.0
    seg[18:30, 24:28, 2:10] = 1
    ct[22:25, 8:11, 10:13] = -950.0  # gas inside the body, unlabelled
    ct[6:42, 34:36, :] = 100.0  # the table ...
    ct[6:42, 31:34, :] = -1000.0  # ... and the air between patient and table
    return ct, seg


def test_body_envelope_matches_nvidia():
    ct, seg = _ct_and_seg()
    theirs = nvidia_module("utils").add_body_envelope(seg, ct, device="cpu")
    ours = add_body_envelope(seg, ct)
    assert np.array_equal(ours, theirs)
    assert (ours == BODY).sum() > 1000 and np.array_equal(ours[seg > 0], seg[seg > 0])
    assert (ours[ct == -950.0] == BODY).all()  # gas inside the body is body
    assert not (ours[6:42, 34:36, :] == BODY).any()  # not the table
    without_lungs = seg.copy()
    without_lungs[np.isin(seg, (28, 29))] = 0
    assert np.array_equal(add_body_envelope(without_lungs, ct, seg_has_lung=False),
                          nvidia_module("utils").add_body_envelope(without_lungs, ct, seg_has_lung=False, device="cpu"))  # fmt: skip


def test_recommended_fields_of_view():
    assert recommended_ct("chest", "abdomen") == ((512, 512, 128), (0.781, 0.781, 2.981))
    assert recommended_ct("head_neck", "head_neck") is None and len(RECOMMENDED_CT) == 9
    assert fov_problem((512, 512, 128), (0.75, 0.75, 3.0), "chest", "abdomen", 0.3) is None
    problem = fov_problem((256, 256, 128), (1.0, 1.0, 1.0), "chest", "abdomen", 0.3)
    assert "recommended [400, 400, 382] mm" in problem and "size [512, 512, 128], spacing [0.781, 0.781, 2.981]" in problem
    assert "axis 0, 1, 2" in problem


def _own_maps(folder, with_body=True, with_ct=False, values=(1, 3)):
    """Two maps (liver, spleen; the body or not) on a 32^3 grid at 4 mm, with their CTs when asked."""
    for i in range(2):
        ct, seg = _ct_and_seg((32, 32, 32))
        seg[:] = 0
        seg[10:18, 8:16, 8:20], seg[18:24, 8:14, 8:16] = values
        if with_body:
            seg[(seg == 0) & (ct > -500)] = BODY
        write_nifti(folder / "labels" / f"c{i}.nii.gz", seg.astype(np.uint8), spacing=(4.0, 4.0, 4.0))
        if with_ct:
            write_nifti(folder / "ct" / f"c{i}.nii.gz", ct.astype(np.int16), spacing=(4.0, 4.0, 4.0))
    return folder


def _request(folder, policy=None, **spec):
    from maisi.generate.requests import parse_requests

    block = {"requests": {"own": {"n_cases": 3, "size": [32, 32, 32], "spacing": [4.0, 4.0, 4.0], "top_region": "chest",
                                  "bottom_region": "abdomen", "masks": "folder", "steps": 2,
                                  "mask_folder": {"path": str(folder), "labels": "labels/{case}.nii.gz", **spec}}},
             "user_masks": policy or {"out_of_range": "warn"}}  # fmt: skip
    return parse_requests(block, "tiny", "rflow")[0]


def test_own_maps_are_checked_against_nvidias_field_of_view(tmp_path, caplog):
    from maisi.core.checks import ConfigError
    from maisi.generate.requests import RequestError

    folder = _own_maps(tmp_path / "own")
    with pytest.raises(RequestError, match=r"2 of 2 maps: c0: field of view \[128, 128, 128\] mm .* recommended \[400, 400, 382\] mm"):
        _request(folder, {"out_of_range": "refuse"})
    req = _request(folder)  # warn
    assert req.mask_source == "folder" and "field of view" in caplog.text
    assert _request(folder, {"fov_tolerance": 3.0, "out_of_range": "refuse"}).mask_folder["path"] == str(folder)
    with pytest.raises(ConfigError, match=r"mask_folder': no label map matches"):
        _request(folder, labels="nothing/{case}.nii.gz")
    with pytest.raises(ConfigError, match=r"mask_folder.label_map'"):
        _request(folder, label_map={1: "no such organ"})


def _generate(tmp_path, req):
    from maisi.core.io import read_json, sidecar_path
    from maisi.generate.augment import AugmentSettings
    from maisi.generate.sampling import load_models
    from maisi.generate.settings import DecodeSettings, GenerateSettings
    from maisi.generate.shard import case_paths, generate_case
    from maisi.generate.user_masks import load_user_masks

    files = save_image_checkpoints(tmp_path)
    models = load_models(files["autoencoder"], files["diffusion"], files["controlnet"], "tiny", "cpu")
    own, digest = load_user_masks(req.mask_folder, "mask_folder")
    settings = GenerateSettings(variant="tiny", device="cpu", decoder=DecodeSettings(devices=("cpu",)), augment=AugmentSettings())
    out = []
    for case in req.cases():
        generate_case(models, req, case, own, settings, tmp_path / "out", progress=False, masks_sha256=digest)
        paths = case_paths(tmp_path / "out", req.name, case.case_id)
        import nibabel as nib

        out.append((np.asanyarray(nib.load(str(paths["label"])).dataobj), read_json(sidecar_path(paths["image"]))))
    return out


def test_cases_from_own_maps_with_the_body_added_from_the_ct(tmp_path):
    folder = _own_maps(tmp_path / "own", with_body=False, with_ct=True, values=(5, 7))
    req = _request(folder, images="ct/{case}.nii.gz", label_map={5: "liver", 7: "spleen"})
    cases = _generate(tmp_path, req)
    assert [c[1]["mask"]["case_id"] for c in cases] == ["folder/c0", "folder/c1", "folder/c0"]  # case i takes map i mod 2
    label, record = cases[0]
    assert record["mask"]["body_added"] is True and record["fingerprint"]["augment"] is None
    assert set(np.unique(label)) == {0, 1, 3, BODY}  # the segmenter's 5 and 7 mapped to liver and spleen
    assert np.array_equal(cases[0][0], cases[2][0])  # the same map for cases 0 and 2


def test_own_maps_without_body_or_with_foreign_values_fail_the_case(tmp_path):
    from maisi.core.checks import InputError
    from maisi.generate.user_masks import load_user_masks

    folder = _own_maps(tmp_path / "own", with_body=False)
    req = _request(folder)
    own, _ = load_user_masks(req.mask_folder, "mask_folder")
    with pytest.raises(InputError, match="no body class"):
        own.draw(req, 0)
    folder = _own_maps(tmp_path / "foreign", values=(1, 150))
    req = _request(folder)
    own, _ = load_user_masks(req.mask_folder, "mask_folder")
    with pytest.raises(InputError, match=r"values \[150\] are not MAISI classes"):
        own.draw(req, 0)
