import json

import pytest

from maisi.core.io import atomic_path, sidecar_path, write_json, write_with_sidecar


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    dest = tmp_path / "a.json"
    write_json(dest, {"v": 1})
    with pytest.raises(ValueError):
        with atomic_path(dest) as tmp:
            tmp.write_text("partial", encoding="utf-8")
            raise ValueError
    assert json.loads(dest.read_text(encoding="utf-8")) == {"v": 1}


def test_sidecar(tmp_path):
    dest = write_with_sidecar(tmp_path / "x.bin", lambda p: p.write_bytes(b"abc"), {"k": 1}, step="unit")
    side = json.loads(sidecar_path(dest).read_text(encoding="utf-8"))
    assert side["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert side["k"] == 1 and side["provenance"]["step"] == "unit"
