"""Search at scale: the usearch (HNSW) index of `panopticon index` against exact search.

Part 1 (in process): N clustered synthetic 768-d vectors (default 1M): build time, index size on disk, resident
memory of a process serving queries from the memory-mapped index, query latency p50/p99 and recall@10 against
exact (brute-force cosine) top-10 — for a few `expansion_search` values.

Part 2 (the command): an embed output folder of M chips (default 200k) in the real chip-table layout (one
GeoParquet part per scene), then `panopticon search OUT --chip-id ... -k 10` timed end to end with the index and
with --exact, and the overlap of their top-10.

    python benchmarks/search_scale.py                      # 1M vectors, 200k-chip folder
    python benchmarks/search_scale.py --n 100000 --m 20000 # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def clustered(n: int, d: int = 768, clusters: int = 2000, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres (embeddings of places cluster by land cover)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        x = centres[rng.integers(0, clusters, b - a)] + spread / np.sqrt(d) * rng.normal(size=(b - a, d))
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    best = np.zeros((len(q), 0), np.int64)
    best_s = np.zeros((len(q), 0), np.float32)
    for a in range(0, len(x), 200_000):
        s = q @ x[a:a + 200_000].T
        idx = np.concatenate([best, np.argpartition(-s, k - 1, axis=1)[:, :k] + a], axis=1)
        sc = np.concatenate([best_s, np.take_along_axis(s, idx[:, best.shape[1]:] - a, axis=1)], axis=1)
        top = np.argsort(-sc, axis=1)[:, :k]
        best, best_s = np.take_along_axis(idx, top, axis=1), np.take_along_axis(sc, top, axis=1)
    return best


def rss_mb(pid: int = 0) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


SERVE = """
import json, sys, time, numpy as np
from usearch.index import Index
path, qfile, ef = sys.argv[1], sys.argv[2], int(sys.argv[3])
idx = Index.restore(path, view=True); idx.expansion_search = ef
q = np.load(qfile); lat = []; keys = []
for v in q:
    t = time.perf_counter(); m = idx.search(v, 10, threads=1); lat.append(time.perf_counter() - t)
    keys.append(np.asarray(m.keys).tolist())
rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
print(json.dumps({"lat": lat, "keys": keys, "rss": rss}))
"""


def part1(n: int, queries: int, dtype: str, conn: int, efs, tmp: str) -> None:
    from dinov2.inference.index import load_usearch

    Index = load_usearch()

    x = clustered(n)
    rng = np.random.default_rng(1)
    q = x[rng.choice(n, queries, replace=False)] + 0.05 / np.sqrt(768) * rng.normal(size=(queries, 768))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    t = time.perf_counter()
    truth = exact_topk(x, q, 10)
    t_exact = (time.perf_counter() - t) / queries
    idx = Index(ndim=768, metric="cos", dtype=dtype, connectivity=conn, expansion_add=128)
    t = time.perf_counter()
    idx.add(np.arange(n, dtype=np.uint64), x)
    build = time.perf_counter() - t
    path = os.path.join(tmp, "bench.usearch")
    idx.save(path)
    del idx, x
    qfile = os.path.join(tmp, "q.npy")
    np.save(qfile, q)
    print(f"\n## usearch HNSW, {n:,} clustered 768-d vectors, dtype {dtype}, M={conn}, efConstruction=128")
    print(f"build {build:.0f} s ({n / build:,.0f} vectors/s), index file {os.path.getsize(path) / 2**20:,.0f} MiB, "
          f"exact search {t_exact * 1e3:.0f} ms/query (numpy, in memory)\n")
    print("| expansion_search | recall@10 | p50 ms | p99 ms | serving RSS MiB |")
    print("|---|---|---|---|---|")
    for ef in efs:
        res = json.loads(subprocess.run([sys.executable, "-c", SERVE, path, qfile, str(ef)], capture_output=True,
                                        text=True, check=True).stdout)
        rec = np.mean([len(set(k) & set(t.tolist())) / 10 for k, t in zip(res["keys"], truth)])
        lat = np.asarray(res["lat"][5:]) * 1e3  # the first queries fault the mapped pages in
        print(f"| {ef} | {rec:.3f} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} | "
              f"{res['rss']:.0f} |")


def synthetic_output(out: str, m: int, per_scene: int = 10_000) -> None:
    """An embed output folder of `m` chips in the real layout (internal scene tables -> published parts)."""
    import pyarrow as pa
    import shapely

    from dinov2.inference.chips_table import write_chip_part
    from dinov2.inference.writers import write_table

    x = clustered(m, seed=2)
    work = os.path.join(out, ".embed")
    os.makedirs(work, exist_ok=True)
    for s, a in enumerate(range(0, m, per_scene)):
        n = min(per_scene, m - a)
        side = int(np.ceil(np.sqrt(n)))
        r, c = np.divmod(np.arange(n), side)
        x0, y0 = 500000.0 + 3000 * side * s + 2240 * c, 5000000.0 - 2240 * r
        lon, lat = 9 + (x0 - 500000) / 79000, 45.1 - (5000000 - y0) / 111000
        name = f"scene{s:03d}"
        cols = {"chip_id": [f"{name}:r{i}c{j}" for i, j in zip(r, c)], "scene": [name] * n,
                "chip_row": r, "chip_col": c, "row_px": r * 224, "col_px": c * 224, "height_px": [224] * n,
                "width_px": [224] * n, "valid_fraction": [1.0] * n, "n_valid_patches": [256] * n,
                "footprint_wkb": list(shapely.to_wkb(shapely.box(x0, y0 - 2240, x0 + 2240, y0))),
                "bbox_wgs84": [{"xmin": a1, "ymin": b1 - 0.02, "xmax": a1 + 0.028, "ymax": b1} for a1, b1 in
                               zip(lon, lat)], "lon": lon + 0.014, "lat": lat - 0.01, "sensor": ["sentinel2"] * n,
                "bands": [["B02", "B03", "B04"]] * n, "chn_ids": [[492, 559, 664]] * n,
                "source_files": [[f"/data/{name}.tif"]] * n, "datetime": ["2024-06-01T10:00:00"] * n,
                "crs": ["EPSG:32632"] * n, "cls_embedding": x[a:a + n], "mean_embedding": x[a:a + n]}
        tbl = os.path.join(work, f"{name}.chips.parquet")
        write_table(tbl, cols, {"datetime": pa.string()})
        write_chip_part(tbl, os.path.join(out, "chips.parquet", f"{name}.parquet"), "float32",
                        {"model_digest": "synthetic"})
        os.remove(tbl)


def part2(m: int, tmp: str, repeats: int) -> None:
    out = os.path.join(tmp, "out")
    synthetic_output(out, m)
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "dinov2.run.cli"]
    t = time.perf_counter()
    subprocess.run([*cmd, "index", out, "--no-progress"], check=True, env=env, capture_output=True)
    build = time.perf_counter() - t
    rng = np.random.default_rng(3)
    ids = [f"scene{rng.integers(0, m // 10_000):03d}:r{rng.integers(0, 50)}c{rng.integers(0, 50)}"
           for _ in range(repeats)]
    times, overlap = {"index": [], "exact": []}, []
    for cid in ids:
        got = {}
        for mode, extra in (("index", []), ("exact", ["--exact"])):
            csv = os.path.join(tmp, f"{mode}.csv")
            t = time.perf_counter()
            subprocess.run([*cmd, "search", out, "--chip-id", cid, "-k", "10", "--output", csv, *extra], check=True,
                           env=env, capture_output=True)
            times[mode].append(time.perf_counter() - t)
            got[mode] = [line.split(",")[0] for line in open(csv).read().splitlines()[1:]]
        overlap.append(len(set(got["index"]) & set(got["exact"])) / 10)
    size = sum(os.path.getsize(os.path.join(out, "chips.parquet", f)) for f in os.listdir(os.path.join(out,
                                                                                                     "chips.parquet")))
    print(f"\n## `panopticon search` on an output folder of {m:,} chips ({size / 2**20:,.0f} MiB of parts); "
          f"`panopticon index` took {build:.0f} s\n")
    print("| mode | median s per call | min s | top-10 overlap with --exact |")
    print("|---|---|---|---|")
    for mode in ("index", "exact"):
        print(f"| {mode} | {np.median(times[mode]):.2f} | {min(times[mode]):.2f} | "
              f"{np.mean(overlap) if mode == 'index' else 1.0:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in part 1")
    p.add_argument("--m", type=int, default=200_000, help="chips in part 2's output folder (0: skip)")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--dtype", default="f16")
    p.add_argument("--connectivity", type=int, default=16)
    p.add_argument("--ef", default="32,64,128,256", help="expansion_search values")
    p.add_argument("--repeats", type=int, default=5, help="CLI calls per mode in part 2")
    a = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if a.n:
            part1(a.n, a.queries, a.dtype, a.connectivity, [int(v) for v in a.ef.split(",")], tmp)
        if a.m:
            part2(a.m, tmp, a.repeats)


if __name__ == "__main__":
    main()
