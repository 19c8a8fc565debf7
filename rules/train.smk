# MAISI's model side: autoencoder, latent cache, latent diffusion UNet and ControlNet.
# A checkpoint given under 'pretrained' replaces its rule's output, and the rule does not run.
# A stage's 'init_from' checkpoint (fine-tuning) is an input of its rule: a changed parent retrains the stage.


rule train_vae:
    input:
        datalist=rules.dataset.output.datalist,
    output:
        checkpoint=f"{MODELS}/autoencoder.pt",
        curve=report(f"{MODELS}/autoencoder_loss.png", caption="../report/loss_vae.rst", category="Training"),
    params:
        settings=stage_settings("train_vae"),
        resume=f"{MODELS}/.resume/autoencoder.pt",
    threads: config["threads"]["training"]
    resources:
        **model_resources(),
    log:
        "logs/train/train_vae.log",
    benchmark:
        "results/benchmarks/train_vae.tsv"
    script:
        "../workflow_scripts/train_vae.py"


rule cache_latents:
    input:
        prepared=PREPARED_SHARDS,
        regions=REGIONS_SHARDS,
        cases=PREPARED_CASES,  # the held-out split, never encoded
        autoencoder=AUTOENCODER,
    output:
        table=LATENT_SHARDS,
    params:
        settings=stage_settings("cache_latents"),
        on_error=config["on_error"],
        out_root=output_root(LATENT_SHARDS),
    threads: config["threads"]["cache_latents"]
    resources:
        **model_resources(runtime=False),
    log:
        "logs/cache_latents/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/cache_latents/{source}/{shard}.tsv"
    script:
        "../workflow_scripts/cache_latents.py"


rule train_diffusion:
    input:
        latents=lambda w: stage_tables(LATENT_SHARDS),
        cases=PREPARED_CASES,  # the held-out split (refused) and the folds (model.validation_fold)
        parent=config["train_diffusion"]["init_from"] or [],
    output:
        checkpoint=f"{MODELS}/diffusion_unet.pt",
        curve=report(f"{MODELS}/diffusion_unet_loss.png", caption="../report/loss_diffusion.rst", category="Training"),
    params:
        settings=stage_settings("train_diffusion"),
        resume=f"{MODELS}/.resume/diffusion_unet.pt",
    threads: config["threads"]["training"]
    resources:
        **model_resources(all_gpus=True),
    log:
        "logs/train/train_diffusion.log",
    benchmark:
        "results/benchmarks/train_diffusion.tsv"
    script:
        "../workflow_scripts/train_diffusion.py"


rule train_controlnet:
    input:
        latents=lambda w: stage_tables(LATENT_SHARDS),
        cases=PREPARED_CASES,
        diffusion=DIFFUSION,
        parent=config["train_controlnet"]["init_from"] or [],
    output:
        checkpoint=f"{MODELS}/controlnet.pt",
        curve=report(f"{MODELS}/controlnet_loss.png", caption="../report/loss_controlnet.rst", category="Training"),
    params:
        settings=stage_settings("train_controlnet"),
        resume=f"{MODELS}/.resume/controlnet.pt",
    threads: config["threads"]["training"]
    resources:
        **model_resources(all_gpus=True),
    log:
        "logs/train/train_controlnet.log",
    benchmark:
        "results/benchmarks/train_controlnet.tsv"
    script:
        "../workflow_scripts/train_controlnet.py"
