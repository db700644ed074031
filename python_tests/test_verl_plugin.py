"""The verl plugin: the ``verl.plugins`` entry point (declared in pyproject.toml) registers on
``import verl`` through verl's own loader; the policy losses, the two-level advantage estimator,
the varlen drop-in and the flag's options, each against verl 0.9.1's own functions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl")

ROOT = Path(__file__).resolve().parents[1]


def _entry_point() -> tuple[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = data["project"]["entry-points"]["verl.plugins"]
    assert list(eps) == ["tsparse"]
    return "tsparse", eps["tsparse"]


def test_pyproject_declares_the_entry_point():
    name, target = _entry_point()
    assert target == "tsparse.integrations.verl.plugin"
    import importlib.util

    assert importlib.util.find_spec(target) is not None


def _run_with_entry_point(tmp_path, code: str, **env) -> str:
    """Runs ``code`` in a fresh interpreter where a distribution declaring pyproject's
    ``verl.plugins`` entry point is installed (a .dist-info on sys.path), so ``import verl``
    finds it through importlib.metadata exactly as it does for ``pip install tsparse``."""
    name, target = _entry_point()
    dist = tmp_path / "site" / "tsparse_verl_ep-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tsparse-verl-ep\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[verl.plugins]\n{name} = {target}\n")
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path / "site"), full_env.get("PYTHONPATH", "")])
    full_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


REGISTRATION_CHECK = r"""
import json, sys
import verl
from verl.trainer.ppo import core_algos as ca
res = {}
for name in ("tsparse", "tsparse_dualstream"):
    try:
        res["loss/" + name] = ca.get_policy_loss_fn(name).__module__
    except ValueError:
        res["loss/" + name] = None
