# Evaluation of the generated set. Quality control: organ HU ranges from the real prepared data;
# every generated case checked per shard (a failing one generated again with a new seed); the
# verdicts gathered, release decisions and figures. Then the 2.5-D FID of the released cases
# against the real prepared cases, with the real-vs-real floor.


rule qc_reference:
    input:
        cases=PREPARED_CASES,
    output:
        reference=QC_REFERENCE,
        table=report(f"{QC_ROOT}/reference_ranges.tsv", caption="../report/qc_reference.rst", category="Quality control"),
    params:
        settings=QC.reference_json(),
        version=REFERENCE_VERSION,  # a new reference format or range rule rebuilds the reference
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
        regenerated=QC_REGENERATED,
        segmenter=QC_SEGMENTER.to_json() if QC_SEGMENTER else "",
        segmented=QC_SEGMENTED,
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
        reference=QC_REFERENCE,
        real=PREPARED_CASES,
    output:
        cases=report(QC_CASES, caption="../report/qc_cases.rst", category="Quality control"),
        organs=report(f"{QC_ROOT}/organs.tsv", caption="../report/qc_organs.rst", category="Quality control"),
        histograms=report(f"{QC_ROOT}/hu_histograms.png", caption="../report/qc_histograms.rst", category="Quality control"),
        montage=report(f"{QC_ROOT}/generated_vs_real.png", caption="../report/qc_montage.rst", category="Generation"),
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


rule fid_segmenter:
    input:
        real=PREPARED_CASES,
    output:
        model=FID_SEGMENTER,
        losses=report(f"{FID_ROOT}/segmenter/losses.png", caption="../report/fid_segmenter.rst", category="FID"),
    params:
        settings=FID_SEGMENTER_SETTINGS.to_json(),
        fid=FID.to_json(),
    threads: config["threads"]["training"]
    resources:
        **model_resources(),
    log:
        "logs/fid/segmenter.log",
    benchmark:
        "results/benchmarks/fid_segmenter.tsv"
    script:
        "../workflow_scripts/fid_segmenter.py"


rule fid:
    input:
        unpack(fid_inputs),
    output:
        table=report(f"{FID_ROOT}/fid.tsv", caption="../report/fid.rst", category="FID"),
        record=f"{FID_ROOT}/fid.json",
    params:
        settings=FID.to_json(),
        variant=config["model"]["variant"],
        enabled=config["fid"]["enabled"],
    threads: config["threads"]["generate"]
    resources:
        **model_resources(runtime=False),
    log:
        "logs/fid/fid.log",
    benchmark:
        "results/benchmarks/fid.tsv"
    script:
        "../workflow_scripts/fid.py"


# What no MAISI tool measures. The held-out real cases (dataset.held_out) judge both: how near honest new
# cases come to the training set (privacy), and how well segmentation networks trained on real, real plus
# synthetic and synthetic cases do on real cases no generative stage saw (utility).


rule privacy:
    input:
        unpack(lambda w: {"qc": QC_CASES, "real": PREPARED_CASES, **extractor_inputs([PRIVACY.extractor])}),
    output:
        audit=report(PRIVACY_AUDIT, caption="../report/privacy.rst", category="Privacy audit"),
        held_out=f"{PRIVACY_ROOT}/held_out.tsv",
        figure=report(f"{PRIVACY_ROOT}/distances.png", caption="../report/privacy.rst", category="Privacy audit"),
    params:
        settings=PRIVACY.to_json(),
        fid=FID.to_json(),
        variant=config["model"]["variant"],
    threads: config["threads"]["generate"]
    resources:
        **model_resources(runtime=False),
    log:
        "logs/privacy/privacy.log",
    benchmark:
        "results/benchmarks/privacy.tsv"
    script:
        "../workflow_scripts/privacy.py"


rule utility_arm:
    input:
        unpack(utility_arm_inputs),
    output:
        model=UTILITY_MODEL,
    params:
        arm=lambda w: UTILITY_ARMS[w.arm],
        settings=UTILITY.to_json(),
        fid=FID.to_json(),
        masked=MASKED_REQUESTS,
    wildcard_constraints:
        arm="|".join(UTILITY_ARMS),
    threads: config["threads"]["training"]
    resources:
        **model_resources(),
    log:
        "logs/utility/{arm}.log",
    benchmark:
        "results/benchmarks/utility/{arm}.tsv"
    script:
        "../workflow_scripts/utility_arm.py"


rule utility:
    input:
        models=expand(UTILITY_MODEL, arm=list(UTILITY_ARMS)),
        real=PREPARED_CASES,
    output:
        differences=report(UTILITY_DIFFERENCES, caption="../report/utility.rst", category="Downstream utility"),
        dice=f"{UTILITY_ROOT}/dice.tsv",
        figure=report(f"{UTILITY_ROOT}/utility.png", caption="../report/utility.rst", category="Downstream utility"),
    params:
        settings=UTILITY.to_json(),
        fid=FID.to_json(),
    threads: config["threads"]["generate"]
    resources:
        **model_resources(runtime=False),
    log:
        "logs/utility/utility.log",
    benchmark:
        "results/benchmarks/utility/evaluate.tsv"
    script:
        "../workflow_scripts/utility.py"


rule label_fidelity:
    input:
        unpack(label_fidelity_inputs),
    output:
        cases=f"{FIDELITY_ROOT}/cases.tsv",
        summary=report(f"{FIDELITY_ROOT}/summary.tsv", caption="../report/label_fidelity.rst", category="Label fidelity"),
    params:
        segmenter=FIDELITY_SEGMENTER,
        totalseg=lambda w: TotalSegSettings.for_fidelity(config).to_json() if FIDELITY_SEGMENTER == "totalsegmentator" else "",
        segmented=f"{FIDELITY_ROOT}/totalseg",
        settings=UTILITY.to_json(),
        fid=FID.to_json(),
        masked=MASKED_REQUESTS,
    threads: config["threads"]["generate"]
    resources:
        **model_resources(runtime=False),
    log:
        "logs/label_fidelity/label_fidelity.log",
    benchmark:
        "results/benchmarks/label_fidelity.tsv"
    script:
        "../workflow_scripts/label_fidelity.py"
