# Paths, settings and input functions of the train rules (train.smk); what every stage needs is in common.smk.
from maisi.train.settings import ControlNetSettings, DiffusionSettings, LatentSettings, VaeSettings

MODELS = "results/models"
LATENTS = "results/latents"
LATENT_SHARDS = f"{LATENTS}/{{source}}/shards/{{shard}}.tsv"
AUTOENCODER = config["pretrained"]["autoencoder"] or f"{MODELS}/autoencoder.pt"
DIFFUSION = config["pretrained"]["diffusion"] or f"{MODELS}/diffusion_unet.pt"
CONTROLNET = config["pretrained"]["controlnet"] or f"{MODELS}/controlnet.pt"
MODEL_GPUS = 0 if config["model"]["device"] == "cpu" else config["model"]["resources"]["gpu"]
#: Validation on held-out cases (model.validation_every, model.validation_fold): the diffusion stage then reads the folds.
VALIDATION = config["model"]["validation_every"] > 0 and config["model"]["validation_fold"] is not None
SETTINGS = {"train_vae": VaeSettings, "cache_latents": LatentSettings, "train_diffusion": DiffusionSettings,
            "train_controlnet": ControlNetSettings}  # fmt: skip


#: The checkpoint each training stage makes; given under 'pretrained', the stage does not run.
STAGE_CHECKPOINT = {"train_vae": "autoencoder", "train_diffusion": "diffusion", "train_controlnet": "controlnet"}


def stage_settings(stage):
    """The stage's settings as stable JSON (a Snakemake param: a change reruns that stage only). A stage
    replaced by a pretrained checkpoint is not checked against the variant (its defaults need not fit it)."""
    given = config["pretrained"].get(STAGE_CHECKPOINT.get(stage, ""))
    if given:
        return json.dumps({"pretrained": given})
    return SETTINGS[stage].from_config(config).to_json()


def training_targets():
    """The checkpoints and loss curves `all` asks for (trained ones only; pretrained ones are inputs)."""
    targets = [CONTROLNET]
    for key, name in (("autoencoder", "autoencoder"), ("diffusion", "diffusion_unet"), ("controlnet", "controlnet")):
        if not config["pretrained"][key]:
            targets.append(f"{MODELS}/{name}_loss.png")
    return targets


def model_resources(runtime=True, all_gpus=False):
    """Placement, memory and runtime of a model job: one GPU, or with `all_gpus` (the diffusion and ControlNet
    training, one process per GPU) model.resources.gpu GPUs on one node."""
    block = config["model"]["resources"]
    gpus = MODEL_GPUS if all_gpus else min(MODEL_GPUS, 1)
    return {**cluster(gpus), **({"nodes": 1} if gpus > 1 else {}), "mem_mb": memory(block["mem_mb"]),
            **({"runtime": block["runtime"]} if runtime else {})}
