"""The flag in verl 0.9.1's own FSDP engine (``FSDPEngineWithLMHead``, FSDP2, fp32, gloo world
size 1, CPU) around the tiny random Qwen2.5-VL: flag off leaves verl untouched; flag on gives
the same log-probs, entropy, loss and gradients (pruning off); with pruning the loss is finite,
only the kept visual tokens reach the language model, and the training forward sees exactly the
tokens the dual-stream rollout generated from. Harness: ``_verl_cpu.py``.

Tolerances (fp32 everywhere): log-probs / entropy ``atol 2e-5``; loss ``rtol 1e-5``;
gradients ``rtol 1e-4, atol 1e-6`` (the fused ops sum in a different order than PyTorch's
log_softmax / matmul backward).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("tensordict")

from _verl_cpu import (  # noqa: E402
    actor_config,
    build_engine,
    engine_batch,
    grads,
    nested,
    save_tiny_checkpoint,
    verl_on_cpu,
)

pytestmark = pytest.mark.slow

LP_ATOL = 2e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def env(tmp_path_factory, synthetic_samples):
    """The plugin registered in this process, a tiny checkpoint, verl on the CPU, one flag-off
    engine and a rollout batch (2 questions x 2 localization x 2 sparse rollouts, the
    localization responses given as warm-up targets so the boxes are the ground truth)."""
    import tsparse.integrations.verl.plugin  # noqa: F401  (registers, as `import verl` does when installed)
    from tsparse.dualstream.config import load_method_config
    from tsparse.dualstream.data import warmup_response
    from tsparse.dualstream.models import VLProcessor
    from tsparse.integrations.verl import patches
    from tsparse.integrations.verl.rollout import dual_stream_rollout, to_verl_batch

    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))
    proc = VLProcessor.from_pretrained(ckpt)
    samples = synthetic_samples["one"][:2]
    with verl_on_cpu():
        before = _targets()
        off = build_engine(ckpt, micro_batch_size=2)
        texts = [[warmup_response(s, "localization")] * 2 for s in samples]
        res = dual_stream_rollout(
            off.module, proc, samples, method=load_method_config(), n_localization=2, n_sparse=2, max_new_tokens=6,
            localization_texts=texts, generate_kwargs={"do_sample": True, "top_k": 0},
        )
        batch = to_verl_batch(res.records, off.module, proc.image_token_id)
        yield dict(ckpt=ckpt, proc=proc, samples=samples, off=off, res=res, batch=batch, before=before)
        patches.unpatch()


def _targets():
    from tsparse.integrations.verl import patches

    out = {}
    for module, path in patches.PATCH_TARGETS + (patches.DISPATCH_TARGET,):
        owner, name = patches.resolve(module, path)
        out[(module, path)] = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
    return out


def _select(batch, stream, first=None):
    idx = [i for i, s in enumerate(batch["tsparse_stream"].tolist()) if s == stream][:first]
    from verl.utils import tensordict_utils as tu

    return tu.index_select_tensor_dict(batch, idx)


def _with_ppo_fields(td, gen):
    """old_log_probs / advantages (random, both signs, around the clip range) per response."""
    resp = td["responses"].offsets().diff().tolist()
    td = td.clone()
    td["old_log_probs"] = nested([-torch.rand(r, generator=gen) * 4 for r in resp])
    td["advantages"] = nested([torch.randn(r, generator=gen) for r in resp])
    return td


def _train(engine, td, loss_mode, **kw):
    from functools import partial

    from verl.workers.utils.losses import ppo_loss

    cfg = actor_config(loss_mode, ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=len(td), **kw)
    with engine.train_mode():  # (it zeroes the gradients on exit: read them inside)
        out = engine.train_batch(td, loss_function=partial(ppo_loss, config=cfg))
        g = grads(engine)
    return out, g


def _metric_values(m) -> list:
    """verl's metric entry (a ``Metric`` aggregator, a list of floats, or one float)."""
    if hasattr(m, "values") and not isinstance(m, dict):
        return [float(v) for v in m.values]
    if isinstance(m, (list, tuple)):
        return [x for v in m for x in _metric_values(v)]
    return [float(m)]


def _reset(engine, state):
    engine.module.load_state_dict(state)
    engine.optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------
