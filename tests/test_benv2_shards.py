"""BigEarthNet-v2 tar shards: `prepare_data benv2-shards` writes the published layout from the release, and
`benv2_webdataset` reads it back equal to the raw-release reader, sample for sample, from a local folder, an HTTP
server and an S3 server (both on 127.0.0.1)."""
import io
import tarfile

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from eval_fixtures import write_benv2
from servers import LocalServer, s3_server

from dinov2.data.datasets.benv2 import BigEarthNetv2
from dinov2.data.datasets.benv2_wds import BENv2Shards
from dinov2.data.loaders import make_dataset
from dinov2.run.prepare_data import main as prepare_main

SPLITS = {"train": 7, "validation": 3, "test": 2}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("benv2")
    write_benv2(root, SPLITS, vv=-10.0, vh=-20.0)
    assert prepare_main(["benv2-shards", str(root), "--shards", "3"]) == 0
    return root


def _raw(root, split, bands):
    ds = BigEarthNetv2(str(root), split=split, bands=bands)
    return {row["patch_id"]: ds[i] for i, row in enumerate(ds.rows)}


def _check_equal(shards: BENv2Shards, raw) -> int:
    n = 0
    for x, y, pid in shards.keyed():
        rx, ry = raw[pid]
        assert torch.equal(x["imgs"], rx["imgs"]) and torch.equal(x["chn_ids"], rx["chn_ids"]), pid
        assert torch.equal(y, ry), pid
        n += 1
    return n


def test_written_layout_is_the_published_one(release):
    folder = release / "wds" / "train-all"
    assert sorted(p.name for p in folder.iterdir()) == ["dataset-000000.tar", "dataset-000001.tar",
                                                        "dataset-000002.tar", "dataset.pt", "dataset.yaml"]
    index = yaml.safe_load((folder / "dataset.yaml").read_text())
    assert index["sensor"] == "s1s2" and index["num_classes"] == 19
    assert index["nsamples_per_shard"] == {"dataset-000000.tar": 3, "dataset-000001.tar": 3,
                                           "dataset-000002.tar": 1}
    with tarfile.open(folder / "dataset-000000.tar") as tar:
        names = tar.getnames()
        img = np.load(io.BytesIO(tar.extractfile(names[0]).read()))
        label = np.load(io.BytesIO(tar.extractfile(names[1]).read()))
    assert names[0].endswith(".img.npy") and names[1] == names[0].replace(".img.npy", ".label.npy")
    assert img.dtype == np.float32 and img.shape == (14, 120, 120) and label.dtype == bool and label.sum() == 2
    assert (img[0] == -20.0).all() and (img[1] == -10.0).all()  # stored as the published builder did: VH, VV
    stats = torch.load(folder / "dataset.pt", weights_only=True)
    assert stats["mean"][:2].tolist() == pytest.approx([-19.3526, -12.6439])


@pytest.mark.parametrize("bands", ["all", "s1", "s2"])
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_shards_read_back_equal_to_the_raw_reader(release, split, bands):
    shards = BENv2Shards(str(release / "wds" / f"{split}-{bands}" / "dataset-*.tar"))
    assert len(shards) == SPLITS[split] and shards.shuffle == (split == "train")
    assert _check_equal(shards, _raw(release, split, bands)) == SPLITS[split]


def test_published_index_without_channel_names(release, tmp_path):
    """Shards from the published builder carry no 'channels' list: Sentinel-1 is taken as VH, VV."""
    import shutil

    folder = tmp_path / "test-s1"
    shutil.copytree(release / "wds" / "test-s1", folder)
    index = yaml.safe_load((folder / "dataset.yaml").read_text())
    del index["channels"]
    (folder / "dataset.yaml").write_text(yaml.safe_dump(index))
    shards = BENv2Shards(str(folder))
    x, _, pid = next(iter(shards.keyed()))
    assert x["chn_ids"].tolist() == [-1, -2] and torch.equal(x["imgs"], _raw(release, "test", "s1")[pid][0]["imgs"])


