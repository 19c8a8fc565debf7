"""2.5D Frechet distance (MAISI's "FID") between generated and real CT volumes.

The protocol follows MAISI's ``scripts/compute_fid_2-5d_ct.py``:

1. every volume is loaded with MONAI, oriented RAS, optionally resampled to a fixed spacing
   (bilinear), padded with -1000 HU / centre-cropped to a fixed size and clipped to [-1000, 1000] HU
   (:func:`load_volume`);
2. features are taken slice by slice in the three planes, from the central part of each axis only
   (``central_fraction``, MAISI's ``enable_center_slices_ratio``): ``axial`` slices lie along array
   axis 2 (S, MAISI's "XY"), ``coronal`` along axis 1 (A, "ZX") and ``sagittal`` along axis 0 (R, "YZ");
   the slice start / end are ``int((1 -/+ f) / 2 * n)`` as in MAISI (at least one slice is kept);
3. per plane, the Frechet distance between the Gaussians fitted to the generated and the real
   feature vectors; the three planes are averaged.

Three feature extractors; ``fid.extractors`` lists those to report, each with its own FID and floor:

* :class:`maisi.evaluate.segmenter.SegmenterFeatures`, the independent offline default: a 2-D segmenter
  trained once on the real cases only (no generative stage trains it), cached by their hash.
* :class:`AutoencoderEncoderFeatures`: the project's own MAISI VAE encoder, i.e. the generator's own
  features (a weak referee; reported beside the segmenter's).
* :class:`RadImageNetResNet50`, MAISI's choice (published values). Its weights cannot be downloaded
  here; ``fid.weights`` names a local file (the hub file ``RadImageNet-ResNet50_notop.pth`` of
  ``Warvito/radimagenet-models``, or a torchvision-layout ResNet-50 state dict).

Only the last gives values **comparable with published MAISI FIDs**.

Besides generated-vs-real, :func:`compute_fid` reports the real-vs-real floor: the distance between
the two halves of the real set, i.e. the value a perfect generator could not get below with this
many volumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch

from maisi.core.io import sha256_file, write_json
from maisi.core.provenance import provenance
from maisi.core.tables import write_table
from maisi.evaluate.features import PLANES, FeatureExtractor, central_range, central_slices, load_label, load_volume
from maisi.evaluate.segmenter import SegmenterFeatures
from maisi.evaluate.settings import FIDSettings
from maisi.models.checkpoints import CheckpointError, load_autoencoder, read_checkpoint
from maisi.models.networks import select_device

__all__ = ["PLANES", "FID_COLUMNS", "NOT_COMPARABLE", "load_volume", "load_label", "central_range", "central_slices", "FeatureExtractor", "RadImageNetResNet50", "AutoencoderEncoderFeatures", "build_extractor", "feature_stats", "frechet_distance", "compute_fid", "write_fid", "write_fid_disabled"]

log = logging.getLogger(__name__)


STEP = "fid"


FID_COLUMNS = ("plane", "fid", "real_floor", "n_generated_slices", "n_real_slices", "extractor")


NOT_COMPARABLE = "not comparable with published MAISI FID values"


#: MAISI's per-channel means, subtracted after min-max scaling (``subtract_mean`` in its script).
RADIMAGENET_MEAN = (0.406, 0.456, 0.485)


#: The HU window the autoencoder is trained on (maisi.prepare.preprocess: clip, then scale to [0, 1]).
AUTOENCODER_HU_RANGE = (-1000.0, 1000.0)


#: Children of torchvision's ResNet in order; a ``Sequential`` of them has these as keys "0." ... "9.".
_RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")


_STRIP_PREFIXES = ("module.", "backbone.", "model.", "feature_network.", "encoder.")


def _resnet50(keras_layout: bool) -> torch.nn.Module:
    """torchvision's ResNet-50 without its classifier (``fc`` = identity, so the output is the spatial
    mean of the last feature map: MAISI's ``spatial_average``). With ``keras_layout`` it is changed into
    the RadImageNet port of ``Warvito/radimagenet-models`` (a Keras ResNet50: every convolution has a
    bias, a bottleneck's stride sits on its first 1x1 convolution, batch-norm eps 1.001e-5)."""
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = torch.nn.Identity()
    if keras_layout:
        convs = [model.conv1]
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                convs += [block.conv1, block.conv2, block.conv3]
                if block.downsample is not None:
                    convs.append(block.downsample[0])
                if block.conv2.stride != (1, 1):
                    block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
        for conv in convs:
            conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eps = 1.001e-5
    return model


def _resnet_state(data: Mapping[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A ResNet-50 state dict from a checkpoint: plain, or under ``state_dict`` / ``model``; common prefixes
    (``module.``, ``backbone.``...) stripped; a ``Sequential`` of the ResNet's children ("0.", "1.", "4.0...")
    renamed to conv1 / bn1 / layer1...; classifier (``fc.*``) weights dropped. Also returns the layout
    (``keras`` when the convolutions have biases, else ``torchvision``)."""
    state: Any = data
    for key in ("state_dict", "model"):
        if isinstance(data.get(key), Mapping):
            state = data[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no tensors found; expected a ResNet-50 state dict (config key fid.weights)")
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    if all(k.split(".", 1)[0].isdigit() for k in state):
        renamed = {}
        for key, value in state.items():
            index, rest = key.split(".", 1)
            if int(index) >= len(_RESNET_CHILDREN):
                raise CheckpointError(f"{path}: key {key!r} has no ResNet-50 counterpart (config key fid.weights)")
            renamed[f"{_RESNET_CHILDREN[int(index)]}.{rest}"] = value
        state = renamed
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return state, "keras" if "conv1.bias" in state else "torchvision"


class RadImageNetResNet50(FeatureExtractor):
    """MAISI's 2D feature network: a ResNet-50 (RadImageNet weights from a local file), 2048 features per slice.

    Each plane's central slices are stacked, grey repeated to 3 channels, min-max scaled to [0, 1] over the
    stack, MAISI's channel means subtracted; the spatial mean of the last feature map is the feature vector.
    """

    name = "radimagenet_resnet50"

    def __init__(self, weights: str | os.PathLike, central_fraction: float = 0.4, batch_size: int = 16, device: str = "auto"):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: RadImageNet ResNet-50 weights not found (config key fid.weights); download "
                "RadImageNet-ResNet50_notop.pth (torch.hub Warvito/radimagenet-models) and point fid.weights at it"
            )
        state, self.layout = _resnet_state(read_checkpoint(path), path)
        model = _resnet50(self.layout == "keras")
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{path}: not a ResNet-50 state dict (config key fid.weights): {len(missing)} missing keys {missing[:3]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}"
            )
        model.load_state_dict(state, strict=True)
        self.weights = path
        self.sha256 = sha256_file(path)
        self.central_fraction = float(central_fraction)
        self.batch_size = int(batch_size)
        self.device = select_device(device)
        self.model = model.to(self.device).eval()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": "ResNet-50 (RadImageNet weights, MAISI's 2.5D FID network); spatial mean of the last feature map per slice",
            "weights": os.fspath(self.weights),
            "weights_sha256": self.sha256,
            "layout": self.layout,
            "feature_dim": 2048,
            "note": "comparable with published MAISI FID values only with the RadImageNet weights and MAISI's settings "
            "(the published autoPET values: 512^3 at 1 mm, central 40 % of the slices)",
        }

    @torch.no_grad()
    def slice_features(self, slices: torch.Tensor) -> np.ndarray:
        """``(n, H, W)`` HU slices of one plane -> ``(n, 2048)`` float64 (MAISI's 2D preprocessing)."""
        x = slices.to(dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)  # grey -> 3 channels (BGR order moot)
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo + 1e-10)
        x = x - torch.tensor(RADIMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
        out = [self.model(x[i : i + self.batch_size].to(self.device)).float().cpu() for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).double().numpy()

    def plane_features(self, volume: np.ndarray) -> dict[str, np.ndarray]:
        vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        return {plane: self.slice_features(central_slices(vol, axis, self.central_fraction)) for plane, axis in PLANES.items()}


class AutoencoderEncoderFeatures(FeatureExtractor):
    """The project's MAISI VAE encoder as a 3D feature network (offline default; not MAISI's published FID).

    The whole volume (HU scaled to [0, 1] over [-1000, 1000] HU, as the autoencoder is trained) runs through
    the encoder up to the output of its last block before the final group norm and the convolution to the
    latent channels: the deepest level's residual stream, ``num_channels[-1]`` channels at 1/4 resolution.
    Per plane, each central slice of that feature map is averaged spatially.
    """

    name = "maisi-autoencoder-encoder"

    def __init__(self, checkpoint: str | os.PathLike, variant: str = "tiny", central_fraction: float = 0.4, device: str = "auto"):
        path = Path(checkpoint)
        self.checkpoint = path
        self.variant = variant
        self.sha256 = sha256_file(path) if path.is_file() else ""
        self.device = select_device(device)
        self.encoder = load_autoencoder(path, variant).encoder.to(self.device).eval()
        blocks = list(self.encoder.blocks)
        if len(blocks) < 3 or "Norm" not in type(blocks[-2]).__name__:
            raise CheckpointError(
                f"{path}: unexpected encoder layout (the block before the last is {type(blocks[-2]).__name__}, not a norm)"
            )
        self.blocks = blocks[:-2]
        self.channels = int(getattr(blocks[-2], "num_channels", 0)) or None
        self.central_fraction = float(central_fraction)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": "MAISI VAE encoder (this project's checkpoint): feature map of the encoder's last block before its final "
            "group norm and latent convolution, spatial mean per slice",
            "checkpoint": os.fspath(self.checkpoint),
            "checkpoint_sha256": self.sha256,
            "variant": self.variant,
            "feature_dim": self.channels,
            "input_hu_range": list(AUTOENCODER_HU_RANGE),
            "note": NOT_COMPARABLE,
        }

    @torch.no_grad()
    def feature_map(self, volume: np.ndarray) -> torch.Tensor:
        """``(C, X/4, Y/4, Z/4)`` float32 feature map (on the CPU) of an ``(X, Y, Z)`` HU volume."""
        from maisi.models.networks import float32_norms

        lo, hi = AUTOENCODER_HU_RANGE
        x = np.clip((np.asarray(volume, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
        h = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(self.device)
        # float32 throughout: the released variants' norms return float16 otherwise (see maisi.models.networks.float32_norms)
        with float32_norms(self.encoder), torch.autocast(self.device.type, enabled=False):
            for block in self.blocks:
                h = block(h)
        return h[0].float().cpu()

    def plane_features(self, volume: np.ndarray) -> dict[str, np.ndarray]:
        fmap = self.feature_map(volume)
        return {
            plane: central_slices(fmap, axis, self.central_fraction).mean(dim=(2, 3)).double().numpy()
            for plane, axis in PLANES.items()
        }


def build_extractor(
    name: str, settings: FIDSettings, autoencoder_path: str | os.PathLike | None = None, variant: str = "tiny",
    segmenter_path: str | os.PathLike | None = None,
) -> FeatureExtractor:  # fmt: skip
    """The extractor ``name`` (one of ``fid.extractors``); the autoencoder one needs ``autoencoder_path``, the
    segmenter ``segmenter_path`` (:func:`maisi.evaluate.segmenter.train_segmenter`'s output)."""
    if name == "radimagenet_resnet50":
        return RadImageNetResNet50(settings.weights, settings.central_fraction, settings.batch_size, settings.device)
    if name == "segmenter":
        if segmenter_path is None:
            raise ValueError("fid: the segmenter extractor needs the trained segmenter (segmenter_path)")
        return SegmenterFeatures(segmenter_path, settings)
    if name != "autoencoder":
        raise ValueError(f"fid.extractors: unknown extractor {name!r}")
    if autoencoder_path is None:
        raise ValueError("fid: the autoencoder extractor needs the autoencoder checkpoint (autoencoder_path)")
    return AutoencoderEncoderFeatures(autoencoder_path, variant, settings.central_fraction, settings.device)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, rows = samples) of ``(n, d)`` features, float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"expected (n >= 2, d) features, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Matrix square root and its relative residual ``||X X - A|| / ||A||`` (inf when not finite)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular-matrix warnings: judged by the residual instead
        x = scipy.linalg.sqrtm(a)
    if not np.isfinite(x).all():
        return x, float("inf")
    norm = float(np.linalg.norm(a))
    return x, float(np.linalg.norm(x @ x - a)) / norm if norm > 0 else 0.0


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` between two Gaussians, in float64.

    Written here rather than MONAI's ``FIDMetric`` (which gives the same value on well-conditioned
    statistics): with few volumes the covariances are near-singular (fewer slices than feature
    dimensions), and MONAI only retries when the square root is not finite and judges nothing else.
    Here a square root that is not finite or does not square back to the product (relative residual
    > 1e-5) is retried with ``eps * I`` added to both covariances; imaginary parts from rounding are
    discarded, a large one (> 1e-3 on the diagonal) is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean, err = _sqrtm(sigma1 @ sigma2)
    if err > 1e-5:
        log.debug("fid: sqrtm of the covariance product is inaccurate (residual %.3g); adding %g to the diagonals", err, eps)
        offset = np.eye(d) * eps
        covmean, err = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("Frechet distance: the square root of the covariance product is not finite")
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > 1e-3:
            raise ValueError(
                f"Frechet distance: imaginary component {imag:.3g} too large (covariances not positive semi-definite?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _plane_fids(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, float]:
    out = {plane: frechet_distance(*feature_stats(a[plane]), *feature_stats(b[plane])) for plane in PLANES}
    out["average"] = float(np.mean([out[p] for p in PLANES]))
    return out


def _stack(features: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {plane: np.concatenate([f[plane] for f in features], axis=0) for plane in PLANES}


def _extractor_fid(features: Mapping[str, Mapping[str, np.ndarray]], generated: Sequence[str], real: Sequence[str]) -> dict[str, Any]:
    """FID, floor (even vs odd halves of the sorted real set) and feature counts of one extractor's features by path."""
    gen, ref = _stack([features[p] for p in generated]), _stack([features[p] for p in real])
    half_a, half_b = _stack([features[p] for p in real[0::2]]), _stack([features[p] for p in real[1::2]])
    count = {name: {plane: int(f[plane].shape[0]) for plane in PLANES} for name, f in
             (("generated", gen), ("real", ref), ("real_even", half_a), ("real_odd", half_b))}  # fmt: skip
    return {"fid": _plane_fids(gen, ref), "real_floor": _plane_fids(half_a, half_b), "n_features": count,
            "feature_dim": int(gen["axial"].shape[1])}  # fmt: skip


def compute_fid(
    generated: Sequence[str | os.PathLike],
    real: Sequence[str | os.PathLike],
    settings: FIDSettings,
    autoencoder: str | os.PathLike | None = None,
    variant: str = "tiny",
    segmenter: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-plane and average 2.5D FID of ``generated`` against ``real``, and the real-vs-real floor, for each
    extractor of ``settings.extractors`` (each volume is loaded once).

    Returns the shared fields (cases, floor split, settings) and ``extractors``: one entry per extractor, in
    the settings' order, with ``fid``, ``real_floor``, ``n_features``, ``feature_dim`` and ``extractor`` (its
    description). The floor is the FID between the two halves of the real set (paths sorted, even vs odd
    positions). ``autoencoder`` / ``segmenter`` are the checkpoints those extractors use.
    """
    from tqdm.auto import tqdm

    generated = [os.fspath(p) for p in generated]
    real = sorted(os.fspath(p) for p in real)
    if len(generated) < 2 or len(real) < 2:
        raise ValueError(
            f"fid: needs at least 2 generated and 2 real volumes, got {len(generated)} generated and {len(real)} real"
        )
    extractors = [build_extractor(name, settings, autoencoder, variant, segmenter) for name in settings.extractors]
    feats: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in extractors]
    with contextlib.closing(
        tqdm(total=len(generated) + len(real), desc="fid features", unit="volume", disable=not progress, mininterval=1.0)
    ) as bar:
        for path in [*generated, *real]:
            if path not in feats[0]:
                volume = load_volume(path, settings)
                for extractor, by_path in zip(extractors, feats, strict=True):
                    by_path[path] = extractor.plane_features(volume)
            bar.update()
    results = []
    for extractor, by_path in zip(extractors, feats, strict=True):
        result = {**_extractor_fid(by_path, generated, real), "extractor": extractor.describe()}
        results.append(result)
        log.info(
            "fid (%s): %s; real floor %.4g", extractor.name,
            ", ".join(f"{k} {v:.4g}" for k, v in result["fid"].items()), result["real_floor"]["average"],
        )  # fmt: skip
    return {
        "extractors": results,
        "n_generated": len(generated),
        "n_real": len(real),
        "floor_split": {"even": real[0::2], "odd": real[1::2]},
        "generated": generated,
        "real": real,
        "settings": settings.to_dict(),
    }


def write_fid(result: Mapping[str, Any], table_path: str | os.PathLike, json_path: str | os.PathLike) -> None:
    """The FID table (per extractor, rows axial, coronal, sagittal, average; the average row's slice counts are
    the totals over the planes) as TSV, and the whole result as JSON with the provenance."""
    rows = []
    for entry in result["extractors"]:
        n_gen, n_real = entry["n_features"]["generated"], entry["n_features"]["real"]
        name = entry["extractor"]["name"]
        rows += [
            {"plane": plane, "fid": entry["fid"][plane], "real_floor": entry["real_floor"][plane],
             "n_generated_slices": n_gen[plane], "n_real_slices": n_real[plane], "extractor": name}
            for plane in PLANES
        ]  # fmt: skip
        rows.append({
            "plane": "average", "fid": entry["fid"]["average"], "real_floor": entry["real_floor"]["average"],
            "n_generated_slices": sum(n_gen.values()), "n_real_slices": sum(n_real.values()), "extractor": name,
        })  # fmt: skip
    write_table(rows, table_path, STEP, FID_COLUMNS)
    write_json(json_path, {**dict(result), "provenance": provenance(STEP)})


def write_fid_disabled(table_path: str | os.PathLike, json_path: str | os.PathLike, reason: str = "fid.enabled is false") -> None:
    """An empty FID table (the release's data card then says FID was not computed) and the reason."""
    write_table([], table_path, STEP, FID_COLUMNS)
    write_json(json_path, {"computed": False, "reason": reason, "provenance": provenance(STEP)})
