"""TSP decoding against MONAI's decoder: time, extra memory and exactness, in one invocation.

Decodes one random latent with one set of random weights of the released MAISI autoencoder
architecture (channels [64, 128, 256], float32) three ways, each in its own process:

- ``monai``: MONAI's ``AutoencoderKlMaisi.decode_stage_2_outputs`` unsplit (``num_splits=1``);
- ``monai_split4``: the same with ``num_splits=4`` along ``dim_split=1`` (MAISI's setting);
- ``tsp``: :class:`maisi.generate.tsp.TSPDecoder` with the same weights.

"Extra memory" is the process's peak resident set size minus its resident set size once the model
and latent are loaded (on the CPU), or ``torch.cuda.max_memory_allocated`` minus the allocation
after loading (on CUDA). "Max diff" is the largest absolute difference to the unsplit MONAI output.

On the CPU the latent is 4x32x32x32 (a 128^3 volume); where CUDA is present the script also decodes
512x512x512 and 512x512x768 volumes on the first GPU (the engine keeps its full-size maps in host
memory as float16 there; MONAI runs under float16 autocast, as MAISI does).

The last line is machine-readable, for the CPU case::

    tsp_decode size=128 peak_ratio=<tsp extra / monai_split4 extra> time_ratio=<tsp time / monai time> max_diff=<...>

Run: ``.venv/bin/python benchmarks/tsp_decode.py`` (about 4 minutes on 2 CPU cores).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from method_runs import build_released_autoencoder, fmt, peak_rss_bytes, rss_bytes, run_methods  # noqa: E402

METHODS = ("monai", "monai_split4", "tsp")


def worker(method: str, weights: Path, latent: Path, out: Path, device: str) -> dict:
    """One method in this process: load, measure the baseline, decode, measure the peak."""
    from maisi.generate.tsp import TSPDecoder, monai_decode

    dev = torch.device(device)
    autoencoder = build_released_autoencoder(weights)
    z = torch.load(str(latent), weights_only=True)
    cuda = dev.type == "cuda"
    if cuda and method != "tsp":
        autoencoder, z = autoencoder.to(dev), z.to(dev)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss_bytes()
    start = time.perf_counter()
    try:
        if method == "monai":
            y = monai_decode(autoencoder, z, num_splits=1)
        elif method == "monai_split4":
            y = monai_decode(autoencoder, z, num_splits=4, dim_split=1)
        else:
            storage = "cpu" if cuda else dev
            dtype = torch.float16 if cuda else torch.float32
            y = TSPDecoder(autoencoder, [dev], storage=storage, storage_dtype=dtype).decode(z)
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError as exc:
        return {"method": method, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(dev) if cuda else peak_rss_bytes()
    torch.save(y.float().cpu(), str(out))
    return {"method": method, "seconds": seconds, "extra_bytes": peak - base, "baseline_bytes": base, "device": str(dev)}


def run_case(size: tuple[int, int, int], device: str, workdir: Path, seed: int = 0) -> dict[str, dict]:
    """Save weights and latent, run every method in its own process, compare the outputs."""
    from maisi.models.networks import build_autoencoder

    torch.manual_seed(seed)
    weights, latent = workdir / "autoencoder.pt", workdir / f"latent_{'x'.join(map(str, size))}.pt"
    if not weights.exists():
        torch.save(build_autoencoder("rflow-ct").state_dict(), str(weights))
    torch.save(torch.randn(1, 4, *(s // 4 for s in size), generator=torch.Generator().manual_seed(seed)), str(latent))
    return run_methods(__file__, METHODS, ["--weights", str(weights), "--latent", str(latent), "--device", device], workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=METHODS)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--latent", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=128, help="CPU case: cubic output size (default 128)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA cases even where CUDA is present")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.latent, args.out, args.device)))
        return

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="tsp_decode.") as tmp:
        work = Path(tmp)
        if torch.cuda.is_available() and not args.no_cuda:
            name = torch.cuda.get_device_name(0)
            for size in ((512, 512, 512), (512, 512, 768)):
                print(f"== CUDA ({name}), output {'x'.join(map(str, size))}, peak = torch.cuda.max_memory_allocated", flush=True)
                for r in run_case(size, "cuda", work).values():
                    print(fmt(r, 13), flush=True)
        size = (args.size,) * 3
        print(f"== CPU ({os.cpu_count()} cores, torch {torch.__version__}), output {'x'.join(map(str, size))}, "
              "extra = peak RSS above the loaded baseline", flush=True)  # fmt: skip
        res = run_case(size, "cpu", work)
        for r in res.values():
            print(fmt(r, 13), flush=True)
    tsp, unsplit, split4 = res["tsp"], res["monai"], res["monai_split4"]
    if any("error" in r for r in (tsp, unsplit, split4)):
        raise SystemExit("a method failed; no ratios")
    peak_ratio = tsp["extra_bytes"] / split4["extra_bytes"]
    time_ratio = tsp["seconds"] / unsplit["seconds"]
    print(f"tsp_decode size={args.size} peak_ratio={peak_ratio:.3f} time_ratio={time_ratio:.3f} max_diff={tsp['max_diff']:.3e}")


if __name__ == "__main__":
    main()
