"""Real servers on 127.0.0.1 for tests: a static HTTP file server that honours byte ranges (as object stores and
CDNs do), and an S3-compatible server (moto's ``ThreadedMotoServer``) with a bucket filled from a local folder."""
from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
from functools import partial
from pathlib import Path
from typing import Iterator, List, Tuple


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` plus ``Range: bytes=a-b`` (206 Partial Content) and a request log."""

    log: List[Tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def send_head(self):
        RangeHandler.log.append((self.command, self.path))
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if not m or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(m.group(1)) if m.group(1) else max(0, size - int(m.group(2)))
        end = min(int(m.group(2)), size - 1) if m.group(1) and m.group(2) else size - 1
        if start >= size:
            self.send_error(416, "Range Not Satisfiable")
            return None
        fh = open(path, "rb")
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(fh, end - start + 1)


class _Limited:
    """A file object that reads at most ``n`` bytes (what ``copyfile`` sends for a range)."""

    def __init__(self, fh, n: int):
        self.fh, self.left = fh, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.fh.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1; yields the base URL."""
    RangeHandler.log = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server(folder: Path, bucket: str, monkeypatch) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with ``bucket`` holding every file below ``folder`` (same relative keys);
    the ``AWS_*`` variables point clients at it. Yields ``s3://<bucket>``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, path.relative_to(folder).as_posix())
        yield f"s3://{bucket}"
    finally:
        server.stop()
