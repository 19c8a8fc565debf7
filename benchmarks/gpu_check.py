"""rflow-ct on one GPU: sampling and decoding time and peak memory beside NVIDIA's published A100 figures.

Random weights in the released rflow-ct architecture (``maisi/data/variants/rflow-ct.json``); the
factory's own sampling loop (:func:`maisi.generate.sampling.sample_latent`, ControlNet on a synthetic
label map, float16 autocast) and its TSP decoder (:mod:`maisi.generate.tsp`). For each size it
prints the sampling and decoding time, the whole generation time and the peak GPU memory, next to
NVIDIA's figures (``docs/performance.md`` of NV-Generate-CTMR, A100 80 GB: 256x256x128 3 s / 15.0 GB;
512x512x512 48 s / 22.8-45.3 GB; 512x512x768 87 s / 49.7 GB). Targets: 512x512x768 decoded within
16 GB; whole generation at 512x512x512 no slower than NVIDIA's 48 s. Random weights take as long as
trained ones: the arithmetic is the same.

The last lines are machine-readable::

    gpu_check size=512x512x512 steps=30 sampling_s=... decode_s=... total_s=... peak_gb=... nvidia_s=48 time_ratio=...

Run with ``bash benchmarks/gpu_check.sh`` (installs carried wheels first), or on the CPU as a smoke
test: ``python benchmarks/gpu_check.py --device cpu --sizes 64x64x64 --decode-size 64x64x64 --steps 2``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

#: NVIDIA's published rflow-ct figures on an A100 80 GB: (seconds, peak GB).
NVIDIA_A100 = {"256x256x128": (3.0, 15.0), "512x512x512": (48.0, 45.3), "512x512x768": (87.0, 49.7)}


def _size(text: str) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in text.lower().split("x"))
    return x, y, z


def _models(device: torch.device):
    from maisi.generate.sampling import Models
    from maisi.models.networks import build_autoencoder, build_controlnet, build_diffusion_unet
    from maisi.models.variants import variant

    var = variant("rflow-ct")
    unet = build_diffusion_unet(var).to(device).eval()
    controlnet = build_controlnet(var, unet).to(device).eval()
    autoencoder = build_autoencoder(var).eval()
    return Models(autoencoder, unet, controlnet, 1.0, 1000, "rflow", device, {}, var)


def _mask(size: tuple[int, int, int]) -> np.ndarray:
    """Body (200) with a liver block (1) and a hepatic tumour (26): the ControlNet's condition."""
    m = np.zeros(size, np.uint8)
    x, y, z = size
    m[x // 8 : -x // 8, y // 8 : -y // 8, :] = 200
    m[x // 4 : x // 2, y // 4 : y // 2, z // 4 : z // 2] = 1
    m[3 * x // 8 : x // 2, 3 * y // 8 : y // 2, 3 * z // 8 : z // 2] = 26
    return m


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def generate(models, size: tuple[int, int, int], steps: int, settings) -> dict[str, float]:
    from maisi.generate.requests import GenerationRequest
    from maisi.generate.sampling import sample_latent
    from maisi.generate.tsp import decode_latent

    request = GenerationRequest(name="gpu_check", n_cases=1, size=size, spacing=(1.0, 1.0, 1.0), top_region="chest",
                                bottom_region="abdomen", masks=True, sampler="rflow", steps=steps, seed=0)  # fmt: skip
    _reset(models.device)
    t0 = time.perf_counter()
    z = sample_latent(models, request, 0, _mask(size), progress=False)
    _sync(models.device)
    t1 = time.perf_counter()
    volume = decode_latent(models.autoencoder, z / models.scale_factor, settings)
    _sync(models.device)
    t2 = time.perf_counter()
    assert volume.shape[2:] == size and torch.isfinite(volume).all()
    return {"sampling_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0, "peak_gb": _peak_gb(models.device)}


def decode_only(models, size: tuple[int, int, int], settings) -> dict[str, float]:
    from maisi.generate.tsp import decode_latent

    z = torch.randn((1, 4, *(s // 4 for s in size)), generator=torch.Generator().manual_seed(0))
    _reset(models.device)
    t0 = time.perf_counter()
    volume = decode_latent(models.autoencoder, z, settings)
    _sync(models.device)
    assert volume.shape[2:] == size
    return {"decode_s": time.perf_counter() - t0, "peak_gb": _peak_gb(models.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="256x256x128,512x512x512", help="whole generations (sampling + decoding)")
    parser.add_argument("--decode-size", default="512x512x768", help="TSP decoding alone")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from maisi.generate.settings import DecodeSettings

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    models = _models(device)
    settings = DecodeSettings(devices=(args.device,))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# rflow-ct, random weights, {args.steps} steps, ControlNet on, device {name}, torch {torch.__version__}")
    generate(models, _size(args.sizes.split(",")[0]), 1, settings)  # warm-up: kernels, cuDNN autotuning
    lines = []
    for text in args.sizes.split(","):
        r = generate(models, _size(text), args.steps, settings)
        ref_s, ref_gb = NVIDIA_A100.get(text, (float("nan"), float("nan")))
        lines.append(f"gpu_check size={text} steps={args.steps} sampling_s={r['sampling_s']:.1f} decode_s={r['decode_s']:.1f} "
                     f"total_s={r['total_s']:.1f} peak_gb={r['peak_gb']:.1f} nvidia_s={ref_s:g} nvidia_gb={ref_gb:g} "
                     f"time_ratio={r['total_s'] / ref_s:.2f}")  # fmt: skip
        print(lines[-1], flush=True)
    r = decode_only(models, _size(args.decode_size), settings)
    ref_s, ref_gb = NVIDIA_A100.get(args.decode_size, (float("nan"), float("nan")))
    print(f"gpu_check decode={args.decode_size} decode_s={r['decode_s']:.1f} peak_gb={r['peak_gb']:.1f} target_gb=16 "
          f"within_target={r['peak_gb'] <= 16.0 if device.type == 'cuda' else 'n/a'} nvidia_whole_generation_gb={ref_gb:g}")  # fmt: skip


if __name__ == "__main__":
    main()