def test_flag_off_leaves_every_patchable_verl_function_identical(env):
    from tsparse.integrations.verl import patches

    from verl.models.transformers.qwen2_vl import forward_with_normal_backend

    with verl_on_cpu():
        snap = _targets()
        eng = build_engine(env["ckpt"], micro_batch_size=2)
        dense = _select(env["batch"], 0)
        eng.infer_batch(engine_batch(dense, fused=False, micro_batch_size=2))
        _train(eng, _with_ppo_fields(engine_batch(dense, fused=False, micro_batch_size=2), torch.Generator().manual_seed(0)),
               "vanilla")
        after = _targets()
    assert not patches.is_patched()
    for key, obj in snap.items():
        assert after[key] is obj, f"{key} changed with the flag off"
    # The only thing registration installed is the dispatcher; the swap targets are verl's own.
    assert getattr(snap[patches.DISPATCH_TARGET], "__tsparse_dispatch__", False)
    assert [t for t in patches.patched_targets()] == [("FSDPEngine", "_build_module")]
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    assert Qwen2_5_VLForConditionalGeneration.forward is forward_with_normal_backend  # verl's, not ours
    # The dispatcher's original is verl's own method.
    assert snap[patches.DISPATCH_TARGET].__wrapped__.__module__ == "verl.workers.engine.fsdp.transformer_impl"


# (switches, flag-on loss mode): verl's log-prob math with the swapped forward / varlen and
# verl's loss isolates the plumbing; the other two add tsparse's fused ops and loss.
OPTION_SETS = {
    "verl_math": ({"logprobs": False}, "vanilla"),
    "tsparse_logits": ({"fused_linear": False}, "tsparse"),
    "tsparse_fused_linear": ({"chunk_size": 64}, "tsparse"),
}


