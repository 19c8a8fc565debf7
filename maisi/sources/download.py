"""Resumable, checksum-verified downloads and safe archive extraction.

:func:`download` streams a URL into ``<dest>.part`` and renames the part onto ``dest`` only after
its checksum has been verified, so a file at ``dest`` is always complete and verified. The one
thing a failed or interrupted download leaves behind is the ``.part`` file: it is kept on purpose
so that the next call resumes with an HTTP ``Range`` request instead of starting over (it is
deleted when it turns out to be corrupt, i.e. on a checksum or size mismatch). The part's size is
checked against the size the server announces (``Content-Length``, ``Content-Range``) and, where the
caller knows it, the expected size, so a truncated or padded transfer is never renamed into place.

:func:`safe_extract` checks every member of a tar or zip archive before extracting anything,
extracts into a temporary folder beside the target and renames that folder into place, so a failed
extraction never leaves a half-filled target folder. It also bounds what an archive may unpack to:
each member's and the members' total declared size (read from the tar or zip headers) against a limit
(by default :data:`MAX_EXPANSION` times the archive's own size, at least :data:`MIN_UNPACKED_LIMIT`) and
the free space of the target's file system, before anything is written; and while streaming, a member
that writes more than it declared is stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import requests
from tqdm.auto import tqdm

__all__ = ["DownloadError", "ChecksumError", "UnsafeArchiveError", "ArchiveTooLargeError", "download", "verify_checksum", "safe_extract",
           "archive_kind", "part_path", "MAX_EXPANSION", "MIN_UNPACKED_LIMIT"]  # fmt: skip

logger = logging.getLogger(__name__)


#: Sleep used between retries; tests patch it (or pass ``sleep=``) to keep them fast.
_sleep: Callable[[float], None] = time.sleep


#: Status codes that are retried besides 5xx: they signal a transient condition (request timeout,
#: rate limiting), not a wrong request. Every other 4xx fails at once.
RETRYABLE_4XX: frozenset[int] = frozenset({408, 429})


#: Default bound of what an archive may unpack to, as a multiple of the archive file's own size (dataset archives
#: hold compressed NIfTI or DICOM, a few times their size at most; a zip bomb reaches a thousand times and more).
MAX_EXPANSION: int = 20


#: The default bound is never below this, so that a small archive of uncompressed files still extracts.
MIN_UNPACKED_LIMIT: int = 1 << 30


_HEX = {"md5": re.compile(r"^[0-9a-f]{32}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}


class DownloadError(RuntimeError):
    """A download failed; the message names the URL and the reason (HTTP status, network error)."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class ChecksumError(DownloadError):
    """A file's digest differs from the expected one."""

    def __init__(self, path: str | os.PathLike, algorithm: str, expected: str, actual: str, *, url: str | None = None):
        self.path = Path(path)
        self.algorithm = algorithm
        self.expected = expected
        self.actual = actual
        source = f" (from {url})" if url else ""
        super().__init__(
            f"{algorithm} mismatch for {self.path}{source}: expected {expected}, got {actual}", url=url
        )


class UnsafeArchiveError(ValueError):
    """An archive member would escape the target folder or is not a plain file or folder."""

    def __init__(self, archive: str | os.PathLike, member: str, reason: str) -> None:
        self.archive = Path(archive)
        self.member = member
        self.reason = reason
        super().__init__(f"unsafe member {member!r} in archive {self.archive}: {reason}")


class ArchiveTooLargeError(UnsafeArchiveError):
    """An archive member (``member``), or all of them together (``member`` empty), would unpack to more than the
    limit or the free disk space."""

    def __init__(self, archive: str | os.PathLike, member: str, reason: str) -> None:
        super().__init__(archive, member, reason)
        what = f"member {member!r} " if member else ""
        self.args = (f"archive {self.archive} not extracted: {what}{reason}",)


class _Retryable(Exception):
    """Internal: an attempt failed in a way worth retrying."""

    def __init__(self, reason: str, status: int | None = None, wait: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.wait = wait


def _normalise_digests(md5: str | None, sha256: str | None) -> dict[str, str]:
    expected: dict[str, str] = {}
    for algo, value in (("md5", md5), ("sha256", sha256)):
        if value is None:
            continue
        value = str(value).strip().lower()
        if not _HEX[algo].match(value):
            raise ValueError(f"malformed {algo} digest {value!r}")
        expected[algo] = value
    return expected


def _file_digests(path: Path, algorithms: Iterable[str], chunk: int = 1 << 20) -> dict[str, str]:
    """All requested digests of ``path`` in one pass over the file."""
    hashers = {a: hashlib.new(a, usedforsecurity=False) if a == "md5" else hashlib.new(a) for a in algorithms}
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            for h in hashers.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashers.items()}


