"""Reading Snakemake's plan: the jobs a dry run would execute, by rule (for benchmarks and tests)."""

from __future__ import annotations

import re

__all__ = ["jobs_by_rule"]

def jobs_by_rule(output: str) -> dict[str, int]:
    """The job-count table (``job  count`` ... ``total``) of a ``snakemake --dry-run`` output, by rule.

    Empty when nothing is to be done.
    """
    jobs: dict[str, int] = {}
    in_table = False
    for line in output.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
            if m and m.group(1) != "total":
                jobs[m.group(1)] = int(m.group(2))
            elif line.strip().startswith("total"):
                break
    return jobs
