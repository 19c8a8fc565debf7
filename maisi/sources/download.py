"""Resumable, checksum-verified downloads and safe archive extraction.

:func:`download` streams a URL into ``<dest>.part`` and renames the part onto ``dest`` only after
its checksum has been verified, so a file at ``dest`` is always complete and verified. The one
thing a failed or interrupted download leaves behind is the ``.part`` file: it is kept on purpose
so that the next call resumes with an HTTP ``Range`` request instead of starting over (it is
deleted when it turns out to be corrupt, i.e. on a checksum mismatch).

:func:`safe_extract` checks every member of a tar or zip archive before extracting anything,
extracts into a temporary folder beside the target and renames that folder into place, so a failed
extraction never leaves a half-filled target folder.
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

import requests
from tqdm.auto import tqdm

__all__ = ["DownloadError", "ChecksumError", "UnsafeArchiveError", "download", "verify_checksum", "safe_extract", "archive_kind", "part_path"]

logger = logging.getLogger(__name__)


#: Sleep used between retries; tests patch it (or pass ``sleep=``) to keep them fast.
_sleep: Callable[[float], None] = time.sleep


#: Status codes that are retried besides 5xx: they signal a transient condition (request timeout,
#: rate limiting), not a wrong request. Every other 4xx fails at once.
RETRYABLE_4XX: frozenset[int] = frozenset({408, 429})


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
    part is deleted and :class:`ChecksumError` raised. A ``dest`` that already exists and matches
    is returned without network access; one that does not match is deleted and fetched again.
    Without any checksum an existing ``dest`` is trusted as is.

    Nothing half-written survives a failure except ``<dest>.part``, which is kept so that the
    next call can resume. Two processes must not download to the same ``dest`` at once.

    Args:
        url: http(s) URL to fetch.
        dest: final file path; its folder is created when missing.
        md5: expected md5 hex digest, or ``None``.
        sha256: expected sha256 hex digest, or ``None``.
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
        ChecksumError: the downloaded file does not match the expected digest.
        ValueError: a malformed digest (checked before any network access).
    """
    dest = Path(dest)
    expected = _normalise_digests(md5, sha256)
    if retries < 0:
        raise ValueError("retries must be >= 0")
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

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
        _fetch_part(url, part, session, retries, backoff, timeout, chunk_size, progress, sleep)
    finally:
        if own_session:
            session.close()

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
) -> None:
    """Bring ``part`` to the full content of ``url`` (retrying as documented in :func:`download`)."""
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(url, part, session, timeout, chunk_size, progress)
            return
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
    url: str, part: Path, session: requests.Session, timeout: float, chunk_size: int, progress: bool
) -> None:
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
            logger.info("%s: server reports range past the end; treating %s as complete", url, part)
            return
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


def _check_tar(archive: Path, tf: tarfile.TarFile, root: Path) -> None:
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


def _check_zip(archive: Path, zf: zipfile.ZipFile, root: Path) -> None:
    for info in zf.infolist():
        _check_name(archive, info.filename)
        fmt = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix mode
        if fmt == stat.S_IFLNK:
            raise UnsafeArchiveError(archive, info.filename, "symbolic link")
        if fmt and fmt not in (stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(archive, info.filename, "device, fifo or socket")
        _check_inside(archive, info.filename, root)


def safe_extract(
    archive: str | os.PathLike,
    target_dir: str | os.PathLike,
    archive_type: str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Extract a tar (plain, gz, bz2, xz) or zip archive into ``target_dir`` safely and atomically.

    Every member is checked before anything is extracted: absolute paths, ``..`` components,
    symbolic and hard links, devices and fifos, and any member whose resolved path leaves the
    target are refused with :class:`UnsafeArchiveError`. Tar members are then extracted with
    ``filter="data"`` as a second line of defence. Extraction goes to a hidden temporary folder
    beside ``target_dir`` that is renamed onto ``target_dir`` on success and deleted on failure,
    so a failed extraction leaves no ``target_dir``.

    Args:
        archive: the archive file.
        target_dir: folder to create with the archive's content.
        archive_type: "tar", "tar.gz", "tgz", "tar.bz2", "tar.xz", "zip"...; from the name if ``None``.
        overwrite: replace an existing ``target_dir`` (only after a successful extraction).

    Raises:
        UnsafeArchiveError: a member is unsafe (names the archive and the member).
        FileExistsError: ``target_dir`` exists and ``overwrite`` is false.
    """
    archive = Path(archive)
    target = Path(target_dir)
    kind = archive_kind(archive, archive_type)
    if target.exists() and not overwrite:
        raise FileExistsError(f"extraction target {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent))
    root = tmp.resolve()
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                _check_zip(archive, zf, root)
                zf.extractall(tmp)
        else:
            with tarfile.open(archive, "r:*") as tf:
                _check_tar(archive, tf, root)
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tf.extractall(tmp)  # noqa: S202 - every member was checked above
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
