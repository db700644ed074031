"""configs/verl: the stage configs compose against verl 0.9.1's trainer config with hydra, pass
verl's own ``validate_config``, add no key verl does not have (except tsparse's free-form
switches), instantiate verl's config dataclasses; the ViTAR-16K -> parquet converter writes what
verl's ``RLHFDataset`` reads; the reward loads through verl's reward-loading path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("verl")
pytest.importorskip("hydra")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "verl"
STAGES = ["stage1_localization", "stage2_sparse"]
# Free-form places: tsparse's switches (a dict field of verl's HFModelConfig) and the trainer
# mode's own section (verl reads trainer.v1.<trainer_mode>).
FREE_FORM = ("actor_rollout_ref.model.fused_kernel_options.", "trainer.v1.tsparse_dualstream.")


def _compose(name: str, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def _base():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer")


def _leaves(d, prefix=""):
    for k, v in d.items():
        if k in ("hydra", "defaults"):
            continue
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, path + ".")
        else:
            yield path


def _has(cfg, path: str) -> bool:
    from omegaconf import OmegaConf

    node = cfg
    for part in path.split("."):
        # (``in`` is False for a key whose value is ``???``: look at the keys themselves)
        if not OmegaConf.is_dict(node) or part not in list(node.keys()):
            return False
        node = node._get_node(part)
    return True


@pytest.mark.parametrize("name", STAGES)
def test_stage_config_composes_and_passes_verls_checks(name):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = _compose(name)
    OmegaConf.resolve(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert cfg.actor_rollout_ref.model.use_fused_kernels is True
    assert cfg.actor_rollout_ref.model.fused_kernel_options.impl_backend == "tsparse"
    assert cfg.trainer.n_gpus_per_node == 8 and cfg.trainer.nnodes == 1
    assert cfg.reward.custom_reward_function.path == "pkg://tsparse.dualstream.reward_fn"


@pytest.mark.parametrize("name", STAGES + ["lingshu7b_common"])
def test_no_key_unknown_to_verl(name):
    """Every key our yaml sets exists in verl's ppo_trainer config (hydra would accept new keys
    while composing; verl's dataclasses would then fail at startup, or worse, ignore them)."""
    base = _base()
    assert _has(base, "actor_rollout_ref.actor.ppo_mini_batch_size")
    assert not _has(base, "actor_rollout_ref.actor.ppo_mini_batchsize")  # the check can fail
    ours = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    unknown = [p for p in _leaves(ours) if not p.startswith(FREE_FORM) and not _has(base, p)]
    assert not unknown, f"{name}: keys verl 0.9.1 does not have: {unknown}"


@pytest.mark.parametrize("name", STAGES)
def test_sections_instantiate_verls_dataclasses(name):
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig

    from tsparse.integrations.verl import TsparseOptions

    cfg = _compose(name)
    OmegaConf.resolve(cfg)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    algo = omega_conf_to_dataclass(cfg.algorithm)
    # (reward: verl 0.9.1's RewardManagerConfig cannot be instantiated standalone - its
    # __post_init__ calls a missing super().__post_init__ - so its keys are checked above only)
    assert actor.policy_loss.loss_mode in ("tsparse", "tsparse_dualstream")
    assert rollout.n == 4 and algo.adv_estimator in ("grpo", "tsparse_dualstream")
    # HFModelConfig would download / load the model: check its keys against the dataclass instead.
    import dataclasses

    fields = {f.name for f in dataclasses.fields(HFModelConfig)} | {"_target_"}
    assert set(cfg.actor_rollout_ref.model) <= fields
    opts = TsparseOptions.from_dict(OmegaConf.to_container(cfg.actor_rollout_ref.model.fused_kernel_options))
    assert opts.logprobs and opts.varlen and opts.prune_visual


def test_stage2_resumes_stage1_and_matches_the_method_config():
    from omegaconf import OmegaConf

    from tsparse.dualstream.config import load_method_config
    from tsparse.integrations.verl import TsparseOptions

    s1 = _compose("stage1_localization", ["trainer.default_local_dir=/ckpt/stage1_localization"])
    s2 = _compose("stage2_sparse")
    assert s2.trainer.v1.trainer_mode == "tsparse_dualstream"
    assert s2.algorithm.adv_estimator == "tsparse_dualstream"
    assert s2.actor_rollout_ref.actor.policy_loss.loss_mode == "tsparse_dualstream"
    assert "stage1_localization" in str(s2.actor_rollout_ref.model.path)  # starts from the stage-1 model
    assert s1.actor_rollout_ref.model.path != s2.actor_rollout_ref.model.path
    method = load_method_config()
    opts = TsparseOptions.from_dict(OmegaConf.to_container(s2.actor_rollout_ref.model.fused_kernel_options))
    for k in ("fuse", "fallback", "margin", "min_coverage"):
        assert getattr(opts.pruning, k) == getattr(method.pruning, k), k
    assert s2.actor_rollout_ref.rollout.n == method.advantages.localization_group_size
    assert s2.trainer.v1.tsparse_dualstream.n_sparse == method.advantages.sparse_group_size


