# The embedded default source: a seeded procedural CT phantom, generated shard by shard.


rule phantom:
    output:
        table=f"{plan.RESOURCES}/sources/{{source}}/shards/{{shard}}.tsv",
    params:
        specs=phantom_specs_json,
        on_error=config["on_error"],
    threads: config["threads"]["phantom"]
    resources:
        **cluster(),
        mem_mb=memory(4000),
    log:
        "logs/phantom/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/phantom/{source}/{shard}.tsv"
    script:
        "../workflow_scripts/phantom.py"