res["adv"] = ca.ADV_ESTIMATOR_REGISTRY.get("tsparse_dualstream").__module__ if "tsparse_dualstream" in ca.ADV_ESTIMATOR_REGISTRY else None
res["engine_imported_by_plugin"] = "verl.workers.engine.fsdp.transformer_impl" in sys.modules
import verl.workers.engine.fsdp.transformer_impl as ti
res["dispatcher"] = bool(getattr(ti.FSDPEngine.__dict__["_build_module"], "__tsparse_dispatch__", False))
from tsparse.integrations.verl import patches
res["patched"] = patches.is_patched()
print("RESULT" + json.dumps(res))
"""


def _result(stdout: str) -> dict:
    line = [l for l in stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_import_verl_registers_through_the_entry_point(tmp_path):
    res = _result(_run_with_entry_point(tmp_path, REGISTRATION_CHECK))
    assert res["loss/tsparse"] == "tsparse.integrations.verl.losses"
    assert res["loss/tsparse_dualstream"] == "tsparse.integrations.verl.losses"
    assert res["adv"] == "tsparse.integrations.verl.advantages"
    assert res["engine_imported_by_plugin"] is False  # registration does not import verl's engine
    assert res["dispatcher"] is True  # installed when the engine module loads
    assert res["patched"] is False  # registration alone swaps nothing in


def test_plugins_off_registers_nothing(tmp_path):
    res = _result(_run_with_entry_point(tmp_path, REGISTRATION_CHECK, VERL_USE_EXTERNAL_PLUGINS="none"))
    assert res["loss/tsparse"] is None and res["adv"] is None and res["dispatcher"] is False


# --------------------------------------------------------------------------------------
# Options
def test_options_parse_and_name_bad_keys():
    from tsparse.integrations.verl import CONFIG_PREFIX, TsparseOptions, options_from_model_config

    o = TsparseOptions.from_dict({"impl_backend": "tsparse"})
    assert o.logprobs and o.fused_linear and o.varlen and o.prune_visual and o.stream_loss
    o = TsparseOptions.from_dict({"impl_backend": "tsparse", "varlen": False, "chunk_size": 256,
                                  "pruning": {"fuse": False, "margin": 1}, "stream_weights": [1, 0.5]})
    assert not o.varlen and o.chunk_size == 256 and o.pruning.fuse == "none" and o.pruning.margin == 1.0
    assert o.stream_weights == (1.0, 0.5)
    for name in ("none", "cosine_mean", "nearest_kept", "summary"):  # the named fusion methods
        assert TsparseOptions.from_dict({"impl_backend": "tsparse", "pruning": {"fuse": name}}).pruning.fuse == name
    for bad, key in [({"pruning": {"fuse": "mean"}}, "pruning"), ({"logprob": True}, "logprob"), ({"varlen": "yes"}, "varlen"), ({"chunk_size": 0}, "chunk_size"),
                     ({"pruning": {"box_scope": "image"}}, "pruning.box_scope"),
                     ({"pruning": {"fallback": "nope"}}, "pruning"), ({"stream_weights": [1]}, "stream_weights")]:
        with pytest.raises(ValueError, match=rf"{CONFIG_PREFIX}\.{key}"):
            TsparseOptions.from_dict({"impl_backend": "tsparse", **bad})

    class Cfg:
        use_fused_kernels = True
        fused_kernel_options = {"impl_backend": "torch"}

    assert options_from_model_config(Cfg) is None  # verl's own backend: not ours
    Cfg.use_fused_kernels, Cfg.fused_kernel_options = False, {"impl_backend": "tsparse"}
    assert options_from_model_config(Cfg) is None  # flag off
    Cfg.use_fused_kernels = True
    assert options_from_model_config(Cfg) == TsparseOptions()


# --------------------------------------------------------------------------------------
# Advantage estimator
def test_estimator_equals_verls_grpo_on_the_same_index():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    from tsparse.integrations.verl.advantages import compute_dualstream_advantage

    n, r = 12, 7
    rewards = torch.zeros(n, r)
    mask = (torch.rand(n, r) > 0.2).float()
    mask[:, 0] = 1
    lens = mask.sum(-1).long()
    rewards[torch.arange(n), lens - 1] = torch.randn(n)
    index = ["a"] * 5 + ["b"] * 4 + ["c#0"] * 2 + ["d"]
    import numpy as np

    ref, _ = compute_grpo_outcome_advantage(rewards, mask, np.array(index, dtype=object))
    got, ret = compute_dualstream_advantage(rewards, mask, index=index)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(got, ret)


def test_estimator_two_level_groups_match_the_method():
    from tsparse.dualstream.advantages import SPARSE, LOCALIZATION, dual_stream_advantages
    from tsparse.integrations.verl.advantages import compute_dualstream_advantage, group_uid, stream_of_uid

    q, g, gp = 2, 3, 2
    loc = torch.randn(q, g)
    sp = torch.randn(q, g, gp)
    for sparse_group in ("localization", "question"):
        ref = dual_stream_advantages(loc, sp, sparse_group=sparse_group)
        index, scores = [], []
        for i in range(q):
            for j in range(g):
                index.append(group_uid(f"u{i}", LOCALIZATION))
                scores.append(loc[i, j])
        for i in range(q):
            for j in range(g):
                for k in range(gp):
                    index.append(group_uid(f"u{i}", SPARSE, j, sparse_group=sparse_group))
                    scores.append(sp[i, j, k])
        rewards = torch.stack(scores)[:, None]
        adv, _ = compute_dualstream_advantage(rewards, torch.ones_like(rewards), index=index)
        torch.testing.assert_close(adv[:, 0], torch.cat(ref.flat()[0:1]), atol=1e-6, rtol=1e-6)
        assert [stream_of_uid(u) for u in index] == ref.flat()[1].tolist()
    with pytest.raises(ValueError, match="parent"):
        group_uid("u", SPARSE)


# --------------------------------------------------------------------------------------
# Varlen drop-in
def test_no_padding_2_padding_matches_verl_values_and_gradients():
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding as verl_fn

    from tsparse.integrations.verl.varlen import no_padding_2_padding

    gen = torch.Generator().manual_seed(0)
    p_lens, r_lens = [3, 1, 5, 2], [4, 6, 1, 3]
    data = TensorDict({
        "prompts": torch.nested.as_nested_tensor([torch.zeros(n, dtype=torch.long) for n in p_lens], layout=torch.jagged),
        "responses": torch.nested.as_nested_tensor([torch.zeros(n, dtype=torch.long) for n in r_lens], layout=torch.jagged),
    }, batch_size=[4])
    total = sum(p_lens) + sum(r_lens)
    for trailing in [(), (3,)]:
        x = torch.randn(total, *trailing, generator=gen, dtype=torch.float64, requires_grad=True)
        y = x.detach().clone().requires_grad_()
        ref = verl_fn(x, data)
        got = no_padding_2_padding(y, data)
        assert got.shape == ref.shape == (4, max(r_lens), *trailing)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        (ref * w).sum().backward()
        (got * w).sum().backward()
        torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=0)
    tu.assign_non_tensor(data, max_response_len=8)  # verl's own metadata: the output width
    assert no_padding_2_padding(torch.randn(total), data).shape == (4, 8)
    with pytest.raises(ValueError, match="packed output"):
        no_padding_2_padding(torch.randn(total + 1), data)


# --------------------------------------------------------------------------------------
# Policy losses (the fused GRPO op)
def _config(**kw):
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=8,
                      use_torch_compile=False, **kw)
    return cfg


def _loss_inputs(dtype, b=6, r=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, r, generator=gen, dtype=dtype) * 3
    # log-ratios on both sides of the clip boundaries (1 - 0.2, 1 + 0.28; not exactly on them:
    # a tie there is the op's own boundary test, where exp's last bit decides the branch) and
    # far beyond (the dual clip at 3, the +-20 log-ratio clamp)
    delta = torch.randn(b, r, generator=gen, dtype=dtype) * 0.3
    delta[0, :5] = torch.tensor([0.799, 0.801, 1.279, 1.281, 25.0], dtype=dtype).log()
    delta[1, :2] = torch.tensor([30.0, -30.0], dtype=dtype)
    logp = (old + delta).requires_grad_()
    adv = torch.randn(b, r, generator=gen, dtype=dtype)
    mask = (torch.rand(b, r, generator=gen) > 0.25)
    mask[:, 0] = True
    return old, logp, adv, mask


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("with_is", [False, True])
def test_tsparse_loss_equals_verls_vanilla(mode, with_is):
    """The ``tsparse`` policy loss gives verl's compute_policy_loss_vanilla: value, metrics and
    gradient, in fp64 to 1e-6 (fp32 to 1e-5), with and without rollout IS weights."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        old, logp, adv, mask = _loss_inputs(dtype)
        isw = torch.rand(logp.shape, dtype=dtype) + 0.5 if with_is else None
        cfg = _config(clip_ratio_low=0.2, clip_ratio_high=0.28)
        ref_loss, ref_m = get_policy_loss_fn("vanilla")(old, logp, adv, mask, mode, cfg, isw)
        (g_ref,) = torch.autograd.grad(ref_loss, logp)
        from tsparse.integrations.verl.losses import compute_policy_loss_tsparse

        loss, m = compute_policy_loss_tsparse(old, logp, adv, mask, mode, cfg, isw)
        (g,) = torch.autograd.grad(loss, logp)
        torch.testing.assert_close(loss.to(dtype), ref_loss, atol=tol, rtol=tol)
        torch.testing.assert_close(g.to(dtype), g_ref, atol=tol, rtol=tol)
        for k in ref_m:
            assert m[k] == pytest.approx(ref_m[k], abs=tol), k


