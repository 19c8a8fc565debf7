"""Snakemake script: TotalSegmentator masks of one shard's prepared cases (see maisi.prepare.totalsegmentator)."""


from maisi.core.logs import from_snakemake
from maisi.core.shards import run_cases
from maisi.core.tables import read_table, write_table
from maisi.prepare.totalsegmentator import SEGMENTED_COLUMNS, TotalSegSettings, mask_path, segment_case

# nnU-Net starts its worker processes with 'spawn', which imports this script again: guard it.
if __name__ == "__main__":
    smk = snakemake  # noqa: F821 (injected by Snakemake)
    with from_snakemake(smk):
        settings = TotalSegSettings.from_json(smk.params.settings)
        prepared = read_table(smk.input.table)
        ok = list(prepared[prepared.status == "ok"].itertuples())
        out_root = smk.params.out_root
        rows = run_cases(
            lambda r: segment_case(r.case_id, r.image_hu, mask_path(out_root, r.source, r.case_id), settings, r.label or None),
            ok,
            case_id=lambda r: r.case_id,
            threads=1,  # TotalSegmentator uses every core (or the GPU) for one case, and sets process-wide state
            on_error=smk.params.on_error,
            desc=f"totalsegmentator {smk.wildcards.source}/{smk.wildcards.shard}",
        )
        for row, case in zip(rows, ok, strict=True):
            row.setdefault("source", case.source)
        write_table(rows, smk.output.table, "totalsegmentator", SEGMENTED_COLUMNS)
