"""Remote rasters: URLs the user named, read through GDAL's virtual file systems with range requests.

``http(s)://`` maps to GDAL's ``/vsicurl/``, ``s3://`` to ``/vsis3/``, ``gs://`` to ``/vsigs/`` and ``az://`` to
``/vsiaz/``. Credentials and endpoints come from the standard environment, which GDAL and obstore both read:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE``, ``AWS_REGION``,
``AWS_NO_SIGN_REQUEST=YES`` (public buckets), ``AWS_REQUEST_PAYER=requester``, ``AWS_S3_ENDPOINT`` +
``AWS_HTTPS`` + ``AWS_VIRTUAL_HOSTING`` (GDAL's names for an S3-compatible server; derived here from
``AWS_ENDPOINT_URL``, the name boto3 and obstore use, when only that is set), ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_ACCOUNT`` / ``AZURE_STORAGE_ACCESS_KEY`` (or obstore's ``AZURE_STORAGE_ACCOUNT_NAME`` /
``AZURE_STORAGE_ACCOUNT_KEY``: each spelling is passed on to the other library) or ``AZURE_STORAGE_CONNECTION_STRING``
(GDAL; it can name another endpoint).

`http_options` are the GDAL settings of remote reads: retries with exponential backoff on 429/5xx answers and
timeouts, connection and stall timeouts, caching. Each is a default that a variable of the same name in the
environment overrides (e.g. ``CPL_VSIL_CURL_USE_HEAD=NO`` for servers that refuse HEAD requests).
`remote_identity` is a remote object's identity for provenance (size and ETag or Last-Modified, from one HEAD
request, or a one-byte GET where HEAD is refused; no pixel is read).
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

URL_PREFIXES = {"http://": "/vsicurl/", "https://": "/vsicurl/", "s3://": "/vsis3/", "gs://": "/vsigs/",
                "az://": "/vsiaz/"}
RETRY_CODES = (429, 500, 502, 503, 504)
# GDAL's own defaults retry nothing (GDAL_HTTP_MAX_RETRY=0) and wait 30 s before a retry; these retry five times,
# starting after 1 s and doubling (GDAL multiplies the delay by ~2 per attempt)
HTTP_DEFAULTS = {
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_HTTP_CONNECTTIMEOUT": "30",
    "GDAL_HTTP_LOW_SPEED_TIME": "60",  # a transfer below 1 byte/s for 60 s is a timeout (and is retried)
    "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_INGESTED_BYTES_AT_OPEN": "65536",  # a COG's header and tile index in the first request
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(16 << 20),  # per open file
}  # (CPL_VSIL_CURL_CACHE_SIZE, GDAL's process-wide cache of downloaded ranges, is read only when GDAL starts)


def is_url(path: Any) -> bool:
    """True for the URL schemes read remotely (http, https, s3, gs, az)."""
    return str(path).startswith(tuple(URL_PREFIXES))


def gdal_path(url: str) -> str:
    """GDAL's virtual-file-system path of `url` (``/vsicurl/https://...``, ``/vsis3/bucket/key``, ...)."""
    url = str(url)
    for prefix, vsi in URL_PREFIXES.items():
        if url.startswith(prefix):
            return vsi + (url if vsi == "/vsicurl/" else url[len(prefix):])
    raise ValueError(f"{url} is not a http(s)://, s3://, gs:// or az:// URL")


def _gdal_at_least(major: int, minor: int) -> bool:
    import rasterio

    parts = [int(p) for p in rasterio.__gdal_version__.split(".")[:2]]
    return tuple(parts) >= (major, minor)


