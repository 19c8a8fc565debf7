# Top and bottom body regions per case (MAISI's rule on the label map or TotalSegmentator's mask, or manual).


rule regions:
    input:
        unpack(regions_inputs),
    output:
        table="results/regions/{source}/shards/{shard}.tsv",
    params:
        regions=regions_params,
        on_error=config["on_error"],
    threads: config["threads"]["regions"]
    resources:
        **cluster(),
    log:
        "logs/regions/{source}/{shard}.log",
    script:
        "../workflow_scripts/regions.py"
