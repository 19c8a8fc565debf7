"""The streamed (TSP) encoder against MONAI's whole-volume encode: time, extra memory and exactness, in one invocation.

Encodes one CT-like volume with one set of random weights of the released MAISI autoencoder
architecture (``rflow-ct``: channels [64, 128, 256], float32) three ways, each in its own process:

- ``monai``: MONAI's ``AutoencoderKlMaisi.encode`` as the variant builds it (what MAISI's latent
  caching runs; float32 group norms on the CPU, float16 autocast on CUDA);
- ``tsp``: :class:`maisi.models.tsp.TSPEncoder` as the ``cache_latents`` stage runs it by default
  (``max_stored_maps`` from the config schema, 1.25);
- ``tsp_store_all``: the same with every map stored (``max_stored_maps=None``): faster, about two
  first-level maps of memory.

"Extra memory" is the process's peak resident set size minus its resident set size once the model
and the image are loaded (on the CPU), or ``torch.cuda.max_memory_allocated`` minus the allocation
after loading (on CUDA). "Max diff" is the largest absolute difference of ``mu`` and ``sigma`` to
MONAI's.

On the CPU the volume is 128^3 (``--size``); where CUDA is present the script also encodes a
512x512x512 volume on the first GPU with the streamed encoder's maps in host memory
(``storage: cpu``; ``auto`` chooses it where the maps would fill over half the GPU), against the 16 GB target (MONAI's encode, whose float16 maps
take 16 GiB each at that size, is not run there).

The last line is machine-readable, for the CPU case::

    tsp_encode size=128 peak_ratio=<tsp extra / monai extra> time_ratio=<tsp time / monai time> max_diff=<...>

Targets: ``peak_ratio <= 0.35``, ``time_ratio <= 1.2``, ``max_diff <= 1e-4``.
Run: ``.venv/bin/python benchmarks/tsp_encode.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from method_runs import build_released_autoencoder, fmt, peak_rss_bytes, rss_bytes, run_methods  # noqa: E402

METHODS = ("monai", "tsp", "tsp_store_all")


def _volume(size: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A CT-like volume in [0, 1]: a textured ellipsoid body in air, ``(1, 1, X, Y, Z)``."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n) for n in size]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    body = (x**2 / 0.8 + y**2 / 0.5 + z**2 / 0.95) < 1
    vol = 0.5 * body.float() + 0.05 * torch.rand(size, generator=g)
    return vol.clamp(0, 1)[None, None]


def worker(method: str, weights: Path, image: Path, out: Path, device: str) -> dict:
    """One method in this process: load, measure the baseline, encode, measure the peak."""
    from maisi.core.schema import schema_default
    from maisi.models.networks import float32_norms
    from maisi.models.tsp import TSPEncoder

    dev = torch.device(device)
    autoencoder = build_released_autoencoder(weights)
    x = torch.load(str(image), weights_only=True)
    cuda = dev.type == "cuda"
    if cuda and method == "monai":
        autoencoder, x = autoencoder.to(dev), x.to(dev)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss_bytes()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if method == "monai":
                with torch.autocast("cuda", dtype=torch.float16) if cuda else float32_norms(autoencoder):
                    mu, sigma = autoencoder.encode(x)
            else:
                bound = schema_default("cache_latents.max_stored_maps") if method == "tsp" else None
                engine = TSPEncoder(autoencoder, [dev], storage="cpu", max_stored_maps=bound)
                mu, sigma = engine.encode(x)
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError as exc:
        return {"method": method, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev) if cuda else peak_rss_bytes()
    torch.save((mu.float().cpu(), sigma.float().cpu()), str(out))
    return {"method": method, "seconds": seconds, "extra_bytes": peak - base, "baseline_bytes": base, "device": str(dev)}


def run_case(size: tuple[int, int, int], device: str, workdir: Path, methods=METHODS, seed: int = 0) -> dict[str, dict]:
    """Save weights and image, run every method in its own process, compare the outputs with MONAI's."""
    from maisi.models.networks import build_autoencoder

    torch.manual_seed(seed)
    weights, image = workdir / "autoencoder.pt", workdir / f"image_{'x'.join(map(str, size))}.pt"
    if not weights.exists():
        torch.save(build_autoencoder("rflow-ct").state_dict(), str(weights))
    torch.save(_volume(size, seed), str(image))
    return run_methods(__file__, methods, ["--weights", str(weights), "--image", str(image), "--device", device], workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=METHODS)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=128, help="CPU case: cubic volume size (default 128)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA case even where CUDA is present")
    ap.add_argument("--cuda-only", action="store_true", help="only the CUDA case (the prepared GPU check)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.image, args.out, args.device)))
        return

    with tempfile.TemporaryDirectory(prefix="tsp_encode.") as tmp:
        work = Path(tmp)
        if torch.cuda.is_available() and not args.no_cuda:
            name = torch.cuda.get_device_name(0)
            size = (512, 512, 512)
            print(f"== CUDA ({name}), image {'x'.join(map(str, size))}, peak = torch.cuda.max_memory_allocated", flush=True)
            res = run_case(size, "cuda", work, methods=("tsp",))
            for r in res.values():
                print(fmt(r), flush=True)
            tsp = res["tsp"]
            if "error" not in tsp:
                print(
                    f"tsp_encode_gpu size=512 peak_gb={tsp['extra_bytes'] / 2**30:.2f} target_gb=16 seconds={tsp['seconds']:.1f}"
                )
        if args.cuda_only:
            return
        size = (args.size,) * 3
        print(f"== CPU ({os.cpu_count()} cores, torch {torch.__version__}), image {'x'.join(map(str, size))}, "
              "extra = peak RSS above the loaded baseline", flush=True)  # fmt: skip
        res = run_case(size, "cpu", work)
        for r in res.values():
            print(fmt(r), flush=True)
    tsp, monai = res["tsp"], res["monai"]
    if any("error" in r for r in (tsp, monai)):
        raise SystemExit("a method failed; no ratios")
    peak_ratio = tsp["extra_bytes"] / monai["extra_bytes"]
    time_ratio = tsp["seconds"] / monai["seconds"]
    print(f"tsp_encode size={args.size} peak_ratio={peak_ratio:.3f} time_ratio={time_ratio:.3f} max_diff={tsp['max_diff']:.3e}")


if __name__ == "__main__":
    main()
