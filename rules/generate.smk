# Generation: the mask database, sharded generation per request (TSP decoding), the generated set
# (first attempts; QC checks them and generates failing cases again, see evaluate.smk).


rule mask_database:
    input:
        unpack(mask_database_inputs),
    output:
        database=MASK_DATABASE,
    params:
        source=config["generate"]["mask_database"]["source"],
    resources:
        **cluster(),
    log:
        "logs/generate/mask_database.log",
    script:
        "../workflow_scripts/mask_database.py"


rule nvidia_masks:
    input:
        archive=config["generate"]["mask_database"]["nvidia_masks"] or [],
    output:
        folder=directory(NVIDIA_MASKS),
    resources:
        **cluster(),
    log:
        "logs/generate/nvidia_masks.log",
    script:
        "../workflow_scripts/nvidia_masks.py"


rule generate:
    input:
        unpack(generate_inputs),
    output:
        table=GENERATION_SHARDS,
    params:
        request=request_json,
        cases=generate_cases_json,
        settings=GENERATE_SETTINGS,
        out_root=output_root(GENERATION_SHARDS),
    threads: config["threads"]["generate"]
    resources:
        **generation_resources(),
    log:
        "logs/generate/{request}/{shard}.log",
    benchmark:
        "results/benchmarks/generate/{request}/{shard}.tsv"
    script:
        "../workflow_scripts/generate.py"


rule generated:
    input:
        tables=generation_tables(),
    output:
        cases=f"{GENERATED}/cases.tsv",
        montage=report(f"{GENERATED}/montage.png", caption="../report/generated_montage.rst", category="Generation"),
    params:
        requests=json.dumps({n: r.describe() for n, r in sorted(REQUESTS.items())}, sort_keys=True),
    resources:
        **cluster(),
    log:
        "logs/generate/generated.log",
    script:
        "../workflow_scripts/generated.py"
