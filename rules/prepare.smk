# The prepared dataset: MAISI's diffusion-data preparation (one job per shard of cases), label masks
# from TotalSegmentator for sources whose region backend asks for it, top and bottom body regions
# per case, and the MAISI datalist with case tables and a visual summary.


rule preprocess:
    input:
        preprocess_inputs,
    output:
        table=PREPARED_SHARDS,
    params:
        cases=cases_json,
        settings=PREPROCESS.to_json(),
        on_error=config["on_error"],
        out_root=output_root(PREPARED_SHARDS),
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


rule totalsegmentator:
    input:
        table=PREPARED_SHARDS,
    output:
        table=TOTALSEG_SHARDS,
    params:
        settings=totalseg_settings,
        on_error=config["on_error"],
        out_root=output_root(TOTALSEG_SHARDS),
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


rule regions:
    input:
        unpack(regions_inputs),
    output:
        table=REGIONS_SHARDS,
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


rule dataset:
    input:
        prepared=lambda w: stage_tables(PREPARED_SHARDS),
        regions=lambda w: stage_tables(REGIONS_SHARDS),
    output:
        datalist=f"{PREPARED}/datalist.json",
        cases=report(PREPARED_CASES, caption="../report/cases.rst", category="Prepared dataset"),
        rejected=report(f"{PREPARED}/rejected.tsv", caption="../report/rejected.rst", category="Prepared dataset"),
    params:
        folds=config["dataset"]["folds"],
        held_out=config["dataset"]["held_out"],
        seed=config["seed"],
        run_name=config["run_name"],
    resources:
        **cluster(),
    log:
        "logs/dataset/dataset.log",
    script:
        "../workflow_scripts/dataset.py"


rule dataset_summary:
    input:
        cases=rules.dataset.output.cases,
        rejected=rules.dataset.output.rejected,
    output:
        dims=report(f"{PREPARED}/summary/dims_spacing.png", caption="../report/dims_spacing.rst", category="Prepared dataset"),
        montage=report(f"{PREPARED}/summary/montage.png", caption="../report/montage.rst", category="Prepared dataset"),
        html=f"{PREPARED}/summary/summary.html",
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
