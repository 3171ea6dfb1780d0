"""Reading GEO-Bench pickles (``task_specs.pkl``, the ``pickle`` attribute of sample HDF5 files) without executing
them.

``SafeGeobenchUnpickler`` resolves only a short allow-list of names, and none of them is a real constructor that a
pickle could drive into a bad state:
- GEO-Bench classes (``geobench.*`` / ``ccb.*`` in ``KNOWN_GEOBENCH_CLASSES``) become plain ``GeobenchRecord``
  objects whose pickled state (a dict with string keys) becomes attributes;
- numpy arrays, scalars and dtypes are rebuilt from plain data only: a numeric dtype code from a fixed list
  (``SAFE_DTYPE_CODES``), its byte order, a shape and a byte string of exactly ``prod(shape) * itemsize`` bytes.
  numpy's own ``_reconstruct``/``__setstate__`` is never called, so a pickle cannot set dtype internals (object
  dtype, forged flags, sizes or fields) or forge object pointers;
- ``datetime`` values are rebuilt through their validating constructors, ``rasterio`` CRS and ``affine`` transforms
  become plain records, and a few harmless builtins (set, frozenset, complex) are allowed.
Anything else, and any malformed or truncated pickle, raises ``GeobenchPickleError`` (a ``ValueError``) naming the
file.
"""
from __future__ import annotations

import datetime as _dt
import io
import math
import pickle
import struct
from collections import OrderedDict
from typing import Any, Dict, Optional

import numpy as np

# GEO-Bench classes that occur in task_specs.pkl and sample attribute pickles (module names under `geobench.` or
# its pre-release name `ccb.`).
KNOWN_GEOBENCH_CLASSES = frozenset({
    "TaskSpecifications", "BandInfo", "SpectralBand", "Sentinel1", "Sentinel2", "Landsat8", "Mask", "Height",
    "ElevationBand", "CloudProbability", "HyperSpectralBands", "MultiBand", "Band", "Classification",
    "MultiLabelClassification", "SegmentationClasses", "Regression", "Accuracy", "MultilabelAccuracy",
    "SegmentationAccuracy", "Stats", "Partition",
})
_GEOBENCH_PACKAGES = ("geobench", "ccb")
# numeric dtypes an array or scalar may have (numpy's short codes, without byte order)
SAFE_DTYPE_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
_MAX_NDIM = 32


class GeobenchPickleError(pickle.UnpicklingError, ValueError):
    """A GEO-Bench pickle is malformed or references something outside the allow-list."""


