# Synthetic CT data factory (MAISI): the workflow's entry point.
# Run: snakemake --profile profiles/local all


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/phantom.smk"
include: "rules/preprocess.smk"
include: "rules/totalseg.smk"
include: "rules/regions.smk"
include: "rules/dataset.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/qc.smk"
include: "rules/fid.smk"
include: "rules/release.smk"


report: "report/workflow.rst"


# Run on the submit host under a cluster executor: they only merge small tables.
localrules:
    all,
    dataset,


rule all:
    input:
        rules.dataset.output,
        rules.dataset_summary.output,
        training_targets(),
        rules.generated.output,
        release_targets(),
    default_target: True
