"""`az://` inputs (GDAL's /vsiaz/) and outputs (obstore) against Azurite, Microsoft's Azure Storage emulator, on
127.0.0.1: the embeddings of a blob equal those of the same local file, the outputs in the container equal a local
run's, and a rerun skips the finished scene from the marker in the container.

Azurite is an npm package: `make setup` installs it into `.venv/azurite` where npm is available; without it (or
without the azure-storage-blob package that creates the container) these tests are skipped.
"""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_resume_dist import _same_outputs  # noqa: E402

# Azurite's well-known development account (public, documented by Microsoft; not a secret)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CONTAINER = "emb"


def _azurite_binary():
    local = os.path.join(sys.prefix, "azurite", "node_modules", ".bin", "azurite-blob")
    return local if os.path.exists(local) else shutil.which("azurite-blob")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def container(tmp_path, monkeypatch):
    blob = pytest.importorskip("azure.storage.blob")
    exe = _azurite_binary()
    if exe is None:
        pytest.skip("Azurite (npm package azurite) is not installed; `make setup` installs it where npm exists")
    port = _free_port()
    proc = subprocess.Popen([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                             str(tmp_path / "azurite"), "--silent", "--skipApiVersionCheck", "--loose"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("Azurite did not start")
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
        conn = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={endpoint};")
        # GDAL reads the connection string (its endpoint); obstore the emulator variables
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
        monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
        monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("PANOPTICON_CACHE", str(tmp_path / "cache"))
        service = blob.BlobServiceClient.from_connection_string(conn)
        service.create_container(CONTAINER)
        yield service.get_container_client(CONTAINER)
    finally:
        proc.kill()  # Azurite waits for idle connections on SIGTERM; its data folder is the test's own
        proc.wait(timeout=30)


def _embed(*args):
    from dinov2.run.embed import main

    assert main([*map(str, args), "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--chip-size", "56",
                 "--overlap", "14", "--batch-size", "2", "--no-progress"]) == 0


def _download(client, prefix, folder):
    for b in client.list_blobs(name_starts_with=prefix + "/"):
        path = folder / b.name[len(prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.download_blob(b.name).readall())
    return folder


def test_blob_in_and_container_out_equal_a_local_run(tmp_path, container, capsys):
    run = write_run(tmp_path / "run")
    tif = write_tif(tmp_path / "s.tif", smooth_scene(84, 112, seed=7))
    with open(tif, "rb") as f:
        container.upload_blob("in/s.tif", f)
    _embed(tif, "--model", run, "-o", tmp_path / "local")
    url = f"az://{CONTAINER}/runs/one"
    _embed(f"az://{CONTAINER}/in/s.tif", "--model", run, "-o", url, "--work-dir", tmp_path / "work")
    assert f"{url}/s_patches.tif" in capsys.readouterr().out
    names = sorted(b.name for b in container.list_blobs(name_starts_with="runs/one/"))
    assert names == ["runs/one/.embed/s.chips.parquet", "runs/one/.embed/s.done.json",
                     "runs/one/chips.parquet/s.parquet", "runs/one/s_patches.tif"]
    _same_outputs(tmp_path / "local", _download(container, "runs/one", tmp_path / "got"), "s")
    chips = gpd.read_parquet(tmp_path / "got" / "chips.parquet")
    assert chips.source_files.iloc[0][0] == f"az://{CONTAINER}/in/s.tif"

    # another machine (a fresh work folder) skips the scene from the marker in the container
    _embed(f"az://{CONTAINER}/in/s.tif", "--model", run, "-o", url, "--work-dir", tmp_path / "work2")
    assert "(1 already finished)" in capsys.readouterr().out


def test_either_spelling_of_the_azure_account_reaches_gdal_and_obstore(monkeypatch):
    from dinov2.data.remote import http_options, object_store

    for name in ("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_ACCOUNT_NAME",
                 "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_USE_EMULATOR", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", "gdalname")  # GDAL's spelling, for obstore's outputs
    monkeypatch.setenv("AZURE_STORAGE_ACCESS_KEY", KEY)
    assert object_store("az://box/prefix").config["account_name"] == "gdalname"
    assert "AZURE_STORAGE_ACCOUNT" not in http_options()  # GDAL reads it itself
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT")
    monkeypatch.delenv("AZURE_STORAGE_ACCESS_KEY")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "objname")  # obstore's spelling, for GDAL's inputs
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", KEY)
    opts = http_options()
    assert opts["AZURE_STORAGE_ACCOUNT"] == "objname" and opts["AZURE_STORAGE_ACCESS_KEY"] == KEY
    assert "account_name" not in object_store("az://box/prefix").config  # obstore reads its own name itself