def test_bad_switch_is_named():
    from omegaconf import OmegaConf

    from tsparse.integrations.verl import TsparseOptions

    cfg = _compose("stage1_localization", ["+actor_rollout_ref.model.fused_kernel_options.prune_visaul=false"])
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.model\.fused_kernel_options\.prune_visaul"):
        TsparseOptions.from_dict(OmegaConf.to_container(cfg.actor_rollout_ref.model.fused_kernel_options))


# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    from tsparse.dualstream.data import SyntheticScanConfig, ensure_synthetic_scans
    from tsparse.integrations.verl.data import main

    root = tmp_path_factory.mktemp("vitar")
    files = ensure_synthetic_scans(root, SyntheticScanConfig(image_size=112, images_per_sample=2, splits={"train": 3}))
    out = root / "verl"
    assert main(["--input", str(files["train"]), "--output", str(out), "--stream", "sparse"]) == 0
    return out / "train_sparse.parquet", files["train"]


def test_converter_writes_what_verls_dataset_reads(parquet, monkeypatch, tmp_path):
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from PIL import Image
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from tsparse.dualstream.config import load_method_config
    from tsparse.dualstream.data import load_vitar_json
    from tsparse.dualstream.models import build_tiny

    path, source = parquet
    samples = load_vitar_json(source)
    table = pq.read_table(path).to_pylist()
    assert len(table) == len(samples) == 3
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    _, proc = build_tiny()
    ds = RLHFDataset(str(path), proc.tokenizer, OmegaConf.create({"filter_overlong_prompts": False,
                                                                   "cache_dir": str(tmp_path / "cache")}),
                     processor=proc)
    row = ds[0]
    system, user = row["raw_prompt"]
    method = load_method_config()
    assert system["role"] == "system" and method.prompts.sparse.system in str(system["content"])
    images = [c["image"] for c in user["content"] if c["type"] == "image"]
    assert len(images) == 2 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].size == (112, 112)
    text = "".join(c["text"] for c in user["content"] if c["type"] == "text")
    assert samples[0].question.replace("<image>", "") in text
    gt = json.loads(row["reward_model"]["ground_truth"])
    assert gt["answer"] == samples[0].answer and len(gt["bbox"]) == len(samples[0].boxes)
    assert row["extra_info"]["stream"] == "sparse"


def test_reward_through_verls_loading_path(parquet):
    """verl's get_custom_reward_fn loads the reward the stage configs name; it returns the
    composite score of tsparse.dualstream.rewards for both streams."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from tsparse.dualstream.data import load_vitar_json
    from tsparse.dualstream.format import format_localization_response, format_sparse_response
    from tsparse.dualstream.rewards import localization_reward, sparse_reward

    cfg = _compose("stage1_localization")
    fn = get_custom_reward_fn(OmegaConf.create({"reward": OmegaConf.to_container(cfg.reward)}))
    path, source = parquet
    row = pq.read_table(path).to_pylist()[0]
    sample = load_vitar_json(source)[0]
    gt = row["reward_model"]["ground_truth"]
    good = format_localization_response("look", sample.boxes, sample.answer)
    loc_extra = dict(row["extra_info"], stream="localization")
    out = fn(row["data_source"], good, gt, loc_extra)
    expect = localization_reward(good, sample)
    assert out["score"] == pytest.approx(expect.score) and out["iou"] == pytest.approx(expect.iou)
    assert out["iou"] > 0.9  # the boxes, written with 2 decimals
    # format + IoU + accuracy with configs/dualstream.yaml's weights (0.5, 1, 1)
    assert out["score"] == pytest.approx(0.5 + out["iou"] + 1.0)
    wrong = format_sparse_response("look", "Z")
    out = fn(row["data_source"], wrong, gt, dict(row["extra_info"], cross_accuracy=1.0))
    assert out["score"] == pytest.approx(sparse_reward(wrong, sample, cross_accuracy=1.0).score)
    assert out["accuracy"] == 0.0 and out["format"] == 1.0 and out["cross_accuracy"] == 1.0