@pytest.mark.parametrize("opts", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_flag_on_matches_flag_off_without_pruning(env, opts):
    """Log-probs, entropy, loss and every gradient agree between verl's own path (flag off,
    loss_mode=vanilla) and the tsparse path (flag on: tsparse forward, varlen swaps, fused
    log-probs, loss_mode=tsparse), pruning off (the localization stream's dense samples)."""
    from tsparse.integrations.verl import patches

    dense = _select(env["batch"], 0)
    off = env["off"]
    state = {k: v.detach().clone() for k, v in off.module.state_dict().items()}
    with verl_on_cpu():
        ref = off.infer_batch(engine_batch(dense, fused=False, micro_batch_size=2))["model_output"]
        on = build_engine(env["ckpt"], micro_batch_size=2,
                          fused_kernel_options={"impl_backend": "tsparse", **OPTION_SETS[opts][0]})
        try:
            assert patches.is_patched()
            got = on.infer_batch(engine_batch(dense, fused=True, micro_batch_size=2))["model_output"]
            torch.testing.assert_close(got["log_probs"].values(), ref["log_probs"].values(), atol=LP_ATOL, rtol=0)
            torch.testing.assert_close(got["entropy"].values(), ref["entropy"].values(), atol=LP_ATOL, rtol=0)

            gen = torch.Generator().manual_seed(1)
            td = _with_ppo_fields(dense, gen)
            _reset(off, state)
            out_off, g_off = _train(off, engine_batch(td, fused=False, micro_batch_size=2), "vanilla")
            out_on, g_on = _train(on, engine_batch(td, fused=True, micro_batch_size=2), OPTION_SETS[opts][1])
        finally:
            patches.unpatch()
            _reset(off, state)
    assert torch.isfinite(torch.tensor(out_on["loss"])).all()
    torch.testing.assert_close(torch.tensor(out_on["loss"]), torch.tensor(out_off["loss"]), rtol=1e-5, atol=1e-7)
    for k in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/entropy_loss"):
        a, b = _metric_values(out_on["metrics"][k]), _metric_values(out_off["metrics"][k])
        torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert set(g_on) == set(g_off) and len(g_on) > 10
    for name in g_off:
        torch.testing.assert_close(g_on[name], g_off[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}")


def test_unpatch_restores_every_original(env):
    from tsparse.integrations.verl import patches

    with verl_on_cpu():
        snap = _targets()
        patches.apply_tsparse_to_verl(env["off"].module)
        changed = [k for k, v in _targets().items() if v is not snap[k]]
        patches.unpatch()
        after = _targets()
    # every switch replaced its targets (the Qwen2-VL class is only touched for a Qwen2-VL model)
    assert len(changed) == len(patches.PATCH_TARGETS) - 1
    assert all(after[k] is v for k, v in snap.items())


def test_switches_off_leave_their_targets(env):
    from tsparse.integrations.verl import patches

    with verl_on_cpu():
        snap = _targets()
        patches.apply_tsparse_to_verl(None, varlen=False, stream_loss=False)
        try:
            assert _targets() == snap
        finally:
            patches.unpatch()
        patches.apply_tsparse_to_verl(None, varlen=True, stream_loss=False)
        try:
            changed = {k for k, v in _targets().items() if v is not snap[k]}
        finally:
            patches.unpatch()
    assert changed == set(patches.VARLEN_TARGETS)


# --------------------------------------------------------------------------------------
def _lm_inputs(engine):
    """Records the inputs_embeds each language-model call receives."""
    seen = []

    def hook(_mod, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    lm = engine.module.model.language_model
    return seen, lm.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("fusion", [None, "none", "summary"])
def test_pruning_only_kept_tokens_reach_the_language_model(env, fusion):
    """Flag on with pruning: the sparse samples' dropped visual tokens never reach the language
    model, the kept ones arrive exactly as the rollout built them (fused, original positions),
    and the engine's log-probs of each sparse response equal the rollout model's teacher-forced
    log-probs on the pruned inputs - the policy trains on the tokens the rollout saw. For the
    default fusion method (None: both sides' defaults, which must agree) and named ones given
    to both the engine options and the rollout's pruning config."""
    import dataclasses

    from tsparse.dualstream.config import load_method_config
    from tsparse.dualstream.models import build_tiny
    from tsparse.dualstream.pruning import extend_sparse_inputs, sparse_stream_inputs
    from tsparse.integrations.verl import patches
    from tsparse.integrations.verl.model_forward import last_prune_stats
    from tsparse.integrations.verl.rollout import hf_generation_context

    proc = env["proc"]
    res = env["res"]
    sparse_recs = res.stream(1)
    assert sparse_recs and all(r.boxes for r in sparse_recs)
    method = load_method_config()
    options = {"impl_backend": "tsparse", "logprobs": False}
    pruning = method.pruning
    if fusion is not None:
        options["pruning"] = {"fuse": fusion}
        pruning = dataclasses.replace(pruning, fuse=fusion)
    with verl_on_cpu():
        on = build_engine(env["ckpt"], micro_batch_size=1, fused_kernel_options=options)
        try:
            seen, handle = _lm_inputs(on)
            rec = sparse_recs[0]
            one = _select(env["batch"], 1, first=1)
            lp = on.infer_batch(engine_batch(one, fused=True, micro_batch_size=1))["model_output"]["log_probs"]
            handle.remove()
            stats = last_prune_stats()
        finally:
            patches.unpatch()

        # The rollout-side pruning of the same prompt and boxes (tsparse.dualstream.pruning).
        ref_model, _ = build_tiny()
        ids = rec.prompt_ids[None]
        with torch.no_grad(), hf_generation_context():
            sp = sparse_stream_inputs(ref_model, ids, torch.ones_like(ids), rec.image_grid_thw, [rec.boxes],
                                      pixel_values=rec.pixel_values, config=pruning)
            ext = extend_sparse_inputs(ref_model, sp, rec.response_ids[None])
            logits = ref_model(**ext.model_inputs()).logits[0]
    n_prompt = rec.prompt_ids.shape[0]
    n_vis = int(rec.image_grid_thw.prod(-1).sum()) // 4
    kept = int(sp.kept_counts.sum())
    assert 0 < kept < n_vis  # the boxes prune
    assert stats.visual_tokens == n_vis and stats.visual_kept == kept
    assert stats.tokens_in == n_prompt + rec.response_ids.shape[0]
    assert stats.tokens_to_lm == stats.tokens_in - (n_vis - kept)
    (emb,) = seen
    assert emb.shape[1] == stats.tokens_to_lm  # only kept tokens reached the LM
    torch.testing.assert_close(emb[0], ext.inputs_embeds[0], atol=1e-5, rtol=0)
    # Engine log-probs of the response == rollout model teacher forcing on the pruned inputs.
    r = rec.response_ids.shape[0]
    ref_lp = torch.log_softmax(logits[sp.prompt_length - 1: sp.prompt_length - 1 + r].float(), -1)
    ref_lp = ref_lp.gather(1, rec.response_ids[:, None])[:, 0]
    got = lp.values()[n_prompt - 1: n_prompt - 1 + r]
    torch.testing.assert_close(got, ref_lp, atol=LP_ATOL, rtol=0)


def test_dual_stream_training_step_with_pruning(env):
    """The whole flag-on path on the mixed batch: old log-probs (pruned forward), the registered
    two-level advantage estimator on verl's ``uid`` index, then a train step with the decoupled
    ``tsparse_dualstream`` loss: finite loss, per-stream metrics, every trained parameter gets a
    finite gradient, and the sparse samples were pruned."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from tsparse.integrations.verl import patches
    from tsparse.integrations.verl.model_forward import last_prune_stats

    batch = env["batch"]
    with verl_on_cpu():
        on = build_engine(env["ckpt"], micro_batch_size=2, fused_kernel_options={"impl_backend": "tsparse",
                                                                                "logprobs": False})
        try:
            out = on.infer_batch(engine_batch(batch, fused=True, micro_batch_size=2))["model_output"]
            from verl.workers.utils.padding import response_from_nested

            old = response_from_nested(out["log_probs"], batch["response_mask"])
            rm = batch["rm_scores"].to_padded_tensor(0.0)
            mask = batch["response_mask"].to_padded_tensor(0)
            adv, _ = get_adv_estimator_fn("tsparse_dualstream")(
                token_level_rewards=rm, response_mask=mask, config=None, index=list(batch["uid"]))
            lens = batch["responses"].offsets().diff().tolist()
            td = batch.clone()
            td["old_log_probs"] = nested([old.values()[o: o + n] - 0.05 for o, n in zip(batch["responses"].offsets().tolist(), lens)])
            gen = torch.Generator().manual_seed(3)
            td["advantages"] = nested([adv[i, :n] + 0.1 * torch.randn(n, generator=gen) for i, n in enumerate(lens)])
            result, g = _train(on, engine_batch(td, fused=True, micro_batch_size=2), "tsparse_dualstream")
            stats = last_prune_stats()
        finally:
            patches.unpatch()
    assert all(torch.isfinite(torch.tensor(v)) for v in result["loss"])
    metrics = result["metrics"]
    for k in ("actor/pg_loss/localization", "actor/pg_loss/sparse", "actor/tokens/sparse"):
        assert k in metrics, sorted(metrics)
    assert stats is not None and stats.visual_kept < stats.visual_tokens
    assert g and all(torch.isfinite(v).all() for v in g.values())
    assert any(v.abs().sum() > 0 for k, v in g.items() if "visual" in k)  # pruning is differentiable


def test_pruned_batch_with_prune_visual_off_raises(env):
    from tsparse.integrations.verl import patches

    sparse = _select(env["batch"], 1, first=2)
    with verl_on_cpu():
        on = build_engine(env["ckpt"], micro_batch_size=2,
                          fused_kernel_options={"impl_backend": "tsparse", "logprobs": False, "prune_visual": False})
        try:
            with pytest.raises(ValueError, match="prune_visual is false"):
                on.infer_batch(engine_batch(sparse, fused=True, micro_batch_size=2))
        finally:
            patches.unpatch()


def test_generation_on_the_engine_module_matches_transformers(env):
    """HF generate on the actor's FSDP module (inside verl's patched classes, flag on) gives the
    same greedy tokens as a fresh transformers model: hf_generation_context restores
    transformers' forwards."""
    from tsparse.dualstream.config import load_method_config
    from tsparse.dualstream.models import build_tiny
    from tsparse.integrations.verl import patches
    from tsparse.integrations.verl.rollout import full_parameters, hf_generation_context

    proc = env["proc"]
    enc = proc.encode_samples(env["samples"], load_method_config().prompts.localization)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    with verl_on_cpu():
        on = build_engine(env["ckpt"], micro_batch_size=2, fused_kernel_options={"impl_backend": "tsparse"})
        try:
            with torch.no_grad(), hf_generation_context(), full_parameters(on.module):
                got = on.module.generate(**inputs, max_new_tokens=8, do_sample=False)
        finally:
            patches.unpatch()
        ref_model, _ = build_tiny()
        with torch.no_grad(), hf_generation_context():
            ref = ref_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)


def test_rollout_records_and_batch(env):
    """The dual-stream rollout's sequences: G localization + G*G' sparse per question, two-level
    group uids, composite rewards with cross-feedback in rm_scores, the sparse stream pruned to
    the localization rollout's boxes (keep ratio < 1), and verl's batch layout."""
    from tsparse.dualstream.rewards import localization_reward, sparse_reward
    from tsparse.integrations.verl.advantages import stream_of_uid

    res, batch, samples = env["res"], env["batch"], env["samples"]
    loc, sp = res.stream(0), res.stream(1)
    assert len(loc) == 2 * 2 and len(sp) == 2 * 2 * 2
    assert [r.uid for r in loc] == ["q0", "q0", "q1", "q1"]
    assert [r.uid for r in sp] == ["q0#0"] * 2 + ["q0#1"] * 2 + ["q1#0"] * 2 + ["q1#1"] * 2
    assert all(stream_of_uid(r.uid) == r.stream for r in res.records)
    for r in sp:
        # the warm-up target's boxes (written with 2 decimals), parsed back
        expect_boxes = [[round(v, 2) for v in b] for b in samples[int(r.question[1:])].boxes]
        torch.testing.assert_close(torch.tensor(r.boxes), torch.tensor(expect_boxes), atol=1e-9, rtol=0)
        assert 0 < r.keep_ratio < 1 and not r.fallback
        parent = loc[int(r.question[1:]) * 2 + r.parent]
        expect = sparse_reward(r.text, samples[int(r.question[1:])], cross_accuracy=parent.terms["accuracy"])
        assert r.score == pytest.approx(expect.score)
    for r in loc:
        kids = [s for s in sp if s.question == r.question and s.parent == r.parent]
        cross = sum(k.terms["accuracy"] for k in kids) / len(kids)
        assert r.score == pytest.approx(localization_reward(r.text, samples[int(r.question[1:])],
                                                            cross_accuracy=cross).score)
        assert r.terms["format"] == 1.0 and r.terms["accuracy"] == 1.0
    assert 0 < res.metrics["rollout/keep_ratio"] < 1 and res.metrics["rollout/box_parse_rate"] == 1.0
    # verl's layout
    n = len(res.records)
    assert batch.batch_size == torch.Size([n])
    assert batch["position_ids"].values().shape[0] == 4
    rm = batch["rm_scores"]
    for i, rec in enumerate(res.records):
        row = rm[i]
        assert row[-1] == pytest.approx(rec.score) and float(row[:-1].abs().sum()) == 0
        mm = batch["multi_modal_inputs"][i]
        assert int(mm["tsparse_prune"].sum()) == (mm["image_grid_thw"].shape[0] if rec.stream else 0)
    assert batch["tsparse_stream"].tolist() == [r.stream for r in res.records]


def test_rollout_generates_its_own_localization_responses(env):
    """The branch without `localization_texts`: the policy samples the localization stream
    itself (HF generate on the engine's module), then the sparse stream; every prompt tensor
    handed to generate sits next to the model, image_grid_thw included (on a GPU a grid left on
    the CPU breaks the vision tower's rotary ids)."""
    from tsparse.dualstream.config import load_method_config
    from tsparse.dualstream.rollout import _generate_inputs
    from tsparse.integrations.verl.rollout import dual_stream_rollout

    proc, samples = env["proc"], env["samples"]
    enc = proc.encode_samples(samples, load_method_config().prompts.localization)
    placed = _generate_inputs(enc, torch.device("meta"))
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(placed)
    assert all(v.device.type == "meta" for v in placed.values())

    with verl_on_cpu():
        res = dual_stream_rollout(
            env["off"].module, proc, samples, method=load_method_config(), n_localization=2, n_sparse=1,
            max_new_tokens=4, generate_kwargs={"do_sample": True, "top_k": 0},
        )
    loc, sp = res.stream(0), res.stream(1)
    assert len(loc) == 2 * 2 and len(sp) == 2 * 2 * 1
    assert all(0 < len(r.response_ids) <= 4 + 1 for r in loc)
    assert "time/localization" in res.metrics and 0 <= res.metrics["rollout/box_parse_rate"] <= 1