def verify_checksum(path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None) -> None:
    """Check ``path`` against the given digest(s).

    Raises:
        ValueError: neither digest is given, or one is not a well-formed hex digest.
        ChecksumError: a digest differs (names the file, algorithm, expected and actual value).
    """
    expected = _normalise_digests(md5, sha256)
    if not expected:
        raise ValueError("verify_checksum needs md5 and/or sha256")
    _verify(Path(path), expected)


def _verify(path: Path, expected: dict[str, str], url: str | None = None) -> None:
    actual = _file_digests(path, expected)
    for algo, want in expected.items():
        if actual[algo] != want:
            raise ChecksumError(path, algo, want, actual[algo], url=url)


def part_path(dest: str | os.PathLike) -> Path:
    """``data/x.tar`` -> ``data/x.tar.part``, where :func:`download` keeps an unfinished transfer."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    progress: bool = True,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming an earlier partial transfer and verifying checksums.

    Data is streamed into ``<dest>.part``. When that file already exists the transfer resumes
    with ``Range: bytes=N-``: a ``206`` reply is appended, a ``200`` (server ignored the range)
    restarts from zero and a ``416`` means the part is already complete and goes to verification.
    Connection errors, timeouts, truncated bodies (fewer bytes than ``Content-Length``), 5xx and
    408/429 replies are retried with exponential back-off (``backoff * 2**k`` seconds after the
    ``k``-th consecutive failure); ``retries`` bounds the number of consecutive failed attempts
    that make no progress, so a long transfer over a connection that drops now and then still
    completes. Other 4xx replies fail at once.

    The checksum(s) are verified *before* the part is renamed onto ``dest``; on a mismatch the
    part is deleted and :class:`ChecksumError` raised. So is its size: it must equal the size the
    server announced (``Content-Length`` of a full reply, the total of ``Content-Range``) and
    ``size`` where given; a server that announces another total than ``size`` is refused before
    the body is read, and a leftover part longer than the file (a ``416`` whose total is smaller)
    is dropped and fetched again. A ``dest`` that already exists and matches is returned without
    network access; one that does not match is deleted and fetched again. Without any checksum an
    existing ``dest`` of the right ``size`` (any size where ``size`` is ``None``) is trusted as is.

    Nothing half-written survives a failure except ``<dest>.part``, which is kept so that the
    next call can resume. Two processes must not download to the same ``dest`` at once.

    Args:
        url: http(s) URL to fetch.
        dest: final file path; its folder is created when missing.
        md5: expected md5 hex digest, or ``None``.
        sha256: expected sha256 hex digest, or ``None``.
        size: expected size in bytes, or ``None``.
        retries: consecutive failed attempts (without progress) allowed after the first one.
        backoff: base of the exponential back-off, in seconds.
        timeout: connect/read timeout of each request, in seconds.
        chunk_size: bytes read per iteration of the stream.
        progress: show a tqdm progress bar.
        session: ``requests.Session`` to use (a new one by default).
        sleep: replaces ``time.sleep`` between retries.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: the server answered with a non-retryable status, or all retries failed.
        ChecksumError: the downloaded file does not match the expected digest or size (``algorithm``
            ``"size in bytes"``).
        ValueError: a malformed digest or size (checked before any network access).
    """
    dest = Path(dest)
    expected = _normalise_digests(md5, sha256)
    if retries < 0:
        raise ValueError("retries must be >= 0")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"size must be a number of bytes >= 0, got {size!r}")
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    if dest.exists():
        if size is not None and (have := dest.stat().st_size) != size:
            logger.warning("%s has %d bytes instead of %d; deleting it and downloading again", dest, have, size)
            dest.unlink()
    if dest.exists():
        if not expected:
            logger.info("%s exists and no checksum is given; using it as is", dest)
            return dest
        try:
            _verify(dest, expected, url)
            logger.info("%s exists and matches its checksum", dest)
            return dest
        except ChecksumError as err:
            logger.warning("%s; deleting it and downloading again", err)
            dest.unlink()

    own_session = session is None
    session = session or requests.Session()
    try:
        announced = _fetch_part(url, part, session, retries, backoff, timeout, chunk_size, progress, sleep, size)
    finally:
        if own_session:
            session.close()

    have = part.stat().st_size
    for want, what in ((announced, " (the size the server announced)"), (size, "")):
        if want is not None and have != want:
            part.unlink(missing_ok=True)
            raise ChecksumError(dest, "size in bytes", f"{want}{what}", str(have), url=url)
    if expected:
        try:
            _verify(part, expected, url)
        except ChecksumError:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)
    return dest


