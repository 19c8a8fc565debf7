"""A local HTTP file server for download tests (127.0.0.1, random port, Range support).

Each served path can be told to return an error status, to cut the body short after a number of
bytes for its first requests, or to ignore ``Range`` headers. Every request is recorded.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from helpers.volumes import write_nifti as _write_nifti


@dataclass
class Resource:
    data: bytes
    status: int | None = None  # answer with this status instead of the file ...
    status_times: int | None = None  # ... for this many requests (None: always)
    truncate_after: int | None = None  # send only this many body bytes, then close ...
    truncate_times: int = 0  # ... for this many requests
    ignore_range: bool = False


@dataclass
class Request:
    path: str
    range: str | None
    status: int


@dataclass
class ServerState:
    resources: dict[str, Resource] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FileServer:
    """Handle on a running server: register files, get their URLs, inspect the requests."""

    def __init__(self, httpd: ThreadingHTTPServer, state: ServerState) -> None:
        self.httpd = httpd
        self.state = state

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, name: str, data: bytes, **behaviour) -> str:
        """Serve ``data`` at ``/name``; ``behaviour`` sets :class:`Resource` fields. Returns the URL."""
        self.state.resources["/" + name] = Resource(data=data, **behaviour)
        return f"{self.base_url}/{name}"

    def requests_for(self, name: str) -> list[Request]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path == "/" + name]


class _Handler(BaseHTTPRequestHandler):
    server_version = "TestFileServer/1.0"

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence the default logging
        pass

    @property
    def state(self) -> ServerState:
        return self.server.state  # type: ignore[attr-defined]

    def _record(self, status: int) -> None:
        with self.state.lock:
            self.state.requests.append(Request(self.path, self.headers.get("Range"), status))

    def _simple(self, status: int, headers: dict[str, str] | None = None) -> None:
        body = f"status {status}\n".encode()
        self._record(status)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        with self.state.lock:
            res = self.state.resources.get(self.path)
            if res is None:
                status, truncate = 404, None
            elif res.status is not None and (res.status_times is None or res.status_times > 0):
                status, truncate = res.status, None
                if res.status_times is not None:
                    res.status_times -= 1
            else:
                status = 200
                truncate = None
                if res.truncate_times > 0:
                    truncate = res.truncate_after
                    res.truncate_times -= 1
        if status != 200:
            self._simple(status)
            return

        data = res.data
        start, end = 0, len(data) - 1
        range_header = self.headers.get("Range")
        partial = False
        if range_header and not res.ignore_range:
            m = re.match(r"^bytes=(\d+)-(\d*)$", range_header.strip())
            if m:
                start = int(m.group(1))
                if m.group(2):
                    end = min(int(m.group(2)), len(data) - 1)
                if start >= len(data):
                    self._simple(416, {"Content-Range": f"bytes */{len(data)}"})
                    return
                partial = True
        body = data[start : end + 1]
        status = 206 if partial else 200
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if truncate is not None and truncate < len(body):
            self.wfile.write(body[:truncate])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serve() -> Iterator[FileServer]:
    """Run a :class:`FileServer` on 127.0.0.1 (random port) in a thread for the ``with`` block."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield FileServer(httpd, httpd.state)  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# tiny datasets and archives


def write_nifti(path, data, affine=None):
    """Save ``data`` as NIfTI at ``path`` (1.5 x 1.5 x 2 mm unless ``affine`` is given)."""
    return _write_nifti(Path(path), np.asarray(data), spacing=(1.5, 1.5, 2.0), affine=affine)


def write_msd_task(root, task="Task09_Spleen", prefix="spleen", n_cases=2, label_values=(1,), n_test=1):
    """A tiny MSD task folder: ``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``, ``._`` junk."""
    base = Path(root) / task
    rng = np.random.default_rng(0)
    training, test = [], []
    for i in range(1, n_cases + 1):
        image = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
        label = np.zeros((6, 5, 4), dtype=np.uint8)
        for j, value in enumerate(label_values):
            label[j, :2, :2] = value
        write_nifti(base / "imagesTr" / f"{prefix}_{i}.nii.gz", image)
        write_nifti(base / "labelsTr" / f"{prefix}_{i}.nii.gz", label)
        (base / "imagesTr" / f"._{prefix}_{i}.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
        training.append({"image": f"./imagesTr/{prefix}_{i}.nii.gz", "label": f"./labelsTr/{prefix}_{i}.nii.gz"})
    for i in range(n_cases + 1, n_cases + 1 + n_test):
        write_nifti(base / "imagesTs" / f"{prefix}_{i}.nii.gz", np.zeros((6, 5, 4), dtype=np.int16))
        test.append(f"./imagesTs/{prefix}_{i}.nii.gz")
    (base / "dataset.json").write_text(json.dumps({
        "name": task, "labels": {"0": "background", **{str(v): f"class{v}" for v in label_values}},
        "numTraining": n_cases, "training": training, "test": test,
    }), encoding="utf-8")
    return base


def make_tar(src_dir, dest, mode="w"):
    """Tar the content of ``src_dir`` (member names relative to it) into ``dest``."""
    src_dir = Path(src_dir)
    with tarfile.open(dest, mode) as tf:
        for path in sorted(src_dir.rglob("*")):
            tf.add(path, arcname=path.relative_to(src_dir).as_posix(), recursive=False)
    return Path(dest)
