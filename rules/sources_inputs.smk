# Paths, settings and input functions of the sources rules (sources.smk); what every stage needs is in common.smk.
from dataclasses import asdict

from maisi.sources.catalog import load_catalog

CATALOG = load_catalog(config["catalog"]) if any(s["type"] == "dataset" for s in config["sources"].values()) else {}
SOURCE_FILES = f"{plan.RESOURCES}/sources"


def dataset_entry(source):
    return CATALOG[config["sources"][source]["dataset"]]


def archive_path(source):
    entry = dataset_entry(source)
    return f"{plan.RESOURCES}/downloads/{entry.name}/{entry.archive_name}"


def dataset_url(wildcards):
    for src in config["sources"].values():
        if src["type"] == "dataset" and src["dataset"] == wildcards.dataset and src.get("url"):
            return src["url"]
    return CATALOG[wildcards.dataset].url


def phantom_specs_json(wildcards):
    wanted = {c.case_id for c in shard_cases(wildcards.source, wildcards.shard)}
    specs = plan.phantom_specs(wildcards.source, config["sources"][wildcards.source], config["seed"])
    return json.dumps([asdict(s) for s in specs if s.case_id in wanted], sort_keys=True)
