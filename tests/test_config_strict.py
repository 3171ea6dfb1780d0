"""Loud configuration: unknown keys, wrong types and impossible values are errors naming the key."""
from pathlib import Path

import pytest
import yaml

from dinov2.utils.config import CONFIG_DIR, load_config
from dinov2.utils.config_schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
EVAL_TASKS = sorted(p for p in (CONFIG_DIR / "eval").rglob("*.yaml") if "defaults" not in p.parts)


@pytest.fixture(autouse=True)
def _cluster_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("RDIR", str(tmp_path / "rdir"))  # stage configs interpolate these
    monkeypatch.setenv("ODIR", str(tmp_path / "odir"))


def _leaves(node, prefix=""):
    """``(dotted key, value)`` of every non-mapping value of a YAML tree (lists count as values)."""
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _same(got, want) -> bool:
    """Equal as loaded, where a YAML 1.1 parser reads exponent floats (``1.0e-4``) as strings."""
    if isinstance(want, str) and isinstance(got, (int, float)) and not isinstance(got, bool):
        try:
            return float(want) == float(got)
        except ValueError:
            return False
    return got == want


def _check_loaded(cfg, files, skip=()):
    """Every plain value written in ``files`` (later files win; keys in ``skip`` aside) is the loaded value at its
    key; returns how many were checked."""
    from omegaconf import OmegaConf

    expected = {}
    for f in files:
        expected.update(_leaves(yaml.safe_load(Path(f).read_text()) or {}))
    checked = 0
    for key, want in expected.items():
        if key in skip or key.startswith("_") or "${" in str(want) or "???" in str(want):
            continue
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert _same(got, want), f"{key}: loaded {got!r}, file says {want!r}"
        checked += 1
    return checked


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
@pytest.mark.parametrize("fastdevrun", [False, True])
def test_every_shipped_training_config_passes(name, fastdevrun):
    from dinov2.utils.config import FASTDEVRUN_CONFIG

    cfg = load_config(str(CONFIG_DIR / name), [], fastdevrun=fastdevrun)
    files = [CONFIG_DIR / name] + ([FASTDEVRUN_CONFIG] if fastdevrun else [])
    assert _check_loaded(cfg, files) > 5
    if fastdevrun:  # the tiny run's values win over the file's
        assert cfg.train.batch_size_per_gpu == 2 and cfg.optim.epochs == 1 and cfg.train.OFFICIAL_EPOCH_LENGTH == 10


@pytest.mark.parametrize("path", EVAL_TASKS, ids=[p.relative_to(CONFIG_DIR / "eval").as_posix() for p in EVAL_TASKS])
def test_every_shipped_eval_task_passes(path):
    from dinov2.eval.tasks import build_task_cfg

    # the overrides the training loop's --fastdevrun passes to every task (+ a scenes file where one is mandatory)
    ov = {"train_dataset.subset": 20, "test_dataset.subset": 20, "optim.dl.batch_size": 20}
    if "_vars:\n  scenes: ???" in path.read_text():
        ov["_vars.scenes"] = "/data/scenes.yaml"
    cfg = build_task_cfg(path, ov)
    assert _check_loaded(cfg, [path], skip=set(ov)) >= 2
    assert cfg.optim.dl.batch_size == 20 and cfg.train_dataset.subset == 20 and cfg.test_dataset.subset == 20
    assert cfg.task.id == yaml.safe_load(path.read_text())["task"]["id"]


def test_misspelled_override_names_key_and_closest_valid_key():
    with pytest.raises(ConfigError, match=r"'train\.batchsize'.*did you mean 'train\.batch_size_per_gpu'"):
        load_config(None, ["train.batchsize=3"])


def test_key_in_wrong_section_points_to_the_right_one():
    with pytest.raises(ConfigError, match=r"'train\.epochs'.*did you mean 'optim\.epochs'"):
        load_config(None, ["train.epochs=3"])


def test_misspelled_key_in_config_file_names_file_and_key(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"optim": {"base_lr": 1e-3, "warmup_epoch": 1}, "teacher": {"teacher_tmp": 0.05}}))
    with pytest.raises(ConfigError) as err:
        load_config(str(f), [])
    text = str(err.value)
    assert "2 problems" in text and str(f) in text
    assert "'optim.warmup_epoch'; did you mean 'optim.warmup_epochs'" in text
    assert "'teacher.teacher_tmp'; did you mean 'teacher.teacher_temp'" in text


