# What every stage needs: the validated config, the sources and their shards, wildcard constraints
# and job placement. Each stage's own input functions and paths live in its rule file.
# All logic lives in the `maisi` package; the rule files only adapt it to Snakemake.
import functools
import json
import sys

from snakemake.utils import min_version, validate

import maisi.sources.cases as plan
from maisi.config import ConfigError, check_config, check_schema
from maisi.core.cluster import attempt_memory, slurm_resources
from maisi.generate.requests import config_requests

min_version("9.0")


def stop_on_config_error(exc):
    """One line naming the key and the config file (Snakemake's validate would dump the schema and config: ~2,000 lines)."""
    sys.exit(f"Error: {exc}" + ("" if " (in " in str(exc) else f" (in {', '.join(workflow.configfiles)})"))


try:
    check_schema(config, workflow.configfiles)
    validate(config, "../config/schema.yaml")  # fills the schema's defaults
    check_config(config)  # what the schema cannot express
except ConfigError as exc:
    stop_on_config_error(exc)
SOURCES = sorted(config["sources"])
# Requests were checked with the config (maisi.config); impossible ones never reach a job.
REQUESTS = config_requests(config)


wildcard_constraints:
    source="|".join(SOURCES),
    shard=r"\d{4}",
    request="|".join(sorted(REQUESTS)) or "(?!)",


# --- placement: GPU count, and for profiles/slurm partition, account and GPU model from the config ---
def cluster(gpus=0):
    return slurm_resources(config["cluster"], gpus)


def memory(mem_mb):
    return attempt_memory(mem_mb, config["cluster"])


# --- the cases of every source, sharded ---
# Shard counts come from the config per source; empty shards get no job. (Snakemake's
# `scattergather:` needs one fixed count for every scatter, with no empty parts.)
def source_cases(source):
    src = config["sources"][source]
    if src["type"] == "phantom":
        return plan.phantom_cases(source, src, config["seed"])
    if src["type"] == "local":
        return plan.local_cases(source, src)
    table = checkpoints.convert_dataset.get(source=source).output.table
    return plan.table_cases(source, table, src)


@functools.cache  # every job's input functions ask; a source is listed and sharded once per process
def source_shards(source):
    return plan.shards_of(source_cases(source), plan.n_shards(config, source))


try:  # local folders are listed when the workflow starts: a bad pattern or file name is one line, before any job
    for name in SOURCES:
        if config["sources"][name]["type"] == "local":
            source_shards(name)
except ConfigError as exc:
    stop_on_config_error(exc)


def shard_cases(source, shard):
    return source_shards(source).get(shard, [])


def cases_json(wildcards):
    return json.dumps([c.to_json() for c in shard_cases(wildcards.source, wildcards.shard)], sort_keys=True)


def stage_tables(pattern):
    """Every shard table of a stage, over all sources."""
    return [pattern.format(source=s, shard=k) for s in SOURCES for k in source_shards(s)]


def output_root(pattern, root=None, key="table"):
    """A param: the folder a stage writes its per-case files under, read off the job's output path.

    ``pattern`` is the path pattern of the job's output ``key`` (its one definition, e.g.
    ``<root>/{source}/shards/{shard}.tsv``) and ``root`` the folder it lies under (by default what
    precedes the pattern's first wildcard); the param is the part of the job's output path before
    the rest of the pattern, so it follows the output wherever Snakemake places it
    (``snakemake --lint``: a hard-coded prefix breaks under remote storage).
    """
    root = pattern.split("{", 1)[0].rstrip("/") if root is None else root
    tail = pattern[len(root) :]

    def param(wildcards, output):
        path = str(getattr(output, key))
        suffix = tail.format(**wildcards)
        if not path.endswith(suffix):
            raise ValueError(f"output {path} does not end in {suffix} (pattern {pattern})")
        return path[: -len(suffix)]

    return param
