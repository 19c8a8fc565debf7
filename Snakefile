# Synthetic CT data factory (MAISI): the workflow's entry point.
# Run: snakemake --profile local all   (after `make profiles`; or --profile profiles/local)

import sys

from maisi.config import ConfigError, check_config_syntax

try:  # a YAML error named by file, line and column (Snakemake's own message names neither)
    check_config_syntax("config/config.yaml")
except ConfigError as exc:
    sys.exit(f"Error: {exc}")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/sources_inputs.smk"
include: "rules/sources.smk"
include: "rules/prepare_inputs.smk"
include: "rules/prepare.smk"
include: "rules/train_inputs.smk"
include: "rules/train.smk"
include: "rules/generate_inputs.smk"
include: "rules/generate.smk"
include: "rules/evaluate_inputs.smk"
include: "rules/evaluate.smk"
include: "rules/release_inputs.smk"
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
