# MAISI's model side: autoencoder, latent cache, latent diffusion UNet and ControlNet.
# A checkpoint given under 'pretrained' replaces its rule's output, and the rule does not run.


rule train_vae:
    input:
        datalist="results/prepared/datalist.json",
    output:
        checkpoint=f"{MODELS}/autoencoder.pt",
        curve=report(f"{MODELS}/autoencoder_loss.png", caption="../report/loss_vae.rst", category="Training"),
    params:
        settings=stage_settings("train_vae"),
        resume=f"{MODELS}/.resume/autoencoder.pt",
    threads: config["threads"]["training"]
    resources:
        **cluster(MODEL_GPUS),
        mem_mb=memory(config["model"]["resources"]["mem_mb"]),
        runtime=config["model"]["resources"]["runtime"],
    log:
        "logs/train/train_vae.log",
    benchmark:
        "results/benchmarks/train_vae.tsv"
    script:
        "../workflow_scripts/train_vae.py"


rule cache_latents:
    input:
        prepared="results/prepared/{source}/shards/{shard}.tsv",
        regions="results/regions/{source}/shards/{shard}.tsv",
        autoencoder=AUTOENCODER,
    output:
        table="results/latents/{source}/shards/{shard}.tsv",
    params:
        settings=stage_settings("cache_latents"),
        on_error=config["on_error"],
    threads: config["threads"]["cache_latents"]
    resources:
        **cluster(MODEL_GPUS),
        mem_mb=memory(config["model"]["resources"]["mem_mb"]),
    log:
        "logs/cache_latents/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/cache_latents/{source}/{shard}.tsv"
    script:
        "../workflow_scripts/cache_latents.py"


rule train_diffusion:
    input:
        latents=lambda w: stage_tables("results/latents/{source}/shards/{shard}.tsv"),
    output:
        checkpoint=f"{MODELS}/diffusion_unet.pt",
        curve=report(f"{MODELS}/diffusion_unet_loss.png", caption="../report/loss_diffusion.rst", category="Training"),
    params:
        settings=stage_settings("train_diffusion"),
        resume=f"{MODELS}/.resume/diffusion_unet.pt",
    threads: config["threads"]["training"]
    resources:
        **cluster(MODEL_GPUS),
        mem_mb=memory(config["model"]["resources"]["mem_mb"]),
        runtime=config["model"]["resources"]["runtime"],
    log:
        "logs/train/train_diffusion.log",
    benchmark:
        "results/benchmarks/train_diffusion.tsv"
    script:
        "../workflow_scripts/train_diffusion.py"


rule train_controlnet:
    input:
        latents=lambda w: stage_tables("results/latents/{source}/shards/{shard}.tsv"),
        cases="results/prepared/cases.tsv",
        diffusion=DIFFUSION,
    output:
        checkpoint=f"{MODELS}/controlnet.pt",
        curve=report(f"{MODELS}/controlnet_loss.png", caption="../report/loss_controlnet.rst", category="Training"),
    params:
        settings=stage_settings("train_controlnet"),
        resume=f"{MODELS}/.resume/controlnet.pt",
    threads: config["threads"]["training"]
    resources:
        **cluster(MODEL_GPUS),
        mem_mb=memory(config["model"]["resources"]["mem_mb"]),
        runtime=config["model"]["resources"]["runtime"],
    log:
        "logs/train/train_controlnet.log",
    benchmark:
        "results/benchmarks/train_controlnet.tsv"
    script:
        "../workflow_scripts/train_controlnet.py"