def test_misspelled_key_in_env_file_is_refused(tmp_path):
    env = tmp_path / "cluster.yaml"
    env.write_text("trian:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"env file .*cluster\.yaml: unknown key 'trian'"):
        load_config(None, [], env_file=str(env))


@pytest.mark.parametrize("override,fragment", [
    ("optim.epochs=0", "optim.epochs=0: must be > 0"),
    ("optim.base_lr=-0.1", "optim.base_lr=-0.1: must be >= 0"),
    ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu=0: must be >= 1"),
    ("train.OFFICIAL_EPOCH_LENGTH=0", "train.OFFICIAL_EPOCH_LENGTH=0: must be -1"),
    ("ibot.mask_sample_probability=1.5", "must be in [0, 1]"),
    ("teacher.teacher_temp=0", "teacher.teacher_temp=0: must be > 0"),
    ("train.num_workers=two", "train.num_workers='two': must be an integer"),
    ("train.batch_size_per_gpu=2.5", "train.batch_size_per_gpu=2.5: must be an integer"),
    ("train.use_wandb=3", "train.use_wandb=3: must be true or false"),
    ("optim.base_lr=fast", "optim.base_lr='fast': must be a number"),
    ("optim.epochs=null", "optim.epochs=None: must be a number > 0"),
    ("optim.epochs=inf", "optim.epochs=inf: must be > 0"),
    ("compute_precision.dtype=fp8", "must be one of fp16"),
    ("ibot.mask_ratio_min_max=0.3", "must be a list"),
])
def test_impossible_values_and_wrong_types_are_refused(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError, match="3 problems"):
        load_config(None, ["optim.epochs=0", "train.batch_size_per_gpu=-1", "optim.base_lr=-1"])


def test_free_form_sections_take_any_key():
    cfg = load_config(None, ["student.pe_args.attn_dim=32", "student.pe_args.anything_new=1",
                             "train.dataset.id=GeoTiffScenes", "train.dataset.scenes=s.yaml",
                             "train.pretrain_augm.global_crops_size=28", "eval.overwrites.optim.dl.batch_size=4",
                             "_scratch.x=1"])
    assert cfg.student.pe_args.anything_new == 1 and cfg.train.dataset.scenes == "s.yaml"
    assert "_scratch" not in cfg


def test_fractional_epochs_accepted_and_honoured_by_the_loop():
    from dinov2.train.train import _periods, build_schedulers

    cfg = load_config(None, ["train.saveckp_freq=0.5", "optim.epochs=1.5", "optim.warmup_epochs=0.2",
                             "eval.eval_period_epoch=0.25"])
    assert cfg.train.saveckp_freq == 0.5
    ckpt_period, eval_period = _periods(cfg, epoch_len=40)
    assert (ckpt_period, eval_period) == (20, 10)  # 0.5 x 40 and 0.25 x 40 iterations
    cfg.optim.lr = 1e-3
    assert len(build_schedulers(cfg, epoch_len=40)["lr"]) == 60  # 1.5 epochs x 40


def test_environment_numbers_become_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_WORKERS", "3")
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  num_workers: ${oc.env:MY_WORKERS}\n  use_wandb: ${oc.env:NO_WANDB,false}\n")
    cfg = load_config(str(f), [])
    assert cfg.train.num_workers == 3 and cfg.train.use_wandb is False
    monkeypatch.setenv("MY_WORKERS", "-3")
    with pytest.raises(ConfigError, match="train.num_workers=-3: must be >= 0"):
        load_config(str(f), [])


def test_training_cli_writes_nothing_before_refusing(tmp_path):
    from dinov2.train.train import main

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="optim.epocs"):
        main(["--config-file", str(CONFIG_DIR / "demo.yaml"), "--output-dir", str(out), "optim.epocs=3"])
    assert not out.exists()


def test_a_run_folders_config_yaml_loads_again(tmp_path):
    from dinov2.utils.config import apply_scaling_rules, write_config

    cfg = load_config(str(CONFIG_DIR / "demo.yaml"), ["train.dataset.scenes=s.yaml"])
    cfg.train.short_exp_name, cfg.slurm_job_id = "run", "123"  # what the trainer adds
    apply_scaling_rules(cfg, 1)
    again = load_config(write_config(cfg, str(tmp_path)), [])
    assert again.optim.lr == cfg.optim.lr and again.train.short_exp_name == "run"


def _task(tmp_path, cfg: dict) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_task_file_with_unknown_key_is_refused(tmp_path):
    from dinov2.eval.tasks import build_task_cfg

    path = _task(tmp_path, {"task": {"id": "knn"}, "heads": {"nb_nn": [5]},
                            "train_dataset": {"id": "x", "anything": 1}, "test_dataset": {"id": "x"}})
    with pytest.raises(ValueError, match=r"task\.yaml: unknown key 'heads\.nb_nn'; did you mean 'heads\.nb_knn'"):
        build_task_cfg(path)


def test_eval_key_of_another_task_type_is_refused_in_the_file_but_fine_as_suite_override(tmp_path):
    from dinov2.eval.tasks import build_task_cfg

    path = _task(tmp_path, {"task": {"id": "knn"}, "optim": {"epochs": 3}, "test_dataset": {"id": "x"}})
    with pytest.raises(ValueError, match=r"unknown key 'optim\.epochs'"):
        build_task_cfg(path)
    ok = _task(tmp_path, {"task": {"id": "knn", "num_classes": 4}, "test_dataset": {"id": "x"},
                          "_vars": {"t": [1]}})
    cfg = build_task_cfg(ok, {"optim.epochs": 1, "test_dataset.scenes": "s.yaml"})  # linear key: suite-wide
    assert cfg.task.num_classes == 4 and cfg.test_dataset.scenes == "s.yaml"


def test_eval_override_with_unknown_key_is_refused(tmp_path):
    from dinov2.eval.tasks import build_task_cfg

    path = _task(tmp_path, {"task": {"id": "retrieval"}, "test_dataset": {"id": "x"}})
    with pytest.raises(ValueError, match=r"eval override: unknown key 'optim\.dl\.batchsize'.*'optim\.dl\.batch_size'"):
        build_task_cfg(path, {"optim.dl.batchsize": 4})


def test_training_eval_overwrites_are_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"eval\.overwrites: unknown key 'optim\.dl\.batchsize'"):
        load_config(None, ["eval.overwrites.optim.dl.batchsize=4"])
    with pytest.raises(ConfigError, match=r"eval\.final_model\.overwrites: unknown key 'heads\.nb_nn'"):
        load_config(None, ["eval.final_model.overwrites.heads.nb_nn=4"])
    cfg = load_config(None, ["eval.overwrites.optim.dl.batch_size=4", "eval.overwrites.test_dataset.subset=5"])
    assert cfg.eval.overwrites.optim.dl.batch_size == 4
