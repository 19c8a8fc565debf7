"""Encoding throughput of the cache_latents stage: MONAI's whole-volume ``encode`` vs ``maisi.train.cache_latents.encode_volume``.

For each volume size and device, two methods are measured, each in its own subprocess so that the
peak memory is clean:

* ``reference``: ``autoencoder.encode(x)`` on the whole volume (what MAISI's reference code does);
* ``ours``: :func:`maisi.train.cache_latents.encode_volume` with a sliding window of ``--roi`` voxels.

Both run under ``torch.no_grad`` (and float16 autocast on CUDA); on the CPU the released variants'
float16 group norms are switched to float32 for both (a CPU convolution rejects the mixed types).
Peak memory is the increase above the state after the model and the input are loaded: on the CPU
the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` where the kernel allows it)
minus the resident set then; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated then.

Usage::

    python benchmarks/encode_throughput.py --sizes 128 256 --variant rflow-ct --devices cpu cuda --repeats 2 --roi 64

The last lines are machine-readable::

    encode_throughput size=128 device=cpu vol_per_s=<x> peak_mb=<y> ref_vol_per_s=<a> ref_peak_mb=<b>
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("reference", "ours")


def _status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024


def _volume(size: int, seed: int = 0):
    """A CT-like test volume in [0, 1]: a textured ellipsoid body in air."""
    import numpy as np

    rng = np.random.default_rng(seed)
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij", sparse=True)
    body = (x**2 / 0.8 + y**2 / 0.5 + z**2 / 0.95) < 1
    vol = np.where(body, np.float32(0.5), np.float32(0.0)) + rng.uniform(0, 0.05, (size,) * 3).astype(np.float32)
    return np.clip(vol, 0, 1)


def worker(args: argparse.Namespace) -> dict:
    """One measurement (run in a fresh process): returns seconds per volume and peak memory."""
    import torch

    from maisi.models.networks import build_autoencoder, float32_norms
    from maisi.train.cache_latents import encode_volume
    from maisi.train.settings import LatentSettings

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_autoencoder(args.variant).to(device).eval()
    image = _volume(args.size)
    if args.method == "reference":
        x = torch.from_numpy(image).to(device)[None, None]
        on_cuda = device.type == "cuda"

        def run() -> None:
            autocast = torch.autocast("cuda", dtype=torch.float16) if on_cuda else contextlib.nullcontext()
            norms = contextlib.nullcontext() if on_cuda else float32_norms(model)
            with torch.no_grad(), autocast, norms:
                mu, sigma = model.encode(x)
                mu.float().cpu(), sigma.float().cpu()
    else:
        settings = LatentSettings(variant=args.variant, device=args.device, roi_size=(args.roi,) * 3, overlap=args.overlap)

        def run() -> None:
            encode_volume(model, image, settings, device)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _status_kb("VmRSS") * 1024
        reset = _reset_peak_rss()
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_total = torch.cuda.max_memory_allocated(device)
        note = "cuda max_memory_allocated"
    else:
        peak_total = _status_kb("VmHWM") * 1024
        note = "VmHWM (reset)" if reset else "VmHWM (not reset: includes model building)"
    return {
        "size": args.size, "device": args.device, "method": args.method, "variant": args.variant,
        "roi": args.roi if args.method == "ours" else None, "overlap": args.overlap if args.method == "ours" else None,
        "seconds": times, "sec_per_vol": min(times), "vol_per_s": 1.0 / min(times),
        "peak_mb": (peak_total - base) / 2**20, "base_mb": base / 2**20, "peak_total_mb": peak_total / 2**20,
        "memory": note, "threads": torch.get_num_threads(),
    }  # fmt: skip


def measure(args: argparse.Namespace, size: int, device: str, method: str) -> dict:
    """Run :func:`worker` in a subprocess; a crash or timeout is reported, not raised."""
    warmup = args.warmup if args.warmup is not None else (1 if device.startswith("cuda") else 0)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--size", str(size), "--device", device, "--method", method,
        "--variant", args.variant, "--repeats", str(args.repeats), "--roi", str(args.roi), "--overlap", str(args.overlap),
        "--warmup", str(warmup), "--threads", str(args.threads),
    ]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"size": size, "device": device, "method": method, "error": f"timed out after {args.timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result["wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"size": size, "device": device, "method": method, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="cube edge lengths in voxels")
    parser.add_argument("--variant", default="rflow-ct", choices=["tiny", "ddpm-ct", "rflow-ct"])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when not available")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on the CPU)")
    parser.add_argument("--roi", type=int, default=64, help="sliding-window edge length in voxels (ours)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (ours)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement before it is given up")
    parser.add_argument("--json", type=Path, help="also write all results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    import torch

    devices = [d for d in args.devices if not d.startswith("cuda") or torch.cuda.is_available()]
    for skipped in sorted(set(args.devices) - set(devices)):
        print(f"# {skipped}: not available, skipped", flush=True)
    results: list[dict] = []
    for size in args.sizes:
        for device in devices:
            for method in args.methods:
                print(f"# measuring {method} {size}^3 on {device} ...", flush=True)
                result = measure(args, size, device, method)
                results.append(result)
                print("#   " + json.dumps(result), flush=True)

    print()
    header = f"{'size':>5} {'device':>6} {'method':>9} {'s/vol':>8} {'vol/s':>8} {'peak MB':>9} {'base MB':>8}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['size']:>5} {r['device']:>6} {r['method']:>9}  failed: {r['error']}")
            continue
        note = f"roi {r['roi']} overlap {r['overlap']}" if r["method"] == "ours" else "whole volume"
        print(f"{r['size']:>5} {r['device']:>6} {r['method']:>9} {r['sec_per_vol']:>8.2f} {r['vol_per_s']:>8.4f} "
              f"{r['peak_mb']:>9.0f} {r['base_mb']:>8.0f}  {note}; {r['memory']}")  # fmt: skip

    by_key = {(r["size"], r["device"], r["method"]): r for r in results if "error" not in r}
    print()
    lines = []
    for size in args.sizes:
        for device in devices:
            ours, ref = by_key.get((size, device, "ours")), by_key.get((size, device, "reference"))
            if ours and ref:
                print(f"{size}^3 {device}: time ours/reference = {ours['sec_per_vol'] / ref['sec_per_vol']:.2f}, "
                      f"peak memory ours/reference = {ours['peak_mb'] / max(ref['peak_mb'], 1e-9):.3f}")  # fmt: skip
            lines.append(
                f"encode_throughput size={size} device={device} "
                f"vol_per_s={_fmt(ours and ours['vol_per_s'], '.4g')} peak_mb={_fmt(ours and ours['peak_mb'], '.0f')} "
                f"ref_vol_per_s={_fmt(ref and ref['vol_per_s'], '.4g')} ref_peak_mb={_fmt(ref and ref['peak_mb'], '.0f')}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
