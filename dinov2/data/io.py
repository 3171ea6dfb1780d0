"""File access shared by the dataset readers: root expansion, image reading, lazy per-worker handles, and the
retry-and-record policy for unreadable files.

Heavy libraries (tifffile, PIL, h5py, rasterio) are imported inside the functions that need them.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import numpy as np

logger = logging.getLogger("dinov2")
T = TypeVar("T")
_UNSET_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand_path(path: str, what: str = "path") -> str:
    """Expand `$VAR`/`${VAR}` and `~`; an environment variable that is used but unset raises naming it."""
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    m = _UNSET_VAR.search(expanded)
    if m:
        var = m.group(1) or m.group(2)
        raise EnvironmentError(
            f"{what} {str(path)!r} uses the environment variable ${var}, which is not set "
            f"(set it in the environment or in .env, e.g. {var}=/path/to/resources)")
    return expanded


def require_path(path: str, what: str, given: Optional[str] = None, env_var: str = "RDIR") -> str:
    """Return `path` if it exists, else raise FileNotFoundError naming it and the environment variable."""
    if not os.path.exists(path):
        val = os.environ.get(env_var)
        src = f" (from {given!r})" if given is not None and given != path else ""
        raise FileNotFoundError(
            f"{what} not found: {path}{src}; ${env_var} is {val!r}" if val is not None else
            f"{what} not found: {path}{src}; ${env_var} is not set")
    return path


def resolve_root(root: str, what: str, env_var: str = "RDIR") -> str:
    """Expand a dataset root (e.g. '${RDIR}/datasets') and check that it exists."""
    return require_path(expand_path(root, what), what, given=root, env_var=env_var)


class UnreadableFileError(OSError):
    """A single file could not be read or decoded; carries its path."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(f"cannot read {path}: {type(cause).__name__}: {cause}")
        self.path = path
        self.cause = cause


def read_json(path: str, what: str = "JSON file") -> Any:
    """Parse a JSON file; malformed or undecodable content raises ``ValueError`` naming the file and position."""
    import json

    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {type(e).__name__}: {e}") from e


def read_tiff_chw(path: str) -> np.ndarray:
    """Read a (multi-band) TIFF as a (C,H,W) array; pixel-interleaved (H,W,C) files are transposed."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = series.asarray()
            axes = series.axes
    except Exception as e:  # decoding errors come from many libraries; report them with the path
        raise UnreadableFileError(path, e) from e
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise UnreadableFileError(path, ValueError(f"expected a 2-D or 3-D image, got shape {arr.shape}"))
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0)) if axes.endswith("S") else arr


def read_png_chw(path: str) -> np.ndarray:
    """Read a PNG (grey or RGB) as a uint8 (C,H,W) array."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as e:
        raise UnreadableFileError(path, e) from e
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(np.moveaxis(arr, -1, 0))


def read_raster_band(src: Any, path: str, bidx: int, **kwargs: Any) -> np.ndarray:
    """``src.read(bidx, **kwargs)`` of an open rasterio dataset; a damaged or truncated file raises
    ``UnreadableFileError`` naming ``path`` and GDAL's own reason."""
    try:
        return src.read(bidx, **kwargs)
    except Exception as e:  # rasterio reports decoding failures as RasterioIOError with the reason chained
        reason = e.__cause__ or e.__context__
        if reason is not None:
            e = type(e)(f"{e} ({type(reason).__name__}: {reason})")
        raise UnreadableFileError(path, e) from e


def open_h5(path: str):
    """Open an HDF5 file read-only (module-level so that LazyHandles stays picklable)."""
    import h5py

    return h5py.File(path, "r")


def open_raster(path: str):
    """Open a raster with rasterio (module-level so that LazyHandles stays picklable)."""
    import rasterio

    return rasterio.open(path)


class LazyHandles:
    """Per-process cache of open file handles (HDF5, rasterio).

    Handles are never pickled and are re-opened after a fork, so each DataLoader worker opens its own.
    `opener` must be a picklable callable `path -> handle`.
    """

    def __init__(self, opener: Callable[[str], Any]):
        self._opener = opener
        self._pid: Optional[int] = None
        self._handles: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> Any:
        """Open `path` on first use in this process and return the cached handle."""
        with self._lock:
            if self._pid != os.getpid():
                self._handles = {}  # inherited through fork: not ours to use
                self._pid = os.getpid()
            h = self._handles.get(path)
            if h is None:
                try:
                    h = self._opener(path)
                except Exception as e:
                    raise UnreadableFileError(path, e) from e
                self._handles[path] = h
            return h

    def open_all(self, paths, threads: int = 8) -> None:
        """Open every path of `paths` not open yet, several at once (remote files: one round trip for all)."""
        from concurrent.futures import ThreadPoolExecutor

        with self._lock:
            missing = list(dict.fromkeys(p for p in paths if self._pid != os.getpid() or p not in self._handles))
        if len(missing) < 2:
            return

        def open_one(path: str) -> Any:
            try:
                return self._opener(path)
            except Exception as e:
                raise UnreadableFileError(path, e) from e

        with ThreadPoolExecutor(max_workers=min(threads, len(missing))) as pool:
            opened = list(pool.map(open_one, missing))
        with self._lock:
            if self._pid != os.getpid():
                self._handles, self._pid = {}, os.getpid()
            extra = [h for path, h in zip(missing, opened) if self._handles.setdefault(path, h) is not h]
        for h in extra:  # opened meanwhile by another caller
            h.close()

    def close(self) -> None:
        """Close this process's handles."""
        with self._lock:
            if self._pid == os.getpid():
                for h in self._handles.values():
                    close = getattr(h, "close", None)
                    if close is not None:
                        close()
            self._handles = {}

    def __getstate__(self) -> Dict[str, Any]:
        return {"_opener": self._opener}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["_opener"])


class FaultyFileLog:
    """Records unreadable files: kept in `entries` and appended (with the traceback) to `path` if given."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self.entries: List[Tuple[str, str]] = []
        self._write_failed = False

    def record(self, file: str, error: BaseException) -> None:
        """Add one unreadable file."""
        self.entries.append((file, f"{type(error).__name__}: {error}"))
        logger.warning("unreadable file %s: %s", file, error)
        if self.path and not self._write_failed:
            try:
                with open(self.path, "a") as fh:
                    fh.write(f"{file}\n")
                    fh.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
            except OSError as e:  # a read-only dataset folder must not stop training
                self._write_failed = True
                logger.warning("cannot append to faulty-files list %s: %s", self.path, e)

    @property
    def files(self) -> List[str]:
        """Paths recorded so far (in this process)."""
        return [f for f, _ in self.entries]


def with_retries(build: Callable[[int], T], max_tries: int, log: FaultyFileLog, what: str) -> T:
    """Call `build(attempt)` until it succeeds; each UnreadableFileError is recorded and the sample re-drawn
    (`build` re-samples its views). After `max_tries` failures raise naming the files."""
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    failed: List[str] = []
    for attempt in range(max_tries):
        try:
            return build(attempt)
        except UnreadableFileError as e:
            log.record(e.path, e)
            failed.append(e.path)
    raise RuntimeError(f"{what}: could not be loaded after {max_tries} tries; unreadable: {', '.join(failed)}")