# Every shape verl's vanilla loss broadcasts: per-sequence [b, 1] advantages / IS weights (the
# ValueError "advantages must have shape [24], got [4]" on main), a [b, 1] old log-prob, a
# scalar advantage, and [b, R] everything.
BROADCAST_CASES = {
    "adv_b1": dict(adv=(6, 1)),
    "is_b1": dict(isw=(6, 1)),
    "adv_b1_is_b1": dict(adv=(6, 1), isw=(6, 1)),
    "adv_scalar": dict(adv=()),
    "adv_r": dict(adv=(9,)),
    "old_b1": dict(old=(6, 1)),
    "is_scalar_adv_b1": dict(adv=(6, 1), isw=()),
}


@pytest.mark.parametrize("case", list(BROADCAST_CASES))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_tsparse_loss_accepts_every_shape_vanilla_broadcasts(case, mode):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    shapes = BROADCAST_CASES[case]
    gen = torch.Generator().manual_seed(3)
    old, logp, adv, mask = _loss_inputs(torch.float64)
    if "old" in shapes:
        old = old[:, :1].clone()
    if "adv" in shapes:
        adv = torch.randn(shapes["adv"], generator=gen, dtype=torch.float64)
    isw = torch.rand(shapes["isw"], generator=gen, dtype=torch.float64) + 0.5 if "isw" in shapes else None
    cfg = _config(clip_ratio_low=0.2, clip_ratio_high=0.28)
    ref_loss, ref_m = get_policy_loss_fn("vanilla")(old, logp, adv, mask, mode, cfg, isw)
    (g_ref,) = torch.autograd.grad(ref_loss, logp)
    loss, m = get_policy_loss_fn("tsparse")(old, logp, adv, mask, mode, cfg, isw)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    for k in ref_m:
        assert m[k] == pytest.approx(ref_m[k], abs=1e-12), k