def _fetch_part(
    url: str,
    part: Path,
    session: requests.Session,
    retries: int,
    backoff: float,
    timeout: float,
    chunk_size: int,
    progress: bool,
    sleep: Callable[[float], None] | None,
    size: int | None = None,
) -> int | None:
    """Bring ``part`` to the full content of ``url`` (retrying as documented in :func:`download`); returns the
    file's size as the server announced it (``None`` where it did not)."""
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            return _attempt(url, part, session, timeout, chunk_size, progress, size)
        except _Retryable as err:
            after = part.stat().st_size if part.exists() else 0
            failures = 0 if after > before else failures
            if failures >= retries:
                status = f" (HTTP {err.status})" if err.status else ""
                raise DownloadError(
                    f"download of {url} failed after {failures + 1} consecutive attempts{status}: {err}",
                    url=url,
                    status=err.status,
                ) from err
            wait = backoff * 2**failures
            if err.wait is not None:
                wait = max(wait, err.wait)
            failures += 1
            logger.warning("download of %s: %s; retrying in %.1f s (%d/%d)", url, err, wait, failures, retries)
            (sleep or _sleep)(wait)


def _attempt(
    url: str, part: Path, session: requests.Session, timeout: float, chunk_size: int, progress: bool, size: int | None = None
) -> int | None:
    """One request; returns the file's total size as announced by the server, or ``None``."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Retryable(f"{type(err).__name__}: {err}") from err
    except requests.RequestException as err:  # invalid URL, too many redirects...
        raise DownloadError(f"download of {url} failed: {err}", url=url) from err

    with resp:
        status = resp.status_code
        if status == 416 and offset:
            total = _content_range_total(resp)
            if total is not None and total != offset:
                logger.warning("%s: %s has %d bytes but the file has %d; restarting", url, part, offset, total)
                part.unlink()
                raise _Retryable(f"part of {offset} bytes is longer than the file ({total} bytes)")
            _check_announced(url, part, total, size)
            logger.info("%s: server reports range past the end; treating %s as complete", url, part)
            return total
        if status >= 500 or status in RETRYABLE_4XX:
            raise _Retryable(f"HTTP {status} {resp.reason}", status=status, wait=_retry_after(resp))
        if status >= 400:
            raise DownloadError(f"download of {url} failed: HTTP {status} {resp.reason}", url=url, status=status)
        if status == 206 and offset:
            start = _content_range_start(resp)
            if start != offset:
                logger.warning("%s: server resumed at byte %s instead of %d; restarting", url, start, offset)
                part.unlink()
                raise _Retryable(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        elif status in (200, 206):
            if offset:
                logger.info("%s: server ignored the Range request; restarting from zero", url)
            offset, mode = 0, "wb"
        else:
            raise DownloadError(f"download of {url} failed: unexpected HTTP {status} {resp.reason}", url=url, status=status)

        length = _content_length(resp)
        total = offset + length if length is not None else None
        if status == 206 and offset:
            total = _content_range_total(resp) or total
        _check_announced(url, part, total, size)
        received = 0
        bar = tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[: -len(".part")], disable=not progress, leave=False,
        )
        try:
            with open(part, mode) as fh:
                for block in resp.iter_content(chunk_size=chunk_size):
                    fh.write(block)
                    received += len(block)
                    bar.update(len(block))
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            raise _Retryable(f"transfer interrupted after {received} bytes: {type(err).__name__}") from err
        except requests.RequestException as err:
            raise DownloadError(f"download of {url} failed: {err}", url=url, status=status) from err
        finally:
            bar.close()
        if length is not None and received < length:
            raise _Retryable(f"truncated body: {received} of {length} bytes")
        return total


def _check_announced(url: str, part: Path, total: int | None, size: int | None) -> None:
    """Refuse a file whose announced size is not the expected one, before reading its body (the part goes too)."""
    if size is not None and total is not None and total != size:
        part.unlink(missing_ok=True)
        raise ChecksumError(part.with_name(part.name[: -len(".part")]), "size in bytes", str(size),
                            f"{total} (announced by the server)", url=url)  # fmt: skip


def _content_length(resp: requests.Response) -> int | None:
    if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        return None  # the header counts encoded bytes; urllib3 checks those itself
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range_start(resp: requests.Response) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _content_range_total(resp: requests.Response) -> int | None:
    """The complete length in ``Content-Range`` (``bytes 0-9/10`` or ``bytes */10``), or ``None``."""
    match = re.match(r"^\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.strip().isdigit() else None


_TAR_KINDS = {
    "tar": "tar", "tar.gz": "tar", "tgz": "tar", "tar.bz2": "tar", "tbz2": "tar", "tbz": "tar",
    "tar.xz": "tar", "txz": "tar",
}


def archive_kind(archive: str | os.PathLike, archive_type: str | None = None) -> str:
    """``"tar"`` or ``"zip"``, from ``archive_type`` ("tar", "tar.gz", "zip"...) or the file name."""
    if archive_type is not None:
        key = archive_type.lower().lstrip(".")
        if key == "zip":
            return "zip"
        if key in _TAR_KINDS:
            return "tar"
        raise ValueError(f"unknown archive type {archive_type!r}")
    name = Path(archive).name.lower()
    if name.endswith(".zip"):
        return "zip"
    for suffix in sorted(_TAR_KINDS, key=len, reverse=True):
        if name.endswith("." + suffix):
            return "tar"
    raise ValueError(f"cannot tell the archive type of {archive}; pass archive_type")


def _check_name(archive: Path, name: str) -> None:
    """Refuse empty, absolute and ``..`` member names (``/`` and ``\\`` both count as separators)."""
    if not name or "\x00" in name:
        raise UnsafeArchiveError(archive, name, "empty name or NUL byte")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise UnsafeArchiveError(archive, name, "absolute path")
    if ".." in PurePosixPath(unified).parts:
        raise UnsafeArchiveError(archive, name, "'..' path component")


def _check_inside(archive: Path, name: str, root: Path) -> None:
    resolved = (root / name).resolve()
    if resolved != root and root not in resolved.parents:
        raise UnsafeArchiveError(archive, name, "resolves outside the target folder")


def _check_tar(archive: Path, tf: tarfile.TarFile, root: Path) -> list[tuple[tarfile.TarInfo, int]]:
    """Every member checked; returns ``(member, declared size)`` in archive order."""
    members = []
    for m in tf.getmembers():
        _check_name(archive, m.name)
        if m.issym() or m.islnk():
            kind = "symbolic" if m.issym() else "hard"
            raise UnsafeArchiveError(archive, m.name, f"{kind} link to {m.linkname!r}")
        if m.ischr() or m.isblk() or m.isfifo():
            raise UnsafeArchiveError(archive, m.name, "device or fifo")
        if not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(archive, m.name, f"unsupported member type {m.type!r}")
        _check_inside(archive, m.name, root)
        members.append((m, m.size if m.isfile() else 0))
    return members


def _check_zip(archive: Path, zf: zipfile.ZipFile, root: Path) -> list[tuple[zipfile.ZipInfo, int]]:
    """Every member checked; returns ``(member, declared size)`` in archive order."""
    members = []
    for info in zf.infolist():
        _check_name(archive, info.filename)
        fmt = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix mode
        if fmt == stat.S_IFLNK:
            raise UnsafeArchiveError(archive, info.filename, "symbolic link")
        if fmt and fmt not in (stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(archive, info.filename, "device, fifo or socket")
        _check_inside(archive, info.filename, root)
        members.append((info, 0 if info.is_dir() else info.file_size))
    return members


def _check_sizes(archive: Path, sizes: list[tuple[str, int]], member_limit: int, total_limit: int, free: int) -> None:
    """Refuse a member or a total over its limit, and a total over the free space, before anything is written."""
    for name, size in sizes:
        if size > member_limit:
            raise ArchiveTooLargeError(archive, name, f"declares {size} bytes, over the limit of {member_limit} bytes per member")
    total = sum(size for _, size in sizes)
    if total > total_limit:
        raise ArchiveTooLargeError(archive, "", f"its members declare {total} bytes together, over the limit of {total_limit} bytes")
    if total > free:
        raise ArchiveTooLargeError(archive, "", f"its members declare {total} bytes together, but only {free} bytes free are left "
                                                  f"on the target's file system")


def _member_path(root: Path, name: str) -> Path:
    """Where a (checked) member goes under ``root``: its ``/``-separated parts, without ``.`` and empty ones."""
    return root.joinpath(*PurePosixPath(name).parts)


def _stream(archive: Path, name: str, source: BinaryIO, dest: Path, declared: int, chunk: int = 1 << 20) -> None:
    """Copy a member's stream to ``dest``, stopped as soon as it writes more than its ``declared`` size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(dest, "wb") as out:
        while block := source.read(min(chunk, declared - written + 1)):
            written += len(block)
            if written > declared:
                raise ArchiveTooLargeError(archive, name, f"writes more than the {declared} bytes it declares")
            out.write(block)


