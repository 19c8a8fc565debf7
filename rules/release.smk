# The versioned synthetic dataset release (immutable; see maisi.release).


rule release:
    input:
        generated=f"{GENERATED}/cases.tsv",
        qc="results/qc/cases.tsv",
        qc_organs="results/qc/organs.tsv",
        fid="results/fid/fid.tsv",
        checkpoints=list(release_checkpoints().values()),
    output:
        record=f"{RELEASES}/{RELEASE_NAME}/{RELEASE_VERSION}.json",
    params:
        name=RELEASE_NAME,
        version=RELEASE_VERSION,
        description=config["release"]["description"],
        checkpoints=json.dumps(release_checkpoints(), sort_keys=True),
        config=json.dumps(config, sort_keys=True, default=str),
        sources=json.dumps(source_records(config["sources"], CATALOG), sort_keys=True),
        repo=workflow.basedir,
    log:
        "logs/release/release.log",
    script:
        "../workflow_scripts/release.py"
