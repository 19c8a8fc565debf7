# MAISI's diffusion-data preparation, one job per shard of cases.


rule preprocess:
    input:
        preprocess_inputs,
    output:
        table="results/prepared/{source}/shards/{shard}.tsv",
    params:
        cases=cases_json,
        settings=PREPROCESS.to_json(),
        on_error=config["on_error"],
    threads: config["threads"]["preprocess"]
    resources:
        **cluster(),
        mem_mb=memory(8000),
    log:
        "logs/preprocess/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/preprocess/{source}/{shard}.tsv"
    script:
        "../workflow_scripts/preprocess.py"