class GeobenchRecord:
    """Plain stand-in for a GEO-Bench object: its pickled state becomes attributes; ``geobench_class`` names the
    original class."""

    geobench_class = "GeobenchRecord"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            parts = [s for s in state if s is not None]
            if not all(isinstance(s, dict) for s in parts):
                raise GeobenchPickleError(f"Unexpected state parts for {self.geobench_class}")
            state = {k: v for s in parts for k, v in s.items()}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise GeobenchPickleError(f"Unexpected state {type(state).__name__} for {self.geobench_class}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{self.geobench_class}({', '.join(sorted(self.__dict__))})"


_RECORD_TYPES: Dict[str, type] = {}


def _record_type(name: str) -> type:
    if name not in _RECORD_TYPES:
        _RECORD_TYPES[name] = type(name, (GeobenchRecord,), {"geobench_class": name})
    return _RECORD_TYPES[name]


class AffineRecord(tuple):
    """Stand-in for ``affine.Affine`` (a 6/9-tuple of coefficients)."""

    def __new__(cls, *args):
        return tuple.__new__(cls, args)


class CrsRecord(GeobenchRecord):
    """Stand-in for ``rasterio.crs.CRS`` (keeps its pickled state, e.g. ``{'wkt': ...}``, in ``value``)."""

    geobench_class = "CRS"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["value"] = state


def _crs_from(value: Any) -> CrsRecord:
    rec = CrsRecord()
    rec.__dict__["value"] = value
    return rec


def _safe_reconstructor(cls: type, base: type, state: Any):
    """``copyreg._reconstructor`` restricted to the plain record classes."""
    if not (isinstance(cls, type) and issubclass(cls, GeobenchRecord)) or base is not object or state is not None:
        raise GeobenchPickleError(f"copyreg._reconstructor({getattr(cls, '__name__', type(cls).__name__)}, ...) "
                                  "is not allowed")
    return object.__new__(cls)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as used by protocol-2 pickles to store bytes; only str -> bytes."""
    if not isinstance(text, str) or not isinstance(encoding, str) or \
            encoding.replace("-", "").lower() not in ("latin1", "utf8"):
        raise GeobenchPickleError(f"_codecs.encode({type(text).__name__}, ...) is not allowed")
    return text.encode(encoding)


def _bytes(*args: Any) -> bytes:
    """``builtins.bytes`` as protocol 0-2 pickles use it: ``bytes()`` or ``bytes(str, 'latin1')``."""
    if not args:
        return b""
    return _latin1_encode(*args)


# ---------------------------------------------------------------------------------------------- numpy from data
class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: only usable as the first argument of ``_reconstruct``."""

    def __new__(cls, *args, **kwargs):
        raise GeobenchPickleError("numpy.ndarray may only appear as the class argument of _reconstruct")


class SafeDtype:
    """Stand-in for ``numpy.dtype(code, align, copy)``: accepts only a numeric code and numpy's canonical state for
    it (byte order; no fields, subarray, metadata or flags)."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or len(code) > 4 or code.lstrip("<>=|") not in SAFE_DTYPE_CODES:
            shown = repr(code)[:40] if isinstance(code, str) else type(code).__name__
            raise GeobenchPickleError(f"numpy dtype {shown} is not an allowed numeric dtype "
                                      f"({', '.join(sorted(SAFE_DTYPE_CODES))})")
        if any(type(flag) not in (bool, int) or flag not in (0, 1) for flag in (align, copy)):
            raise GeobenchPickleError("numpy dtype align/copy arguments must be booleans")
        self.dtype = np.dtype(code)

    def __setstate__(self, state: Any) -> None:
        dt = getattr(self, "dtype", None)
        if getattr(self, "_state_set", False):
            raise GeobenchPickleError("numpy dtype state set twice")
        self._state_set = True
        if dt is None or not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise GeobenchPickleError("numpy dtype state is not the state of a plain numeric dtype")
        order, subarray, names, fields, elsize, alignment, flags = state[1:8]
        canonical = (subarray is None and names is None and fields is None and flags == 0 and
                     type(elsize) is int and elsize in (-1, dt.itemsize) and
                     type(alignment) is int and alignment in (-1, dt.alignment) and
                     (len(state) == 8 or state[8] is None))
        if not canonical or order not in ("<", ">", "=", "|") or (order == "|") != (dt.itemsize == 1 or
                                                                                       dt.kind == "b"):
            raise GeobenchPickleError(f"numpy dtype state {state!r:.200} is not the canonical state of {dt}")
        self.dtype = dt if order == "|" else dt.newbyteorder(order)


def _dtype_of(value: Any) -> np.dtype:
    if not isinstance(value, SafeDtype) or not isinstance(getattr(value, "dtype", None), np.dtype):
        raise GeobenchPickleError(f"expected a numeric numpy dtype, got {type(value).__name__}")
    return value.dtype


def _array_from_data(shape: Any, dtype: Any, data: Any, order: str = "C") -> np.ndarray:
    """A fresh array from (shape, numeric dtype, raw bytes of exactly the right length)."""
    dt = _dtype_of(dtype)
    if isinstance(shape, int) and type(shape) is not bool:
        shape = (shape,)
    if not isinstance(shape, tuple) or len(shape) > _MAX_NDIM or \
            not all(type(d) is int and d >= 0 for d in shape):
        raise GeobenchPickleError(f"numpy array shape must be a tuple of at most {_MAX_NDIM} non-negative ints")
    if isinstance(data, bytearray):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise GeobenchPickleError(f"numpy array data must be bytes, got {type(data).__name__} (object arrays are "
                                  "not allowed)")
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise GeobenchPickleError(f"numpy array data has {len(data)} bytes, shape {shape} of {dt} needs {expected}")
    if order not in ("C", "F"):
        raise GeobenchPickleError(f"numpy array order must be 'C' or 'F', got {order!r:.20}")
    return np.frombuffer(data, dtype=dt).reshape(shape, order=order).copy(order=order)


class PendingArray:
    """What numpy's ``_reconstruct(ndarray, ...)`` yields; its pickled state ``(version, shape, dtype, fortran,
    data)`` is turned into a real array by ``_array_from_data`` (``array``), swapped in after loading."""

    def __init__(self, cls: Any = None, shape: Any = None, typecode: Any = None):
        if cls is not _NdarrayName:
            raise GeobenchPickleError("numpy _reconstruct is only allowed for numpy.ndarray")
        self.array: Optional[np.ndarray] = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5) or getattr(self, "array", 1) is not None:
            raise GeobenchPickleError("numpy array state must be (version, shape, dtype, is_fortran, data), once")
        if len(state) == 5 and state[0] != 1:
            raise GeobenchPickleError(f"numpy array state version {state[0]!r:.20} is not 1")
        shape, dtype, fortran, data = state[-4:]
        if not isinstance(fortran, bool):
            raise GeobenchPickleError("numpy array is_fortran flag must be a bool")
        self.array = _array_from_data(shape, dtype, data, "F" if fortran else "C")


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's protocol-5 ``_frombuffer``, from plain data."""
    return _array_from_data(shape, dtype, buf, order)


