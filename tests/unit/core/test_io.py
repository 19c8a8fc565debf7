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


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """kill -9 mid-write leaves a hidden temporary file; the next write of that output removes it, and only it."""
    import signal
    import subprocess
    import sys
    import time

    dest = tmp_path / "case.nii.gz"
    other = tmp_path / ".other.nii.gz.abcdefgh.nii.gz"  # another output's temporary: not ours to remove
    other.write_bytes(b"x")
    writer = (
        "import sys, time\nfrom maisi.core.io import atomic_path\n"
        f"with atomic_path({str(dest)!r}) as tmp:\n    tmp.write_bytes(b'half'); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, encoding="utf-8")
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".case.nii.gz.")]
    assert len(stale) == 1 and not dest.exists()  # what kill -9 leaves
    time.sleep(0.01)
    write_json(tmp_path / "unrelated.json", {})  # writing another output touches nothing of case's
    assert stale[0].exists()
    with atomic_path(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert not stale[0].exists() and other.exists() and dest.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest.name, other.name, "unrelated.json"])
