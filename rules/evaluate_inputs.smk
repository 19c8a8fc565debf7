# Paths, settings and input functions of the evaluate rules (evaluate.smk); what every stage needs is in common.smk.
from maisi.evaluate.qc import REFERENCE_VERSION, QCSettings
from maisi.evaluate.settings import FIDSettings, SegmenterSettings
from maisi.prepare.totalsegmentator import TotalSegSettings, check_weights

QC_ROOT = "results/qc"
QC_REFERENCE = f"{QC_ROOT}/reference.json"
QC_SHARDS = f"{QC_ROOT}/shards/{{request}}/{{shard}}.tsv"
#: Where QC puts the cases it generates again (attempt k under attempt-<k>/).
QC_REGENERATED = f"{QC_ROOT}/regenerated"
QC_CASES = f"{QC_ROOT}/cases.tsv"
#: TotalSegmentator's masks of image-only cases (attempt k under attempt-<k>/).
QC_SEGMENTED = f"{QC_ROOT}/totalseg"
QC = QCSettings.from_config(config)
#: How QC segments image-only cases (None: it does not); its weights are checked before any job starts.
QC_SEGMENTER = TotalSegSettings.for_qc(config)
if QC_SEGMENTER is not None:
    check_weights(QC_SEGMENTER.weights, QC_SEGMENTER.mode)
FID = FIDSettings.from_config(config)
FID_ROOT = "results/fid"
#: FID's independent feature network, trained on the real cases only.
FID_SEGMENTER = f"{FID_ROOT}/segmenter/segmenter.pt"
FID_SEGMENTER_SETTINGS = SegmenterSettings.from_config(config)


def fid_inputs(wildcards):
    """The released cases, the real ones and the networks of the configured extractors (none when FID is off)."""
    inputs = {"qc": QC_CASES, "real": PREPARED_CASES}
    if config["fid"]["enabled"]:
        if "autoencoder" in FID.extractors:
            inputs["autoencoder"] = AUTOENCODER
        if "segmenter" in FID.extractors:
            inputs["segmenter"] = FID_SEGMENTER
    return inputs


def qc_check_inputs(wildcards):
    """A QC shard checks its generation shard and may generate cases again (same models and masks)."""
    table = GENERATION_SHARDS.format(request=wildcards.request, shard=wildcards.shard)
    return {"table": table, "reference": QC_REFERENCE, **generate_inputs(wildcards)}
