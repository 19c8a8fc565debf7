"""Reading the job table of a Snakemake dry run."""

from maisi.dryrun import jobs_by_rule

DRY_RUN = """Building DAG of jobs...
Job stats:
job                 count
----------------  -------
all                     1
generate                3
qc                      1
total                   5

Reasons:
    (check individual jobs above for details)
"""


def test_job_table_by_rule():
    assert jobs_by_rule(DRY_RUN) == {"all": 1, "generate": 3, "qc": 1}


def test_nothing_to_be_done():
    assert jobs_by_rule("Building DAG of jobs...\nNothing to be done (all requested files are present and up to date).\n") == {}


def test_planning_imports_neither_torch_nor_monai():
    """Every `maisi` module the workflow imports while planning stays free of torch and MONAI
    (importing them costs Snakemake over a second at every start; see benchmarks/dag_scale.py)."""
    import re
    import subprocess
    import sys

    from helpers.paths import ROOT

    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))])
    modules = set(re.findall(r"^\s*(?:from|import) (maisi\.[\w.]+)", text, flags=re.M))
    modules |= {f"maisi.{m.strip()}" for names in re.findall(r"^\s*from maisi import ([\w, ]+)$", text, flags=re.M) for m in names.split(",")}
    modules = sorted(modules)
    assert "maisi.train.settings" in modules and "maisi.sources.cases" in modules
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted({{'torch', 'monai'}} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"planning imports {proc.stdout.strip()} (modules: {modules})"
