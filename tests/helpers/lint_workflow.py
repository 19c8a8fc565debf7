"""Run `snakemake --lint` and fail on any finding except the per-rule conda/container advice.

The workflow runs from one pip-installed environment (see README), so per-rule conda
environments or containers are deliberately not declared.
"""

import subprocess
import sys
from pathlib import Path

ALLOWED = {"Specify a conda environment or container for each rule.:"}


def main() -> int:
    root = Path(__file__).resolve().parents[2]  # tests/helpers/ -> the checkout (run as a script: helpers.paths is not importable)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "text"], cwd=root, capture_output=True, encoding="utf-8", errors="replace"
    )
    text = proc.stdout + proc.stderr
    findings = [line.strip()[2:] for line in text.splitlines() if line.startswith("    * ")]
    bad = [f for f in findings if f not in ALLOWED]
    if bad or not findings and proc.returncode != 0:
        print(text)
        print(f"snakemake --lint: {len(bad)} finding(s) beyond the conda/container advice", file=sys.stderr)
        return 1
    print(f"snakemake --lint: {len(findings)} finding(s), all the per-rule conda/container advice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
