# Public datasets: download (resumable, checksum-verified) and conversion to the common layout.


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
        table=f"{plan.RESOURCES}/sources/{{source}}/cases.tsv",
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
