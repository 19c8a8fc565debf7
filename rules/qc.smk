# Quality control: organ HU ranges from the real prepared data; every generated case checked per shard
# (a failing one generated again with a new seed); the verdicts gathered, release decisions and figures.


rule qc_reference:
    input:
        cases="results/prepared/cases.tsv",
    output:
        reference="results/qc/reference.json",
        table=report("results/qc/reference_ranges.tsv", caption="../report/qc_reference.rst", category="Quality control"),
    params:
        settings=QC.reference_json(),
    resources:
        **cluster(),
    log:
        "logs/qc/qc_reference.log",
    benchmark:
        "results/benchmarks/qc_reference.tsv"
    script:
        "../workflow_scripts/qc_reference.py"


rule qc_check:
    input:
        unpack(qc_check_inputs),
    output:
        table=QC_SHARDS,
    params:
        request=request_json,
        cases=generate_cases_json,
        settings=GENERATE_SETTINGS,
        qc=QC.check_json(),
    threads: config["threads"]["generate"]
    resources:
        **generation_resources(),
    log:
        "logs/qc/{request}/{shard}.log",
    benchmark:
        "results/benchmarks/qc_check/{request}/{shard}.tsv"
    script:
        "../workflow_scripts/qc_check.py"


rule qc:
    input:
        tables=generation_tables(QC_SHARDS),
        reference="results/qc/reference.json",
        real="results/prepared/cases.tsv",
    output:
        cases=report("results/qc/cases.tsv", caption="../report/qc_cases.rst", category="Quality control"),
        organs=report("results/qc/organs.tsv", caption="../report/qc_organs.rst", category="Quality control"),
        histograms=report("results/qc/hu_histograms.png", caption="../report/qc_histograms.rst", category="Quality control"),
        montage=report("results/qc/generated_vs_real.png", caption="../report/qc_montage.rst", category="Generation"),
    params:
        settings=QC.to_json(),
    resources:
        **cluster(),
    log:
        "logs/qc/qc.log",
    benchmark:
        "results/benchmarks/qc.tsv"
    script:
        "../workflow_scripts/qc.py"
