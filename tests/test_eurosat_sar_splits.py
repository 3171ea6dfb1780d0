"""EuroSAT-SAR as released (class folders only): the prepare command writes the split CSVs the reader needs."""
from collections import Counter

import pandas as pd
import pytest
from eval_fixtures import write_eurosat_sar_release

from dinov2.run.prepare_data import main

COUNTS = {"AnnualCrop": 12, "Forest": 10, "River": 11}  # smallest class: 10 images


def _read(root, stem):
    return pd.read_csv(root / f"{stem}.csv")


def test_prepare_eurosat_sar_splits(tmp_path, capsys):
    from dinov2.data.datasets.eurosat_sar import CLASSES, EurosatSAR

    files = write_eurosat_sar_release(tmp_path, COUNTS)
    with pytest.raises(SystemExit) as e:
        main(["eurosat-sar", "--help"])
    assert e.value.code == 0 and "--small-sizes" in capsys.readouterr().out
    assert main(["eurosat-sar", str(tmp_path), "--small-sizes", "6", "3", "3"]) == 0
    # per class 10 images: 2 test (20 %), 1 validation (1/8 of 8), 7 train
    sizes = {stem: len(_read(tmp_path, stem)) for stem in ("train", "val", "test", "small_train", "small_val",
                                                           "small_test")}
    assert sizes == {"train": 21, "val": 3, "test": 6, "small_train": 6, "small_val": 3, "small_test": 3}
    parts = {stem: _read(tmp_path, stem) for stem in sizes}
    for stem in ("train", "val", "test", "small_train", "small_val", "small_test"):
        df = parts[stem]
        assert list(df.columns) == ["filepath", "class_name"]
        per_class = Counter(df["class_name"])
        assert set(per_class) == set(COUNTS) and len(set(per_class.values())) == 1, (stem, per_class)
        for fp, cls in zip(df["filepath"], df["class_name"]):
            assert fp in files[cls]
    big = [set(parts[s]["filepath"]) for s in ("train", "val", "test")]
    assert not (big[0] & big[1]) and not (big[0] & big[2]) and not (big[1] & big[2])
    for s in ("train", "val", "test"):
        assert set(parts[f"small_{s}"]["filepath"]) <= set(parts[s]["filepath"])

    ds = EurosatSAR(str(tmp_path), split="small_train")  # the reader works on what was written
    x, y = ds[0]
    assert x["imgs"].shape == (2, 8, 8) and x["chn_ids"].tolist() == [-1, -2] and CLASSES[y] in COUNTS

    with pytest.raises(FileExistsError, match="train.csv exists"):
        main(["eurosat-sar", str(tmp_path)])
    first = _read(tmp_path, "test")
    assert main(["eurosat-sar", str(tmp_path), "--small-sizes", "6", "3", "3", "--overwrite"]) == 0
    assert _read(tmp_path, "test").equals(first)  # same seed, same split
    assert main(["eurosat-sar", str(tmp_path), "--small-sizes", "6", "3", "3", "--overwrite", "--seed", "1"]) == 0
    assert not _read(tmp_path, "test").equals(first)


def test_prepare_eurosat_sar_errors(tmp_path):
    from dinov2.data.datasets.eurosat_sar import make_splits

    write_eurosat_sar_release(tmp_path / "ok", COUNTS)
    with pytest.raises(ValueError, match="small_train wants 2000 images but split 'train' has only 7"):
        make_splits(str(tmp_path / "ok"))
    (tmp_path / "empty" / "Nothing").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folder with .tif images"):
        make_splits(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="missing"):
        make_splits(str(tmp_path / "missing"))
