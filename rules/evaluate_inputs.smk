# Paths, settings and input functions of the evaluate rules (evaluate.smk); what every stage needs is in common.smk.
from maisi.evaluate.qc import REFERENCE_VERSION, QCSettings
from maisi.evaluate.settings import FIDSettings, PrivacySettings, SegmenterSettings, UtilitySettings
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
        inputs.update(extractor_inputs(FID.extractors))
    return inputs


def qc_check_inputs(wildcards):
    """A QC shard checks its generation shard and may generate cases again (same models and masks)."""
    table = GENERATION_SHARDS.format(request=wildcards.request, shard=wildcards.shard)
    return {"table": table, "reference": QC_REFERENCE, **generate_inputs(wildcards)}


# --- what no MAISI tool measures: memorisation, label fidelity, downstream utility ---
HELD_OUT_ON = config["dataset"]["held_out"] > 0
MASKED_REQUESTS = sorted(name for name, r in REQUESTS.items() if r.masks and r.n_cases)
PRIVACY = PrivacySettings.from_config(config)
PRIVACY_ON = config["privacy"]["enabled"] and HELD_OUT_ON and bool(REQUESTS)
PRIVACY_ROOT = "results/privacy"
PRIVACY_AUDIT = f"{PRIVACY_ROOT}/audit.tsv"
UTILITY = UtilitySettings.from_config(config)
UTILITY_ON = config["utility"]["enabled"] and HELD_OUT_ON and bool(MASKED_REQUESTS)
UTILITY_ROOT = "results/utility"
#: Arm wildcards (file names) and the arms they train: (a) real, (b) real+synthetic, (c) synthetic.
UTILITY_ARMS = {"real": "real", "real_synthetic": "real+synthetic", "synthetic": "synthetic"}
UTILITY_MODEL = f"{UTILITY_ROOT}/{{arm}}.pt"
UTILITY_DIFFERENCES = f"{UTILITY_ROOT}/differences.tsv"
FIDELITY_ON = config["label_fidelity"]["enabled"] and bool(MASKED_REQUESTS)
FIDELITY_SEGMENTER = config["label_fidelity"]["segmenter"]
FIDELITY_ROOT = "results/label_fidelity"
if FIDELITY_ON and FIDELITY_SEGMENTER == "totalsegmentator":
    check_weights(config["totalsegmentator"]["weights"], "fast")


def extractor_inputs(names):
    """The networks the named FID extractors read."""
    inputs = {}
    if "autoencoder" in names:
        inputs["autoencoder"] = AUTOENCODER
    if "segmenter" in names:
        inputs["segmenter"] = FID_SEGMENTER
    return inputs


def dropped_copies():
    """The audit, where the release drops the cases it flags (so the evaluations see what the release holds)."""
    return {"audit": PRIVACY_AUDIT} if PRIVACY_ON and PRIVACY.on_copy == "drop" else {}


def utility_arm_inputs(wildcards):
    """The real cases, and the released cases for the arms that learn from synthetic ones."""
    inputs = {"real": PREPARED_CASES}
    if wildcards.arm != "real":
        inputs.update(qc=QC_CASES, **dropped_copies())
    return inputs


def label_fidelity_inputs(wildcards):
    """The released cases, and the real-only segmenter with its held-out Dice (segmenter 'utility')."""
    inputs = {"qc": QC_CASES, **dropped_copies()}
    if FIDELITY_SEGMENTER == "utility":
        inputs["model"] = UTILITY_MODEL.format(arm="real")
        if UTILITY_ON:
            inputs["utility"] = UTILITY_DIFFERENCES
    return inputs


def evaluation_targets():
    """The privacy, label-fidelity and utility reports that are on (each needs what its comment in the schema says)."""
    out = {}
    if PRIVACY_ON:
        out.update(privacy=PRIVACY_AUDIT, privacy_held_out=f"{PRIVACY_ROOT}/held_out.tsv", privacy_figure=f"{PRIVACY_ROOT}/distances.png")
    if FIDELITY_ON:
        out.update(fidelity=f"{FIDELITY_ROOT}/cases.tsv", fidelity_summary=f"{FIDELITY_ROOT}/summary.tsv")
    if UTILITY_ON:
        out.update(utility=UTILITY_DIFFERENCES, utility_dice=f"{UTILITY_ROOT}/dice.tsv", utility_figure=f"{UTILITY_ROOT}/utility.png")
    return out
