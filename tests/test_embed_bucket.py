"""`panopticon embed --output-dir s3://...` against moto's S3 server on 127.0.0.1: outputs equal a local run's, a
part or COG appears in the bucket only when whole, resume and skip read the markers in the bucket (after a kill,
and from a fresh work folder), a second run on the same URL is refused, and `index` / `search` work on the
bucket."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")
boto3 = pytest.importorskip("boto3")

from servers import s3_server  # noqa: E402
from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_resume_dist import ROOT, _env, _same_outputs, kill_after_strips  # noqa: E402

BUCKET = "emb-out"


def _args(inputs, run, out, *extra, progress=False):
    return [*map(str, inputs), "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", str(run),
            "--chip-size", "56", "--overlap", "14", "--batch-size", "2", "-o", str(out), *map(str, extra),
            *([] if progress else ["--no-progress"])]


def _objects(prefix):
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: o["ETag"] for o in listed}


def _download(prefix, folder):
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key in _objects(prefix):
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, f"{prefix}/{key}", str(path))
    return folder


def _embed(*args):
    from dinov2.run.embed import main

    assert main(list(args)) == 0


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("PANOPTICON_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with s3_server(tmp_path / "empty", BUCKET, monkeypatch) as url:
        yield url


def test_outputs_in_the_bucket_equal_a_local_run_and_resume_reads_the_bucket(tmp_path, bucket):
    run = write_run(tmp_path / "run")
    a = write_tif(tmp_path / "a.tif", smooth_scene(56, 112, seed=1))
    b = write_tif(tmp_path / "b.tif", smooth_scene(70, 56, seed=2))
    long = write_tif(tmp_path / "long.tif", smooth_scene(1260, 140, seed=5))  # 30 strips: time to kill it
    url, work = f"{bucket}/runs/one", tmp_path / "work"
    _embed(*_args([a, b], run, url, "--work-dir", work))
    local = tmp_path / "local"
    _embed(*_args([a, b], run, local))
    stored = _objects("runs/one")
    assert set(stored) == {"a_patches.tif", "b_patches.tif", "chips.parquet/a.parquet", "chips.parquet/b.parquet",
                           ".embed/a.done.json", ".embed/b.done.json", ".embed/a.chips.parquet",
                           ".embed/b.chips.parquet"}
    got = _download("runs/one", tmp_path / "got")
    for name in ("a", "b"):
        _same_outputs(local, got, name)
    assert not list(work.glob("*_patches.tif")) and not list((work / "chips.parquet").iterdir())  # uploaded, gone

    # a killed run leaves nothing in the bucket that looks whole; the rerun skips a and b (markers in the bucket)
    args = _args([a, b, long], run, url, "--work-dir", work, progress=True)
    rc, done = kill_after_strips(args, work / ".embed" / "long" / "state.json")
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert done >= 3
    assert _objects("runs/one") == stored  # a and b untouched, nothing of long
    res = subprocess.run([sys.executable, "-m", "dinov2.run.embed", *args], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "a already finished, skipped" in res.stderr and "b already finished, skipped" in res.stderr
    assert f"{done * 3}/90" in res.stderr  # long resumed from the killed run's strips in the work folder
    assert "(2 already finished)" in res.stdout and f"{url}/long_patches.tif" in res.stdout
    after = _objects("runs/one")
    assert {k: after[k] for k in stored} == stored and "chips.parquet/long.parquet" in after
    fresh = tmp_path / "fresh"
    _embed(*_args([long], run, fresh))
    got = _download("runs/one", tmp_path / "got2")
    for name in ("a", "b"):
        os.remove(got / "chips.parquet" / f"{name}.parquet")
    _same_outputs(fresh, got, "long")

    # another machine (a fresh work folder) skips every scene from the markers in the bucket
    from dinov2.inference.embed import EmbedSettings, embed_scenes
    from dinov2.inference.sources import collect_scenes
    from dinov2.run.embed import load_backbone

    scenes = collect_scenes([a, b, long], "sentinel2", S2_BANDS)
    res = embed_scenes(scenes, load_backbone(run), url, EmbedSettings("56", "14", 2, progress=False),
                       work_dir=str(tmp_path / "other_machine"))
    assert sorted(res["skipped"]) == ["a", "b", "long"] and res["n_chips"] == 90 + 3 + 2
    assert res["chips"] == f"{url}/chips.parquet" and _objects("runs/one") == after


def test_a_second_run_on_the_same_url_is_refused(tmp_path, bucket):
    from dinov2.inference.output_store import open_output
    from dinov2.utils.folder_lock import FolderLockedError

    run = write_run(tmp_path / "run")
    a = write_tif(tmp_path / "a.tif", smooth_scene(56, 56, seed=1))
    url = f"{bucket}/locked"
    root = open_output(url).root  # the default work folder: keyed by the URL, in the cache
    assert root.startswith(str(tmp_path / "cache")) and open_output(url + "/").root == root
    os.makedirs(root)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dinov2.utils.folder_lock import "
                               "FolderLock; FolderLock(sys.argv[1], '.panopticon.lock', 'panopticon embed').acquire();"
                               " print('held', flush=True); time.sleep(60)", root], env=_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from dinov2.run.embed import main

        with pytest.raises(FolderLockedError, match="panopticon embed"):
            main(_args([a], run, url))
    finally:
        holder.kill()
        holder.wait()
    assert _objects("locked") == {}


def test_index_and_search_on_a_bucket(tmp_path, bucket):
    from dinov2.inference.index import build_index
    from dinov2.inference.search import search_chips

    run = write_run(tmp_path / "run")
    scenes = [write_tif(tmp_path / f"s{i}.tif", smooth_scene(112, 112, seed=i)) for i in range(2)]
    url, local = f"{bucket}/idx", tmp_path / "local"
    _embed(*_args(scenes, run, url))
    _embed(*_args(scenes, run, local))
    summary = build_index(url, progress=False)
    assert summary["rows"] == 18 and summary["folder"].startswith(str(tmp_path / "cache"))
    build_index(str(local), progress=False)
    for exact in (False, True):
        got = search_chips(url, k=5, chip_id="s0:r1c1", exact=exact)
        want = search_chips(str(local), k=5, chip_id="s0:r1c1", exact=exact)
        assert list(got.chip_id) == list(want.chip_id) and got.chip_id.iloc[0] == "s0:r1c1"
        np.testing.assert_allclose(got.similarity, want.similarity, atol=1e-6)
    # a scene added to the bucket reaches the mirror: the index no longer matches and search says so
    _embed(*_args([write_tif(tmp_path / "s2.tif", smooth_scene(56, 56, seed=7))], run, url))
    got = search_chips(url, k=30, chip_id="s2:r0c0", exact=True)
    assert got.chip_id.iloc[0] == "s2:r0c0" and len(got) == 19
    # one model per chip table, checked against the parts in the bucket
    other = write_run(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=rf"{url}/chips.parquet/s0.parquet was written with other settings"):
        _embed(*_args([write_tif(tmp_path / "s3.tif", smooth_scene(56, 56, seed=8))], other, url))
