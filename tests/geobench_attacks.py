"""Hostile GEO-Bench inputs for the fuzz test: crafted pickles (assembled opcode by opcode) and crafted HDF5 samples.

Every builder returns ``(name, bytes)`` / writes a file; nothing here reads them (the reader under test does).
"""
from __future__ import annotations

import os
import pickle
import random
import struct
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np

NP_MODULES = ("numpy._core.multiarray", "numpy.core.multiarray")


# -------------------------------------------------------------------------------------------- opcode assembly
def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def raw(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b


def integer(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


NONE, TRUE, FALSE = b"N", b"\x88", b"\x89"


def dtype(code: str, state: Tuple[bytes, ...] = None) -> bytes:
    out = glob("numpy", "dtype") + tup(text(code), FALSE, TRUE) + b"R"
    if state is not None:
        out += tup(*state) + b"b"
    return out


def dtype_state(order: str = "<", subarray=NONE, names=NONE, fields=NONE, elsize: int = -1, align: int = -1,
                flags: int = 0) -> Tuple[bytes, ...]:
    return (integer(3), text(order), subarray, names, fields, integer(elsize), integer(align), integer(flags))


def array(shape, dt: bytes, data: bytes, fortran: bool = False, module: str = NP_MODULES[0],
          version: int = 1) -> bytes:
    head = glob(module, "_reconstruct") + tup(glob("numpy", "ndarray"), tup(integer(0)), raw(b"b")) + b"R"
    return head + tup(integer(version), tup(*map(integer, shape)), dt, TRUE if fortran else FALSE, data) + b"b"


def attr_dict(value: bytes, label: int = 1) -> bytes:
    """A protocol-4 attribute dict ``{'label': label, 'x': <value>}``."""
    return b"\x80\x04}" + text("label") + integer(label) + b"s" + text("x") + value + b"s."


# ----------------------------------------------------------------------------------------------- attack shapes
def attack_pickles() -> List[Tuple[str, bytes]]:
    """Named crafted pickles that must all be refused (none of them is a legitimate GEO-Bench pickle)."""
    out: List[Tuple[str, bytes]] = []
    f8 = dtype("f8", dtype_state())
    obj_ptr = struct.pack("<Q", 0x4141414141414141)
    for mod in NP_MODULES:
        # object dtype + raw bytes: the bytes would become PyObject pointers
        out.append((f"{mod}: object array from raw bytes",
                    attr_dict(array((1,), dtype("O8", dtype_state("|", flags=63)), raw(obj_ptr), module=mod))))
        # object dtype with a list state (numpy would store arbitrary objects)
        out.append((f"{mod}: object array from a list",
                    attr_dict(array((1,), dtype("O8", dtype_state("|", flags=63)), b"]" + integer(7) + b"a",
                                    module=mod))))
        # float dtype whose state claims it holds object references (forged flags)
        out.append((f"{mod}: float dtype with forged refcount flags",
                    attr_dict(array((1,), dtype("f8", dtype_state(flags=63)), raw(obj_ptr), module=mod))))
        # float dtype state with a huge element size: numpy would read past the 8 given bytes
        out.append((f"{mod}: dtype elsize forged (heap over-read)",
                    attr_dict(array((4,), dtype("f8", dtype_state(elsize=1 << 20)), raw(b"\0" * 8), module=mod))))
        out.append((f"{mod}: dtype alignment forged",
                    attr_dict(array((1,), dtype("f8", dtype_state(align=3)), raw(b"\0" * 8), module=mod))))
        out.append((f"{mod}: dtype with forged fields",
                    attr_dict(array((1,), dtype("f8", dtype_state(
                        names=tup(text("a")), fields=b"}" + text("a") + tup(dtype("O8"), integer(0)) + b"s")),
                        raw(obj_ptr), module=mod))))
        out.append((f"{mod}: dtype with forged subarray",
                    attr_dict(array((1,), dtype("f8", dtype_state(subarray=tup(dtype("O8"), tup(integer(1))))),
                                    raw(obj_ptr), module=mod))))
        # shape larger than the data: numpy would read out of bounds
        out.append((f"{mod}: short data for shape", attr_dict(array((1000,), f8, raw(b"\0" * 8), module=mod))))
        out.append((f"{mod}: long data for shape", attr_dict(array((1,), f8, raw(b"\0" * 16), module=mod))))
        out.append((f"{mod}: negative shape", attr_dict(array((-1,), f8, raw(b""), module=mod))))
        out.append((f"{mod}: array state version 2", attr_dict(array((1,), f8, raw(b"\0" * 8), module=mod,
                                                                      version=2))))
        out.append((f"{mod}: _reconstruct of a non-ndarray class",
                    attr_dict(glob(mod, "_reconstruct") + tup(glob("builtins", "set"), tup(integer(0)), raw(b"b"))
                              + b"R")))
        out.append((f"{mod}: scalar of object dtype",
                    attr_dict(glob(mod, "scalar") + tup(dtype("O8", dtype_state("|", flags=63)), raw(obj_ptr))
                              + b"R")))
        out.append((f"{mod}: scalar with short data",
                    attr_dict(glob(mod, "scalar") + tup(f8, raw(b"\0" * 3)) + b"R")))
        numeric = mod.replace("multiarray", "numeric")
        out.append((f"{numeric}: _frombuffer object dtype",
                    attr_dict(glob(numeric, "_frombuffer") + tup(b"\x96" + struct.pack("<Q", 8) + obj_ptr,
                                                               dtype("O8"), tup(integer(1)), text("C")) + b"R")))
        out.append((f"{numeric}: _frombuffer wrong length",
                    attr_dict(glob(numeric, "_frombuffer") + tup(raw(b"\0" * 4), f8, tup(integer(64)), text("C"))
                              + b"R")))
    for code in ("O8", "O", "V8", "U4", "S4", "M8[s]", "m8", "f8,f8", "(2,)f8", "i8" * 40):
        out.append((f"numpy.dtype({code!r})", attr_dict(dtype(code, dtype_state("|")))))
    out.append(("numpy.dtype state tuple too short", attr_dict(dtype("f8", (integer(3), text("<"))))))
    out.append(("numpy.dtype state twice", attr_dict(dtype("f8", dtype_state()) + tup(*dtype_state()) + b"b")))
    out.append(("numpy.ndarray called directly", attr_dict(glob("numpy", "ndarray") + tup(tup(integer(4))) + b"R")))
    out.append(("numpy.dtypes.ObjectDType", attr_dict(glob("numpy.dtypes", "ObjectDType") + tup() + b"R")))
    out.append(("numpy.frombuffer", attr_dict(glob("numpy", "frombuffer") + tup(raw(obj_ptr), text("O")) + b"R")))
    # classic code-execution payloads
    for mod, name, arg in [("os", "system", "echo pwned"), ("posix", "system", "echo pwned"),
                           ("builtins", "eval", "__import__('os').system('echo pwned')"),
                           ("builtins", "exec", "import os"), ("__builtin__", "eval", "1"),
                           ("subprocess", "Popen", "echo"), ("builtins", "__import__", "os"),
                           ("builtins", "getattr", "x"), ("builtins", "open", "/etc/passwd"),
                           ("io", "open", "/etc/passwd"), ("pickle", "loads", "x"), ("torch", "load", "x"),
                           ("numpy", "load", "/etc/passwd"), ("numpy.testing._private.utils", "runstring", "1"),
                           ("geobench.dataset", "Evil", "x"), ("ccb.io", "load", "x")]:
        out.append((f"REDUCE {mod}.{name}", attr_dict(glob(mod, name) + tup(text(arg)) + b"R")))
        out.append((f"top-level REDUCE {mod}.{name}", b"\x80\x02" + glob(mod, name) + tup(text(arg)) + b"R."))
    out.append(("INST os.system", b"(" + text("echo pwned") + b"ios\nsystem\n."))
    out.append(("OBJ builtins.eval", b"(" + glob("builtins", "eval") + text("1") + b"o."))
    out.append(("STACK_GLOBAL os.system", b"\x80\x04" + text("os") + text("system") + b"\x93" + tup(text("x"))
                + b"R."))
    out.append(("copyreg._reconstructor of a numpy stand-in",
                attr_dict(glob("copyreg", "_reconstructor") + tup(glob("numpy", "dtype"), glob("builtins", "object"),
                                                                  NONE) + b"R" + tup(*dtype_state()) + b"b")))
    out.append(("copyreg._reconstructor with base set",
                attr_dict(glob("copyreg", "_reconstructor") + tup(glob("geobench.task", "TaskSpecifications"),
                                                                  glob("builtins", "set"), NONE) + b"R")))
    out.append(("record state with non-str keys",
                attr_dict(glob("geobench.task", "TaskSpecifications") + tup() + b"R" + b"}" + integer(1)
                          + integer(2) + b"sb")))
    out.append(("_codecs.encode to another codec", attr_dict(glob("_codecs", "encode") + tup(text("x"),
                                                                                            text("rot13")) + b"R")))
    out.append(("persistent id", attr_dict(text("pid") + b"Q")))
    out.append(("out-of-band buffer", attr_dict(b"\x97")))
    out.append(("empty", b""))
    out.append(("only STOP", b"."))
    out.append(("deep nesting", b"\x80\x04" + b"]" * 200000 + b"a" * 199999 + b"}" + b"."))
    out.append(("huge BINBYTES8 length", attr_dict(b"\x8e" + struct.pack("<Q", 1 << 60) + b"abc")))
    out.append(("huge LONG4 length", attr_dict(b"\x8b" + struct.pack("<i", 1 << 30) + b"\x01")))
    out.append(("MEMOIZE/GET of unknown index", attr_dict(b"h\x05")))
    out.append(("datetime.date with day 99", attr_dict(glob("datetime", "date") + tup(raw(b"\x07\xe4\x01\x63"))
                                                       + b"R")))
    out.append(("datetime.datetime with hour 99", attr_dict(glob("datetime", "datetime") + tup(
        raw(b"\x07\xe4\x01\x01\x63\x00\x00\x00\x00\x00")) + b"R")))
    out.append(("datetime with a non-timezone tzinfo", attr_dict(glob("datetime", "datetime") + tup(
        raw(b"\x07\xe4\x01\x01\x00\x00\x00\x00\x00\x00"), glob("geobench.task", "Stats") + tup() + b"R") + b"R")))
    return out


def valid_pickles() -> List[Tuple[str, bytes]]:
    """Legitimate attribute-dict pickles (protocols 0-5) holding numpy arrays/scalars, datetimes and records."""
    import datetime

    d = {"label": 1, "arr": np.arange(6, dtype=np.int16).reshape(2, 3), "f": np.asfortranarray(np.ones((2, 2))),
         "be": np.arange(3, dtype=">u2"), "n": np.float32(2.5), "b": np.bool_(True), "dt": np.dtype("f4"),
         "date": datetime.date(2020, 6, 1),
         "ts": datetime.datetime(2020, 6, 1, 10, 30, 5, 123, tzinfo=datetime.timezone.utc),
         "dur": datetime.timedelta(days=2), "ids": {1, 2}, "empty": np.zeros((0, 3), np.float32)}
    return [(f"valid protocol {p}", pickle.dumps(d, protocol=p)) for p in range(0, 6)]


def mutate(data: bytes, rng: random.Random, donors: List[bytes]) -> bytes:
    """One random mutation: byte flips, insertions, deletions, truncation, or a splice from another pickle."""
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        pos = rng.randrange(len(b))
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 2:
        pos = rng.randrange(len(b))
        del b[pos:pos + rng.randint(1, 16)]
    elif kind == 3:
        b = b[:rng.randrange(len(b))]
    elif kind == 4:
        donor = rng.choice(donors)
        start = rng.randrange(len(donor))
        pos = rng.randrange(len(b))
        b[pos:pos] = donor[start:start + rng.randint(2, 64)]
    else:  # swap a dtype code for a dangerous or different one
        for old in (b"i2", b"f8", b"u2", b"f4", b"<", b"int16", b"float64"):
            if old in b:
                new = rng.choice([b"O8", b"V8", b"O", b"f4", b"c16", b"U1", b"i8"])[:len(old)].ljust(len(old), b"8")
                i = b.index(old)
                b[i:i + len(old)] = new
                break
    return bytes(b)


def mutated_pickles(n: int, seed: int = 0) -> List[Tuple[str, bytes]]:
    rng = random.Random(seed)
    bases = [p for _, p in valid_pickles()] + [p for _, p in attack_pickles()[:12]]
    return [(f"mutation {i}", mutate(rng.choice(bases), rng, bases)) for i in range(n)]


def truncations(data: bytes, n: int, seed: int = 1) -> List[Tuple[str, bytes]]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(data)), min(n, len(data))))
    return [(f"truncated at {c}/{len(data)}", data[:c]) for c in cuts]