def s3_endpoint_options() -> Dict[str, str]:
    """GDAL's S3 endpoint settings from ``AWS_ENDPOINT_URL[_S3]`` when ``AWS_S3_ENDPOINT`` is not set: GDAL wants
    host[:port] without the scheme, the scheme as ``AWS_HTTPS`` and path-style addressing for such servers."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url or os.environ.get("AWS_S3_ENDPOINT"):
        return {}
    parts = urlsplit(url)
    opts = {"AWS_S3_ENDPOINT": parts.netloc + parts.path.rstrip("/"),
            "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES"}
    if "AWS_VIRTUAL_HOSTING" not in os.environ:
        opts["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return opts


def azure_options() -> Dict[str, str]:
    """GDAL's Azure account settings from obstore's names (``AZURE_STORAGE_ACCOUNT_NAME``,
    ``AZURE_STORAGE_ACCOUNT_KEY``) when GDAL's own (``AZURE_STORAGE_ACCOUNT``, ``AZURE_STORAGE_ACCESS_KEY``) are not
    set, so that either spelling serves inputs (GDAL) and outputs (obstore) alike."""
    opts = {}
    for gdal_name, other in (("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_ACCOUNT_NAME"),
                             ("AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_ACCOUNT_KEY")):
        if gdal_name not in os.environ and os.environ.get(other):
            opts[gdal_name] = os.environ[other]
    return opts


def http_options() -> Dict[str, str]:
    """GDAL settings of remote reads (`HTTP_DEFAULTS`, retry codes on GDAL >= 3.10, the S3 endpoint); a variable
    set in the environment wins over the default here."""
    opts = dict(HTTP_DEFAULTS)
    if _gdal_at_least(3, 10):
        opts["GDAL_HTTP_RETRY_CODES"] = ",".join(map(str, RETRY_CODES))
    opts = {k: v for k, v in opts.items() if k not in os.environ}
    opts.update(s3_endpoint_options())
    opts.update(azure_options())
    return opts


def clear_cached(urls: List[str]) -> None:
    """Drop what GDAL cached of `urls` in this process (file size, downloaded ranges), so that a file that changed
    since an earlier run in this process is read anew. (GDAL's C function ``VSICurlPartialClearCache``, which
    rasterio does not wrap; without it nothing is cleared.)"""
    try:
        import ctypes

        import rasterio._env

        fn = ctypes.CDLL(rasterio._env.__file__).VSICurlPartialClearCache
    except (OSError, AttributeError, ImportError):
        return
    fn.argtypes, fn.restype = [ctypes.c_char_p], None
    for url in urls:
        fn(gdal_path(url).encode())


def object_store(url: str, **config: Any):
    """An obstore store for the bucket (or http origin) of `url`, credentials from the environment; plain http
    is allowed (local S3-compatible servers), ``AWS_NO_SIGN_REQUEST=YES`` reads public buckets unsigned."""
    import obstore.store

    if url.startswith("s3://") and os.environ.get("AWS_NO_SIGN_REQUEST", "").upper() in ("YES", "TRUE", "1"):
        config.setdefault("skip_signature", True)
    if url.startswith("az://") and os.environ.get("AZURE_STORAGE_ACCOUNT") and \
            not os.environ.get("AZURE_STORAGE_ACCOUNT_NAME"):  # GDAL's name for it (obstore reads the key's)
        config.setdefault("account_name", os.environ["AZURE_STORAGE_ACCOUNT"])
    return obstore.store.from_url(url, client_options={"allow_http": True}, **config)


def split_url(url: str) -> Tuple[str, str]:
    """(bucket root URL, key) of an object store URL: ``s3://b/k/x`` -> (``s3://b``, ``k/x``)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")


def _retry_delay() -> float:
    try:
        return max(0.0, float(os.environ.get("GDAL_HTTP_RETRY_DELAY", HTTP_DEFAULTS["GDAL_HTTP_RETRY_DELAY"])))
    except ValueError:
        return 1.0


def _http(url: str, method: str, tries: int = 6, headers: Optional[Dict[str, str]] = None) -> Tuple[Any, bytes]:
    """(headers, body) of a HTTP request, retried with backoff on 429/5xx answers and network errors."""
    import urllib.error
    import urllib.request

    delay = _retry_delay()
    for attempt in range(tries):
        try:
            request = urllib.request.Request(url, method=method, headers=headers or {})
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.headers, (r.read() if method == "GET" else b"")
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_CODES or attempt + 1 == tries:
                raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt + 1 == tries:
                raise OSError(f"{url}: {getattr(e, 'reason', e)}") from None
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _store_call(url: str, fn):
    """`fn(store, key)` on the object store of `url`, its errors as one line naming the URL."""
    root, key = split_url(url)
    try:
        return fn(object_store(root), key)
    except FileNotFoundError:
        raise FileNotFoundError(f"no object at {url}") from None
    except Exception as e:  # obstore reports network and credential problems with multi-line messages
        raise OSError(f"{url}: {str(e).splitlines()[0]}") from None


def read_bytes(url: str) -> bytes:
    """The content of a (small) remote object, e.g. a STAC item JSON."""
    if url.startswith(("http://", "https://")):
        return _http(url, "GET")[1]
    import obstore

    return bytes(_store_call(url, lambda store, key: obstore.get(store, key).bytes()))


def remote_identity(url: str) -> List[Any]:
    """[url, size, ETag (else Last-Modified, else None)] of a remote object, from one HEAD request (retried like
    GDAL's reads); a missing object or refused request raises OSError naming the URL."""
    if url.startswith(("http://", "https://")):
        try:
            h = _http(url, "HEAD")[0]
            size = h.get("Content-Length")
        except OSError as e:  # URLs signed for GET only (S3 presigned) refuse HEAD: ask for their first byte
            if not any(f"HTTP {code} " in str(e) for code in (403, 405)):
                raise
            h = _http(url, "GET", headers={"Range": "bytes=0-0"})[0]
            size = (h.get("Content-Range") or "").rpartition("/")[2] or None
        head = {"size": int(size) if size not in (None, "*") else None, "etag": h.get("ETag"),
                "last_modified": h.get("Last-Modified")}
    else:
        import obstore

        meta = _store_call(url, obstore.head)
        head = {"size": meta["size"], "etag": meta.get("e_tag"), "last_modified": str(meta.get("last_modified"))}
    return [url, head["size"], head["etag"] or head["last_modified"]]
