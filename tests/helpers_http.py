"""A real HTTP server on 127.0.0.1 for tests: serves a directory and records every request it gets.

Use the context manager in a fixture (or import the ``http_directory`` fixture)::

    from helpers_http import serve_directory

    @pytest.fixture
    def served(tmp_path):
        with serve_directory(tmp_path) as server:
            yield server

    url = served.url("store.zarr")          # http://127.0.0.1:PORT/store.zarr
    served.clear()                          # forget requests made so far
    served.gets("/store.zarr/t2m/")         # paths of GET requests under that prefix

The server is the standard library's ``ThreadingHTTPServer`` on a random free port, in a daemon thread,
shut down (and its port released) when the context exits. It answers single-range ``Range: bytes=a-b``
requests with 206 Partial Content, so fsspec can read byte ranges of served files (as a remote
netCDF/HDF5 reader does); everything else is ``SimpleHTTPRequestHandler``.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class ServedDirectory:
    """A running server: its root folder, base URL and the requests seen so far (method, path)."""

    root: Path
    base_url: str
    _requests: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, relative: str = "") -> str:
        """The URL of ``relative`` (a path under ``root``, '/'-separated)."""
        return f"{self.base_url}/{relative.lstrip('/')}" if relative else self.base_url

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    @property
    def requests(self) -> list[tuple[str, str]]:
        """A copy of all (method, path) pairs received, in order."""
        with self._lock:
            return list(self._requests)

    def gets(self, prefix: str = "") -> list[str]:
        """Paths of the GET requests whose path starts with ``prefix``."""
        return [path for method, path in self.requests if method == "GET" and path.startswith(prefix)]

    def clear(self) -> None:
        """Forget the requests received so far."""
        with self._lock:
            self._requests.clear()


class _RecordingHandler(SimpleHTTPRequestHandler):
    """Serves files, records requests, and honours a single byte range."""

    served: ServedDirectory

    def __init__(self, *args, served: ServedDirectory, **kwargs) -> None:
        self.served = served
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return

    def do_HEAD(self) -> None:
        self.served.record("HEAD", self.path)
        super().do_HEAD()

    def do_GET(self) -> None:
        self.served.record("GET", self.path)
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if header is None or not os.path.isfile(path):
            super().do_GET()
            return
        match = _RANGE_RE.match(header.strip())
        size = os.path.getsize(path)
        if match is None or not (match.group(1) or match.group(2)):
            self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"unsupported range {header!r}")
            return
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        else:  # suffix range: the last N bytes
            start, end = max(size - int(match.group(2)), 0), size - 1
        if start >= size or start > end:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serve_directory(root: str | os.PathLike[str]) -> Iterator[ServedDirectory]:
    """Serve ``root`` on 127.0.0.1 at a random free port until the context exits."""
    root = Path(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: None)  # handler set below
    served = ServedDirectory(root=root, base_url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = functools.partial(_RecordingHandler, served=served, directory=str(root))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"http-{server.server_address[1]}", daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def http_directory(tmp_path: Path) -> Iterator[ServedDirectory]:
    """A server for the folder ``tmp_path / "www"`` (created empty), stopped at teardown."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_directory(root) as served:
        yield served
