"""Cloud and quality masks of local files (a band of the input itself, a mask file on a coarser grid; values or
bits) become no-data where the reader reads them; `--clip` crops an item to the search box. Oracles: the masks
computed here with numpy from the values written."""
import json

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from test_embed import CRS, ORIGIN, S2_BANDS, _one_thread, smooth_scene, write_tif  # noqa: E402,F401
from test_embed_remote import write_cog  # noqa: E402


def _valid(scene):
    from dinov2.inference.reader import SceneReader

    reader = SceneReader(scene)
    try:
        g = reader.grid
        return reader.read(0, 0, g.height, g.width)[1]
    finally:
        reader.close()


def _collect(inputs, **mask):
    from dinov2.inference.scene_source import MaskFlags
    from dinov2.inference.sources import ItemOptions, collect_scenes

    return collect_scenes([str(i) for i in inputs], "sentinel2", S2_BANDS, options=ItemOptions(mask=MaskFlags(**mask)))


def test_qa_band_of_the_input_with_bits(tmp_path):
    data = smooth_scene(56, 70, seed=3)
    rng = np.random.default_rng(0)
    qa = rng.integers(0, 1 << 16, (1, 56, 70)).astype(np.uint16)  # Landsat QA_PIXEL-like bit flags
    tif = write_tif(tmp_path / "stack.tif", np.concatenate([data, qa]))
    [scene] = _collect([tif], band=5, bits=(1, 3, 4))
    assert scene.bands == S2_BANDS and [c.index for c in scene.channels] == [1, 2, 3, 4]
    assert scene.mask.path == tif and scene.mask.index == 5
    flags = (qa[0] >> 1 & 1) | (qa[0] >> 3 & 1) | (qa[0] >> 4 & 1)
    np.testing.assert_array_equal(_valid(scene), flags == 0)
    with pytest.raises(ValueError, match="--mask-band 7, but the file has 5 bands"):
        _collect([tif], band=7, bits=(1,))


def test_coarser_mask_file_is_resampled_nearest(tmp_path):
    data = smooth_scene(64, 64, seed=4)
    tif = write_tif(tmp_path / "s.tif", data)
    scl = np.full((1, 32, 32), 4, np.uint8)
    scl[0, 3:9, 10:20] = 9
    scl[0, 20, 5] = 3
    mask = write_cog(tmp_path / "scl.tif", scl, res=20.0)
    [scene] = _collect([tif], file=mask, values=(3, 9))
    want = ~np.repeat(np.repeat(np.isin(scl[0], [3, 9]), 2, 0), 2, 1)
    np.testing.assert_array_equal(_valid(scene), want)


def test_mask_errors_name_the_mask(tmp_path):
    data = smooth_scene(56, 56, seed=5)
    tif = write_tif(tmp_path / "s.tif", data)
    other_crs = write_tif(tmp_path / "m_crs.tif", np.zeros((1, 56, 56), np.uint8), crs="EPSG:32633")
    small = write_tif(tmp_path / "m_small.tif", np.zeros((1, 20, 20), np.uint8))
    with pytest.raises(ValueError, match="m_crs.tif has CRS EPSG:32633"):
        _valid(_collect([tif], file=other_crs, values=(1,))[0])
    with pytest.raises(ValueError, match="m_small.tif does not cover the scene"):
        _valid(_collect([tif], file=small, values=(1,))[0])
    with pytest.raises(ValueError, match="--mask-file names the mask of one plain GeoTIFF input, and 2 were given"):
        _collect([tif, write_tif(tmp_path / "t.tif", data)], file=small, values=(1,))
    with pytest.raises(ValueError, match="--mask-asset names an asset of STAC items"):
        _collect([tif], asset="scl", values=(1,))
    with pytest.raises(ValueError, match="bit positions must be 0..63"):
        _collect([tif], band=1, bits=(64,))


def test_yaml_mask_entry(tmp_path):
    import yaml

    data = smooth_scene(56, 56, seed=6)
    qa = np.zeros((1, 56, 56), np.uint16)
    qa[0, :10] = 1 << 3  # cloud
    write_tif(tmp_path / "stack.tif", np.concatenate([data, qa]))
    (tmp_path / "scenes.yaml").write_text(yaml.safe_dump({"scenes": [
        {"sensor": "sentinel2", "file": "stack.tif", "bands": [*S2_BANDS, None], "mask": {"band": 5, "bits": [3]}}]}))
    from dinov2.inference.sources import collect_scenes

    [scene] = collect_scenes([str(tmp_path / "scenes.yaml")])
    assert scene.bands == S2_BANDS and scene.mask.index == 5
    valid = _valid(scene)
    assert not valid[:10].any() and valid[10:].all()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"scenes": [
        {"sensor": "sentinel2", "file": "stack.tif", "bands": [*S2_BANDS, None], "mask": {"band": 5, "bit": [3]}}]}))
    with pytest.raises(ValueError, match=r"bad.yaml: scene 0: mask has unknown keys \['bit'\]"):
        collect_scenes([str(tmp_path / "bad.yaml")])


def test_clip_crops_an_item_to_the_box(tmp_path):
    from rasterio.warp import transform_bounds

    from dinov2.inference.reader import SceneReader
    from dinov2.inference.sources import ItemOptions, collect_scenes
    from test_embed_remote import item_dict, write_release

    release = write_release(tmp_path / "release")
    (tmp_path / "item.json").write_text(json.dumps(item_dict(str(release))))
    # the north-west 560 m x 280 m of the 1120 m scene (a box a little inside, so whole pixels remain)
    box = transform_bounds(CRS, "EPSG:4326", ORIGIN[0] + 1, ORIGIN[1] - 279, ORIGIN[0] + 559, ORIGIN[1] - 1)
    [scene] = collect_scenes([str(tmp_path / "item.json")], options=ItemOptions(clip=box))
    reader = SceneReader(scene)
    g = reader.grid
    assert (g.left, g.top, g.width, g.height) == (ORIGIN[0], ORIGIN[1], 56, 28)  # every pixel the box touches
    arr = reader.read(0, 0, g.height, g.width)[0]
    with rasterio.open(release / "B04.tif") as src:
        np.testing.assert_array_equal(arr[2], src.read(1)[:g.height, :g.width])
    reader.close()
    far = (0.0, 0.0, 0.1, 0.1)
    [scene] = collect_scenes([str(tmp_path / "item.json")], options=ItemOptions(clip=far))
    with pytest.raises(ValueError, match="does not intersect the clip box"):
        SceneReader(scene)