def _scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's ``scalar(dtype, bytes)``; object scalars are refused."""
    return _array_from_data((), dtype, data)[()]


# ------------------------------------------------------------------------------------- datetime, via validation
def _date(*args):
    if len(args) == 1 and isinstance(args[0], bytes) and len(args[0]) == 4:
        b = args[0]
        return _dt.date(b[0] * 256 + b[1], b[2], b[3])
    return _dt.date(*args)


def _datetime(*args):
    if args and isinstance(args[0], bytes) and len(args[0]) == 10 and len(args) <= 2:
        b = args[0]
        tz = args[1] if len(args) == 2 else None
        if tz is not None and not isinstance(tz, _dt.timezone):
            raise GeobenchPickleError("datetime tzinfo must be a datetime.timezone")
        return _dt.datetime(b[0] * 256 + b[1], b[2] & 0x7F, b[3], b[4], b[5], b[6], (b[7] << 16) | (b[8] << 8) | b[9],
                            tz, fold=int(b[2] > 127))
    if len(args) > 7:
        raise GeobenchPickleError("datetime with a tzinfo argument is only allowed in its pickled form")
    return _dt.datetime(*args)


def _timezone(offset: Any, name: Any = None):
    if not isinstance(offset, _dt.timedelta) or (name is not None and not isinstance(name, str)):
        raise GeobenchPickleError("datetime.timezone needs a timedelta offset and an optional str name")
    return _dt.timezone(offset) if name is None else _dt.timezone(offset, name)


def _numpy_names() -> Dict[tuple, Any]:
    out: Dict[tuple, Any] = {("numpy", "ndarray"): _NdarrayName, ("numpy", "dtype"): SafeDtype}
    for pkg in ("numpy._core", "numpy.core"):  # numpy >= 2 and numpy 1.x module names
        out[(f"{pkg}.multiarray", "_reconstruct")] = PendingArray
        out[(f"{pkg}.multiarray", "scalar")] = _scalar
        out[(f"{pkg}.numeric", "_frombuffer")] = _frombuffer
    return out


