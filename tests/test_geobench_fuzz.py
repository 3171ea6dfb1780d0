"""Fuzz the GEO-Bench reader with crafted pickles and crafted HDF5 samples (tests/geobench_attacks.py).

The corpus runs in a subprocess so that a crash of the interpreter (segfault, abort, out-of-memory kill) fails the
test instead of killing pytest. Every input must be refused with an error (``ValueError`` or ``OSError``) naming the
file, or read correctly; crafted attacks must all be refused.
"""
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from conftest import ROOT

N_MUTATED_ATTR = 320
N_MUTATED_SPECS = 80
N_TRUNCATED = 40
N_CORRUPT_HDF5 = 60


def _outcome(fn, path: Path, must_refuse: bool, check=None):
    """'read' | 'refused' | a failure description."""
    try:
        out = fn()
    except (ValueError, OSError) as e:
        return "refused" if str(path) in str(e) else f"error without the file name: {type(e).__name__}: {e}"[:300]
    except BaseException as e:  # noqa: B902 - anything else (TypeError, RecursionError, ...) is a failure
        return f"unexpected {type(e).__name__}: {e}"[:300]
    if must_refuse:
        return "attack accepted"
    problem = check(out) if check else None
    return f"read but wrong: {problem}" if problem else "read"


def run_corpus(work: Path) -> dict:
    import h5py

    import geobench_attacks as ga
    from eval_fixtures import write_geobench_task

    from dinov2.data.datasets.geobench import GeobenchDataset

    root = work / "gb"
    tdir = write_geobench_task(root, "m-eurosat", {"train": 2, "valid": 1, "test": 1})
    os.environ["GEO_BENCH_DIR"] = str(root)
    ds = GeobenchDataset("m-eurosat", split="train")
    base = tdir / f"{ds.samples[0]}.hdf5"
    secret = work / "secret.bin"
    secret.write_bytes(np.full(16 * 16, 123456.0, np.float32).tobytes())
    results = []

    def record(group, name, outcome):
        results.append({"group": group, "name": name, "outcome": outcome})

    def sample_ok(out):
        imgs, label, attrs = out
        if tuple(imgs.shape) != (13, 16, 16) or not bool(imgs.isfinite().all()):
            return f"imgs {tuple(imgs.shape)}"
        if (imgs == 123456.0).any():
            return "pixels from the secret file"
        return None if isinstance(label, int) and 0 <= label < ds.num_classes else f"label {label!r}"

    # 1. attribute pickles, through the real sample reader
    attr_file = ga.copy(base, tdir / "fz_attr.hdf5")

    def read_with_attr(data: bytes):
        with h5py.File(attr_file, "a") as fp:
            fp.attrs["pickle"] = str(data)
        return lambda: ds.read_sample("fz_attr")

    for name, data in ga.attack_pickles():
        record("attack pickle", name, _outcome(read_with_attr(data), attr_file, True))
    for name, data in ga.valid_pickles():
        def valid_check(out):
            a = out[2]
            ok = (a["arr"].dtype == np.int16 and a["arr"].tolist() == [[0, 1, 2], [3, 4, 5]] and
                  a["f"].flags.f_contiguous and a["be"].dtype == np.dtype(">u2") and a["be"].tolist() == [0, 1, 2]
                  and float(a["n"]) == 2.5 and a["dt"] == np.dtype("f4") and a["empty"].shape == (0, 3)
                  and a["ts"].microsecond == 123 and a["ids"] == {1, 2} and out[1] == 1)
            return None if ok else f"decoded {a!r:.200}"
        record("valid pickle", name, _outcome(read_with_attr(data), attr_file, False, valid_check))
    for name, data in ga.mutated_pickles(N_MUTATED_ATTR, seed=0):
        record("mutated attribute pickle", name, _outcome(read_with_attr(data), attr_file, False, sample_ok))
    good_attr = h5py.File(base, "r").attrs["pickle"]
    for name, data in ga.truncations(eval(good_attr), N_TRUNCATED):  # noqa: S307 - our own bytes literal
        record("truncated attribute pickle", name, _outcome(read_with_attr(data), attr_file, True))

    # 2. task_specs.pkl, through the dataset constructor
    specs_path = tdir / "task_specs.pkl"
    good_specs = specs_path.read_bytes()

    def construct(data: bytes):
        specs_path.write_bytes(data)
        return lambda: GeobenchDataset("m-eurosat", split="train")

    for name, data in ga.attack_pickles()[:40] + ga.truncations(good_specs, 20, seed=2):
        record("attack task_specs.pkl", name, _outcome(construct(data), specs_path, True))
    rng = random.Random(3)
    for i in range(N_MUTATED_SPECS):
        data = ga.mutate(good_specs, rng, [good_specs])
        record("mutated task_specs.pkl", f"mutation {i}",
               _outcome(construct(data), specs_path, False, lambda d: None if len(d.band_names) == 13 else "bands"))
    specs_path.write_bytes(good_specs)

    # 3. crafted HDF5 samples
    for i, (name, write) in enumerate(ga.hdf5_attacks(base, ds.band_names[3], secret)):
        path = ga.copy(base, tdir / f"fz_h5_{i}.hdf5")
        write(path)
        record("crafted HDF5", name, _outcome(lambda: ds.read_sample(path.stem), path, True))
    rng = random.Random(4)
    for i in range(N_CORRUPT_HDF5):
        path = ga.copy(base, tdir / f"fz_bad_{i}.hdf5")
        name = ga.corrupt_file(path, rng)
        record("corrupted HDF5", name, _outcome(lambda: ds.read_sample(path.stem), path, False, sample_ok))
    for name, content in [("empty file", b""), ("not HDF5", b"hello world" * 10)]:
        path = tdir / f"fz_{name.replace(' ', '_')}.hdf5"
        path.write_bytes(content)
        record("crafted HDF5", name, _outcome(lambda: ds.read_sample(path.stem), path, True))
    return {"results": results}


def test_geobench_reader_fuzz(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"reader process died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    results = json.loads((tmp_path / "fuzz.json").read_text())["results"]
    failures = [r for r in results if r["outcome"] not in ("read", "refused")]
    assert not failures, failures[:20]
    by_group = Counter(r["group"] for r in results)
    outcomes = Counter((r["group"], r["outcome"]) for r in results)
    print(json.dumps({f"{g} / {o}": n for (g, o), n in sorted(outcomes.items())}, indent=1))
    assert by_group["attack pickle"] >= 90 and by_group["crafted HDF5"] >= 28
    assert sum(by_group.values()) >= 600
    assert outcomes[("valid pickle", "read")] == 6  # legitimate pickles of every protocol still decode exactly
    for group in ("attack pickle", "crafted HDF5", "attack task_specs.pkl", "truncated attribute pickle"):
        assert outcomes[(group, "refused")] == by_group[group]
    # the mutation fuzz is neither all-refused nor all-read (damaged pixel data or metadata values still read)
    mutated = ("mutated attribute pickle", "mutated task_specs.pkl", "corrupted HDF5")
    assert sum(outcomes[(g, "refused")] for g in mutated) > 100 and sum(outcomes[(g, "read")] for g in mutated) > 10


if __name__ == "__main__":
    work_dir = Path(sys.argv[1])
    (work_dir / "fuzz.json").write_text(json.dumps(run_corpus(work_dir)))