def test_subset_picks_seeded_shards_and_stream_order(release):
    url = str(release / "wds" / "train-s2" / "dataset-*.tar")
    cfg = {"id": "benv2_webdataset", "url": url, "subset": 0.34, "transform": [{"id": "Resize", "size": 32}]}
    a, b = make_dataset(cfg, seed=1), make_dataset(cfg, seed=1)
    assert a.is_webdataset and a.shards == b.shards and len(a.shards) == 1 and len(a) == a.counts[a.shards[0]]
    others = {tuple(make_dataset(cfg, seed=s).shards) for s in range(8)}
    assert len(others) > 1  # the seed decides which shards
    x, y = next(iter(a))
    assert x["imgs"].shape == (12, 32, 32) and y.shape == (19,)
    # a training stream reshuffles on every pass: same samples, new order
    train = BENv2Shards(url, seed=3, shuffle_buffer=4)
    first, second = [k for *_, k in train.keyed()], [k for *_, k in train.keyed()]
    assert sorted(first) == sorted(second) and len(first) == SPLITS["train"] and first != second


def test_shards_stream_over_http(release):
    with LocalServer(str(release)) as srv:
        base = srv.url
        shards = BENv2Shards(f"{base}/wds/test-all/dataset-{{000000..000001}}.tar")
        assert _check_equal(shards, _raw(release, "test", "all")) == SPLITS["test"]
        with pytest.raises(FileNotFoundError, match="shard index .*/wds/nope/dataset.yaml not found"):
            BENv2Shards(f"{base}/wds/nope/dataset-*.tar")
    assert any(r.method == "GET" and r.path == "/wds/test-all/dataset.yaml" for r in srv.requests)


def test_shards_stream_from_s3(release, monkeypatch):
    with s3_server(release / "wds", "benv2-shards", monkeypatch) as bucket:
        shards = BENv2Shards(f"{bucket}/validation-s2/dataset-*.tar")
        assert _check_equal(shards, _raw(release, "validation", "s2")) == SPLITS["validation"]


def test_bad_index_and_members_are_named(release, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "dataset.yaml").write_text(yaml.safe_dump({"sensor": "s3", "nsamples_per_shard": {"a.tar": 1}}))
    with pytest.raises(ValueError, match="sensor must be one of"):
        BENv2Shards(str(folder))
    (folder / "dataset.yaml").write_text("sensor: s1\n")
    with pytest.raises(ValueError, match=r"bad/dataset.yaml: expected a mapping 'nsamples_per_shard"):
        BENv2Shards(str(folder))
    with pytest.raises(ValueError, match="already holds shards"):
        prepare_main(["benv2-shards", str(release), "--splits", "test", "--bands", "s1", "--shards", "1"])


def test_shipped_benv2_task_runs_on_the_shards(release, tmp_path, monkeypatch):
    """The published 15min/saropt/benv2-sar task as shipped (10 % of the training shards, linear heads on streamed
    batches) on the shards prepare_data wrote, with a tiny model and few iterations."""
    from test_eval_engine import make_run

    from dinov2.eval.eval import main

    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    task = ROOT / "dinov2" / "configs" / "eval" / "15min" / "saropt" / "benv2-sar.yaml"
    over = {"_vars.shards": str(release / "wds"), "_vars.transform": [{"id": "Resize", "size": 16}],
            "optim.epochs": 4, "optim.dl": {"batch_size": 4, "num_workers": 0},
            "heads.n_last_blocks_list": [1], "heads.learning_rates": [0.1]}
    res = main(str(make_run(tmp_path / "run")), str(task), output_dir=str(tmp_path / "out"), device="cpu", **over)
    vals = res["15min/saropt/benv2-sar"]
    assert set(vals) == {"MulLabAvergPrec_micro", "MulLabAvergPrec_macro"}
    assert all(0.0 < v <= 100.0 for v in vals.values())
