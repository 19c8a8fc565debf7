# Paths, settings and input functions of the release rules (release.smk); what every stage needs is in common.smk.
from maisi.release.inputs import source_records

RELEASES = "results/releases"
RELEASE_NAME = config["release"]["name"] or config["run_name"]
RELEASE_VERSION = config["release"]["version"]
#: The record of a built release (its folder is <RELEASES>/<name>/<version>/).
RELEASE_RECORD = f"{RELEASES}/{RELEASE_NAME}/{RELEASE_VERSION}.json"


def release_checkpoints():
    """The checkpoints the released cases were generated with (the ControlNet only when a request uses masks)."""
    used = {"autoencoder": AUTOENCODER, "diffusion": DIFFUSION}
    if any(r.masks for r in REQUESTS.values()):
        used["controlnet"] = CONTROLNET
    return used


def release_targets():
    """QC and the release, when there is anything to generate (a run without requests ends at training)."""
    if not any(r.n_cases for r in REQUESTS.values()):
        return []
    return [*rules.qc.output, *rules.release.output]