def test_tsparse_loss_names_shapes_that_do_not_broadcast():
    from tsparse.integrations.verl.losses import compute_policy_loss_tsparse

    old, logp, adv, mask = _loss_inputs(torch.float64)
    with pytest.raises(ValueError, match=r"`advantages` \(4,\).*do not broadcast"):
        compute_policy_loss_tsparse(old, logp, torch.zeros(4, dtype=torch.float64), mask, "token-mean", _config(), None)


def test_clip_ratio_c_at_most_one_is_a_value_error_naming_the_key():
    """verl asserts clip_ratio_c > 1 (AssertionError); tsparse raises ValueError naming the
    config key (documented in the README)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, logp, adv, mask = _loss_inputs(torch.float64)
    cfg = _config(clip_ratio_c=1.0)
    with pytest.raises(AssertionError):
        get_policy_loss_fn("vanilla")(old, logp, adv, mask, "token-mean", cfg, None)
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\.clip_ratio_c must be > 1\.0"):
        get_policy_loss_fn("tsparse")(old, logp, adv, mask, "token-mean", cfg, None)


def test_dualstream_loss_accepts_per_sequence_advantages():
    from tsparse.integrations.verl.losses import compute_policy_loss_dualstream, stream_context

    old, logp, adv, mask = _loss_inputs(torch.float64, b=6)
    stream = torch.tensor([0, 0, 1, 1, 1, 0])
    tokens = torch.stack([(mask & (stream[:, None] == k)).sum().double() for k in (0, 1)])
    seqs = torch.stack([((mask & (stream[:, None] == k)).sum(-1) > 0).sum().double() for k in (0, 1)])
    adv_seq = torch.randn(6, 1, dtype=torch.float64)
    with stream_context(stream=stream, tokens=tokens, sequences=seqs):
        a, _ = compute_policy_loss_dualstream(old, logp, adv_seq, mask, "token-mean", _config(), None)
        b, _ = compute_policy_loss_dualstream(old, logp, adv_seq.expand(6, 9).clone(), mask, "token-mean", _config(),
                                              None)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dualstream_loss_decouples_the_streams():
    """Each stream is aggregated over its own tokens: the sparse stream's gradient does not
    change when the localization stream's tokens double (token-mean), and with one stream the
    loss is verl's vanilla loss."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from tsparse.integrations.verl.losses import compute_policy_loss_dualstream, stream_context

    old, logp, adv, mask = _loss_inputs(torch.float64, b=6)
    stream = torch.tensor([0, 0, 1, 1, 1, 0])
    cfg = _config()

    def run(o, lp, a, m, s):
        tokens = torch.stack([(m & (s[:, None] == k)).sum().double() for k in (0, 1)])
        seqs = torch.stack([((m & (s[:, None] == k)).sum(-1) > 0).sum().double() for k in (0, 1)])
        with stream_context(stream=s, tokens=tokens, sequences=seqs):
            return compute_policy_loss_dualstream(o, lp, a, m, "token-mean", cfg, None)

    loss, metrics = run(old, logp, adv, mask, stream)
    (g,) = torch.autograd.grad(loss, logp)
    assert {"actor/pg_loss/localization", "actor/pg_loss/sparse"} <= set(metrics)
    # double the localization rows
    loc = stream == 0
    old2 = torch.cat([old, old[loc]])
    lp2 = torch.cat([logp.detach(), logp.detach()[loc]]).requires_grad_()
    loss2, _ = run(old2, lp2, torch.cat([adv, adv[loc]]), torch.cat([mask, mask[loc]]), torch.cat([stream, stream[loc]]))
    (g2,) = torch.autograd.grad(loss2, lp2)
    sp = stream == 1
    torch.testing.assert_close(g2[: len(stream)][sp], g[sp], atol=1e-12, rtol=0)
    # the per-stream losses are the token means of each stream
    one, m1 = run(old[sp], logp.detach()[sp], adv[sp], mask[sp], stream[sp])
    ref, _ = get_policy_loss_fn("vanilla")(old[sp], logp.detach()[sp], adv[sp], mask[sp], "token-mean", cfg, None)
    torch.testing.assert_close(one, ref, atol=1e-10, rtol=0)
    assert metrics["actor/pg_loss/sparse"] == pytest.approx(float(ref))


