"""The prepared dataset's assembly (maisi.prepare.dataset): every case rejected stops here, with the reasons."""

from __future__ import annotations

import pandas as pd
import pytest

from maisi.core.checks import InputError
from maisi.prepare.dataset import CASE_COLUMNS, REJECTED_COLUMNS, check_not_all_rejected, write_dataset


def _rejected(*reasons):
    rows = [{"source": "s", "case_id": f"c{i}", "stage": "preprocess", "reason": r} for i, r in enumerate(reasons)]
    return pd.DataFrame(rows, columns=list(REJECTED_COLUMNS))


def test_every_case_rejected_stops_with_the_commonest_reasons(caplog):
    rejected = _rejected(
        "/d/a.nii.gz: minimum intensity 300 is not below -500 HU: no air",
        "/d/b.nii.gz: minimum intensity 300 is not below -500 HU: no air",
        "/d/c.nii.gz: cannot be read (EOFError)",
    )
    with caplog.at_level("ERROR", logger="maisi.prepare.dataset"), pytest.raises(InputError) as err:
        check_not_all_rejected(pd.DataFrame(columns=list(CASE_COLUMNS)), rejected)
    msg = str(err.value)
    assert "every case was rejected (3 of 3)" in msg
    assert "2 x minimum intensity 300 is not below -500 HU: no air; 1 x cannot be read (EOFError)" in msg
    assert "rejected s/c2 at preprocess: /d/c.nii.gz: cannot be read" in caplog.text  # every case, with its file


def test_some_cases_left_or_nothing_rejected_pass():
    check_not_all_rejected(pd.DataFrame([{"case_id": "ok"}]), _rejected("x: bad"))
    check_not_all_rejected(pd.DataFrame(columns=list(CASE_COLUMNS)), _rejected())


def test_write_dataset_writes_nothing_when_every_case_is_rejected(tmp_path):
    table = tmp_path / "prep.tsv"
    pd.DataFrame([{"source": "s", "case_id": "a", "status": "rejected", "reason": "a.nii: no air"}]).to_csv(table, sep="\t", index=False)
    out = {k: tmp_path / f"{k}.out" for k in ("datalist", "cases", "rejected")}
    with pytest.raises(InputError, match="every case was rejected"):
        write_dataset([table], [], 5, out["datalist"], out["cases"], out["rejected"], run_name="r")
    assert not any(p.exists() for p in out.values())