def _extract_tar(archive: Path, tf: tarfile.TarFile, members: list[tuple[tarfile.TarInfo, int]], root: Path) -> None:
    for m, size in members:
        if hasattr(tarfile, "data_filter"):  # the standard library's checks as a second line of defence
            m = tarfile.data_filter(m, str(root))
        path = _member_path(root, m.name)
        if m.isdir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        source = tf.extractfile(m)
        if source is None:  # pragma: no cover - a regular member always has a stream
            raise UnsafeArchiveError(archive, m.name, "no data")
        with source:
            _stream(archive, m.name, source, path, size)
        if m.mode is not None:
            os.chmod(path, m.mode & 0o777)
        os.utime(path, (m.mtime, m.mtime))


def _extract_zip(archive: Path, zf: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, int]], root: Path) -> None:
    for info, size in members:
        path = _member_path(root, info.filename)
        if info.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        with zf.open(info) as source:
            _stream(archive, info.filename, source, path, size)


def safe_extract(
    archive: str | os.PathLike,
    target_dir: str | os.PathLike,
    archive_type: str | None = None,
    *,
    overwrite: bool = False,
    max_total_bytes: int | None = None,
    max_member_bytes: int | None = None,
) -> Path:
    """Extract a tar (plain, gz, bz2, xz) or zip archive into ``target_dir`` safely and atomically.

    Every member is checked before anything is extracted: absolute paths, ``..`` components,
    symbolic and hard links, devices and fifos, and any member whose resolved path leaves the
    target are refused with :class:`UnsafeArchiveError`. Tar members also pass the standard
    library's ``data`` filter as a second line of defence. So are the sizes the members declare in
    the archive's headers: a member over ``max_member_bytes``, all of them together over
    ``max_total_bytes`` or over the free space of the target's file system are refused with
    :class:`ArchiveTooLargeError` before anything is written, and a member whose stream runs past
    its declared size is stopped while it is written. Extraction goes to a hidden temporary
    folder beside ``target_dir`` that is renamed onto ``target_dir`` on success and deleted on
    failure, so a failed extraction leaves no ``target_dir``.

    Args:
        archive: the archive file.
        target_dir: folder to create with the archive's content.
        archive_type: "tar", "tar.gz", "tgz", "tar.bz2", "tar.xz", "zip"...; from the name if ``None``.
        overwrite: replace an existing ``target_dir`` (only after a successful extraction).
        max_total_bytes: what all members may unpack to together; ``None``: :data:`MAX_EXPANSION` times
            the archive's size, at least :data:`MIN_UNPACKED_LIMIT`.
        max_member_bytes: what one member may unpack to; ``None``: the total's limit.

    Raises:
        UnsafeArchiveError: a member is unsafe (names the archive and the member).
        ArchiveTooLargeError: the archive would unpack to more than a limit or the free space.
        FileExistsError: ``target_dir`` exists and ``overwrite`` is false.
    """
    archive = Path(archive)
    target = Path(target_dir)
    kind = archive_kind(archive, archive_type)
    if target.exists() and not overwrite:
        raise FileExistsError(f"extraction target {target} already exists")
    for name, value in (("max_total_bytes", max_total_bytes), ("max_member_bytes", max_member_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a number of bytes >= 0, got {value!r}")
    if max_total_bytes is None:
        max_total_bytes = max(MAX_EXPANSION * archive.stat().st_size, MIN_UNPACKED_LIMIT)
    member_limit = max_total_bytes if max_member_bytes is None else min(max_member_bytes, max_total_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent))
    root = tmp.resolve()
    try:
        free = shutil.disk_usage(tmp).free
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                members = _check_zip(archive, zf, root)
                _check_sizes(archive, [(i.filename, n) for i, n in members], member_limit, max_total_bytes, free)
                _extract_zip(archive, zf, members, root)
        else:
            with tarfile.open(archive, "r:*") as tf:
                tar_members = _check_tar(archive, tf, root)
                _check_sizes(archive, [(m.name, n) for m, n in tar_members], member_limit, max_total_bytes, free)
                _extract_tar(archive, tf, tar_members, root)
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
