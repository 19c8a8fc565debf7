# Paths, settings and input functions of the generate rules (generate.smk); what every stage needs is in common.smk.
import functools
from dataclasses import asdict

from maisi.generate.settings import GenerateSettings

GENERATED = "results/generated"
GENERATION_SHARDS = f"{GENERATED}/{{request}}/shards/{{shard}}.tsv"
MASK_DATABASE = "results/masks/database.json"
#: NVIDIA's mask archive, extracted (mask_database.source 'nvidia' with a .zip archive).
NVIDIA_MASKS = "results/masks/nvidia"


def mask_database_inputs(wildcards):
    """The prepared cases (their label maps, or only the held-out split that no database may hold), and NVIDIA's
    candidate list and masks (its archive extracted by nvidia_masks)."""
    db = config["generate"]["mask_database"]
    if db["source"] != "nvidia":
        return {"cases": PREPARED_CASES}
    masks = db["nvidia_masks"]
    return {"cases": PREPARED_CASES, "candidates": db["nvidia_candidates"], "masks": NVIDIA_MASKS if str(masks).endswith(".zip") else masks}
GENERATE_SETTINGS = GenerateSettings.from_config(config).to_json()


#: NVIDIA's mask-generation files, for requests with generated masks (checked at workflow start).
MASK_GENERATION = {
    "mask_autoencoder": config["generate"]["mask_generation"]["autoencoder"],
    "mask_diffusion": config["generate"]["mask_generation"]["diffusion"],
    "size_conditions": config["generate"]["mask_generation"]["size_conditions"],
}


def generate_inputs(wildcards):
    request = REQUESTS[wildcards.request]
    inputs = {"autoencoder": AUTOENCODER, "diffusion": DIFFUSION}
    if request.masks and request.mask_source == "generated":
        inputs.update(controlnet=CONTROLNET, **MASK_GENERATION)
    elif request.masks and request.mask_source == "folder":
        # the prepared cases: no own map may be a held-out case's (checked when the shard starts)
        inputs.update(controlnet=CONTROLNET, own_masks=user_mask_files(wildcards.request), cases=PREPARED_CASES)
    elif request.masks:
        inputs.update(controlnet=CONTROLNET, masks=MASK_DATABASE)
    return inputs


@functools.cache
def user_mask_files(name):
    """Request ``name``'s own maps (and CTs): inputs, so that a changed map reruns the request's shards.
    Found once per request (every shard's generate and qc_check job asks; each search reads every header)."""
    from maisi.generate.user_masks import find_user_masks

    masks = find_user_masks(REQUESTS[name].mask_folder, f"generate.requests.{name}.mask_folder")
    return [m.label for m in masks] + [m.image for m in masks if m.image]


def generation_resources():
    """Placement, memory and runtime of the jobs that generate cases (generate, and qc_check when a case fails)."""
    block = config["generate"]["resources"]
    return {**cluster(min(MODEL_GPUS, 1)), "mem_mb": memory(block["mem_mb"]), "runtime": block["runtime"]}


def request_json(wildcards):
    return json.dumps(REQUESTS[wildcards.request].to_json(), sort_keys=True)


def generate_cases_json(wildcards):
    cases = REQUESTS[wildcards.request].shards().get(wildcards.shard, [])
    return json.dumps([asdict(c) for c in cases], sort_keys=True)


def generation_tables(pattern=GENERATION_SHARDS):
    return [pattern.format(request=n, shard=k) for n, r in sorted(REQUESTS.items()) for k in r.shards()]
