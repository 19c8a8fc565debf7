# MAISI label masks from TotalSegmentator, for sources whose region backend is 'totalsegmentator'.


rule totalsegmentator:
    input:
        table="results/prepared/{source}/shards/{shard}.tsv",
    output:
        table="results/totalseg/{source}/shards/{shard}.tsv",
    params:
        settings=totalseg_settings,
        on_error=config["on_error"],
    threads: config["threads"]["totalsegmentator"]
    resources:
        **cluster(TOTALSEG_GPUS),
        mem_mb=memory(config["totalsegmentator"]["resources"]["mem_mb"]),
        runtime=config["totalsegmentator"]["resources"]["runtime"],
    log:
        "logs/totalsegmentator/{source}/{shard}.log",
    benchmark:
        "results/benchmarks/totalsegmentator/{source}/{shard}.tsv"
    script:
        "../workflow_scripts/totalsegmentator.py"
