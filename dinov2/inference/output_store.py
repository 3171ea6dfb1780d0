"""Where an embed run's outputs live: a local folder, or a prefix in object storage (``s3://``, ``gs://``,
``az://``) through obstore.

With a local folder, outputs are written in place (`OutputStore`: publishing is a no-op). With object storage
(`ObjectOutput`), every scene is computed in a local work folder (``--work-dir``, by default a folder of the cache
keyed by the URL) exactly as for a local output, and uploaded when it is finished: its COG, its chip-table part
and its float32 table first, its done marker last. An object appears only when its upload is complete (a PUT or
a completed multipart upload), so a part or COG in the bucket is always whole, and a marker in the bucket means
that the scene's outputs there are complete: resume and skip read markers in the bucket. A scene that is
recomputed has its marker removed from the bucket first.

obstore rather than fsspec/s3fs: it is already a dependency (shards are streamed with it), one small wheel with
no Python dependencies serves S3, GCS and Azure with their standard credential variables, uploads files in
parallel multipart chunks, and supports conditional writes.

Chip tables in object storage are read for `panopticon index` / `search` through a local mirror of their parts
(`mirror_chips`): parts that changed (by ETag and size) are downloaded into the cache, so the index is built and
searched locally, beside the mirror.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
from typing import Any, Dict, List, Optional, Sequence

from dinov2.data.remote import object_store, split_url

OBJECT_SCHEMES = ("s3://", "gs://", "az://")


def is_object_url(path: Any) -> bool:
    """True for output locations in object storage."""
    return str(path).startswith(OBJECT_SCHEMES)


def cache_root() -> str:
    """``$PANOPTICON_CACHE``, else ``$XDG_CACHE_HOME/panopticon`` (``~/.cache/panopticon``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("PANOPTICON_CACHE") or os.path.join(base, "panopticon")


def url_folder(kind: str, url: str) -> str:
    """A cache folder of `kind` for `url`: readable (host and path) and unique (a hash of the URL)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[:80]
    return os.path.join(cache_root(), kind, f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}")


def _one_line(url: str, e: Exception) -> OSError:
    return OSError(f"{url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


class _Seekable(io.RawIOBase):
    """A seekable file object over an obstore reader (pyarrow reads a parquet footer through it)."""

    def __init__(self, reader):
        self.reader = reader

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.reader.seek(offset, whence)

    def tell(self) -> int:
        return self.reader.tell()

    def readinto(self, buf) -> int:
        data = memoryview(self.reader.read(len(buf)))
        buf[:len(data)] = data
        return len(data)


class OutputStore:
    """A local output folder: outputs are written in place under `root`."""

    remote = False

    def __init__(self, root: str):
        self.root = root

    def location(self, path: str) -> str:
        """How `path` (under `root`) is named to the user."""
        return path

    def exists(self, path: str) -> bool:
        return os.path.isfile(path)

    def read_json(self, path: str) -> Optional[Dict[str, Any]]:
        """JSON content, or None when it does not exist."""
        from dinov2.inference.writers import read_json

        return read_json(path)

    def publish(self, paths: Sequence[str]) -> None:
        """Make finished files visible at their final location, in order (local: they already are)."""

    def remove(self, paths: Sequence[str]) -> None:
        """Remove outputs, in order (the done marker first, so nothing looks finished meanwhile)."""
        for p in paths:
            if os.path.exists(p):
                os.remove(p)

    def parts(self) -> List[str]:
        """Locations of the chip-table parts at the final location."""
        folder = os.path.join(self.root, "chips.parquet")
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                if f.endswith(".parquet") and not f.startswith(".")] if os.path.isdir(folder) else []

    def part_info(self, location: str) -> Dict[str, Any]:
        """The ``panopticon`` metadata of the part at `location` (one of `parts`)."""
        from dinov2.inference.chips_table import part_info

        return part_info(location)


class ObjectOutput(OutputStore):
    """Outputs under `url` (``s3://bucket/prefix``), computed in the local folder `root` and uploaded when
    finished (see the module docstring)."""

    remote = True

    def __init__(self, url: str, root: str):
        super().__init__(root)
        self.url = url.rstrip("/")
        bucket, self.prefix = split_url(self.url)
        self.store = object_store(bucket)

    def key(self, path: str) -> str:
        rel = os.path.relpath(path, self.root).replace(os.sep, "/")
        if rel.startswith(".."):
            raise ValueError(f"{path} is not inside the work folder {self.root}")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def location(self, path: str) -> str:
        return f"{self.url}/{os.path.relpath(path, self.root).replace(os.sep, '/')}"

    def _call(self, path: str, fn, *args, **kwargs):
        try:
            return fn(self.store, self.key(path), *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # obstore reports network and credential problems with multi-line messages
            raise _one_line(self.location(path), e) from None

    def exists(self, path: str) -> bool:
        import obstore

        try:
            self._call(path, obstore.head)
            return True
        except FileNotFoundError:
            return False

    def read_json(self, path: str) -> Optional[Dict[str, Any]]:
        import obstore

        try:
            data = bytes(self._call(path, obstore.get).bytes())
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise ValueError(f"{self.location(path)} is not JSON") from None

    def publish(self, paths: Sequence[str]) -> None:
        """Upload each file (multipart for large ones; the object appears when complete), then delete the local
        copy."""
        import obstore

        for p in paths:
            self._call(p, obstore.put, pathlib.Path(p))
        for p in paths:
            os.remove(p)

    def remove(self, paths: Sequence[str]) -> None:
        import obstore

        for p in paths:
            try:
                self._call(p, obstore.delete)
            except FileNotFoundError:
                pass
        super().remove(paths)

    def _parts(self) -> List[Dict[str, Any]]:
        import obstore

        prefix = self.key(os.path.join(self.root, "chips.parquet")) + "/"
        try:
            objects = [o for batch in obstore.list(self.store, prefix) for o in batch]
        except Exception as e:
            raise _one_line(self.url, e) from None
        return sorted((o for o in objects if o["path"].endswith(".parquet")
                       and not os.path.basename(o["path"]).startswith(".")), key=lambda o: o["path"])

    def parts(self) -> List[str]:
        return [self.location(os.path.join(self.root, "chips.parquet", os.path.basename(o["path"])))
                for o in self._parts()]

    def part_info(self, location: str) -> Dict[str, Any]:
        """A part's ``panopticon`` metadata, from its parquet footer (ranged reads, no data)."""
        import obstore
        import pyarrow.parquet as pq

        from dinov2.inference.chips_table import META_KEY

        path = os.path.join(self.root, *location[len(self.url) + 1:].split("/"))
        meta = pq.ParquetFile(_Seekable(self._call(path, obstore.open_reader))).schema_arrow.metadata or {}
        raw = meta.get(META_KEY)
        return json.loads(raw) if raw else {}


def open_output(output_dir: str, work_dir: Optional[str] = None) -> OutputStore:
    """The store of `output_dir`: a local folder, or ``s3://`` / ``gs://`` / ``az://`` (computed in `work_dir`,
    by default ``<cache>/embed-work/<url>-<hash>``)."""
    if is_object_url(output_dir):
        url = str(output_dir).rstrip("/")
        return ObjectOutput(url, os.path.abspath(work_dir or url_folder("embed-work", url)))
    if "://" in str(output_dir):
        raise ValueError(f"--output-dir {output_dir}: outputs go to a local folder or to s3://, gs:// or az:// "
                         "object storage")
    if work_dir is not None:
        raise ValueError("--work-dir is for outputs in object storage (a local --output-dir is its own work folder)")
    return OutputStore(str(output_dir))


def mirror_chips(url: str) -> str:
    """A local mirror of the chip table at `url` (an embed output in object storage, or its chips.parquet):
    parts new or changed since the last call are downloaded, parts gone are removed. Returns the mirror folder
    (an output folder with ``chips.parquet/``, where `panopticon index` puts its index)."""
    import obstore

    url = url.rstrip("/")
    out_url = url[: -len("/chips.parquet")] if url.endswith("/chips.parquet") else url
    folder = url_folder("chips", out_url)
    remote = ObjectOutput(out_url, folder)
    parts = remote._parts()
    if not parts:
        raise ValueError(f"{out_url} holds no chip parts (chips.parquet/*.parquet); did `panopticon embed` finish a "
                         "scene there?")
    local = os.path.join(folder, "chips.parquet")
    os.makedirs(local, exist_ok=True)
    stamps_path = os.path.join(folder, "mirror.json")
    try:
        with open(stamps_path) as f:
            stamps = json.load(f)
    except (OSError, ValueError):
        stamps = {}
    keep = set()
    for o in parts:
        name = os.path.basename(o["path"])
        keep.add(name)
        stamp = [o.get("e_tag"), o["size"]]
        target = os.path.join(local, name)
        if stamps.get(name) == stamp and os.path.isfile(target):
            continue
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            data = obstore.get(remote.store, o["path"]).bytes()
        except Exception as e:
            raise _one_line(f"{out_url}/chips.parquet/{name}", e) from None
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, target)
        stamps[name] = stamp
    for name in sorted(set(os.listdir(local)) - keep):
        if name.endswith(".parquet"):
            os.remove(os.path.join(local, name))
            stamps.pop(name, None)
    with open(stamps_path, "w") as f:
        json.dump(stamps, f)
    return folder


def local_chips(chips: str) -> str:
    """`chips` itself when local; for an embed output in object storage, its local mirror (`mirror_chips`)."""
    return mirror_chips(str(chips)) if is_object_url(chips) else chips