def test_dualstream_loss_needs_the_flag():
    from tsparse.integrations.verl.losses import compute_policy_loss_dualstream

    old, logp, adv, mask = _loss_inputs(torch.float32)
    with pytest.raises(ValueError, match="impl_backend=tsparse"):
        compute_policy_loss_dualstream(old, logp, adv, mask, "token-mean", _config(), None)


def test_varlen_switch_through_verls_own_padding_functions():
    """With ``varlen`` swapped in, verl's own ``left_right_2_no_padding`` (which calls the
    swapped ``unpad_input``) and ``no_padding_2_padding`` give what they give without it."""
    from tensordict import TensorDict
    from verl.workers.utils import padding

    from tsparse.integrations.verl import apply_tsparse_to_verl, unpatch

    gen = torch.Generator().manual_seed(5)
    b, p, r = 3, 5, 4
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    resp_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    attn = torch.cat([prompt_mask, resp_mask], 1)
    ids = torch.randint(0, 100, (b, p + r), generator=gen) * attn
    pos = (attn.cumsum(1) - 1).clamp(min=0)

    def build():
        return TensorDict({"input_ids": ids.clone(), "attention_mask": attn.clone(), "response_mask": resp_mask.clone(),
                           "position_ids": pos.clone(), "prompts": ids[:, :p].clone(), "responses": ids[:, p:].clone()},
                          batch_size=[b])

    ref = padding.left_right_2_no_padding(build())
    apply_tsparse_to_verl(None, varlen=True, stream_loss=False)
    try:
        assert padding.unpad_input.__module__ == "tsparse.ops.varlen"
        got = padding.left_right_2_no_padding(build())
    finally:
        unpatch()
    assert padding.unpad_input.__module__ == "verl.utils.attention_utils"
    from tsparse.integrations.verl.patches import VARLEN_TARGETS, resolve

    for module, path in VARLEN_TARGETS:  # every original back (none is tsparse's own function)
        owner, name = resolve(module, path)
        assert getattr(owner, name).__module__.startswith("verl."), (module, path)
    for key in ("input_ids", "position_ids"):
        torch.testing.assert_close(got[key].values(), ref[key].values(), rtol=0, atol=0)
        torch.testing.assert_close(got[key].offsets(), ref[key].offsets(), rtol=0, atol=0)
    assert torch.equal(got.get_non_tensor("indices"), ref.get_non_tensor("indices"))