# ------------------------------------------------------------------------------------------------ crafted HDF5
def hdf5_attacks(sample: Path, band: str, secret: Path) -> List[Tuple[str, Callable[[Path], None]]]:
    """``(name, writer)``: each writer turns a copy of a valid sample file (at the given path) into a crafted one.
    ``band`` is a band dataset the reader needs; ``secret`` is a local file no sample may read."""
    import h5py

    shape = h5py.File(sample, "r")[band].shape

    def replace(make):
        def write(path: Path) -> None:
            with h5py.File(path, "a") as fp:
                del fp[band]
                make(fp, path)
        return write

    def external(fp, path):
        fp.create_dataset(band, shape=shape, dtype="f4", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])

    def virtual(fp, path):
        src = path.with_name(path.stem + "_src.h5")
        with h5py.File(src, "w") as s:
            s.create_dataset("d", data=np.ones(shape, np.float32))
        layout = h5py.VirtualLayout(shape=shape, dtype="f4")
        layout[...] = h5py.VirtualSource(str(src), "d", shape=shape)
        fp.create_virtual_dataset(band, layout)

    def ext_link(fp, path):
        src = path.with_name(path.stem + "_other.h5")
        with h5py.File(src, "w") as s:
            s.create_dataset("d", data=np.ones(shape, np.float32))
        fp[band] = h5py.ExternalLink(str(src), "d")

    def soft_link(fp, path):
        fp.create_dataset("elsewhere", data=np.ones(shape, np.float32))
        fp[band] = h5py.SoftLink("/elsewhere")

    def set_attr(value):
        def write(path: Path) -> None:
            with h5py.File(path, "a") as fp:
                if value is None:
                    del fp.attrs["pickle"]
                else:
                    fp.attrs["pickle"] = value
        return write

    def set_pickle(obj):
        return set_attr(str(pickle.dumps(obj)))

    ref_dtype = h5py.special_dtype(ref=h5py.Reference)
    return [
        ("external storage reading a local file", replace(external)),
        ("virtual dataset mapping another file", replace(virtual)),
        ("external link to another file", replace(ext_link)),
        ("soft link", replace(soft_link)),
        ("band is a group", replace(lambda fp, p: fp.create_group(band))),
        ("string band", replace(lambda fp, p: fp.create_dataset(band, data=np.array([b"ab"] * 4)))),
        ("vlen string band", replace(lambda fp, p: fp.create_dataset(band, data=["x", "y"],
                                                                     dtype=h5py.string_dtype()))),
        ("compound band", replace(lambda fp, p: fp.create_dataset(band, shape=shape,
                                                                  dtype=np.dtype([("a", "f4"), ("b", "i4")])))),
        ("object reference band", replace(lambda fp, p: fp.create_dataset(band, shape=(2,), dtype=ref_dtype))),
        ("huge declared band (never written)", replace(lambda fp, p: fp.create_dataset(
            band, shape=(200000, 200000), dtype="f4", chunks=(64, 64)))),
        ("1-D band", replace(lambda fp, p: fp.create_dataset(band, data=np.ones(16, np.float32)))),
        ("4-D band", replace(lambda fp, p: fp.create_dataset(band, data=np.ones((1, 1, 4, 4), np.float32)))),
        ("scalar band", replace(lambda fp, p: fp.create_dataset(band, data=np.float32(1)))),
        ("empty band", replace(lambda fp, p: fp.create_dataset(band, shape=(0, 0), dtype="f4"))),
        ("null-shape band", replace(lambda fp, p: fp.create_dataset(band, data=h5py.Empty("f4")))),
        ("no pickle attribute", set_attr(None)),
        ("pickle attribute is an int", set_attr(7)),
        ("pickle attribute is float data", set_attr(np.ones(8))),
        ("pickle attribute is Python source", set_attr("__import__('os').system('echo pwned')")),
        ("pickle attribute is a broken literal", set_attr("b'\\x80\\x04")),
        ("pickle attribute is an os.system pickle", set_attr(str(b"cos\nsystem\n(Vecho pwned\ntR."))),
        ("label out of range", set_pickle({"label": 10 ** 6})),
        ("label is a string", set_pickle({"label": "3"})),
        ("label is a float", set_pickle({"label": 1.5})),
        ("label is a list", set_pickle({"label": [1, 2]})),
        ("attribute pickle is a list", set_pickle([1, 2])),
    ]


def corrupt_file(path: Path, rng: random.Random) -> str:
    """Damage a file in place: truncate it, or overwrite a few bytes in its first 4 KiB (the HDF5 metadata)."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.4:
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated at {cut}/{len(data)}"
    positions = [rng.randrange(min(len(data), 4096)) for _ in range(rng.randint(1, 3))]
    for p in positions:
        data[p] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return f"bytes overwritten at {positions}"


def copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    os.chmod(dst, 0o644)
    return dst
