"""SatlasPretrain tar shards (`satl_webdataset`): views equal to the PNG reader's resized views, endless seeded
streams, streaming from an S3 server on 127.0.0.1, and a pretraining loader over the augmentation."""
import numpy as np
import pytest
import torch
import yaml

import data_fixtures as fx
from servers import s3_server

from dinov2.data.datasets.satlas import LAYOUT, SENSOR_DIR, SatlasDataset
from dinov2.data.datasets.satlas_wds import SatlasShards, footprint_members
from dinov2.data.io import read_png_chw
from dinov2.data.loaders import make_data_loader, make_dataset

SENSORS = ("s2", "s1", "landsat")


def _acquisition(root, tid, sensor, folder) -> np.ndarray:
    """All bands of one acquisition from the PNGs, resized (nearest: the fixture's bands are constant) to the
    largest band, as the shard builder stores them."""
    import torch.nn.functional as F

    bands = []
    for sub, _ in LAYOUT[sensor]:
        bands += list(read_png_chw(f"{root}/satlas/{SENSOR_DIR[sensor]}/{folder}/{sub}/{tid}.png"))
    size = max(b.shape for b in bands)
    return np.stack([b if b.shape == size else F.interpolate(torch.tensor(b)[None, None].float(), size=size)
                     [0, 0].numpy().astype(np.uint8) for b in bands])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import webdataset as wds

    root = tmp_path_factory.mktemp("satlas")
    info = fx.write_satlas(str(root), n=5)
    folder = root / "satlas_wds"
    folder.mkdir()
    counts = {}
    for k, rows in enumerate((info["rows"][:3], info["rows"][3:])):
        name = f"satlas-{k:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for row in rows:
                views = {s: _acquisition(root, row["id"], s, t) for s, t in zip(row["sensor"], row["time"])}
                sink.write(footprint_members(views, row["id"]))
        counts[name] = len(rows)
    (folder / "dataset.yaml").write_text(yaml.safe_dump({"nsamples_per_shard": counts}))
    torch.save({s: {"mean": torch.zeros(1), "std": torch.ones(1)} for s in SENSORS}, folder / "dataset.pt")
    return root, folder, info


def test_views_equal_the_png_reader(shards):
    root, folder, info = shards
    png = SatlasDataset(root=f"{root}/satlas", metadata_path=f"{root}/{fx.SATLAS_META}", num_sens=3, resize=True)
    stream = SatlasShards(str(folder), num_sens=3, shuffle=False, endless=False)
    assert len(stream) == 5
    samples = list(stream)
    assert len(samples) == 5
    for sample, row in zip(samples, info["rows"]):
        theirs = {tuple(v["chn_ids"][0].tolist()): v["imgs"][0] for v in png.__getitem__(info["rows"].index(row))}
        ours = {tuple(v["chn_ids"][0].tolist()): v["imgs"][0] for v in sample}
        assert set(ours) == set(theirs) and len(ours) == 3  # unique mode: the three sensors, in random order
        for ids, img in ours.items():
            assert torch.allclose(img, theirs[ids], atol=1e-6), ids


def test_endless_seeded_stream_and_errors(shards, tmp_path):
    _, folder, _ = shards
    stream = SatlasShards(str(folder), num_sens=2, get_idx_mode="replace", keep_sensors=["s1"], seed=1)
    first = [next(it) for it in [iter(stream)] for _ in range(12)]  # more than one pass: the stream goes on
    assert len(first) == 12 and all(len(s) == 2 and s[0]["chn_ids"][0].tolist() == [-1, -2] for s in first)
    with pytest.raises(ValueError, match="get_idx_mode must be one of"):
        SatlasShards(str(folder), get_idx_mode="sometimes")
    with pytest.raises(ValueError, match="3 acquisitions of sensors .* 4 views wanted"):
        next(iter(SatlasShards(str(folder), num_sens=4)))


def test_stream_from_s3_and_pretraining_loader(shards, monkeypatch):
    _, folder, _ = shards
    augm = {"id": "PanopticonAugmentation", "global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 1}
    with s3_server(folder, "satlas-shards", monkeypatch) as bucket:
        ds = make_dataset({"id": "satl_webdataset", "url": f"{bucket}/satlas-*.tar", "subset": 1,
                           "keep_sensors": ["s1", "s2"]}, pretrain_augm_cfg=augm, seed=0)
        assert ds.is_webdataset and len(ds.shards) == 1 and len(ds) in (2, 3)
        loader = make_data_loader(ds, batch_size=2, num_workers=0, collate_fn=list)
        batches = [b for _, b in zip(range(4), loader)]  # endless: as many batches as the training loop asks for
    assert len(batches) == 4 and all(len(b) == 2 for b in batches)
    crop = batches[0][0]["global_crops"][0]
    assert crop["imgs"].shape[-2:] == (16, 16) and torch.isfinite(crop["imgs"]).all()
