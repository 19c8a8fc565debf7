"""Atomic file output, JSON sidecars and checksums.

Every artefact the factory writes goes through :func:`atomic_path`: the producer writes to a
hidden temporary file in the destination folder and the file is renamed into place only once it
is complete, so a killed run never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from maisi.core.logs import TERMINATED
from maisi.core.provenance import provenance

__all__ = ["atomic_path", "remove_stale_temporaries", "temp_suffix", "current_umask", "json_default", "write_json", "write_text", "write_with_sidecar", "sidecar_path", "current_sidecar", "sha256_file", "read_json", "save_nifti", "world_grid",
           "read_canonical"]

def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Compression suffixes kept together with the format suffix before them (``.nii.gz``).
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def temp_suffix(dest: str | os.PathLike) -> str:
    """The format suffix of ``dest`` for its temporary name: ``.nii.gz``, ``.tsv``, else ``.tmp``.

    Only the last suffix, and the one before a compression suffix, count: the rest of the name (a case
    id such as ``...`` or ``a.b``) never reaches the temporary name's suffix.
    """
    def plain(s: str) -> bool:
        return len(s) > 1 and s[1:].isalnum()

    dest = Path(dest)
    last = dest.suffix
    if not plain(last):
        return ".tmp"
    before = Path(dest.stem).suffix
    return before + last if last in _COMPRESSED and plain(before) else last


def remove_stale_temporaries(dest: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove the temporary files a killed writer of ``dest`` left beside it (``.<name>.<8 random chars><suffix>``).

    A process killed with SIGKILL cannot clean up; the next write of the same output (the job's rerun)
    removes what it left. Each output has one writer at a time, so such a file is never in use.
    """
    dest = Path(dest)
    suffix = temp_suffix(dest) if suffix is None else suffix
    pattern = re.compile(re.escape(f".{dest.name}.") + r"[A-Za-z0-9_]{8}" + re.escape(suffix))
    removed = []
    if dest.parent.is_dir():
        for path in dest.parent.iterdir():
            if pattern.fullmatch(path.name):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds.

    The temporary name keeps the destination's suffixes (``.nii.gz``, ``.tsv``...) so that
    writers which pick a format from the file name still work. On error the temporary file
    is removed and ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = temp_suffix(dest)
    remove_stale_temporaries(dest, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise FileNotFoundError(f"writer produced no file for {dest}")
        if tmp_path.is_file():  # mkstemp creates 0600; give the file the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~current_umask())
        if TERMINATED.is_set():  # the job got SIGTERM: a worker thread abandons its case here
            raise SystemExit(f"{dest}: not written, the job was terminated")
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(dest: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` to ``dest``."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json(dest: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable across runs)."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def sidecar_path(path: str | os.PathLike) -> Path:
    """``images/case.nii.gz`` -> ``images/case.nii.gz.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def current_sidecar(dest: str | os.PathLike, fingerprint: Any) -> dict[str, Any] | None:
    """The sidecar record of ``dest`` when ``dest`` is still what ``fingerprint`` describes (the sidecar
    holds the same ``fingerprint`` and the file's sha256 matches), else ``None``: the output must be made."""
    dest = Path(dest)
    sidecar = sidecar_path(dest)
    if not (dest.is_file() and sidecar.is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if record.get("fingerprint") != fingerprint or record.get("sha256") != sha256_file(dest):
        return None
    return record


def write_with_sidecar(
    dest: str | os.PathLike, writer, meta: Mapping[str, Any], step: str
) -> Path:
    """Write ``dest`` atomically with ``writer(tmp_path)`` then its JSON sidecar.

    The sidecar holds ``meta``, the file's sha256 and the provenance of ``step`` (package
    versions, host, time). It is written after the data file, so a sidecar never describes a
    file that is not there.
    """
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        writer(tmp)
    record = {"file": dest.name, "sha256": sha256_file(dest), **dict(meta), "provenance": provenance(step)}
    write_json(sidecar_path(dest), record)
    return dest


def save_nifti(array, affine, dest: str | os.PathLike, dtype) -> Path:
    """Atomically save a 3-D array as NIfTI with ``dtype``, spacing in mm and the affine as both
    qform and sform (code 1, scanner), so every reader sees the same geometry."""
    import nibabel as nib
    import numpy as np

    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(dest) as tmp:
        nib.save(img, str(tmp))
    return Path(dest)


def world_grid(shape: Sequence[int], affine: Any) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Size and spacing (mm) along the world's x, y and z (RAS) of an array stored in any axis order, from its affine:
    the grid :func:`read_canonical` gives it."""
    import nibabel as nib
    import numpy as np

    from maisi.core.checks import spacing_from_affine

    spacing = spacing_from_affine(affine)
    dim, step = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (world, _) in enumerate(nib.orientations.io_orientation(np.asarray(affine, np.float64))):
        dim[int(world)], step[int(world)] = int(shape[axis]), round(float(spacing[axis]), 6)
    return tuple(dim), tuple(step)  # type: ignore[return-value]


def read_canonical(path: str | os.PathLike, what: str) -> tuple[Any, Any]:
    """A 3-D volume with its axes in RAS order, and its affine (float64). NIfTI with nibabel (``as_closest_canonical``,
    its header's spacing checked first); other formats (NRRD, a DICOM folder) with MONAI's readers. A file that cannot be
    read, or is not one 3-D volume (a trailing axis of one is dropped), is an :class:`~maisi.core.checks.InputError`
    naming it; ``what`` (``"label map"``, ``"CT"``) says what it should have been."""
    import numpy as np

    from maisi.core.checks import InputError, check_nifti_spacing

    nifti = str(path).lower().endswith((".nii", ".nii.gz"))
    try:
        if nifti:
            import nibabel as nib

            check_nifti_spacing(path)
            img = nib.as_closest_canonical(nib.load(str(path)))
            data, affine = np.asanyarray(img.dataobj), np.asarray(img.affine, np.float64)
        else:
            from monai.transforms import LoadImage, Orientation

            img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
            img = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(img)
            data, affine = np.asarray(img), np.asarray(img.affine, np.float64)
            data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)  # channels last, refused below
    except InputError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib and MONAI's readers raise many types for corrupt or foreign files
        raise InputError(path, f"cannot be read as a {'NIfTI ' if nifti else ''}{what} ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"the {what} has shape {tuple(data.shape)}; expected a 3-D volume")
    return data, affine


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def json_default(obj: Any) -> Any:
    # numpy scalars and arrays, paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
