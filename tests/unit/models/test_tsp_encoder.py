"""The slab-streamed encoder against MONAI's whole-volume ``encode`` on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiConvolution

from maisi.models.networks import build_autoencoder, float32_norms
from maisi.models.tsp import TSPEncoder
from maisi.train.cache_latents import encode_volume
from maisi.train.settings import LatentSettings

TOL = 1e-5


def _released_like(channels: tuple[int, int, int] = (8, 16, 16)) -> AutoencoderKlMaisi:
    """The released autoencoder's layout (two residual blocks per level, a 1x1 shortcut where the width
    changes, no attention), narrower."""
    torch.manual_seed(0)
    return AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=list(channels),
        num_res_blocks=[2, 2, 2], norm_num_groups=4, norm_eps=1e-6, attention_levels=[False, False, False],
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_checkpointing=False,
        use_convtranspose=False, norm_float16=False, num_splits=1, dim_split=1,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return _released_like()


@pytest.fixture(scope="module")
def image():
    # A body-like volume (not uniform noise): group-norm statistics then differ between slabs.
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 48, 32, 40, generator=g) * 0.1
    x[:, :, 8:40, 6:26, 4:36] += 0.5
    return x


@pytest.fixture(scope="module")
def reference(model, image):
    with torch.no_grad(), float32_norms(model):
        return model.encode(image)


def _diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("max_maps", [None, 1.0, 1.5])
def test_streamed_encoder_equals_monai_encode(model, image, reference, axis, max_maps):
    """mu and sigma equal MONAI's whole-volume encode, along every axis, whatever the memory bound
    (slabs recomputed instead of stored must be recomputed from unchanged inputs)."""
    engine = TSPEncoder(model, ["cpu"], axis=axis, slab=1, min_slab_mb=0, max_stored_maps=max_maps)
    mu, sigma = engine.encode(image)
    assert mu.shape == sigma.shape == (1, 4, 12, 8, 10)
    assert _diff((mu, sigma), reference) <= TOL


def test_per_slab_statistics_would_differ(model, image, reference):
    """The comparison above can fail: encoding each slab on its own (per-slab group norms, as a sliding
    window does) differs from the whole-volume encode by far more than the tolerance."""
    with torch.no_grad(), float32_norms(model):
        parts = [model.encode(image[:, :, a : a + 16]) for a in range(0, 48, 16)]
    mu = torch.cat([p[0] for p in parts], dim=2)
    assert float((mu - reference[0]).abs().max()) > 100 * TOL


def test_memory_bound_keeps_about_one_map(model, image):
    """With ``max_stored_maps=1`` the stored maps stay near one first-level map; storing every map takes
    about two (the residual block's input and its inner map)."""
    largest = 8 * 48 * 32 * 40 * 4  # the first level's maps, float32
    peaks = {}
    for bound in (None, 1.0):
        engine = TSPEncoder(model, ["cpu"], axis=0, slab=1, min_slab_mb=0, max_stored_maps=bound)
        engine.encode(image)
        peaks[bound] = engine.ledger.peak / largest
    assert peaks[None] > 1.9
    # one map plus a few slabs of 4 slices (48 slices in all) in flight
    assert peaks[1.0] <= 1.0 + 6 * 4 / 48


def test_several_devices_store_every_map(model, image, reference):
    """Slabs spread over two (CPU) workers are exact too; recomputation is then off (ordering)."""
    engine = TSPEncoder(model, ["cpu", "cpu"], axis=2, slab=1, min_slab_mb=0, max_stored_maps=1.0)
    assert _diff(engine.encode(image), reference) <= TOL


def test_released_variant_tiny_size_exact():
    """The released architecture itself (random weights) at a small size."""
    torch.manual_seed(0)
    ae = build_autoencoder("rflow-ct").eval()
    for m in ae.modules():  # MONAI's reference unsplit (the variant splits convolutions 4 ways)
        if isinstance(m, MaisiConvolution):
            m.num_splits = 1
    x = torch.rand(1, 1, 16, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), float32_norms(ae):
        ref = ae.encode(x)
    assert _diff(TSPEncoder(ae, max_stored_maps=1.0).encode(x), ref) <= 1e-4


def test_encode_volume_default_is_the_streamed_encoder(model, image, reference):
    """The cache stage's default encodes whole volumes with the streamed encoder (MONAI's values);
    'monai' is MONAI's encode; a window changes the latents (per-window statistics)."""
    img = image[0, 0].numpy()
    mu, sigma = encode_volume(model, img, LatentSettings(), "cpu")
    assert LatentSettings().encoder == "tsp" and LatentSettings().roi_size is None
    assert _diff((torch.from_numpy(mu), torch.from_numpy(sigma)), (reference[0][0], reference[1][0])) <= TOL
    mu_m, _ = encode_volume(model, img, LatentSettings(encoder="monai"), "cpu")
    assert np.abs(mu_m - mu).max() <= TOL
    mu_w, _ = encode_volume(model, img, LatentSettings(roi_size=(16, 16, 16), overlap=0.5), "cpu")
    assert np.abs(mu_w - mu).max() > 100 * TOL


def test_memory_layout_is_not_in_the_fingerprint():
    """Slabs, storage and the memory bound do not change the latents; the encoder and precision may."""
    base = LatentSettings().fingerprint()
    assert LatentSettings(slab=3, storage="cpu", max_stored_maps=None).fingerprint() == base
    assert LatentSettings(encoder="monai").fingerprint() != base
    assert LatentSettings(storage_dtype="float16").fingerprint() != base


def test_unstreamable_encoder_is_refused():
    torch.manual_seed(0)
    ae = AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[8, 8], num_res_blocks=[1, 1],
        norm_num_groups=4, attention_levels=[False, True], with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False, num_splits=1, dim_split=1,
    )  # fmt: skip
    with pytest.raises(TypeError, match="cannot stream"):
        TSPEncoder(ae)
    with pytest.raises(ValueError, match="max_stored_maps"):
        TSPEncoder(_released_like(), max_stored_maps=0.5)
