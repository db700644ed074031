"""configs/dualstream.yaml and its validation."""

from __future__ import annotations

import pytest

from tsparse.dualstream.config import (
    MethodConfig,
    PruningConfig,
    config_dir,
    load_method_config,
    load_yaml,
    resolve_config_path,
)


def test_default_config_loads():
    cfg = load_method_config()
    assert "{question}" in cfg.prompts.localization.user and "<box>" in cfg.prompts.localization.system
    assert "<box>" not in cfg.prompts.sparse.system
    assert cfg.rewards.localization["iou"] > 0 and set(cfg.rewards.sparse) == {"format", "accuracy", "cross_accuracy"}
    assert cfg.pruning.fallback == "full_image" and cfg.advantages.sparse_group == "localization"
    assert cfg.format.max_boxes >= 1
    assert resolve_config_path("dualstream") == config_dir() / "dualstream.yaml"


def _minimal(**over):
    data = {"prompts": {"localization": {"system": "s", "user": "{question}"},
                        "sparse": {"system": "t", "user": "Q: {question}"}}}
    data.update(over)
    return data


@pytest.mark.parametrize(
    "data, match",
    [
        (_minimal(extra=1), r"unknown key\(s\) \['extra'\]"),
        ({}, "prompts"),
        (_minimal(prompts={"localization": {"user": "{question}"}}), "prompts.sparse"),
        (_minimal(prompts={"localization": {"user": "no field"}, "sparse": {}}), "prompts.localization"),
        (_minimal(rewards={"localization": {"iuo": 1.0}}), r"rewards.localization.*iuo"),
        (_minimal(rewards={"sparse": {"accuracy": float("inf")}}), "rewards.sparse.accuracy"),
        (_minimal(pruning={"fallback": "keep"}), "pruning.fallback"),
        (_minimal(pruning={"min_coverage": 1.0}), "pruning.min_coverage"),
        (_minimal(pruning={"margn": 1.0}), "margn"),
        (_minimal(advantages={"epsilon": 0}), "advantages.epsilon"),
        (_minimal(advantages={"localization_group_size": 0}), "advantages.localization_group_size"),
        (_minimal(format={"max_boxes": 0}), "format.max_boxes"),
    ],
)
def test_bad_config_errors_name_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        MethodConfig.from_dict(data)


def test_partial_sections_keep_defaults():
    cfg = MethodConfig.from_dict(_minimal(pruning={"fuse": False}))
    assert cfg.pruning == PruningConfig(fuse=False)
    assert cfg.advantages.epsilon == 1e-6


def test_config_dir_override_and_missing(tmp_path, monkeypatch):
    (tmp_path / "dualstream.yaml").write_text(
        "prompts:\n  localization: {user: 'L {question}'}\n  sparse: {user: 'S {question}'}\n")
    monkeypatch.setenv("TSPARSE_CONFIG_DIR", str(tmp_path))
    assert load_method_config().prompts.sparse.user == "S {question}"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_yaml("nope")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml("list")
