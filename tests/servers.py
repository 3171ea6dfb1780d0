"""Real servers on 127.0.0.1 for the tests: an HTTP file server with byte ranges (as object stores and CDNs serve
COGs), optional latency and injected 5xx failures; a minimal STAC API (landing page, conformance, collections,
item search with bbox/datetime/collections/ids and paging) over items whose assets it serves; and an
S3-compatible server (moto's ``ThreadedMotoServer``) with a bucket filled from a local folder.

Every request is recorded (method, path, Range header), so a test can assert what was — and was not — fetched.
"""
from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlparse

STAC_CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/collections",
    "http://www.opengis.net/spec/ogcapi-features-1/conf/1.0/core",
    "http://www.opengis.net/spec/ogcapi-features-1/conf/1.0/geojson",
]


@dataclass
class Request:
    method: str
    path: str
    range: Optional[str]


@dataclass
class ServerState:
    root: Optional[str] = None
    latency: float = 0.0  # seconds added to every request
    failures: Dict[str, int] = field(default_factory=dict)  # path -> how many more requests answer 503
    every: Dict[str, int] = field(default_factory=dict)  # path -> every n-th request answers 503
    counts: Dict[str, int] = field(default_factory=dict)  # path -> requests seen
    requests: List[Request] = field(default_factory=list)
    routes: Dict[str, Callable[["Handler", Dict[str, Any]], Tuple[int, Any]]] = field(default_factory=dict)
    head_status: Optional[int] = None  # answer every HEAD request with this status (servers that refuse HEAD)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ServerState

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _record(self) -> bool:
        """Record the request; apply latency and injected failures. False when the request was answered 503."""
        path = urlparse(self.path).path
        with self.state.lock:
            self.state.requests.append(Request(self.command, path, self.headers.get("Range")))
            left = self.state.failures.get(path, 0)
            if left:
                self.state.failures[path] = left - 1
            self.state.counts[path] = self.state.counts.get(path, 0) + 1
            n = self.state.every.get(path)
            left = left or bool(n and self.state.counts[path] % n == 0)
        if self.state.latency:
            time.sleep(self.state.latency)
        if left:
            self._send(503, b"injected failure", "text/plain")
            return False
        return True

    def _send(self, code: int, body: bytes, ctype: str, extra: Optional[Dict[str, str]] = None,
              head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json_route(self, body: Optional[bytes]) -> bool:
        url = urlparse(self.path)
        route = self.state.routes.get(url.path)
        if route is None:
            for prefix, fn in self.state.routes.items():
                if prefix.endswith("/*") and url.path.startswith(prefix[:-1]):
                    route = fn
                    break
        if route is None:
            return False
        params: Dict[str, Any] = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if body:
            params.update(json.loads(body))
        params["_path"] = url.path
        code, obj = route(self, params)
        ctype = "application/geo+json" if isinstance(obj, dict) and obj.get("type") == "FeatureCollection" \
            else "application/json"
        self._send(code, json.dumps(obj).encode(), ctype)
        return True

    def _file(self, head: bool) -> None:
        rel = urlparse(self.path).path.lstrip("/")
        path = os.path.realpath(os.path.join(self.state.root or "", rel))
        if not self.state.root or not path.startswith(os.path.realpath(self.state.root) + os.sep) \
                or not os.path.isfile(path):
            self._send(404, b"not found", "text/plain", head=head)
            return
        st = os.stat(path)
        tag = hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()
        meta = {"Accept-Ranges": "bytes", "ETag": f'"{tag}"',
                "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True)}
        with open(path, "rb") as f:
            data = f.read()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].split(",")[0].partition("-")
            start = int(start_s) if start_s else max(0, len(data) - int(end_s))
            end = min(int(end_s), len(data) - 1) if start_s and end_s else len(data) - 1
            if start >= len(data):
                self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"}, head)
                return
            meta["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start:end + 1], "application/octet-stream", meta, head)
        else:
            self._send(200, data, "application/octet-stream", meta, head)

    def do_HEAD(self) -> None:  # noqa: N802
        if self._record():
            if self.state.head_status:
                self._send(self.state.head_status, b"", "text/plain", head=True)
            else:
                self._file(head=True)

    def do_GET(self) -> None:  # noqa: N802
        if self._record() and not self._json_route(None):
            self._file(head=False)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self._record() and not self._json_route(body):
            self._send(404, b"not found", "text/plain")


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving files under `root` and JSON routes."""

    def __init__(self, root: Optional[str] = None, latency: float = 0.0):
        self.state = ServerState(root=root, latency=latency)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def requests(self) -> List[Request]:
        return list(self.state.requests)

    def fail(self, path: str, times: int) -> None:
        """The next `times` requests for `path` answer 503."""
        self.state.failures["/" + path.lstrip("/")] = times

    def fail_every(self, path: str, n: int) -> None:
        """Every `n`-th request for `path` (counted from the server's start) answers 503."""
        self.state.every["/" + path.lstrip("/")] = n

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _overlaps(a, b) -> bool:
    return a[0] <= b[2] and a[2] >= b[0] and a[1] <= b[3] and a[3] >= b[1]


def _in_time(item: Dict[str, Any], interval: str) -> bool:
    t = item["properties"].get("datetime")
    start, _, end = interval.partition("/") if "/" in interval else (interval, "", interval)
    return (start in ("", "..") or t >= start) and (end in ("", "..") or t <= end)


_QUERY_OPS = {"eq": lambda v, x: v == x, "neq": lambda v, x: v != x, "lt": lambda v, x: v < x,
              "lte": lambda v, x: v <= x, "gt": lambda v, x: v > x, "gte": lambda v, x: v >= x,
              "in": lambda v, x: v in x}
_CQL2_OPS = {"=": "eq", "<>": "neq", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}


def _matches_query(item: Dict[str, Any], query: Dict[str, Any]) -> bool:
    """The STAC query extension: every property's every operator holds."""
    props = item["properties"]
    return all(name in props and _QUERY_OPS[op](props[name], value)
               for name, ops in query.items() for op, value in ops.items())


def _matches_cql2(item: Dict[str, Any], expr: Dict[str, Any]) -> bool:
    """CQL2-JSON: and/or/not over comparisons of a property with a literal."""
    op, args = expr["op"], expr["args"]
    if op in ("and", "or"):
        return (all if op == "and" else any)(_matches_cql2(item, a) for a in args)
    if op == "not":
        return not _matches_cql2(item, args[0])
    prop, value = args[0]["property"], args[1]
    return prop in item["properties"] and _QUERY_OPS[_CQL2_OPS[op]](item["properties"][prop], value)


class StacApi(LocalServer):
    """A minimal STAC API: `items` are item dicts (their asset hrefs may point at this server's files);
    `extensions` among ``query`` (the query extension) and ``filter`` (CQL2-JSON), which it then implements and
    declares (without them it ignores such expressions, as an API without the extension does)."""

    def __init__(self, root: Optional[str] = None, items: Optional[List[Dict[str, Any]]] = None,
                 page_size: int = 2, extensions: Sequence[str] = ()):
        super().__init__(root)
        self.items = list(items or [])
        self.page_size = page_size
        self.extensions = set(extensions)
        self.state.routes.update({"/": self._landing, "/conformance": self._conformance,
                                  "/collections": self._collections, "/collections/*": self._collection,
                                  "/search": self._search})

    def _link(self, rel: str, path: str, method: str = "GET", body: Optional[Dict[str, Any]] = None,
              mtype: str = "application/json") -> Dict[str, Any]:
        link = {"rel": rel, "href": self.url + path, "type": mtype}
        if method != "GET":
            link.update(method=method, body=body or {})
        return link

    def _landing(self, handler, params):
        return 200, {"type": "Catalog", "stac_version": "1.0.0", "id": "test-api", "description": "tests",
                     "conformsTo": self._conforms(),
                     "links": [self._link("self", "/"), self._link("root", "/"),
                               self._link("conformance", "/conformance"), self._link("data", "/collections"),
                               self._link("search", "/search", mtype="application/geo+json"),
                               dict(self._link("search", "/search", "POST"), type="application/geo+json")]}

    def _conforms(self) -> List[str]:
        extra = {"query": ["https://api.stacspec.org/v1.0.0/item-search#query"],
                 "filter": ["https://api.stacspec.org/v1.0.0/item-search#filter",
                            "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json"]}
        return STAC_CONFORMANCE + [uri for ext in sorted(self.extensions) for uri in extra[ext]]

    def _conformance(self, handler, params):
        return 200, {"conformsTo": self._conforms()}

    def _collection_doc(self, cid: str) -> Dict[str, Any]:
        return {"type": "Collection", "stac_version": "1.0.0", "id": cid, "description": cid, "license": "proprietary",
                "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
                "links": [self._link("self", f"/collections/{cid}"), self._link("root", "/")]}

    def _collections(self, handler, params):
        ids = sorted({i["collection"] for i in self.items})
        return 200, {"collections": [self._collection_doc(c) for c in ids], "links": [self._link("root", "/")]}

    def _collection(self, handler, params):
        cid = params["_path"].split("/")[2]
        return 200, self._collection_doc(cid)

    def _search(self, handler, params):
        hits = list(self.items)
        cols = params.get("collections")
        if cols:
            cols = cols.split(",") if isinstance(cols, str) else cols
            hits = [i for i in hits if i["collection"] in cols]
        ids = params.get("ids")
        if ids:
            ids = ids.split(",") if isinstance(ids, str) else ids
            hits = [i for i in hits if i["id"] in ids]
        bbox = params.get("bbox")
        if bbox:
            box = [float(v) for v in (bbox.split(",") if isinstance(bbox, str) else bbox)]
            hits = [i for i in hits if _overlaps(i["bbox"], box)]
        if params.get("datetime"):
            hits = [i for i in hits if _in_time(i, params["datetime"])]
        for ext, match in (("query", _matches_query), ("filter", _matches_cql2)):
            expr = params.get(ext)
            if ext in self.extensions and expr:
                expr = json.loads(expr) if isinstance(expr, str) else expr
                hits = [i for i in hits if match(i, expr)]
        limit = min(int(params.get("limit") or self.page_size), self.page_size)
        start = int(params.get("token") or 0)
        page = hits[start:start + limit]
        links = [self._link("root", "/")]
        if start + limit < len(hits):
            body = {k: v for k, v in params.items() if not k.startswith("_")}
            body["token"] = str(start + limit)
            if handler.command == "POST":
                links.append(dict(self._link("next", "/search", "POST", body), type="application/geo+json"))
            else:
                query = "&".join(f"{k}={v if isinstance(v, str) else ','.join(map(str, v))}"
                                 for k, v in body.items())
                links.append(self._link("next", f"/search?{query}", mtype="application/geo+json"))
        return 200, {"type": "FeatureCollection", "features": page, "links": links,
                     "numberMatched": len(hits), "numberReturned": len(page)}


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
