"""How the real workflow plans at MAISI scale: dry-run time, peak memory and jobs per stage.

MAISI's diffusion model was trained on 10,277 CT volumes. For each case count this script builds a
working directory with a ``local`` source of that many (empty) image files, i.e. metadata only, no
image is opened, and times ``snakemake --dry-run all`` of the real Snakefile with its input
functions, schema validation and config checks. About 100 cases go to a shard (at most 500 shards).

The reference, measured in the same run, is the naive layout: a minimal Snakefile with one job per
case for each of four per-case stages, dry-run on ``--naive-cases`` cases; the ratio printed is its
time over the sharded workflow's time at the same case count (interpolated linearly when the counts
differ).

Targets: 10,277 cases plan in at most 5 s and 50,000 in at most 15 s, with at most 500 jobs per
stage; the exit status is 1 when one is missed.

Usage::

    python benchmarks/dag_scale.py                          # 1,000, 10,277 and 50,000 cases
    python benchmarks/dag_scale.py --cases 10277 --naive-cases 10277

The last line is machine-readable::

    dag_scale cases=10277 seconds=<dry-run wall time> peak_mb=<peak RSS> max_jobs_per_stage=<n>
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from maisi.dryrun import jobs_by_rule  # noqa: E402

TARGET_SECONDS = {10277: 5.0, 50000: 15.0}
MAX_JOBS_PER_STAGE = 500
CASES_PER_SHARD = 100
NAIVE_STAGES = ("convert", "preprocess", "regions", "cache_latents")


def _run(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) of the child alone (``wait4``) and its output."""
    out = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode("utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-4000:]}")
    return seconds, usage.ru_maxrss / 1024, text


def _touch_cases(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"case_{i:06d}.nii.gz").touch()


def n_shards(n: int) -> int:
    """About ``CASES_PER_SHARD`` cases a shard, at most ``MAX_JOBS_PER_STAGE`` shards."""
    return max(1, min(MAX_JOBS_PER_STAGE, math.ceil(n / CASES_PER_SHARD)))


def workflow_dir(base: Path, n: int) -> Path:
    """A working directory whose config has one local source of ``n`` cases (the rest: the default config)."""
    work = base / f"workflow_{n}"
    _touch_cases(work / "scans" / "images", n)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    cfg.update(
        run_name=f"scale_{n}",
        catalog=str(ROOT / "config" / "datasets.yaml"),
        shards=n_shards(n),
        sources={
            "scans": {
                "type": "local",
                "path": str(work / "scans"),
                "images": "images/{case}.nii.gz",
                "regions": {"backend": "manual", "top": "chest", "bottom": "abdomen"},
            }
        },
    )
    (work / "config").mkdir(exist_ok=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return work


def naive_dir(base: Path, n: int) -> Path:
    """A minimal workflow with one job per case and stage (the layout the sharded workflow replaces)."""
    work = base / f"naive_{n}"
    _touch_cases(work / "scans", n)
    rules = [f'CASES = [f"case_{{i:06d}}" for i in range({n})]\n', 'rule all:\n    input: expand("latents/{case}.pt", case=CASES)\n']
    previous = "scans/{case}.nii.gz"
    for stage in NAIVE_STAGES:
        output = "latents/{case}.pt" if stage == "cache_latents" else f"{stage}/{{case}}.nii.gz"
        rules.append(f'rule {stage}:\n    input: "{previous}"\n    output: "{output}"\n    shell: "cp {{input}} {{output}}"\n')
        previous = output
    (work / "Snakefile").write_text("\n".join(rules), encoding="utf-8")
    return work


def dry_run(work: Path, snakefile: Path) -> tuple[float, float, dict[str, int]]:
    cmd = [sys.executable, "-m", "snakemake", "all", "--snakefile", str(snakefile), "--directory", str(work), "--dry-run", "--cores", "2", "--quiet", "rules"]  # fmt: skip
    seconds, peak_mb, text = _run(cmd, work)
    return seconds, peak_mb, jobs_by_rule(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[1000, 10277, 50000], help="case counts to plan")
    parser.add_argument("--naive-cases", type=int, default=2000, help="case count of the one-job-per-case reference (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the working directories")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="dag_scale_"))
    ok = True
    results: list[tuple[int, float, float, int]] = []
    try:
        naive = None
        if args.naive_cases:
            naive_work = naive_dir(base, args.naive_cases)
            s, mb, jobs = dry_run(naive_work, naive_work / "Snakefile")
            naive = (args.naive_cases, s, mb, sum(jobs.values()))
            print(f"reference  naive one-job-per-case DAG: {args.naive_cases} cases, {naive[3]} jobs, {s:.2f} s, {mb:.0f} MB peak")
        print(f"{'cases':>7} {'shards':>6} {'jobs':>6} {'max/stage':>9} {'seconds':>8} {'peak_mb':>8} {'naive/ours':>10}  target")
        for n in args.cases:
            work = workflow_dir(base, n)
            seconds, peak_mb, jobs = dry_run(work, ROOT / "Snakefile")
            per_stage = max(jobs.values())
            ratio = ""
            if naive:
                naive_s = naive[1] * n / naive[0]  # the naive DAG's planning time grows at least linearly
                ratio = f"{naive_s / seconds:.1f}x"
            target = TARGET_SECONDS.get(n)
            verdict = []
            if target is not None:
                verdict.append(f"<= {target:g} s: {'ok' if seconds <= target else 'MISSED'}")
                ok &= seconds <= target
            verdict.append(f"<= {MAX_JOBS_PER_STAGE}/stage: {'ok' if per_stage <= MAX_JOBS_PER_STAGE else 'MISSED'}")
            ok &= per_stage <= MAX_JOBS_PER_STAGE
            print(f"{n:>7} {n_shards(n):>6} {sum(jobs.values()):>6} {per_stage:>9} {seconds:>8.2f} {peak_mb:>8.0f} {ratio:>10}  {', '.join(verdict)}")
            results.append((n, seconds, peak_mb, per_stage))
    finally:
        if args.keep:
            print(f"working directories kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    headline = next((r for r in results if r[0] == 10277), results[-1])
    print(f"dag_scale cases={headline[0]} seconds={headline[1]:.2f} peak_mb={headline[2]:.0f} max_jobs_per_stage={headline[3]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
