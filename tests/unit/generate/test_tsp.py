"""The TSP decoding engine against MONAI's decoder on the same weights."""

from __future__ import annotations

import pytest
import torch
from helpers.config import validated

from maisi.core.checks import ConfigError
from maisi.generate.settings import DecodeSettings, GenerateSettings
from maisi.generate.tsp import TSPDecoder, decode_latent, monai_decode, sliding_window_decode, split_bounds
from maisi.models.networks import build_autoencoder

TOL = 1e-4  # on the [0, 1] intensity scale


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_autoencoder("tiny").eval()


@pytest.fixture(scope="module")
def latent():
    return torch.randn(1, 4, 8, 12, 10, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(tiny, latent):
    return monai_decode(tiny, latent)


def test_split_bounds_cover_the_axis():
    assert split_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert split_bounds(3, 1) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError):
        split_bounds(0, 1)


@pytest.mark.parametrize("axis,slab,min_mb", [(0, 1, 0), (1, 5, 0), (2, 3, 0), (0, 8, 0), (1, 1, 0.05), (2, 1, 16)])
def test_tsp_matches_monai_unsplit(tiny, latent, reference, axis, slab, min_mb):
    """Slabs of every thickness, also different per resolution level (``min_slab_mb``), are exact."""
    engine = TSPDecoder(tiny, ["cpu"], axis=axis, slab=slab, min_slab_mb=min_mb)
    out = engine.decode(latent)
    assert out.shape == reference.shape == (1, 1, 32, 48, 40)
    assert float((out - reference).abs().max()) <= TOL


def test_no_seams_at_slab_borders(tiny, latent, reference):
    """The error on the planes next to every slab border is as small as anywhere (no seam)."""
    out = TSPDecoder(tiny, ["cpu"], axis=1, slab=2, min_slab_mb=0).decode(latent)
    diff = (out - reference).abs()[0, 0]
    borders = [4 * b + d for b in range(2, 12, 2) for d in (-1, 0)]  # latent borders x4, both sides
    assert float(diff[:, borders, :].max()) <= TOL
    # A seam would show as a jump of the output across the border larger than inside the slabs.
    step = (out[0, 0, :, 1:, :] - out[0, 0, :, :-1, :]).abs().mean(dim=(0, 2))
    ref_step = (reference[0, 0, :, 1:, :] - reference[0, 0, :, :-1, :]).abs().mean(dim=(0, 2))
    assert torch.allclose(step, ref_step, atol=1e-5)


def test_released_architecture_matches(latent):
    torch.manual_seed(3)
    ae = build_autoencoder("rflow-ct").eval()
    z = latent[:, :, :6, :6, :4]
    ref = monai_decode(ae, z)
    out = TSPDecoder(ae, ["cpu"], axis=2, slab=1, min_slab_mb=0).decode(z)
    assert out.shape == (1, 1, 24, 24, 16)
    assert float((out - ref).abs().max()) <= TOL


def test_monai_split_matches_unsplit(tiny, latent, reference):
    assert float((monai_decode(tiny, latent, num_splits=2, dim_split=0) - reference).abs().max()) <= TOL


def test_several_devices_give_the_same_result(tiny, latent, reference):
    out = TSPDecoder(tiny, ["cpu", "cpu", "cpu"], axis=0, slab=1, min_slab_mb=0).decode(latent)
    assert float((out - reference).abs().max()) <= TOL


def test_output_written_into_preallocated_tensor(tiny, latent, reference):
    out = torch.full(reference.shape, float("nan"))
    result = TSPDecoder(tiny, ["cpu"], slab=2, min_slab_mb=0).decode(latent, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="expected"):
        TSPDecoder(tiny, ["cpu"], min_slab_mb=0).decode(latent, out=torch.empty(1, 1, 4, 4, 4))


def test_never_holds_two_full_maps(tiny, latent):
    """Stored feature maps never exceed the largest single map by more than a few slabs."""
    engine = TSPDecoder(tiny, ["cpu"], axis=0, slab=1, min_slab_mb=0)
    engine.decode(latent)
    x, y, z = (4 * s for s in latent.shape[2:])
    largest = 16 * x * y * z * 4  # the widest full-resolution map of the tiny decoder: 16 channels, float32
    slab_bytes = largest // latent.shape[2]  # slabs of one latent voxel along axis 0
    assert largest < engine.ledger.peak <= largest + slab_bytes, (engine.ledger.peak, largest)


def test_float16_storage_is_close_not_exact(tiny, latent, reference):
    out = TSPDecoder(tiny, ["cpu"], storage_dtype=torch.float16, min_slab_mb=0).decode(latent)
    diff = float((out - reference).abs().max())
    assert diff < 2e-2


def test_sliding_window_runs_but_is_not_exact(tiny, latent, reference):
    out = sliding_window_decode(tiny, latent, roi=(4, 4, 4), overlap=0.25)
    assert out.shape == reference.shape
    assert float((out - reference).abs().max()) > TOL  # per-window group-norm statistics


def test_decode_latent_dispatch(tiny, latent, reference):
    for method in ("tsp", "monai"):
        out = decode_latent(tiny, latent, DecodeSettings(method=method, devices=("cpu",), num_splits=1))
        assert float((out - reference).abs().max()) <= TOL


def test_settings_validation():
    with pytest.raises(ValueError, match="method"):
        DecodeSettings(method="magic")
    with pytest.raises(ConfigError, match="slabs"):
        validated(generate={"decoder": {"slabs": 3}})
    assert GenerateSettings.from_config(validated(generate={"decoder": {"roi": [8, 8, 8]}})).decoder.roi == (8, 8, 8)
    assert DecodeSettings.from_dict({"roi": [8, 8, 8]}).roi == (8, 8, 8)
    with pytest.raises(RuntimeError, match="CUDA"):
        if torch.cuda.is_available():
            raise RuntimeError("CUDA present: nothing to check")
        DecodeSettings(devices=("cuda:0",)).compute_devices()


def test_unsupported_decoder_is_refused():
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    from maisi.models.variants import variant

    kwargs = variant("tiny").network("autoencoder")
    kwargs["with_decoder_nonlocal_attn"] = True
    with pytest.raises(TypeError, match="cannot stream"):
        TSPDecoder(AutoencoderKlMaisi(**kwargs))
