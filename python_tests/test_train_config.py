"""The trainer's config: YAML + key=value overrides, every key checked and named in errors;
the shipped configs load."""

from __future__ import annotations

import pytest

from tsparse.dualstream.config import config_dir
from tsparse.train.__main__ import main as cli_main
from tsparse.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_train_config,
    parse_overrides,
)


def test_overrides_parse_as_yaml():
    got = parse_overrides(["stages.localization.steps=3", "device=cpu", "stages=[sparse]", "loss.kl_coef=1e-2",
                           "model.path=/models/Lingshu-7B", "eval.at=[start]", "method.pruning.fuse=false",
                           "output_dir=", "rollout.top_p=0.9"])
    assert got == [(["stages", "localization", "steps"], 3), (["device"], "cpu"), (["stages"], ["sparse"]),
                   (["loss", "kl_coef"], 0.01), (["model", "path"], "/models/Lingshu-7B"), (["eval", "at"], ["start"]),
                   (["method", "pruning", "fuse"], False), (["output_dir"], ""), (["rollout", "top_p"], 0.9)]
    for bad in ("steps", "=3", "a..b=1", ".a=1"):
        with pytest.raises(ConfigError, match="override"):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="does not parse"):
        parse_overrides(["stages=[a, b"])


def test_apply_overrides_sets_nested_keys_and_the_stage_list():
    data = {"stages": {"run": ["warmup"], "warmup": {"steps": 5}}, "model": {"path": "tiny"}}
    out = apply_overrides(data, parse_overrides(["stages=[localization, sparse]", "stages.warmup.steps=7",
                                                 "optim.lr=0.1"]))
    assert out["stages"] == {"run": ["localization", "sparse"], "warmup": {"steps": 7}}
    assert out["optim"] == {"lr": 0.1}
    assert data["stages"]["warmup"]["steps"] == 5  # the input is not modified
    with pytest.raises(ConfigError, match="model.path"):
        apply_overrides(data, parse_overrides(["model.path.x=1"]))


def test_demo_config_loads_with_overrides():
    cfg = load_train_config("configs/demo.yaml" if (config_dir() / "demo.yaml").is_file() else "demo",
                            ["stages.localization.steps=3", "device=cpu", "stages=[localization, sparse]",
                             "method.advantages.sparse_group=question"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.stages == ("localization", "sparse") and cfg.device == "cpu"
    assert cfg.stages_config.localization.steps == 3
    m = cfg.method_config_obj()
    assert m.advantages.sparse_group == "question"
    assert m.advantages.localization_group_size == 8 and m.advantages.sparse_group_size == 2  # demo.yaml
    assert len(m.prompts.localization.system) < 200  # the demo's short prompts
    assert m.rewards.localization["iou"] == 1.0  # the rest comes from configs/dualstream.yaml
    assert cfg.to_dict()["stages"]["run"] == ["localization", "sparse"]


def test_lingshu_config_loads_and_needs_a_model_and_data():
    cfg = load_train_config("lingshu7b", ["model.path=/models/Lingshu-7B", "data.train=/data/vitar16k.json"])
    assert cfg.model.path == "/models/Lingshu-7B" and cfg.optim.master_weights == "cpu"
    assert cfg.model.gradient_checkpointing and cfg.dtype == "bfloat16"
    m = cfg.method_config_obj()
    assert m.advantages.localization_group_size >= 4 and cfg.optim.lr <= 1e-5
    bare = load_train_config("lingshu7b")
    assert bare.model.path is None and bare.data.train is None


@pytest.mark.parametrize("override, match", [
    ("stages.localization.stepz=3", r"stages\.localization\.stepz"),
    ("optim.learning_rate=1", r"optim\.learning_rate"),
    ("devices=cpu", r"'devices'"),
    ("stages.warmpu.steps=3", r"stages\.warmpu"),
    ("stages=[sparse, warmup]", "order"),
    ("stages=[dense]", "stages"),
    ("device=tpu", "device"),
    ("dtype=int8", "dtype"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.master_weights=gpu", "optim.master_weights"),
    ("optim.schedule=linear", "optim.schedule"),
    ("stages.localization.mini_batches=9", "stages.localization.mini_batches"),  # > questions_per_step (8)
    ("stages.sparse.ppo_epochs=0", "stages.sparse.ppo_epochs"),
    ("stages.warmup.streams=[dense]", "stages.warmup.streams"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.max_new_tokens.sparse=0", "rollout.max_new_tokens.sparse"),
    ("loss.loss_agg=mean", "loss.loss_agg"),
    ("loss.clip_low=x", "loss.clip_low"),
    ("eval.at=[end]", "eval.at"),
    ("method.advantages.sparse_group=all", "advantages.sparse_group"),
    ("method.rewards.localization.iuo=1", "rewards.localization"),
    ("method.promtps.sparse.user=x", "promtps"),
    ("model.attn_implementation=flash", "model.attn_implementation"),
    ("progress=maybe", "progress"),
])
def test_bad_keys_and_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config("demo", [override])


def test_cli_reports_config_errors(capsys, tmp_path):
    rc = cli_main(["--config", "demo", f"--output-dir={tmp_path}", "stages.sparse.stepz=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "stages.sparse.stepz" in err and "error" in err
    assert cli_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main([]) == 2  # --config is required: one line, no usage block
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m tsparse.train: error: the following arguments are required: --config (see --help)"]


def test_resume_without_a_checkpoint_is_an_error(capsys, tmp_path):
    rc = cli_main(["--config", "demo", "--output-dir", str(tmp_path), "--resume", "eval.samples=0"])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err


def test_missing_data_and_model_fail_before_loading_a_model(tmp_path):
    from tsparse.train.trainer import Trainer

    common = ["device=cpu", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match="data.train"):
        Trainer(load_train_config("lingshu7b", common))
    with pytest.raises(ConfigError, match="data.val"):
        Trainer(load_train_config("lingshu7b", common + ["data.train=synthetic", "eval.samples=4",
                                                         f"data.synthetic_root={tmp_path / 'data'}",
                                                         "data.synthetic_splits={train: 2, val: 2}"]))
    with pytest.raises(ConfigError, match="model.path"):
        Trainer(load_train_config("lingshu7b", common + ["data.train=synthetic", "data.synthetic_splits={train: 2}",
                                                         f"data.synthetic_root={tmp_path / 'd'}"]))
    with pytest.raises(ConfigError, match="no such file"):
        Trainer(load_train_config("demo", common + [f"data.train={tmp_path / 'nope.json'}"]))
