"""Snakemake script: the memorisation audit of the released cases against the training split, judged by the
held-out split (see maisi.evaluate.privacy)."""

import torch

from maisi.core.holdout import case_files, require_held_out, training_rows
from maisi.core.io import read_json, sidecar_path
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table, write_table
from maisi.evaluate.fid import build_extractor
from maisi.evaluate.privacy import AUDIT_COLUMNS, audit_files, plot_audit
from maisi.evaluate.qc_report import released_cases
from maisi.evaluate.settings import FIDSettings, PrivacySettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    settings, fid = PrivacySettings.from_json(smk.params.settings), FIDSettings.from_json(smk.params.fid)
    real = read_table(smk.input.real)
    released = released_cases(smk.input.qc)
    generated = {f"generated/{r.case_id}": r.image for r in released.itertuples()}
    extractor = build_extractor(settings.extractor, fid, smk.input.get("autoencoder"), smk.params.variant, smk.input.get("segmenter"))
    training, held_out = case_files(training_rows(real)), case_files(require_held_out(real, "privacy"))
    audit, held = audit_files(generated, training, held_out, extractor, fid, settings.percentile, min_similarity=settings.min_similarity)
    audit["case_id"] = audit["case_id"].str.removeprefix("generated/")
    audit["extractor"] = extractor.name
    # the training case a mask-conditioned case's label map came from: its anatomy, by design
    sources = {r.case_id: (read_json(sidecar_path(r.image)).get("mask") or {}).get("case_id") or "" for r in released.itertuples()}
    audit["mask_source"] = audit["case_id"].map(sources)
    write_table(audit.to_dict("records"), smk.output.audit, "privacy", [*AUDIT_COLUMNS, "extractor", "mask_source"])
    write_table(held.to_dict("records"), smk.output.held_out, "privacy", ["case_id", "nearest_training", "distance", "image_similarity"])
    plot_audit(audit, held, smk.output.figure)
