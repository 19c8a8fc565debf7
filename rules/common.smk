# Config loading, validation and the input functions that map sources to shards.
# All logic lives in the `maisi` package; this file only adapts it to Snakemake.
import functools
import json

from snakemake.utils import min_version, validate

from maisi import plan
from maisi.catalog import load_catalog
from maisi.cluster import attempt_memory, slurm_resources
from maisi.generation_plan import parse_requests
from maisi.config import validate_config
from maisi.qc import QCSettings
from maisi.release_inputs import source_records
from maisi.settings import (
    ControlNetSettings,
    DiffusionSettings,
    FIDSettings,
    GenerateSettings,
    LatentSettings,
    VaeSettings,
)
from maisi.preprocess import PreprocessSettings
from maisi.totalseg import TotalSegSettings, check_weights

min_version("9.0")


validate(config, "../config/schema.yaml")
config.update(validate_config(config))
CATALOG = load_catalog(config["catalog"]) if any(
    s["type"] == "dataset" for s in config["sources"].values()
) else {}
SOURCES = sorted(config["sources"])
TOTALSEG_SOURCES = [s for s in SOURCES if config["sources"][s]["regions"]["backend"] == "totalsegmentator"]
# Missing or wrong TotalSegmentator weights stop the run before any job starts (no download).
for _mode in sorted({config["sources"][s]["regions"]["mode"] for s in TOTALSEG_SOURCES}):
    check_weights(config["totalsegmentator"]["weights"], _mode)


wildcard_constraints:
    source="|".join(SOURCES),
    shard=r"\d{4}",
    request="|".join(sorted(config["generate"]["requests"])) or "(?!)",


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


def shard_cases(source, shard):
    return source_shards(source).get(shard, [])


def cases_json(wildcards):
    return json.dumps([c.to_json() for c in shard_cases(wildcards.source, wildcards.shard)], sort_keys=True)


def stage_tables(pattern):
    """Every shard table of a stage, over all sources."""
    return [pattern.format(source=s, shard=k) for s in SOURCES for k in source_shards(s)]


PREPROCESS = PreprocessSettings.from_config(config["preprocess"])


# --- placement: GPU count, and for profiles/slurm partition, account and GPU model from the config ---
def cluster(gpus=0):
    return slurm_resources(config["cluster"], gpus)


def memory(mem_mb):
    return attempt_memory(mem_mb, config["cluster"])


# --- download.smk ---
def dataset_entry(source):
    return CATALOG[config["sources"][source]["dataset"]]


def archive_path(source):
    entry = dataset_entry(source)
    return f"{plan.RESOURCES}/downloads/{entry.name}/{entry.archive_name}"


def dataset_url(wildcards):
    for name, src in config["sources"].items():
        if src["type"] == "dataset" and src["dataset"] == wildcards.dataset and src.get("url"):
            return src["url"]
    return CATALOG[wildcards.dataset].url


# --- phantom.smk ---
def phantom_specs_json(wildcards):
    from dataclasses import asdict

    wanted = {c.case_id for c in shard_cases(wildcards.source, wildcards.shard)}
    specs = plan.phantom_specs(wildcards.source, config["sources"][wildcards.source], config["seed"])
    return json.dumps([asdict(s) for s in specs if s.case_id in wanted], sort_keys=True)


# --- preprocess.smk ---
def preprocess_inputs(wildcards):
    src = config["sources"][wildcards.source]
    if src["type"] == "phantom":
        return [f"{plan.RESOURCES}/sources/{wildcards.source}/shards/{wildcards.shard}.tsv"]
    files = []
    for case in shard_cases(wildcards.source, wildcards.shard):
        files.append(case.image)
        if case.label:
            files.append(case.label)
    return files


# --- totalseg.smk ---
def totalseg_settings(wildcards):
    src = config["sources"][wildcards.source]
    block = config["totalsegmentator"]
    return TotalSegSettings.from_config(block, src["regions"], config["threads"]["totalsegmentator"]).to_json()


TOTALSEG_GPUS = 0 if config["totalsegmentator"]["device"] == "cpu" else config["totalsegmentator"]["resources"]["gpu"]


# --- train.smk ---
# A released checkpoint in 'pretrained' replaces the output of its training rule.
MODELS = "results/models"
AUTOENCODER = config["pretrained"]["autoencoder"] or f"{MODELS}/autoencoder.pt"
DIFFUSION = config["pretrained"]["diffusion"] or f"{MODELS}/diffusion_unet.pt"
CONTROLNET = config["pretrained"]["controlnet"] or f"{MODELS}/controlnet.pt"


MODEL_GPUS = 0 if config["model"]["device"] == "cpu" else config["model"]["resources"]["gpu"]


