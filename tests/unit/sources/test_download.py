"""Tests of maisi.sources.download against a local HTTP server, and of safe archive extraction."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.http_server import make_tar, serve, write_msd_task

import maisi.sources.download as dl
from maisi.sources.catalog import DatasetEntry
from maisi.sources.converters import convert_dataset
from maisi.sources.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download,
    part_path,
    safe_extract,
    verify_checksum,
)


@pytest.fixture
def server():
    with serve() as srv:
        yield srv


@pytest.fixture
def sleeps(monkeypatch):
    """Record back-off sleeps instead of sleeping."""
    calls: list[float] = []
    monkeypatch.setattr(dl, "_sleep", calls.append)
    return calls


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(n: int = 200_000, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def spleen_entry(url: str, digest: str | None) -> DatasetEntry:
    return DatasetEntry(
        name="msd_task09_spleen", url=url, md5=digest, sha256=None, licence="CC-BY-SA 4.0",
        archive_type="tar", converter="msd", label_map={1: 3}, subdir="Task09_Spleen",
    )


# --------------------------------------------------------------------------------------------
# download


def test_download_verify_extract_convert(server, sleeps, tmp_path):
    src = tmp_path / "src"
    write_msd_task(src)
    archive = make_tar(src, tmp_path / "Task09_Spleen.tar")
    data = archive.read_bytes()
    url = server.add("Task09_Spleen.tar", data)

    dest = download(url, tmp_path / "dl" / "Task09_Spleen.tar", md5=md5(data), sha256=sha256(data), progress=False)
    assert dest.read_bytes() == data
    assert not part_path(dest).exists()
    assert sleeps == []

    extracted = safe_extract(dest, tmp_path / "extracted")
    assert (extracted / "Task09_Spleen" / "dataset.json").is_file()

    out = tmp_path / "converted"
    df = convert_dataset(spleen_entry(url, md5(data)), extracted, out)
    assert list(df.columns) == ["case_id", "image", "label", "source_image"]
    assert set(df["case_id"]) == {"spleen_1", "spleen_2", "spleen_3"}
    label = nib.load(out / "labels" / "spleen_1.nii.gz")
    assert label.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) == {0, 3}  # MSD spleen 1 -> MAISI 3


def test_existing_dest_with_matching_checksum_needs_no_network(server, tmp_path):
    data = payload()
    url = server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    dest.write_bytes(data)
    assert download(url, dest, md5=md5(data), progress=False) == dest
    assert server.requests_for("f.bin") == []


def test_existing_dest_with_wrong_content_is_fetched_again(server, tmp_path):
    data = payload()
    url = server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"stale")
    download(url, dest, sha256=sha256(data), progress=False)
    assert dest.read_bytes() == data


def test_wrong_checksum_raises_and_leaves_nothing(server, sleeps, tmp_path):
    data = payload()
    url = server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    with pytest.raises(ChecksumError) as info:
        download(url, dest, md5="0" * 32, progress=False)
    err = info.value
    assert err.algorithm == "md5" and err.expected == "0" * 32 and err.actual == md5(data)
    assert "md5" in str(err) and str(dest) in str(err) and md5(data) in str(err)
    assert not dest.exists()
    assert not part_path(dest).exists()
    assert sleeps == []


def test_truncated_transfer_is_resumed_with_range(server, sleeps, tmp_path):
    data = payload(300_000)
    url = server.add("big.bin", data, truncate_after=70_000, truncate_times=2)
    dest = tmp_path / "big.bin"
    download(url, dest, md5=md5(data), progress=False, chunk_size=8192)
    assert dest.read_bytes() == data
    reqs = server.requests_for("big.bin")
    assert len(reqs) == 3
    assert reqs[0].range is None
    # bytes of a chunk cut short may be dropped, so the resume offset is at most what was sent
    offsets = [int(r.range.removeprefix("bytes=").rstrip("-")) for r in reqs[1:]]
    assert 0 < offsets[0] <= 70_000 and offsets[0] < offsets[1] <= offsets[0] + 70_000
    assert [r.status for r in reqs] == [200, 206, 206]
    assert sleeps == [1.0, 1.0]  # each attempt made progress, so the back-off does not grow


def test_existing_part_is_resumed(server, tmp_path):
    data = payload()
    url = server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(data[:12345])
    download(url, dest, md5=md5(data), progress=False)
    assert dest.read_bytes() == data
    assert [r.range for r in server.requests_for("f.bin")] == ["bytes=12345-"]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = payload()
    url = server.add("f.bin", data, ignore_range=True)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"x" * 5000)  # not even a prefix of the data
    download(url, dest, md5=md5(data), progress=False)
    assert dest.read_bytes() == data
    reqs = server.requests_for("f.bin")
    assert reqs[0].range == "bytes=5000-" and reqs[0].status == 200


def test_complete_part_and_416_goes_to_verification(server, tmp_path):
    data = payload()
    url = server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(data)
    download(url, dest, md5=md5(data), progress=False)
    assert dest.read_bytes() == data
    assert [r.status for r in server.requests_for("f.bin")] == [416]


def test_404_fails_at_once(server, sleeps, tmp_path):
    url = f"{server.base_url}/missing.tar"
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path / "missing.tar", md5="0" * 32, progress=False)
    assert info.value.status == 404
    assert url in str(info.value) and "404" in str(info.value)
    assert len(server.requests_for("missing.tar")) == 1
    assert sleeps == []
    assert not (tmp_path / "missing.tar").exists()


def test_5xx_is_retried_with_exponential_backoff(server, sleeps, tmp_path):
    data = payload(1000)
    url = server.add("f.bin", data, status=503, status_times=3)
    download(url, tmp_path / "f.bin", md5=md5(data), progress=False, backoff=0.5)
    assert sleeps == [0.5, 1.0, 2.0]
    assert len(server.requests_for("f.bin")) == 4


def test_persistent_5xx_gives_up_after_retries(server, sleeps, tmp_path):
    url = server.add("f.bin", b"abc", status=500)
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path / "f.bin", retries=2, progress=False)
    assert info.value.status == 500 and url in str(info.value)
    assert len(server.requests_for("f.bin")) == 3
    assert sleeps == [1.0, 2.0]


def test_connection_refused_is_retried_then_fails(sleeps, tmp_path):
    with serve() as srv:
        url = f"{srv.base_url}/gone"
    with pytest.raises(DownloadError, match="gone"):
        download(url, tmp_path / "gone", retries=1, timeout=2, progress=False)
    assert sleeps == [1.0]


def test_malformed_digest_is_rejected_before_network(server, tmp_path):
    url = server.add("f.bin", b"abc")
    with pytest.raises(ValueError, match="md5"):
        download(url, tmp_path / "f.bin", md5="xyz", progress=False)
    assert server.requests_for("f.bin") == []


def test_verify_checksum(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    verify_checksum(f, md5=md5(b"hello"), sha256=sha256(b"hello"))
    with pytest.raises(ChecksumError, match="sha256"):
        verify_checksum(f, sha256="f" * 64)
    with pytest.raises(ValueError):
        verify_checksum(f)


# --------------------------------------------------------------------------------------------
# safe extraction


def _tar_with(members: list[tarfile.TarInfo], dest: Path, mode: str = "w") -> Path:
    with tarfile.open(dest, mode) as tf:
        good = tarfile.TarInfo("ok/fine.txt")
        good.size = 4
        tf.addfile(good, io.BytesIO(b"fine"))
        for m in members:
            tf.addfile(m, io.BytesIO(b"evil") if m.isfile() else None)
    return dest


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


def _nothing_extracted(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    assert [p for p in tmp_path.rglob("*") if "evil" in p.name and p.suffix != ".tar" and p.suffix != ".zip"] == []
    assert not any(p.name.endswith(".extracting") for p in tmp_path.iterdir())
    assert not any(p.name == "fine.txt" for p in tmp_path.rglob("*"))
    assert not Path("/abs/evil").exists()


@pytest.mark.parametrize(
    "member, reason",
    [
        (_file("../evil"), "'..'"),
        (_file("ok/../../evil"), "'..'"),
        (_file("/abs/evil"), "absolute"),
        (_link("evil_link", "/etc/passwd", tarfile.SYMTYPE), "symbolic link"),
        (_link("evil_rel", "../../outside", tarfile.SYMTYPE), "symbolic link"),
        (_link("evil_hard", "ok/fine.txt", tarfile.LNKTYPE), "hard link"),
        (_special("evil_fifo", tarfile.FIFOTYPE), "device or fifo"),
        (_special("evil_dev", tarfile.CHRTYPE), "device or fifo"),
    ],
)
def test_malicious_tar_is_refused(tmp_path, member, reason):
    archive = _tar_with([member], tmp_path / "bad.tar.gz", "w:gz")
    target = tmp_path / "out" / "target"
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract(archive, target)
    assert member.name in str(info.value) and str(archive) in str(info.value)
    assert reason in str(info.value)
    _nothing_extracted(tmp_path, target)
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", ["../evil", "/abs/evil", "a\\..\\..\\evil"])
def test_malicious_zip_is_refused(tmp_path, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/fine.txt", "fine")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    target = tmp_path / "target"
    with pytest.raises(UnsafeArchiveError, match="evil"):
        safe_extract(archive, target)
    _nothing_extracted(tmp_path, target)


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("evil_link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(archive, tmp_path / "target")
    _nothing_extracted(tmp_path, tmp_path / "target")


@pytest.mark.parametrize("suffix, mode", [("tar", "w"), ("tar.gz", "w:gz"), ("tar.bz2", "w:bz2"), ("tar.xz", "w:xz")])
def test_tar_variants_extract(tmp_path, suffix, mode):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a.txt").write_text("A", encoding="utf-8")
    archive = make_tar(src, tmp_path / f"x.{suffix}", mode)
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "d" / "a.txt").read_text(encoding="utf-8") == "A"


def test_zip_extracts_and_type_can_be_forced(tmp_path):
    archive = tmp_path / "download.bin"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("s0000/ct.nii.gz", b"data")
    with pytest.raises(ValueError, match="archive type"):
        safe_extract(archive, tmp_path / "out")
    out = safe_extract(archive, tmp_path / "out", "zip")
    assert (out / "s0000" / "ct.nii.gz").read_bytes() == b"data"


def test_existing_target_needs_overwrite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "new.txt").write_text("new", encoding="utf-8")
    archive = make_tar(src, tmp_path / "x.tar")
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(FileExistsError):
        safe_extract(archive, target)
    safe_extract(archive, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "x.tar"]


def test_corrupt_archive_leaves_no_target(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(payload(50_000))
    archive = make_tar(src, tmp_path / "x.tar.gz", "w:gz")
    archive.write_bytes(archive.read_bytes()[:-2000])
    with pytest.raises((tarfile.TarError, EOFError, OSError)):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "x.tar.gz"]


def test_cases_table_is_written(server, tmp_path):
    src = tmp_path / "src"
    write_msd_task(src, n_test=0)
    out = tmp_path / "converted"
    convert_dataset(spleen_entry("http://example.invalid/x.tar", None), src, out)
    df = pd.read_csv(out / "cases.tsv", sep="\t", keep_default_na=False)
    assert df["label"].tolist() == ["labels/spleen_1.nii.gz", "labels/spleen_2.nii.gz"]


# --------------------------------------------------------------------------------------------
# sizes: a truncated or padded transfer, and archives that expand beyond a limit


def test_part_longer_than_the_file_is_not_taken_as_complete(server, sleeps, tmp_path):
    """A leftover part longer than the file (an older, longer version) gets a 416: it is not the file, so it is
    dropped and the download starts over instead of renaming the padded part into place."""
    data = payload()
    url = server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(data + b"tail of an older, longer version")
    download(url, dest, progress=False)
    assert dest.read_bytes() == data
    assert [r.status for r in server.requests_for("f.bin")] == [416, 200]


def test_expected_size_is_checked_against_the_server_and_the_file(server, sleeps, tmp_path):
    data = payload()
    url = server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    with pytest.raises(ChecksumError, match=r"size in bytes.*f\.bin.*expected 200001"):
        download(url, dest, size=len(data) + 1, progress=False)
    assert not dest.exists() and not part_path(dest).exists()
    assert len(server.requests_for("f.bin")) == 1 and sleeps == []  # refused on the announced size, not retried
    download(url, dest, size=len(data), progress=False)
    assert dest.read_bytes() == data
    dest.write_bytes(data[:-1])  # an existing file of the wrong size is fetched again, even without a digest
    download(url, dest, size=len(data), progress=False)
    assert dest.read_bytes() == data
    with pytest.raises(ValueError, match="size"):
        download(url, dest, size=-1, progress=False)


def _nothing_written(tmp_path: Path, archive: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]


def test_zip_member_declaring_a_size_over_the_limit_is_refused_before_writing(tmp_path):
    """A zip whose member declares about 4 GiB in a few hundred bytes (a zip-bomb member) is refused by the default
    limit, read from its headers before anything is written."""
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ok/fine.txt", b"fine")
        zf.writestr("big.bin", b"0123456789")
    raw = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):  # central directory, local header
        at = raw.rfind(signature)
        raw[at + offset : at + offset + 4] = (0xFFFFFFF0).to_bytes(4, "little")  # uncompressed size
    archive.write_bytes(bytes(raw))
    with pytest.raises(dl.ArchiveTooLargeError, match=r"bomb\.zip.*big\.bin.*4294967280 bytes") as info:
        safe_extract(archive, tmp_path / "out")
    assert isinstance(info.value, UnsafeArchiveError)
    _nothing_written(tmp_path, archive)


def test_compressible_zip_member_over_a_member_limit_is_refused(tmp_path):
    archive = tmp_path / "zeros.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(4 << 20))
    assert archive.stat().st_size < 64 << 10
    with pytest.raises(dl.ArchiveTooLargeError, match=r"zeros\.bin.*4194304 bytes.*1048576"):
        safe_extract(archive, tmp_path / "out", max_member_bytes=1 << 20)
    _nothing_written(tmp_path, archive)


def test_tar_of_zeros_over_a_tiny_limit_is_refused(tmp_path):
    """A tar.gz of highly compressible zeros: one member over the limit, and members that only together exceed it."""
    archive = tmp_path / "zeros.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, size in (("a/zeros_1.bin", 700_000), ("a/zeros_2.bin", 700_000)):
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BytesIO(bytes(size)))
    assert archive.stat().st_size < 16 << 10
    with pytest.raises(dl.ArchiveTooLargeError, match=r"zeros\.tar\.gz.*1400000 bytes.*1000000"):
        safe_extract(archive, tmp_path / "out", max_total_bytes=1_000_000)
    _nothing_written(tmp_path, archive)
    with pytest.raises(dl.ArchiveTooLargeError, match=r"zeros_1\.bin.*700000 bytes.*500000"):
        safe_extract(archive, tmp_path / "out", max_member_bytes=500_000)
    _nothing_written(tmp_path, archive)
    out = safe_extract(archive, tmp_path / "out", max_total_bytes=1_400_000)
    assert (out / "a" / "zeros_2.bin").stat().st_size == 700_000


def test_member_writing_more_than_it_declared_is_stopped(tmp_path, monkeypatch):
    """The declared sizes are checked first; a member whose stream runs on past its declared size (a lying header,
    a decompressor that does not stop) is cut off while streaming and nothing is left behind."""
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("small.bin", b"x" * 100)

    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            buffer[:] = bytes(len(buffer))
            return len(buffer)

    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: io.BufferedReader(Endless()))
    with pytest.raises(dl.ArchiveTooLargeError, match=r"small\.bin.*more than the 100 bytes it declares"):
        safe_extract(archive, tmp_path / "out")
    _nothing_written(tmp_path, archive)


def test_archive_larger_than_the_free_space_is_refused(tmp_path, monkeypatch):
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.bin", bytes(10_000))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: usage._replace(free=5_000))
    with pytest.raises(dl.ArchiveTooLargeError, match=r"10000 bytes.*5000 bytes free"):
        safe_extract(archive, tmp_path / "out")
    _nothing_written(tmp_path, archive)


def test_extract_entry_limits_the_archive_by_the_catalogs_size(tmp_path):
    """A dataset's archive may unpack to a few times the catalog's size_gb, no more."""
    from maisi.sources.catalog import UNPACKED_FACTOR, extract_entry

    src = tmp_path / "src"
    write_msd_task(src)
    archive = make_tar(src, tmp_path / "Task09_Spleen.tar")
    unpacked = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    entry = spleen_entry("http://example.invalid/Task09_Spleen.tar", None)
    small = dataclasses.replace(entry, size_gb=unpacked / 2 / UNPACKED_FACTOR / 1e9)
    with pytest.raises(dl.ArchiveTooLargeError, match=r"Task09_Spleen\.tar.*size_gb.*msd_task09_spleen"):
        extract_entry(small, archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    fits = dataclasses.replace(entry, size_gb=unpacked / UNPACKED_FACTOR / 1e9 * 1.01)
    assert (extract_entry(fits, archive, tmp_path / "out") / "Task09_Spleen" / "dataset.json").is_file()
