# The prepared dataset: MAISI datalist, case tables and a visual summary.


rule dataset:
    input:
        prepared=lambda w: stage_tables("results/prepared/{source}/shards/{shard}.tsv"),
        regions=lambda w: stage_tables("results/regions/{source}/shards/{shard}.tsv"),
    output:
        datalist="results/prepared/datalist.json",
        cases=report(
            "results/prepared/cases.tsv",
            caption="../report/cases.rst",
            category="Prepared dataset",
        ),
        rejected=report(
            "results/prepared/rejected.tsv",
            caption="../report/rejected.rst",
            category="Prepared dataset",
        ),
    params:
        folds=config["dataset"]["folds"],
        run_name=config["run_name"],
    resources:
        **cluster(),
    log:
        "logs/dataset/dataset.log",
    script:
        "../workflow_scripts/dataset.py"


rule dataset_summary:
    input:
        cases="results/prepared/cases.tsv",
        rejected="results/prepared/rejected.tsv",
    output:
        dims=report(
            "results/prepared/summary/dims_spacing.png",
            caption="../report/dims_spacing.rst",
            category="Prepared dataset",
        ),
        montage=report(
            "results/prepared/summary/montage.png",
            caption="../report/montage.rst",
            category="Prepared dataset",
        ),
        html="results/prepared/summary/summary.html",
    params:
        max_cases=config["dataset"]["montage_cases"],
        run_name=config["run_name"],
    resources:
        **cluster(),
    log:
        "logs/dataset/summary.log",
    benchmark:
        "results/benchmarks/dataset_summary.tsv"
    script:
        "../workflow_scripts/dataset_summary.py"
