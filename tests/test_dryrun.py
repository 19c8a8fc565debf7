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
