"""``python tests/helpers/snakemake_steady_polling.py ARGS``: Snakemake's own command line, with the SLURM
executor checking its jobs at a steady interval.

The SLURM executor plugin adds 10 s to its status interval after every check that finds no finished
job (up to 180 s), which suits a busy cluster: on the one-node test cluster a 10 s job was seen as
finished after 36 s, and the default run spent more than half of its time waiting. Here the interval
goes back to ``--slurm-init-seconds-before-status-checks`` after every check. Nothing else differs from
``snakemake ARGS``: the same command line, profile, plugin, submissions and job states.
"""

from __future__ import annotations

import sys

import snakemake_executor_plugin_slurm as slurm
from snakemake.cli import main

_check_active_jobs = slurm.Executor.check_active_jobs


async def _steady_check_active_jobs(self, active_jobs):
    async for job in _check_active_jobs(self, active_jobs):
        yield job
    self.next_seconds_between_status_checks = self.workflow.executor_settings.init_seconds_before_status_checks


slurm.Executor.check_active_jobs = _steady_check_active_jobs

if __name__ == "__main__":
    sys.exit(main())
