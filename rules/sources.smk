# Where cases come from: public datasets (download, checksum-verified, converted to the common
# layout) and the embedded default source, a seeded procedural CT phantom generated shard by shard.


rule download:
    output:
        f"{plan.RESOURCES}/downloads/{{dataset}}/{{archive}}",
    params:
        url=dataset_url,
        catalog=config["catalog"],
    log:
        "logs/download/{dataset}/{archive}.log",
    resources:
        **cluster(),
        downloads=1,
    script:
        "../workflow_scripts/download.py"


checkpoint convert_dataset:
    input:
        archive=lambda w: archive_path(w.source),
    output:
        table=f"{SOURCE_FILES}/{{source}}/cases.tsv",
    params:
        dataset=lambda w: config["sources"][w.source]["dataset"],
        catalog=config["catalog"],
    resources:
        **cluster(),
    log:
        "logs/convert_dataset/{source}.log",
    benchmark:
        "results/benchmarks/convert_dataset/{source}.tsv"
    script:
        "../workflow_scripts/convert_dataset.py"


rule phantom:
    output:
        table=f"{SOURCE_FILES}/{{source}}/shards/{{shard}}.tsv",
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