def stage_settings(stage):
    """The stage's settings as stable JSON (a Snakemake param: a change reruns that stage only)."""
    kinds = {"train_vae": VaeSettings, "cache_latents": LatentSettings, "train_diffusion": DiffusionSettings,
             "train_controlnet": ControlNetSettings}  # fmt: skip
    block = dict(config[stage])
    if stage == "train_controlnet":  # for diffusion checkpoints that do not record their scheduler
        block["scheduler"] = config["train_diffusion"]["scheduler"]
    return kinds[stage].from_config(block, config["model"]).to_json()


def training_targets():
    """The checkpoints and loss curves `all` asks for (trained ones only; pretrained ones are inputs)."""
    targets = [CONTROLNET]
    for key, name in (("autoencoder", "autoencoder"), ("diffusion", "diffusion_unet"), ("controlnet", "controlnet")):
        if not config["pretrained"][key]:
            targets.append(f"{MODELS}/{name}_loss.png")
    return targets


# --- generate.smk ---
# Requests were checked with the config (maisi.config); impossible ones never reach a job.
REQUESTS = {
    r.name: r
    for r in parse_requests(
        config["generate"],
        config["model"]["preset"],
        None if config["pretrained"]["diffusion"] else config["train_diffusion"]["scheduler"],
    )
}
GENERATED = "results/generated"
GENERATION_SHARDS = f"{GENERATED}/{{request}}/shards/{{shard}}.tsv"


def generate_inputs(wildcards):
    inputs = {"autoencoder": AUTOENCODER, "diffusion": DIFFUSION}
    if REQUESTS[wildcards.request].masks:
        inputs.update(controlnet=CONTROLNET, masks="results/masks/database.json")
    return inputs


GENERATE_SETTINGS = GenerateSettings.from_config(config["generate"], config["model"], config["on_error"]).to_json()


def generation_resources():
    """Placement, memory and runtime of the jobs that generate cases (generate, and qc_check when a case fails)."""
    block = config["generate"]["resources"]
    return {**cluster(MODEL_GPUS), "mem_mb": memory(block["mem_mb"]), "runtime": block["runtime"]}


def request_json(wildcards):
    return json.dumps(REQUESTS[wildcards.request].to_json(), sort_keys=True)


def generate_cases_json(wildcards):
    from dataclasses import asdict

    cases = REQUESTS[wildcards.request].shards().get(wildcards.shard, [])
    return json.dumps([asdict(c) for c in cases], sort_keys=True)


def generation_tables(pattern=GENERATION_SHARDS):
    return [pattern.format(request=n, shard=k) for n, r in sorted(REQUESTS.items()) for k in r.shards()]


# --- regions.smk ---
def regions_inputs(wildcards):
    inputs = {"table": f"results/prepared/{wildcards.source}/shards/{wildcards.shard}.tsv"}
    if wildcards.source in TOTALSEG_SOURCES:
        inputs["segmented"] = f"results/totalseg/{wildcards.source}/shards/{wildcards.shard}.tsv"
    return inputs


def regions_params(wildcards):
    cfg = dict(config["sources"][wildcards.source]["regions"])
    if cfg["backend"] != "totalsegmentator":
        cfg.pop("mode", None)
    ids = {c.case_id for c in shard_cases(wildcards.source, wildcards.shard)}
    # Only this shard's overrides, so editing one case's override reruns one shard.
    cfg["overrides"] = {k: v for k, v in cfg.get("overrides", {}).items() if k in ids}
    return json.dumps(cfg, sort_keys=True)


# --- qc.smk, fid.smk, release.smk ---
QC = QCSettings.from_config(config["qc"])
QC_SHARDS = "results/qc/shards/{request}/{shard}.tsv"


def qc_check_inputs(wildcards):
    """A QC shard checks its generation shard and may generate cases again (same models and masks)."""
    table = GENERATION_SHARDS.format(request=wildcards.request, shard=wildcards.shard)
    return {"table": table, "reference": "results/qc/reference.json", **generate_inputs(wildcards)}


FID = FIDSettings.from_config({k: v for k, v in config["fid"].items() if k != "enabled"})
RELEASES = "results/releases"
RELEASE_NAME = config["release"]["name"] or config["run_name"]
RELEASE_VERSION = config["release"]["version"]


def release_checkpoints():
    """The checkpoints the released cases were generated with (the ControlNet only when a request uses masks)."""
    used = {"autoencoder": AUTOENCODER, "diffusion": DIFFUSION}
    if any(r.masks for r in REQUESTS.values()):
        used["controlnet"] = CONTROLNET
    return used


def release_targets():
    """QC and the release, when there is anything to generate (a run without requests ends at training)."""
    if not any(r.n_cases for r in REQUESTS.values()):
        return []
    return [*rules.qc.output, *rules.release.output]