class SafeGeobenchUnpickler(pickle._Unpickler):
    """Unpickler that only resolves GEO-Bench records, datetime, numpy data and plain builtins.

    Built on the pure-Python unpickler: the C one sizes its memo table from the index a pickle names
    (``LONG_BINPUT 2**31`` allocates and clears tens of GB), the Python one keeps the memo in a dict. Its one
    length-first allocation (``BYTEARRAY8``) is replaced by a read of the bytes actually present.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_bytearray8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)  # returns at most what the file holds
        if len(data) != size:
            raise GeobenchPickleError(f"BYTEARRAY8 of {size} bytes, but only {len(data)} remain")
        self.append(bytearray(data))

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    _ALLOWED = {
        ("datetime", "date"): _date, ("datetime", "datetime"): _datetime,
        ("datetime", "timedelta"): _dt.timedelta, ("datetime", "timezone"): _timezone,
        ("builtins", "object"): object,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
        ("builtins", "bytes"): _bytes,
        ("collections", "OrderedDict"): OrderedDict,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("_codecs", "encode"): _latin1_encode,
        ("affine", "Affine"): AffineRecord,
        ("rasterio.crs", "CRS"): CrsRecord, ("rasterio.crs", "CRS.from_wkt"): _crs_from,
        ("rasterio.crs", "CRS.from_dict"): _crs_from, ("rasterio.crs", "CRS.from_epsg"): _crs_from,
        **_numpy_names(),
    }

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if module.split(".")[0] in _GEOBENCH_PACKAGES and name in KNOWN_GEOBENCH_CLASSES:
            return _record_type(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise GeobenchPickleError(
            f"Refusing to unpickle '{module:.100}.{name:.100}' in {self.source}: only known GEO-Bench classes "
            f"({', '.join(sorted(KNOWN_GEOBENCH_CLASSES))}), datetime and numpy array types are allowed")

    def persistent_load(self, pid):
        raise GeobenchPickleError(f"persistent ids are not allowed in {self.source}")


def _finalize(obj: Any, memo: Dict[int, Any]) -> Any:
    """Swap ``PendingArray``/``SafeDtype`` stand-ins for real numpy objects throughout the loaded structure."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, PendingArray):
        if obj.array is None:
            raise GeobenchPickleError("numpy array without its state")
        memo[key] = obj.array
    elif isinstance(obj, SafeDtype):
        memo[key] = _dtype_of(obj)
    elif isinstance(obj, (dict, list)):
        memo[key] = obj
        items = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
        for k, v in items:
            if isinstance(k, (PendingArray, SafeDtype)):
                raise GeobenchPickleError("numpy arrays and dtypes cannot be dict keys")
            obj[k] = _finalize(v, memo)
    elif isinstance(obj, GeobenchRecord):
        memo[key] = obj
        _finalize(obj.__dict__, memo)
    elif isinstance(obj, tuple):
        items = [_finalize(v, memo) for v in obj]
        memo[key] = obj if all(a is b for a, b in zip(items, obj)) else \
            (AffineRecord(*items) if isinstance(obj, AffineRecord) else tuple(items))
    elif isinstance(obj, (set, frozenset)):
        if any(isinstance(v, (PendingArray, SafeDtype)) for v in obj):
            raise GeobenchPickleError("numpy arrays and dtypes cannot be set members")
        memo[key] = obj
    else:
        memo[key] = obj
    return memo[key]


def safe_loads(data: bytes, source: str) -> Any:
    """Unpickle GEO-Bench bytes with ``SafeGeobenchUnpickler``; any failure raises ``GeobenchPickleError`` naming
    ``source`` (the file)."""
    if not data:
        raise GeobenchPickleError(f"{source} is empty (0 bytes): not a GEO-Bench pickle")
    try:
        return _finalize(SafeGeobenchUnpickler(io.BytesIO(data), source).load(), {})
    except Exception as e:  # malformed pickles fail in many ways (EOFError, KeyError, TypeError, ...)
        msg = str(e)[:500]
        if isinstance(e, GeobenchPickleError) and source in msg:
            raise
        raise GeobenchPickleError(f"Cannot unpickle {source}: {type(e).__name__}: {msg}") from e


def decode_attr_pickle(raw: Any, source: str) -> Dict[str, Any]:
    """The ``pickle`` HDF5 attribute: ``str(pickle.dumps(d))`` (GEO-Bench) or raw bytes, as a dict."""
    import ast

    if isinstance(raw, (np.ndarray, np.void)):
        if isinstance(raw, np.ndarray) and raw.dtype.kind not in "SVu" and raw.dtype != np.uint8:
            raise ValueError(f"Attribute 'pickle' of {source} has unexpected dtype {raw.dtype}")
        raw = raw.tobytes()
    if isinstance(raw, str):
        if not raw.startswith(("b'", 'b"')):
            raise ValueError(f"Attribute 'pickle' of {source} is not a bytes literal (starts {raw[:20]!r})")
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise ValueError(f"Attribute 'pickle' of {source} is not a bytes literal: {e}") from e
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"Attribute 'pickle' of {source} has unexpected type {type(raw).__name__}")
    out = safe_loads(bytes(raw), source)
    if not isinstance(out, dict):
        raise ValueError(f"Attribute pickle of {source} is a {type(out).__name__}, expected a dict")
    return out
