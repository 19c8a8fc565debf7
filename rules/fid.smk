# 2.5-D FID of the released generated cases against the real prepared cases, with the real-vs-real floor.


rule fid:
    input:
        qc="results/qc/cases.tsv",
        real="results/prepared/cases.tsv",
        autoencoder=AUTOENCODER,
    output:
        table=report("results/fid/fid.tsv", caption="../report/fid.rst", category="FID"),
        record="results/fid/fid.json",
    params:
        settings=FID.to_json(),
        preset=config["model"]["preset"],
        enabled=config["fid"]["enabled"],
    threads: config["threads"]["generate"]
    resources:
        **cluster(MODEL_GPUS),
        mem_mb=memory(config["model"]["resources"]["mem_mb"]),
    log:
        "logs/fid/fid.log",
    benchmark:
        "results/benchmarks/fid.tsv"
    script:
        "../workflow_scripts/fid.py"
