# The versioned synthetic dataset release (immutable; see maisi.release).


rule release:
    input:
        qc=rules.qc.output.cases,
        qc_organs=rules.qc.output.organs,
        fid=rules.fid.output.table,
        checkpoints=list(release_checkpoints().values()),
        evaluation=list(evaluation_targets().values()),
    output:
        record=RELEASE_RECORD,
    params:
        name=RELEASE_NAME,
        version=RELEASE_VERSION,
        # Functions, so that user text such as a local source's "images/{case}.nii.gz" is not
        # taken for a wildcard.
        description=lambda w: config["release"]["description"],
        checkpoints=lambda w: json.dumps(release_checkpoints(), sort_keys=True),
        evaluation=lambda w: json.dumps(evaluation_targets(), sort_keys=True),
        on_copy=PRIVACY.on_copy,
        config=lambda w: json.dumps(config, sort_keys=True, default=str),
        sources=lambda w: json.dumps(source_records(config["sources"], CATALOG), sort_keys=True),
        root=output_root(RELEASE_RECORD, root=RELEASES, key="record"),
    resources:
        **cluster(),
    log:
        "logs/release/release.log",
    script:
        "../workflow_scripts/release.py"
