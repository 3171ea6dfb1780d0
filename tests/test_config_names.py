"""Shipped configs by name from any directory (`--config-file debug`, `--config-obj demo`), paths first, and the
`panopticon configs` listing."""
import os

import pytest

from dinov2.eval.eval import resolve_config_objs
from dinov2.run import configs as configs_cli
from dinov2.utils.config_names import CONFIG_DIR, resolve_config_file, resolve_config_obj


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory without any configs, and no $CDIR."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CDIR", raising=False)
    return tmp_path


def test_training_config_names(elsewhere):
    assert resolve_config_file("debug") == str(CONFIG_DIR / "debug.yaml")
    assert resolve_config_file("stage1.yaml") == str(CONFIG_DIR / "stage1.yaml")
    with pytest.raises(FileNotFoundError, match=r"'nope' is neither a file nor a shipped .* debug, demo"):
        resolve_config_file("nope")
    with pytest.raises(FileNotFoundError):  # evaluation tasks are not training configs
        resolve_config_file("eval/5min/m-eurosat_knn")
    (elsewhere / "debug").write_text("optim: {epochs: 1}\n")  # an existing path always wins
    assert resolve_config_file("debug") == "debug"


def test_eval_config_names(elsewhere):
    eval_dir = CONFIG_DIR / "eval"
    assert resolve_config_obj("demo") == [str(eval_dir / "demo")]
    assert resolve_config_obj("1h/geobench/so2sat") == [str(eval_dir / "1h" / "geobench" / "so2sat.yaml")]
    assert resolve_config_obj("5min/*_knn") == sorted(str(p) for p in (eval_dir / "5min").glob("*_knn.yaml"))
    assert resolve_config_obj("no/such/suite") == []
    # tasks keep the names they have when given as paths
    by_name = resolve_config_objs("demo;1h/geobench/so2sat")
    by_path = resolve_config_objs(f"{eval_dir / 'demo'};{eval_dir / '1h/geobench/so2sat.yaml'}")
    assert by_name == by_path and [n for n, _ in by_name] == [
        "1h/geobench/so2sat", "demo/retrieval_interleaved_bands", "demo/retrieval_visible_vs_infrared"]
    with pytest.raises(FileNotFoundError, match="nor a shipped evaluation config"):
        resolve_config_objs("demo;nope")


def test_cdir_configs_come_first(elsewhere, monkeypatch):
    own = elsewhere / "myconfigs"
    (own / "eval" / "demo").mkdir(parents=True)
    (own / "eval" / "demo" / "mine.yaml").write_text("task: {id: knn}\n")
    (own / "debug.yaml").write_text("optim: {epochs: 1}\n")
    monkeypatch.setenv("CDIR", str(own))
    assert resolve_config_file("debug") == str(own / "debug.yaml")
    assert resolve_config_file("stage2") == str(CONFIG_DIR / "stage2.yaml")  # the package still serves the rest
    assert resolve_config_obj("demo") == [str(own / "eval" / "demo")]


def test_configs_command_lists_shows_and_locates(elsewhere, capsys):
    assert configs_cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("debug", "demo", "stage1", "1h/geobench/so2sat", "5min", "demo/retrieval_visible_vs_infrared"):
        assert f"  {name} " in out, name
    assert "defaults" not in out and "data/" not in out
    assert configs_cli.main(["--show", "debug"]) == 0
    assert capsys.readouterr().out == (CONFIG_DIR / "debug.yaml").read_text()
    assert configs_cli.main(["--show", "demo", "--kind", "eval"]) == 0
    assert "retrieval_interleaved_bands" in capsys.readouterr().out
    assert configs_cli.main(["--path", "demo"]) == 0  # training first with --kind all
    assert capsys.readouterr().out.strip() == str(CONFIG_DIR / "demo.yaml")
    with pytest.raises(FileNotFoundError, match="no shipped config named 'nope'"):
        configs_cli.main(["--show", "nope"])
    assert os.getcwd() == str(elsewhere)
