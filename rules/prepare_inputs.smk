# Paths, settings and input functions of the prepare rules (prepare.smk); what every stage needs is in common.smk.
from maisi.prepare.preprocess import PreprocessSettings
from maisi.prepare.totalsegmentator import TotalSegSettings, check_weights

PREPARED = "results/prepared"
PREPARED_CASES = f"{PREPARED}/cases.tsv"
PREPARED_SHARDS = f"{PREPARED}/{{source}}/shards/{{shard}}.tsv"
TOTALSEG = "results/totalseg"
TOTALSEG_SHARDS = f"{TOTALSEG}/{{source}}/shards/{{shard}}.tsv"
REGIONS_SHARDS = "results/regions/{source}/shards/{shard}.tsv"
PREPROCESS = PreprocessSettings.from_config(config)
TOTALSEG_SOURCES = [s for s in SOURCES if config["sources"][s]["regions"]["backend"] == "totalsegmentator"]
TOTALSEG_GPUS = 0 if config["totalsegmentator"]["device"] == "cpu" else config["totalsegmentator"]["resources"]["gpu"]
# Missing or wrong TotalSegmentator weights stop the run before any job starts (no download).
for _mode in sorted({config["sources"][s]["regions"]["mode"] for s in TOTALSEG_SOURCES}):
    check_weights(config["totalsegmentator"]["weights"], _mode)


def preprocess_inputs(wildcards):
    src = config["sources"][wildcards.source]
    if src["type"] == "phantom":
        return [f"{SOURCE_FILES}/{wildcards.source}/shards/{wildcards.shard}.tsv"]
    files = []
    for case in shard_cases(wildcards.source, wildcards.shard):
        files.append(case.image)
        if case.label:
            files.append(case.label)
    return files


def totalseg_settings(wildcards):
    return TotalSegSettings.from_config(config, wildcards.source).to_json()


def regions_inputs(wildcards):
    inputs = {"table": PREPARED_SHARDS.format(**wildcards)}
    if wildcards.source in TOTALSEG_SOURCES:
        inputs["segmented"] = TOTALSEG_SHARDS.format(**wildcards)
    return inputs


def regions_params(wildcards):
    cfg = dict(config["sources"][wildcards.source]["regions"])
    if cfg["backend"] != "totalsegmentator":
        cfg.pop("mode", None)
    ids = {c.case_id for c in shard_cases(wildcards.source, wildcards.shard)}
    # Only this shard's overrides, so editing one case's override reruns one shard.
    cfg["overrides"] = {k: v for k, v in cfg.get("overrides", {}).items() if k in ids}
    return json.dumps(cfg, sort_keys=True)
