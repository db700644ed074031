"""Tests of the fused GRPO ops against the pure-PyTorch references (tsparse/reference.py,
written from verl 0.9.1's published math) and against verl itself where it imports.

Every test takes a ``device`` ("cpu" always; "cuda" runs when a GPU is usable and skips
otherwise) and fresh random inputs (see conftest.py for the seed).

Tolerances (the references run in fp64 on the same input values):
  * fp64 logits: 1e-10 (values and gradients);
  * fp32 logits: log-probs / entropy 2e-5 absolute (fp32 accumulation over V); gradients 1e-6
    absolute + 1e-4 relative;
  * bf16 / fp16 logits: the inputs are exact in fp64 and the math is fp32, so log-probs and
    entropy use the fp32 tolerances (5e-5 at V = 152,064); gradients are rounded once to the
    logits' dtype: 8e-3 relative (bf16, 2^-8 is one rounding) / 1e-3 relative + 1e-7 absolute
    (fp16, whose subnormals start at 6e-8);
  * 16/32-bit log-prob gradients also get, per row, |upstream| / T * 1e-5 absolute
    (:data:`P_ABS_ERR`): the target element's 1 - p_t cancels when p_t ~ 1, so the fp32
    probabilities' absolute error does not shrink with it (a bf16 case failed on one seed in
    300: 1.1e-5 computed as 1.37e-5 / 1.38e-5 after the 0.7 temperature, 0.9% > 8e-3).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tsparse import reference as ref
from tsparse.ops import fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss, logprobs
from tsparse.ops.grpo import CLAMP_EDGES, KL_TYPES, LOSS_AGG_MODES

from conftest import requires_cuda

ops = torch.ops.tsparse
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# --------------------------------------------------------------------------------------
# Helpers
def value_tol(dtype, v: int) -> dict:
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-10)
    return dict(atol=5e-5 if v > 10000 else 2e-5, rtol=1e-5)


def grad_tol(dtype) -> dict:
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=1e-6, rtol=1e-4),
        torch.bfloat16: dict(atol=1e-9, rtol=8e-3),
        torch.float16: dict(atol=1e-7, rtol=1e-3),
    }[dtype]


def close(a, b, **tol):
    torch.testing.assert_close(a.to(torch.float64).cpu(), b.to(torch.float64).cpu(), equal_nan=True, **tol)


def close_grad(g, g_ref, dtype):
    """Gradients against the fp64 reference: grad_tol(dtype), plus 2e-5 of the largest gradient
    for 16/32-bit logits - the entropy gradient's factor g_logp + g_ent * (z - mean z) cancels for
    rare elements, and fp32 keeps the cancelled value only to ~1e-6 of its terms."""
    tol = dict(grad_tol(dtype))
    if dtype != torch.float64 and g_ref.numel():
        tol["atol"] = max(tol["atol"], 2e-5 * g_ref.abs().max().item())
    close(g, g_ref.to(dtype), **tol)


#: Absolute error bound of the kernels' softmax probabilities (fp32 math, profiling/NOTES.md
#: "Accuracy of the row kernels": p_j = 2^(offset_j - L) inherits the row sum's relative error
#: eps_a, ~7e-6 at V = 152,064 on the device, plus the offset and L roundings; p <= 1 makes it
#: absolute). A log-prob gradient element is upstream * (onehot_j - p_j) / T: for the TARGET
#: element with p_t ~ 1, 1 - p_t cancels, so its error is absolute (|upstream| / T * this), not
#: relative - e.g. p_t = 0.99998882 gives 1 - p_t = 1.1e-5 computed to ~1.2e-7, 0.9% relative,
#: more than one bf16 rounding (torch's own fp32 log_softmax backward has the same cancellation).
P_ABS_ERR = 1e-5


def close_logp_grad(g, g_ref, dtype, upstream, temperature: float):
    """A log-prob gradient against the fp64 reference (rounded to ``dtype`` like ``g``):
    ``grad_tol(dtype)``'s relative tolerance (one rounding to the logits' dtype) plus, per row,
    the absolute error of the fp32 probabilities times ``|upstream[row]| / temperature``
    (:data:`P_ABS_ERR`; ``upstream``: the gradient reaching each row's log-prob, a tensor [T] or
    a number)."""
    tol = grad_tol(dtype)
    g64, r64 = g.to(torch.float64).cpu(), g_ref.to(dtype).to(torch.float64).cpu()
    up = torch.as_tensor(upstream, dtype=torch.float64).abs().cpu()
    p_err = 0.0 if dtype == torch.float64 else P_ABS_ERR  # fp64 logits: fp64 math, grad_tol's 1e-10 holds
    atol = tol["atol"] + p_err * (up.reshape(-1, 1) if up.dim() else up) / temperature
    bad = (g64 - r64).abs() > atol + tol["rtol"] * r64.abs()
    if bad.any():
        i = tuple(int(k) for k in bad.nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} gradient elements differ beyond tolerance; first at {i}: "
            f"{g64[i].item():.9g} vs {r64[i].item():.9g} (rtol {tol['rtol']}, atol {float(atol.expand_as(g64)[i]):.3g})"
        )


def random_logits(t: int, v: int, dtype, device, scale: float = 3.0):
    return (torch.randn(t, v, dtype=torch.float64) * scale).to(dtype).to(device)


def grpo_inputs(t: int, v: int, device, dtype=torch.float64, num_streams: int = 2, mask_p: float = 0.8):
    """Logits and everything else of a GRPO batch; old log-probs near the current ones so the
    ratios straddle the clip range, advantages of both signs."""
    logits = random_logits(t, v, dtype, device)
    targets = torch.randint(0, v, (t,), device=device)
    lp, _ = ref.logprobs_ref(logits.cpu(), targets.cpu())
    old = (lp + torch.randn(t, dtype=torch.float64) * 0.25).to(device)
    refl = (lp + torch.randn(t, dtype=torch.float64) * 0.25).to(device)
    adv = torch.randn(t, dtype=torch.float64).to(device)
    mask = (torch.rand(t) < mask_p).to(device)
    stream = torch.randint(0, num_streams, (t,)).to(device)
    seq = torch.randint(0, max(1, t // 4), (t,)).to(device)
    isw = (torch.rand(t, dtype=torch.float64) * 1.5 + 0.25).to(device)
    return dict(logits=logits, targets=targets, old=old, ref=refl, adv=adv, mask=mask, stream=stream, seq=seq, isw=isw)


def grad_of(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d value / d x) for a scalar function of a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf)
    (g,) = torch.autograd.grad(out, leaf)
    return out.detach(), g


# ======================================================================================
# logprobs
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("v", [1, 7, 4096, 152064])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_matches_reference(device, dtype, v, temperature):
    t = 3 if v > 10000 else 37
    x = random_logits(t, v, dtype, device)
    targets = torch.randint(0, v, (t,), device=device)
    g_lp = torch.randn(t, dtype=torch.float64, device=device)
    g_en = torch.randn(t, dtype=torch.float64, device=device)

    lp, en = logprobs(x, targets, temperature=temperature, return_entropy=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == acc and en.dtype == acc and lp.shape == (t,) and lp.device.type == device
    lp_r, en_r = ref.logprobs_ref(x, targets, temperature=temperature, return_entropy=True)
    close(lp, lp_r, **value_tol(dtype, v))
    close(en, en_r, **value_tol(dtype, v))

    def objective(fn):
        def f(leaf):
            a, b = fn(leaf)
            return (a.double() * g_lp).sum() + (b.double() * g_en).sum()
        return f

    _, g = grad_of(objective(lambda z: logprobs(z, targets, temperature=temperature, return_entropy=True)), x)
    _, g_r = grad_of(objective(lambda z: ref.logprobs_ref(z, targets, temperature=temperature, return_entropy=True)), x)
    assert g.dtype == dtype
    close_grad(g, g_r, dtype)
    # Without the entropy: the logp-only gradient (a separate kernel path: g_ent = 0).
    lp2, none = logprobs(x, targets, temperature=temperature)
    assert none is None
    close(lp2, lp, atol=0, rtol=0)
    _, g2 = grad_of(lambda z: (logprobs(z, targets, temperature=temperature)[0].double() * g_lp).sum(), x)
    _, g2_r = grad_of(lambda z: (ref.logprobs_ref(z, targets, temperature=temperature)[0] * g_lp).sum(), x)
    close_logp_grad(g2, g2_r, dtype, g_lp, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprobs_extreme_logits(device, dtype):
    t, v = 8, 300
    x = random_logits(t, v, torch.float64, "cpu")
    x[0, :] = 0.0
    x[0, 5] = 1e4  # one dominant logit: p = 1 there, logp = 0 at target 5, entropy 0
    x[1, :] = -1e4
    x[1, 7] = 1e4
    x[2, ::3] = -math.inf  # -inf entries (p = 0, no NaN in the entropy or the gradient)
    x[3, :] = -math.inf
    x[3, 11] = 2.0  # all mass on one finite logit
    x[4, :] = torch.linspace(-1e4, 1e4, v, dtype=torch.float64)
    x[5, 0] = -math.inf  # the target itself is -inf: logp = -inf
    x[6, 1::2] = 1e4
    x = x.to(dtype).to(device)
    targets = torch.tensor([5, 7, 1, 11, v - 1, 0, 3, 9], device=device)
    for temperature in (1.0, 0.6):
        lp, en = logprobs(x, targets, temperature=temperature, return_entropy=True)
        lp_r, en_r = ref.logprobs_ref(x, targets, temperature=temperature, return_entropy=True)
        assert torch.isfinite(lp[[0, 1, 2, 3, 4, 6, 7]]).all() and lp[5].item() == -math.inf
        assert torch.isfinite(en).all()
        tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=1e-5)
        close(lp, lp_r, **tol)
        close(en, en_r, **tol)
        assert abs(lp[0].item()) < 1e-6 and abs(en[0].item()) < 1e-6
        # Gradient (rows other than the -inf target, whose logp is -inf by definition).
        keep = torch.tensor([0, 1, 2, 3, 4, 6, 7], device=device)
        g_lp = torch.randn(t, dtype=torch.float64, device=device) * (torch.arange(t, device=device) != 5)
        g_en = torch.randn(t, dtype=torch.float64, device=device)

        def f(fn):
            def obj(z):
                a, b = fn(z)
                return (torch.where(g_lp != 0, a.double() * g_lp, 0)).sum() + (b.double() * g_en).sum()
            return obj

        _, g = grad_of(f(lambda z: logprobs(z, targets, temperature=temperature, return_entropy=True)), x)
        _, g_r = grad_of(f(lambda z: ref.logprobs_ref(z, targets, temperature=temperature, return_entropy=True)), x)
        assert torch.isfinite(g).all()
        close_grad(g[keep], g_r[keep], dtype)


def test_logprobs_empty_and_noncontiguous(device):
    x = torch.randn(0, 11, device=device, requires_grad=True)
    lp, en = logprobs(x, torch.zeros(0, dtype=torch.int64, device=device), return_entropy=True)
    assert lp.shape == (0,) and en.shape == (0,)
    (lp.sum() + en.sum()).backward()
    assert x.grad.shape == (0, 11)

    wide = random_logits(9, 40, torch.float32, device)
    view = wide[:, 3:30]  # row stride 40, inner stride 1: used in place
    tg = torch.randint(0, 27, (9,), device=device)
    lp, en = logprobs(view, tg, return_entropy=True)
    lp_r, en_r = ref.logprobs_ref(view, tg, return_entropy=True)
    close(lp, lp_r, **value_tol(torch.float32, 27))
    close(en, en_r, **value_tol(torch.float32, 27))
    tr = random_logits(27, 9, torch.float32, device).t()  # inner stride != 1: copied
    lp, _ = logprobs(tr, tg)
    close(lp, ref.logprobs_ref(tr, tg)[0], **value_tol(torch.float32, 27))
    _, g = grad_of(lambda z: logprobs(z[:, 3:30], tg)[0].sum(), wide)
    _, g_r = grad_of(lambda z: ref.logprobs_ref(z[:, 3:30], tg)[0].sum(), wide)
    close_logp_grad(g, g_r, torch.float32, 1.0, 1.0)
    assert (g[:, :3] == 0).all() and (g[:, 30:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_inplace_backward_same_gradient(device, dtype):
    t, v = 13, 1031
    base = random_logits(t, v, dtype, device)
    targets = torch.randint(0, v, (t,), device=device)
    g_lp, g_en = torch.randn(t, device=device), torch.randn(t, device=device)

    def run(inplace):
        leaf = base.detach().clone().requires_grad_()
        x = leaf * 2.0  # a non-leaf: its storage belongs to the graph
        lp, en = logprobs(x, targets, temperature=0.9, return_entropy=True, inplace_backward=inplace)
        v0 = x._version
        ((lp * g_lp).sum() + (en * g_en).sum()).backward()
        return leaf.grad, x, v0

    g_ref, x_ref, _ = run(False)
    g_in, x_in, v0 = run(True)
    assert torch.equal(g_in, g_ref)  # same kernel, same values, bit for bit
    assert x_in._version > v0  # the logits were overwritten ...
    assert torch.equal(x_in.detach(), (g_ref / 2.0).to(dtype))  # ... with their own gradient
    assert torch.equal(x_ref.detach(), base * 2.0)  # the out-of-place path leaves them alone


def test_logprobs_inplace_backward_falls_back_or_refuses_safely(device):
    t, v = 5, 64
    targets = torch.randint(0, v, (t,), device=device)
    # A leaf: its values are the user's, never overwritten.
    leaf = random_logits(t, v, torch.float32, device).requires_grad_()
    before = leaf.detach().clone()
    logprobs(leaf, targets, inplace_backward=True)[0].sum().backward()
    assert torch.equal(leaf.detach(), before)
    _, g_r = grad_of(lambda z: ref.logprobs_ref(z, targets)[0].sum(), before)
    close_logp_grad(leaf.grad, g_r, torch.float32, 1.0, 1.0)
    # create_graph=True: the logits may still be needed, so the gradient is a fresh tensor (and
    # differentiating it again raises: the ops are differentiable once).
    w = before.clone().requires_grad_()
    x = w * 1.5
    lp, _ = logprobs(x, targets, inplace_backward=True)
    (gx,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
    assert torch.equal(x.detach(), before * 1.5)
    _, gx_r = grad_of(lambda z: ref.logprobs_ref(z, targets)[0].sum(), before * 1.5)
    close_logp_grad(gx, gx_r, torch.float32, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="differentiate twice a tsparse"):
        torch.autograd.grad(gx.sum(), w)
    # Another node saved the same logits and runs its backward after ours: the in-place backward
    # sees it (it holds the logits) and returns a fresh gradient, so sin's backward reads the
    # logits, not their gradient (it used to raise "modified by an inplace operation").
    w = before.clone().requires_grad_()
    x = w * 1.5
    s = x.sin()  # saves x; created first, so its backward runs after logprobs'
    lp, _ = logprobs(x, targets, inplace_backward=True)
    (lp.sum() + s.sum()).backward()
    assert torch.equal(x.detach(), before * 1.5)
    _, g_r = grad_of(lambda z: ref.logprobs_ref(z * 1.5, targets)[0].sum() + (z * 1.5).sin().sum(), before)
    close_logp_grad(w.grad, g_r, torch.float32, 1.5, 1.0)  # d/d before = 1.5 d/d x


# ======================================================================================
# grpo_loss
KL_CASES = [None, "k1", "abs", "k2", "low_var_kl", "k3+"]


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("kl_type", KL_CASES)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_grpo_loss_matches_reference(device, loss_agg, kl_type, entropy_coef):
    t, v = 64, 97
    d = grpo_inputs(t, v, device, num_streams=3)
    d["stream"][d["stream"] == 2] = 1  # stream 2 has no tokens at all
    kw = dict(
        temperature=0.8, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, kl_type=kl_type or "low_var_kl",
        ref_logp=d["ref"] if kl_type else None, kl_coef=0.05 if kl_type else 0.0, entropy_coef=entropy_coef,
        stream=d["stream"], stream_weights=[1.0, 0.5, 2.0], loss_agg=loss_agg, seq_ids=d["seq"], is_weights=d["isw"],
        loss_scale_factor=7.0 if loss_agg == "seq-mean-token-sum-norm" else None,
    )
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    res = grpo_loss(d["logits"].clone().requires_grad_(), *args, return_entropy=True, **kw)
    exp = ref.grpo_loss_ref(d["logits"], *args, **kw)
    tol = dict(atol=1e-10, rtol=1e-10)
    close(res.loss, exp["loss"], **tol)
    close(res.logp, exp["logp"], **tol)
    close(res.ratio, exp["ratio"], **tol)
    close(res.entropy, exp["entropy"], **tol)
    for name in ("pg_loss", "clipfrac", "clipfrac_lower", "ppo_kl", "entropy", "tokens"):
        close(getattr(res.metrics, name), exp["metrics"][name], **tol)
    if kl_type:
        close(res.kl, exp["kl"], **tol)
        close(res.metrics.kl, exp["metrics"]["kl"], **tol)
    else:
        assert res.kl is None and res.metrics.kl is None
    assert res.metrics.tokens[2].item() == 0 and res.metrics.pg_loss[2].item() == 0
    # Gradients with respect to the logits.
    _, g = grad_of(lambda z: grpo_loss(z, *args, **kw).loss, d["logits"])
    _, g_r = grad_of(lambda z: ref.grpo_loss_ref(z, *args, **kw)["loss"], d["logits"])
    close(g, g_r, **tol)
    assert (g[~d["mask"]] == 0).all()  # masked tokens: zero rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grpo_loss_low_precision_logits(device, dtype):
    t, v = 48, 4099
    d = grpo_inputs(t, v, device, dtype=dtype)
    kw = dict(ref_logp=d["ref"], kl_coef=0.1, entropy_coef=0.02, stream=d["stream"], stream_weights=[1.0, 0.7],
              temperature=1.3)
    args = (d["targets"], d["old"].float(), d["adv"].float(), d["mask"])
    res = grpo_loss(d["logits"], *args, **kw)
    assert res.loss.dtype == torch.float32
    exp = ref.grpo_loss_ref(d["logits"], *args, **kw)
    close(res.loss, exp["loss"], atol=2e-5, rtol=1e-4)
    close(res.logp, exp["logp"], atol=3e-5, rtol=1e-5)
    _, g = grad_of(lambda z: grpo_loss(z, *args, **kw).loss, d["logits"])
    _, g_r = grad_of(lambda z: ref.grpo_loss_ref(z, *args, **kw)["loss"], d["logits"])
    # Near the clip edges an fp32 ratio (log-prob error ~1e-6) may fall on the other side of a
    # boundary than the fp64 reference's; compare the tokens whose ratio is not within 1e-4 of one.
    r = exp["ratio"].detach()
    safe = ((r - 0.8).abs() > 1e-4) & ((r - 1.2).abs() > 1e-4) & ((r - 3.0).abs() > 1e-4)
    close_grad(g[safe], g_r[safe], dtype)


def test_grpo_single_stream_equals_verl_formula_fp64(device):
    """stream=None is verl's single-stream ppo_loss (pg - entropy_coeff * entropy + kl_coef * kl)."""
    t, v = 50, 33
    d = grpo_inputs(t, v, device)
    for loss_agg in LOSS_AGG_MODES:
        lsf = 13.0 if loss_agg == "seq-mean-token-sum-norm" else None
        kw = dict(ref_logp=d["ref"], kl_type="low_var_kl", kl_coef=0.001, entropy_coef=0.003, loss_agg=loss_agg,
                  seq_ids=d["seq"], clip_low=0.2, clip_high=0.28, loss_scale_factor=lsf)
        args = (d["targets"], d["old"], d["adv"], d["mask"])
        res = grpo_loss(d["logits"], *args, **kw)
        logp, ent = ref.logprobs_ref(d["logits"], d["targets"], return_entropy=True)
        pl = ref.policy_loss_vanilla_ref(d["old"], logp, d["adv"], clip_low=0.2, clip_high=0.28)
        m = d["mask"].double()
        kld = ref.kl_penalty_ref(logp, d["ref"], "low_var_kl")
        agg = lambda v: ref.agg_loss_ref(v, m, loss_agg, d["seq"], lsf)  # noqa: E731
        expect = agg(pl["pg"]) - 0.003 * agg(ent) + agg(kld) * 0.001
        assert abs(res.loss.item() - expect.item()) < 1e-6 * max(1.0, abs(expect.item())), loss_agg
        assert abs(res.loss.item() - expect.item()) < 1e-12 * max(1.0, abs(expect.item())), loss_agg


def _import_verl():
    try:
        from verl.trainer.ppo import core_algos
        from verl.utils import torch_functional as verl_F
        from verl.workers.config import ActorConfig
    except Exception as exc:  # pragma: no cover - verl is a dev dependency
        pytest.skip(f"verl not importable: {exc}")
    return core_algos, verl_F, ActorConfig


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_grpo_loss_equals_real_verl(loss_agg):
    """Cross-check against verl 0.9.1's own functions (imported), fp64, [B, L] batches:
    logprobs_from_logits / entropy_from_logits on temperature-scaled logits,
    compute_policy_loss_vanilla, kl_penalty and agg_loss combined as verl's ppo_loss does."""
    core_algos, verl_F, ActorConfig = _import_verl()
    b, l, v, temperature = 6, 9, 41, 0.9
    t = b * l
    d = grpo_inputs(t, v, "cpu")
    mask = d["mask"].clone()
    mask[l : 2 * l] = False  # one fully masked sequence
    seq = torch.arange(b).repeat_interleave(l)
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=8,
                      use_torch_compile=False, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    kl_coef, ent_coef = 0.01, 0.002

    def verl_loss(logits):
        scaled = logits / temperature
        logp = verl_F.logprobs_from_logits(scaled, d["targets"]).view(b, l)
        ent = verl_F.entropy_from_logits(scaled).view(b, l)
        m2 = mask.view(b, l)
        pg_loss, metrics = core_algos.get_policy_loss_fn("vanilla")(
            d["old"].view(b, l), logp, d["adv"].view(b, l), m2, loss_agg, cfg, d["isw"].view(b, l))
        ent_loss = core_algos.agg_loss(ent, m2, loss_agg)
        kld = core_algos.kl_penalty(logp, d["ref"].view(b, l), "low_var_kl")
        kl_loss = core_algos.agg_loss(kld, m2, loss_agg)
        return pg_loss - ent_coef * ent_loss + kl_loss * kl_coef, metrics, pg_loss, kl_loss, ent_loss

    kw = dict(temperature=temperature, clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, ref_logp=d["ref"],
              kl_type="low_var_kl", kl_coef=kl_coef, entropy_coef=ent_coef, loss_agg=loss_agg, seq_ids=seq,
              is_weights=d["isw"],
              # verl's default for seq-mean-token-sum-norm: the padded response length
              loss_scale_factor=float(l) if loss_agg == "seq-mean-token-sum-norm" else None)
    args = (d["targets"], d["old"], d["adv"], mask)
    res = grpo_loss(d["logits"], *args, **kw)
    v_loss, v_metrics, v_pg, v_kl, v_ent = verl_loss(d["logits"])
    assert abs(res.loss.item() - v_loss.item()) < 1e-6
    assert abs(res.metrics.pg_loss.item() - v_pg.item()) < 1e-6
    assert abs(res.metrics.kl.item() - v_kl.item()) < 1e-6
    assert abs(res.metrics.entropy.item() - v_ent.item()) < 1e-6
    # verl reports its fractions through fp32 (.float()); compare at fp32 precision.
    assert abs(res.metrics.clipfrac.item() - v_metrics["actor/pg_clipfrac"]) < 1e-6
    assert abs(res.metrics.clipfrac_lower.item() - v_metrics["actor/pg_clipfrac_lower"]) < 1e-6
    assert abs(res.metrics.ppo_kl.item() - v_metrics["actor/ppo_kl"]) < 1e-6
    named = res.verl_metrics()
    assert abs(named["actor/pg_clipfrac"] - v_metrics["actor/pg_clipfrac"]) < 1e-6
    _, g = grad_of(lambda z: grpo_loss(z, *args, **kw).loss, d["logits"])
    _, g_v = grad_of(lambda z: verl_loss(z)[0], d["logits"])
    close(g, g_v, atol=1e-9, rtol=1e-9)


def _exact_ratio_delta(logp_value: float, want_above_one: bool, device) -> tuple[float, float]:
    """A log-ratio d whose ratio exp(logp - (logp - d)) is computed identically by the kernel
    and by torch.exp (both fp64, both within an ulp of exact: try candidates until they agree)."""
    for k in range(1, 200):
        d = (0.05 + 0.0137 * k) * (1 if want_above_one else -1)
        lp = torch.tensor([logp_value], dtype=torch.float64, device=device)
        old = lp - d
        r_torch = torch.exp(torch.clamp(lp - old, -20, 20))
        ones = torch.ones(1, dtype=torch.float64, device=device)
        r_ours = ops.grpo_token_terms(lp, old, ones, None, None, 0.2, 0.2, 3.0, "k1", CLAMP_EDGES)[2]
        if r_torch.item() == r_ours.item():
            return float(old.item()), r_torch.item()
    raise AssertionError("no candidate ratio agreed between the kernel and torch.exp")


@pytest.mark.parametrize("edge", ["high", "low", "dual", "one"])
def test_ratio_exactly_at_clip_boundaries(device, edge):
    """Ratios EXACTLY at 1 + clip_high, 1 - clip_low, clip_ratio_c (and 1 with clip 0): the
    gradient follows torch autograd's conventions (clamp passes its closed interval; min/max
    split ties in halves), as verl's loss does. Advantages of both signs."""
    lp0 = -1.7
    if edge == "one":
        old, r = lp0, 1.0
        clip_low = clip_high = 0.0
        cc = 3.0
    else:
        old, r = _exact_ratio_delta(lp0, want_above_one=edge != "low", device=device)
        clip_low, clip_high, cc = 0.2, 0.2, 3.0
        if edge == "high":
            clip_high = r - 1.0  # exact (Sterbenz): 1 + clip_high == r
            assert 1.0 + clip_high == r
        elif edge == "low":
            clip_low = 1.0 - r
            assert 1.0 - clip_low == r
        else:
            cc = r  # ratio == clip_ratio_c: the dual clip ties
            clip_high = (r - 1.0) / 2
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0], dtype=torch.float64, device=device)
    n = adv.shape[0]
    lp = torch.full((n,), lp0, dtype=torch.float64, device=device, requires_grad=True)
    oldt = torch.full((n,), old, dtype=torch.float64, device=device)
    pg, _, ratio, flags, *_ = ops.grpo_token_terms(lp, oldt, adv, None, None, clip_low, clip_high, cc, "k1", CLAMP_EDGES)
    assert (ratio == r).all()
    (g,) = torch.autograd.grad(pg.sum(), lp)
    lp_r = lp.detach().clone().requires_grad_()
    pl = ref.policy_loss_vanilla_ref(oldt, lp_r, adv, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=cc)
    assert (pl["ratio"] == r).all()
    (g_r,) = torch.autograd.grad(pl["pg"].sum(), lp_r)
    close(pg, pl["pg"], atol=0, rtol=0)
    close(g, g_r, atol=0, rtol=1e-15)
    assert torch.equal((flags & 1).bool().cpu(), pl["clipped"].cpu())
    assert torch.equal((flags & 2).bool().cpu(), pl["clipped_lower"].cpu())
    if edge == "dual":  # A < 0 at the dual-clip tie: half the unclipped gradient
        assert g[1].item() == pytest.approx(0.5 * 1.0 * r) and g[3].item() == pytest.approx(0.5 * 2.0 * r)
    if edge == "high":
        # A > 0 at ratio == 1 + clip_high: the two surrogates tie (half the gradient each); the
        # clipped one passes its half only if the installed torch's clamp passes at its bound.
        passes = bool(CLAMP_EDGES & 2)
        assert g[0].item() == pytest.approx(-r if passes else -0.5 * r)


def test_ratio_clamp_at_plus_minus_20(device):
    lp = torch.tensor([0.0, 0.0, -1.0, -1.0], dtype=torch.float64, device=device, requires_grad=True)
    old = torch.tensor([-20.0, -25.0, 19.0, 30.0], dtype=torch.float64, device=device)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64, device=device)
    for kl_type in ("k1", "k3", "low_var_kl+"):
        out = ops.grpo_token_terms(lp, old, adv, old, None, 0.2, 0.2, 3.0, kl_type, CLAMP_EDGES)
        lp_r = lp.detach().clone().requires_grad_()
        pl = ref.policy_loss_vanilla_ref(old, lp_r, adv)
        kl = ref.kl_penalty_ref(lp_r, old, kl_type)
        close(out[0], pl["pg"], atol=0, rtol=1e-15)
        close(out[1], kl, atol=0, rtol=1e-15)
        g = torch.autograd.grad(out[0].sum() + 0.3 * out[1].sum() + 0.7 * out[2].sum(), lp)[0]
        g_r = torch.autograd.grad(pl["pg"].sum() + 0.3 * kl.sum() + 0.7 * pl["ratio"].sum(), lp_r)[0]
        close(g, g_r, atol=0, rtol=1e-14)


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_each_kl_type_values_and_gradients(device, kl_type):
    t = 200
    lp = (torch.randn(t, dtype=torch.float64) * 3).to(device).requires_grad_()
    refl = (torch.randn(t, dtype=torch.float64) * 3).to(device)
    refl[:5] = lp.detach()[:5]  # d = 0 exactly (abs: zero subgradient)
    refl[5:10] = lp.detach()[5:10] + 25  # beyond the +-20 clamp of k3
    refl[10:15] = lp.detach()[10:15] - 12  # k3 beyond its +10 clamp
    out = ops.grpo_token_terms(lp, lp.detach() - 0.1, torch.randn(t, dtype=torch.float64, device=device), refl, None,
                               0.2, 0.2, 3.0, kl_type, CLAMP_EDGES)
    lp_r = lp.detach().clone().requires_grad_()
    kl_r = ref.kl_penalty_ref(lp_r, refl, kl_type)
    close(out[1], kl_r, atol=1e-12, rtol=1e-12)
    g = torch.autograd.grad(out[1].sum(), lp)[0]
    g_r = torch.autograd.grad(kl_r.sum(), lp_r)[0]
    close(g, g_r, atol=1e-12, rtol=1e-12)


def test_grpo_loss_empty_and_all_masked(device):
    for t in (0, 16):
        d = grpo_inputs(t, 23, device)
        mask = torch.zeros(t, dtype=torch.bool, device=device)
        x = d["logits"].clone().requires_grad_()
        res = grpo_loss(x, d["targets"], d["old"], d["adv"], mask, ref_logp=d["ref"], kl_coef=0.1, entropy_coef=0.1,
                        stream=d["stream"], stream_weights=[1.0, 1.0], loss_agg="seq-mean-token-mean", seq_ids=d["seq"])
        assert res.loss.item() == 0.0 and res.logp.shape == (t,)
        for m in res.metrics:
            assert m.shape == (2,) and torch.isfinite(m).all() and (m == 0).all()
        res.loss.backward()
        assert x.grad.shape == (t, 23) and (x.grad == 0).all()


def test_grpo_streams_are_decoupled(device):
    """With token-mean per stream, stream 1's size and advantages do not change the gradient
    of stream 0's tokens (a joint token-mean would rescale it)."""
    t0, v = 20, 31
    a = grpo_inputs(t0, v, device)
    b = grpo_inputs(57, v, device)
    cat = lambda k: torch.cat([a[k], b[k]])  # noqa: E731
    stream = torch.cat([torch.zeros(t0, dtype=torch.int64), torch.ones(57, dtype=torch.int64)]).to(device)
    small = torch.cat([torch.zeros(t0, dtype=torch.int64), torch.ones(5, dtype=torch.int64)]).to(device)

    def grad0(n1, adv_scale):
        keys = ("logits", "targets", "old", "adv", "mask")
        x, tg, old, adv, mask = (cat(k)[: t0 + n1] for k in keys)
        adv = torch.cat([adv[:t0], adv[t0:] * adv_scale])
        _, g = grad_of(lambda z: grpo_loss(z, tg, old, adv, mask, stream=(stream if n1 == 57 else small),
                                           stream_weights=[1.0, 0.5]).loss, x)
        return g[:t0]

    g_full = grad0(57, 1.0)
    close(grad0(5, 1.0), g_full, atol=1e-12, rtol=1e-12)
    close(grad0(57, -3.0), g_full, atol=1e-12, rtol=1e-12)
    # ... whereas one joint stream (verl's single-stream token-mean) does depend on it.
    x, tg, old, adv, mask = (cat(k) for k in ("logits", "targets", "old", "adv", "mask"))
    _, g_joint = grad_of(lambda z: grpo_loss(z, tg, old, adv, mask).loss, x)
    assert not torch.allclose(g_joint[:t0], g_full)


def test_grpo_entropy_on_off(device):
    d = grpo_inputs(24, 19, device)
    args = (d["logits"], d["targets"], d["old"], d["adv"], d["mask"])
    off = grpo_loss(*args)
    assert off.entropy is None and off.metrics.entropy is None
    on = grpo_loss(*args, return_entropy=True)
    assert on.entropy is not None and on.loss.item() == off.loss.item()  # metrics only
    bonus = grpo_loss(*args, entropy_coef=0.5)
    expect = off.loss - 0.5 * on.metrics.entropy[0]
    close(bonus.loss, expect, atol=1e-12, rtol=1e-12)


def test_grpo_loss_streams_and_options(device):
    d = grpo_inputs(40, 29, device, num_streams=2)
    args = (d["logits"], d["targets"], d["old"], d["adv"], d["mask"])
    a = grpo_loss(*args, stream=d["stream"])  # S read from stream.max()
    b = grpo_loss(*args, stream=d["stream"], num_streams=2)
    c = grpo_loss(*args, stream=d["stream"], stream_weights=torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert a.loss.item() == b.loss.item() == c.loss.item()
    e = ref.grpo_loss_ref(*args, stream=d["stream"], stream_weights=[1.0, 1.0])
    close(a.loss, e["loss"], atol=1e-12, rtol=1e-12)
    m = a.verl_metrics(["loc", "sparse"])
    assert set(m) >= {"actor/pg_loss/loc", "actor/pg_loss/sparse", "actor/tokens/loc"}
    assert m["actor/tokens/loc"] == float((d["mask"] & (d["stream"] == 0)).sum())


# ======================================================================================
# Fused linear path
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_fused_linear_logprobs_matches(device, dtype, chunk_size):
    t, h, v = 23, 16, 301
    hidden = torch.randn(t, h, dtype=dtype, device=device)
    weight = (torch.randn(v, h, dtype=dtype, device=device) * 0.5)
    targets = torch.randint(0, v, (t,), device=device)
    g_lp, g_en = torch.randn(t, dtype=dtype, device=device), torch.randn(t, dtype=dtype, device=device)
    hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, en = fused_linear_logprobs(hl, wl, targets, temperature=0.9, return_entropy=True, chunk_size=chunk_size)
    ((lp * g_lp).sum() + (en * g_en).sum()).backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp_r, en_r = ref.logprobs_ref(hr @ wr.t(), targets, temperature=0.9, return_entropy=True, dtype=dtype)
    ((lp_r * g_lp).sum() + (en_r * g_en).sum()).backward()
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    close(lp, lp_r, **tol)
    close(en, en_r, **tol)
    close(hl.grad, hr.grad, **tol)
    close(wl.grad, wr.grad, **tol)
    # Only the log-probs: no entropy gradient path.
    hl2 = hidden.clone().requires_grad_()
    lp2, none = fused_linear_logprobs(hl2, weight, targets, chunk_size=chunk_size)
    assert none is None
    lp2.sum().backward()
    hr2 = hidden.clone().requires_grad_()
    ref.logprobs_ref(hr2 @ weight.t(), targets, dtype=dtype)[0].sum().backward()
    close(hl2.grad, hr2.grad, **tol)


@pytest.mark.parametrize("chunk_size", [7, None])
def test_fused_linear_grpo_loss_matches_grpo_loss(device, chunk_size):
    t, h, v = 45, 12, 211
    hidden = torch.randn(t, h, dtype=torch.float64, device=device)
    weight = torch.randn(v, h, dtype=torch.float64, device=device) * 0.6
    d = grpo_inputs(t, v, device)
    kw = dict(temperature=1.1, ref_logp=d["ref"], kl_type="k3", kl_coef=0.05, entropy_coef=0.01,
              stream=d["stream"], stream_weights=[0.7, 1.3], loss_agg="seq-mean-token-mean", seq_ids=d["seq"],
              is_weights=d["isw"], clip_high=0.28)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    res = fused_linear_grpo_loss(hl, wl, *args, chunk_size=chunk_size, **kw)
    (res.loss * 1.7).backward()  # a non-unit upstream gradient
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    exp = grpo_loss(hr @ wr.t(), *args, **kw)
    (exp.loss * 1.7).backward()
    tol = dict(atol=1e-10, rtol=1e-10)
    close(res.loss, exp.loss, **tol)
    close(res.logp, exp.logp, **tol)
    close(res.ratio, exp.ratio, **tol)
    close(res.kl, exp.kl, **tol)
    close(res.entropy, exp.entropy, **tol)
    for a, b in zip(res.metrics, exp.metrics):
        close(a, b, **tol)
    close(hl.grad, hr.grad, **tol)
    close(wl.grad, wr.grad, **tol)
    with pytest.raises(RuntimeError, match="backward ran twice|Trying to backward through the graph a second time"):
        res.loss.backward()
    # No gradient wanted: nothing but the loss.
    with torch.no_grad():
        res2 = fused_linear_grpo_loss(hidden, weight, *args, chunk_size=chunk_size, **kw)
    close(res2.loss, exp.loss, **tol)


@pytest.mark.parametrize("dtype,upstream", [(torch.bfloat16, 1.0 / 3.0), (torch.float16, 65536.0),
                                            (torch.bfloat16, -2.5)])
def test_fused_linear_grpo_loss_upstream_scale_is_not_rounded(device, dtype, upstream):
    """The gradients are computed in forward at upstream 1 and scaled in backward by the upstream
    scalar in fp32: it was first rounded to the gradients' dtype (bf16: 1/3 -> 0.33398, a 0.2%
    error on every element; float16: a GradScaler's initial 65536 overflowed to inf)."""
    t, h, v = 40, 16, 130
    hidden = (torch.randn(t, h, device=device) * 0.5).to(dtype)
    weight = (torch.randn(v, h, device=device) * 0.5).to(dtype)
    d = grpo_inputs(t, v, device, dtype=torch.float32, mask_p=1.0)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    grads = {}
    for u in (1.0, upstream):
        hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        res = fused_linear_grpo_loss(hl, wl, *args, chunk_size=16)
        (res.loss * u).backward()
        grads[u] = (hl.grad, wl.grad)
    for g1, gu in zip(grads[1.0], grads[upstream]):
        assert torch.isfinite(gu).all()
        # The unit-upstream gradient times the fp32 upstream, rounded once: what scaling gives.
        assert torch.equal(gu, (g1.float() * upstream).to(dtype))


def test_fused_linear_bf16_and_fp32_accumulator(device):
    t, h, v = 64, 32, 515
    hidden = (torch.randn(t, h, device=device) * 0.5).bfloat16()
    weight = (torch.randn(v, h, device=device) * 0.5).bfloat16()
    targets = torch.randint(0, v, (t,), device=device)
    lp, _ = fused_linear_logprobs(hidden, weight, targets, chunk_size=16)
    lp_r, _ = ref.logprobs_ref((hidden.double() @ weight.double().t()), targets)
    close(lp, lp_r, atol=0.05, rtol=0.01)  # the bf16 matmul rounds the logits (as the unfused path does)
    grads = []
    for accum in (None, torch.float32):
        wl = weight.clone().requires_grad_()
        fused_linear_logprobs(hidden, wl, targets, chunk_size=16, accum_dtype=accum)[0].sum().backward()
        assert wl.grad.dtype == torch.bfloat16
        grads.append(wl.grad.float())
    wr = weight.double().requires_grad_()
    ref.logprobs_ref(hidden.double() @ wr.t(), targets)[0].sum().backward()
    for g in grads:
        close(g, wr.grad, atol=0.05, rtol=0.05)


def test_fused_linear_under_autocast_computes_in_the_region_dtype(device):
    """In a bf16 autocast region with fp32 hidden / weight, both fused linear ops compute as
    nn.Linear would there (bf16 logits) and equal the op called on bf16 inputs outside autocast,
    values and gradients (carried back through the cast to fp32), including a backward run
    outside the region; fp64 inputs are left alone."""
    t, h, v = 40, 16, 300
    hidden = torch.randn(t, h, device=device) * 0.5
    weight = torch.randn(v, h, device=device) * 0.5
    d = grpo_inputs(t, v, device)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    kw = dict(stream=d["stream"], stream_weights=[1.0, 0.5], entropy_coef=0.01, chunk_size=16)
    dev = torch.device(device).type

    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    want = fused_linear_grpo_loss(hb, wb, *args, **kw)
    want.loss.backward()
    hl, wl = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(dev, dtype=torch.bfloat16):
        got = fused_linear_grpo_loss(hl, wl, *args, **kw)
        got.loss.backward()
    assert hl.grad.dtype == torch.float32 and wl.grad.dtype == torch.float32
    close(got.loss, want.loss, atol=0, rtol=0)
    close(hl.grad, hb.grad.float(), atol=0, rtol=0)
    close(wl.grad, wb.grad.float(), atol=0, rtol=0)

    hb2, wb2 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    lp_want, _ = fused_linear_logprobs(hb2, wb2, d["targets"], chunk_size=16, return_entropy=True)
    lp_want.sum().backward()
    hl2, wl2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(dev, dtype=torch.bfloat16):
        lp, _ = fused_linear_logprobs(hl2, wl2, d["targets"], chunk_size=16, return_entropy=True)
    lp.sum().backward()  # outside the region: same dtype as the forward's statistics
    close(lp, lp_want, atol=0, rtol=0)
    close(hl2.grad, hb2.grad.float(), atol=0, rtol=0)
    close(wl2.grad, wb2.grad.float(), atol=0, rtol=0)

    # grpo_loss on logits: its [T]-sized aggregation is not recast by the region either.
    logits = (hidden @ weight.t()).bfloat16()
    plain = grpo_loss(logits, *args, stream=d["stream"], stream_weights=[1.0, 0.5], entropy_coef=0.01)
    with torch.autocast(dev, dtype=torch.bfloat16):
        inside = grpo_loss(logits, *args, stream=d["stream"], stream_weights=[1.0, 0.5], entropy_coef=0.01)
    close(inside.loss, plain.loss, atol=0, rtol=0)
    for a, b in zip(inside.metrics, plain.metrics):
        if a is not None or b is not None:
            close(a, b, atol=0, rtol=0)

    with torch.autocast(dev, dtype=torch.bfloat16):
        lp64, _ = fused_linear_logprobs(hidden.double(), weight.double(), d["targets"])
    assert lp64.dtype == torch.float64
    close(lp64, fused_linear_logprobs(hidden.double(), weight.double(), d["targets"])[0], atol=0, rtol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (every aten and tsparse op below autograd)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() >= self.largest:
                self.largest = o.numel()
                self.ops.append((str(func), tuple(o.shape)))
        return out


def test_fused_linear_never_allocates_t_by_v(device):
    t, h, v, chunk = 96, 8, 1000, 16
    hidden = torch.randn(t, h, device=device, requires_grad=True)
    weight = torch.randn(v, h, device=device, requires_grad=True)
    d = grpo_inputs(t, v, device)
    args = (d["targets"], d["old"].float(), d["adv"].float(), d["mask"])
    for fn in (
        lambda: fused_linear_logprobs(hidden, weight, d["targets"], return_entropy=True, chunk_size=chunk)[0].sum(),
        lambda: fused_linear_grpo_loss(hidden, weight, *args, entropy_coef=0.1, chunk_size=chunk).loss,
    ):
        with _LargestTensor() as mode:
            fn().backward()
        # The largest tensors are one chunk of logits [chunk, V] and the weight gradient [V, H].
        assert mode.largest == max(chunk * v, v * h), mode.ops[-3:]
        assert mode.largest < t * v / 4
    # The unfused path does materialize [T, V] (the check can fail).
    with _LargestTensor() as mode:
        grpo_loss(hidden @ weight.t(), *args).loss.backward()
    assert mode.largest >= t * v


# ======================================================================================
# Memory: peak extra memory of forward + backward is O(T), not O(T x V) (CPU, measured as the
# high-water mark of the resident set in a fresh process; every allocation >= 64 KiB is its own
# mmap there, so freed buffers leave the resident set at once).
_MEMORY_CHILD = r"""
import json, sys, torch, tsparse
from tsparse.ops import grpo_loss, logprobs, fused_linear_grpo_loss

def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def measure(fn):
    fn()  # warm-up: thread pools, autograd and allocator state
    reset_peak()
    base = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - base) * 1024

torch.set_num_threads(2)
t, v, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
base = (torch.randn(t, v, generator=g) * 2).bfloat16().requires_grad_()
targets = torch.randint(0, v, (t,), generator=g)
old = torch.randn(t, generator=g) - 12
adv = torch.randn(t, generator=g)
mask = torch.rand(t, generator=g) < 0.9
stream = torch.randint(0, 2, (t,), generator=g)

def run_logprobs(inplace):
    x = base * 1  # non-leaf logits, created before measuring
    x0 = x.detach().clone()  # an in-place run leaves the gradient in x: each run starts from the logits
    def fn():
        x.detach().copy_(x0)
        lp, en = logprobs(x, targets, return_entropy=True, inplace_backward=inplace)
        torch.autograd.grad(lp.sum() + en.sum(), x)
    return fn

def run_grpo(inplace):
    x = base * 1
    x0 = x.detach().clone()
    def fn():
        x.detach().copy_(x0)
        r = grpo_loss(x, targets, old, adv, mask, entropy_coef=0.01, stream=stream, num_streams=2,
                      inplace_backward=inplace)
        torch.autograd.grad(r.loss, x)
    return fn

def run_torch():
    x = base * 1
    def fn():
        lp = torch.log_softmax(x.float(), -1).gather(1, targets[:, None])
        torch.autograd.grad(lp.sum(), x)
    return fn

fns = {"logprobs_inplace": run_logprobs(True), "logprobs": run_logprobs(False),
       "grpo_inplace": run_grpo(True), "grpo": run_grpo(False), "torch": run_torch()}
print(json.dumps({"extra": measure(fns[kind]), "logits": t * v * 2}))
"""


def _measure_child(t: int, v: int, kind: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="2")
    import json

    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(t), str(v), kind], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_forward_backward_peak_memory_is_o_t_not_o_t_v():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    t = 64
    small = {k: _measure_child(t, 38016, k) for k in ("logprobs_inplace", "grpo_inplace")}
    big = {k: _measure_child(t, 152064, k) for k in ("logprobs_inplace", "grpo_inplace", "logprobs", "grpo", "torch")}
    logits = big["torch"]["logits"]  # 19.5 MB of bf16 logits; an fp32 copy would be 39 MB
    for k in ("logprobs_inplace", "grpo_inplace"):
        # In-place backward: O(T) extra (a few KiB of per-token statistics + interpreter noise),
        # the same at V = 38,016 and 152,064 - it does not grow with V.
        assert big[k]["extra"] < 0.05 * logits, (k, big[k])
        assert abs(big[k]["extra"] - small[k]["extra"]) < 0.03 * logits, (k, big[k], small[k])
    for k in ("logprobs", "grpo"):
        # Out-of-place backward: exactly one gradient-sized buffer (the returned gradient, in the
        # logits' dtype) plus O(T) - no fp32 [T, V] temporary.
        assert 0.9 * logits < big[k]["extra"] < 1.1 * logits, (k, big[k])
    # The eager PyTorch path (fp32 log_softmax) holds several fp32 [T, V] buffers (the check can fail).
    assert big["torch"]["extra"] > 3 * logits, big["torch"]


# ======================================================================================
# Bad inputs raise errors naming the argument.
def test_bad_inputs_name_the_argument(device):
    x = torch.randn(4, 10, device=device)
    tg = torch.tensor([1, 2, 3, 4], device=device)
    z = torch.zeros(4, device=device)
    mask = torch.ones(4, dtype=torch.bool, device=device)
    with pytest.raises(TypeError, match="`logits`"):
        logprobs(x.long(), tg)
    with pytest.raises(TypeError, match="`logits`"):
        logprobs(None, tg)
    with pytest.raises(ValueError, match="`logits`"):
        logprobs(x[0], tg)
    with pytest.raises(ValueError, match="`logits`"):
        logprobs(torch.randn(4, 0, device=device), tg)
    with pytest.raises(TypeError, match="`targets`"):
        logprobs(x, tg.float())
    with pytest.raises(ValueError, match="`targets`"):
        logprobs(x, tg[:3])
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="`temperature`"):
            logprobs(x, tg, temperature=bad)
        with pytest.raises(ValueError, match="`temperature`"):
            ops.logprobs(x, tg, bad, False)  # the C++ check too
    with pytest.raises(TypeError, match="`temperature`"):
        logprobs(x, tg, temperature="1")
    if device == "cpu":
        with pytest.raises(IndexError, match="`targets"):
            logprobs(x, torch.tensor([1, 2, 10, 3]))
        with pytest.raises(IndexError, match="`targets"):
            logprobs(x, torch.tensor([1, -1, 0, 3]))
        with pytest.raises(IndexError, match="`targets"):
            ops.logprobs(x, torch.tensor([1, 2, 10, 3]), 1.0, False)
    args = (x, tg, z, z, mask)
    with pytest.raises(ValueError, match="`old_logp`"):
        grpo_loss(x, tg, z[:3], z, mask)
    with pytest.raises(TypeError, match="`advantages`"):
        grpo_loss(x, tg, z, z.long(), mask)
    with pytest.raises(ValueError, match="`mask`"):
        grpo_loss(x, tg, z, z, mask[:2])
    with pytest.raises(ValueError, match="`loss_agg`"):
        grpo_loss(*args, loss_agg="mean")
    with pytest.raises(ValueError, match="`seq_ids`"):
        grpo_loss(*args, loss_agg="seq-mean-token-mean")
    with pytest.raises(ValueError, match="`kl_type`"):
        grpo_loss(*args, ref_logp=z, kl_type="k4")
    with pytest.raises(ValueError, match="`ref_logp`"):
        grpo_loss(*args, kl_coef=0.1)
    with pytest.raises(ValueError, match="`clip_ratio_c`"):
        grpo_loss(*args, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="`clip_low`"):
        grpo_loss(*args, clip_low=float("nan"))
    with pytest.raises(ValueError, match="`stream_weights`"):
        grpo_loss(*args, stream_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="`temperature`"):
        grpo_loss(*args, temperature=float("nan"))
    if device == "cpu":
        with pytest.raises(IndexError, match="`stream`"):
            grpo_loss(*args, stream=torch.tensor([0, 1, 2, 0]), stream_weights=[1.0, 1.0])
        with pytest.raises(IndexError, match="`seq_ids`"):
            grpo_loss(*args, loss_agg="seq-mean-token-sum", seq_ids=torch.tensor([0, 1, 9, 0]))
        with pytest.raises(ValueError, match="`kl_type`"):
            ops.grpo_token_terms(z, z, z, z, None, 0.2, 0.2, 3.0, "bogus", 3)
        with pytest.raises(ValueError, match="`clip_ratio_c`"):
            ops.grpo_token_terms(z, z, z, None, None, 0.2, 0.2, 0.5, "k1", 3)
    w = torch.randn(10, 3, device=device)
    hidden = torch.randn(4, 3, device=device)
    with pytest.raises(TypeError, match="`weight`"):
        fused_linear_logprobs(hidden, w.double(), tg)
    with pytest.raises(ValueError, match="`weight`"):
        fused_linear_logprobs(hidden, w[:, :2], tg)
    with pytest.raises(ValueError, match="`targets`"):
        fused_linear_logprobs(hidden, w, tg[:2])
    with pytest.raises(ValueError, match="`chunk_size`"):
        fused_linear_logprobs(hidden, w, tg, chunk_size=0)
    with pytest.raises(ValueError, match="`old_logp`"):
        fused_linear_grpo_loss(hidden, w, tg, z[:1], z, mask)


def test_inplace_backward_op_rejects_unwritable_logits(device):
    x = torch.randn(4, 6, device=device)
    tg = torch.tensor([0, 1, 2, 3], device=device)
    lp, rm, ln, en = ops.logprobs(x, tg, 1.0, False)
    with pytest.raises(ValueError, match="`logits`"):
        ops.logprobs_backward_(x.t().contiguous().t(), tg, rm, ln, en, lp, None, 1.0)
    with pytest.raises(ValueError, match="`logits`"):
        ops.logprobs_backward_(x[:1].expand(4, 6), tg, rm, ln, en, lp, None, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("alias", ["targets", "grad_logp", "row_max"])
def test_inplace_backward_with_inputs_stored_in_the_logits(device, dtype, alias):
    """Per-row inputs that live in the logits' own memory (raw op, adversarial caller) are
    read before the rows are overwritten: the in-place result equals the out-of-place one
    (the CPU kernel used to read overwritten targets and index outside the row)."""
    t, v = 8, 64
    base = torch.randn(t, v, device=device).to(dtype)
    targets = torch.randint(0, v, (t,), device=device)
    lp, rm, ln, en = ops.logprobs(base, targets, 1.0, False)
    g = torch.randn(t, device=device, dtype=lp.dtype)
    logits = base.clone()
    flat = logits.view(-1)
    raw = flat.view(torch.uint8)  # the logits' bytes: the first row holds the aliased input
    if alias == "targets":
        view = raw[: 8 * t].view(torch.int64)
        view.copy_(targets)
        targets_in, g_in, rm_in = view, g, rm
    else:
        vec = raw[: lp.element_size() * t].view(lp.dtype)
        vec.copy_(g if alias == "grad_logp" else rm)
        targets_in = targets
        g_in, rm_in = (vec, rm) if alias == "grad_logp" else (g, vec)
    snapshot = logits.clone()  # the logits as the op sees them (the first row holds the alias)
    want = ops.logprobs_backward(snapshot, targets, rm, ln, en, g, None, 1.0)
    ops.logprobs_backward_(logits, targets_in, rm_in, ln, en, g_in, None, 1.0)
    torch.testing.assert_close(logits, want, atol=0, rtol=0)


def test_temperature_whose_inverse_overflows_is_rejected(device):
    x = torch.randn(2, 5, device=device)
    tg = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="`temperature`"):
        ops.logprobs(x, tg, 1e-39, False)
    lp = ops.logprobs(x.double(), tg, 1e-39, False)[0]  # fine in fp64
    assert torch.isfinite(lp).all()


# ======================================================================================
# torch.library.opcheck on every op (schema, fake kernel, autograd registration, AOT)
def test_opcheck_grpo_ops(device):
    t, v = 6, 37
    x = torch.randn(t, v, device=device, requires_grad=True)
    x64 = torch.randn(t, v, device=device, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(t, v, device=device).bfloat16().requires_grad_()
    tg = torch.randint(0, v, (t,), device=device)
    cases = [
        (ops.logprobs.default, (x, tg, 0.9, True)),
        (ops.logprobs.default, (x64, tg, 1.0, False)),
        (ops.logprobs.default, (xb, tg.int(), 1.3, True)),
        (ops.logprobs.default, (torch.randn(0, 5, device=device, requires_grad=True), tg[:0], 1.0, True)),
    ]
    lp, rm, ln, en = ops.logprobs(x.detach(), tg, 0.9, True)
    g1, g2 = torch.randn(t, device=device), torch.randn(t, device=device)
    cases += [
        (ops.logprobs_backward.default, (x.detach(), tg, rm, ln, en, g1, g2, 0.9)),
        (ops.logprobs_backward.default, (x.detach(), tg, rm, ln, en, g1, None, 0.9)),
        (ops.logprobs_backward_.default, (x.detach().clone(), tg, rm, ln, en, g1, g2, 0.9)),
    ]
    lpg = lp.detach().clone().requires_grad_()
    old, adv, refl, isw = (torch.randn(t, device=device) for _ in range(4))
    for kl_type in ("k1", "k3", "abs+"):
        cases.append((ops.grpo_token_terms.default, (lpg, old, adv, refl, isw.abs(), 0.2, 0.28, 3.0, kl_type, 3)))
    cases.append((ops.grpo_token_terms.default, (lpg.double().detach().requires_grad_(), old, adv, None, None, 0.1,
                                                 0.1, 2.0, "low_var_kl", 0)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_logprobs_and_grpo(device):
    t, v = 12, 50
    x = torch.randn(t, v, device=device, requires_grad=True)
    tg = torch.randint(0, v, (t,), device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, tg):
        lp, en = logprobs(x, tg, temperature=0.8, return_entropy=True)
        return lp.sum() + en.sum()

    out = f(x, tg)
    (g,) = torch.autograd.grad(out, x)
    out_e, g_e = grad_of(lambda z: sum(a.sum() for a in logprobs(z, tg, temperature=0.8, return_entropy=True)), x)
    close(out, out_e, atol=1e-5, rtol=1e-5)
    close(g, g_e, atol=1e-6, rtol=1e-5)

    d = grpo_inputs(t, v, device)
    args = (d["targets"], d["old"].float(), d["adv"].float(), d["mask"])
    compiled = torch.compile(lambda z: grpo_loss(z, *args, stream=d["stream"], num_streams=2).loss, backend="aot_eager")
    xl = d["logits"].float().requires_grad_()
    loss = compiled(xl)
    loss.backward()
    _, g_ref = grad_of(lambda z: grpo_loss(z, *args, stream=d["stream"], num_streams=2).loss, d["logits"].float())
    close(xl.grad, g_ref, atol=1e-6, rtol=1e-5)


# ======================================================================================
# CUDA-only behaviour (skipped without a GPU).
@pytest.mark.cuda
@requires_cuda
def test_cuda_grpo_makes_no_host_sync():
    d = grpo_inputs(256, 152064 // 8, "cuda", dtype=torch.bfloat16)
    x = d["logits"].clone().requires_grad_()
    y = x * 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = grpo_loss(y, d["targets"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"], kl_coef=0.1,
                        entropy_coef=0.01, stream=d["stream"], num_streams=2, loss_agg="seq-mean-token-mean",
                        seq_ids=d["seq"], inplace_backward=True)
        res.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.cuda
@requires_cuda
def test_cuda_target_out_of_range_is_a_device_error():
    code = textwrap.dedent("""
        import torch, tsparse
        x = torch.randn(3, 5000, device="cuda")
        tsparse.ops.logprobs(x, torch.tensor([1, 5000, 2], device="cuda"))
        torch.cuda.synchronize()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "tsparse.logprobs" in r.stdout + r.stderr and "out of range" in r.stdout + r.stderr


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("v", [1, 7, 4096, 4097, 32768, 32769, 152064, 262144])
def test_cuda_matches_cpu_for_odd_widths_and_alignments(v):
    """Every row-layout branch of the CUDA kernels (warp / 128 / 512 threads, scalar head and
    tail from an odd row offset, out-of-place gradient rows aligned differently from the
    logits rows, in-place gradient into an odd view) against the CPU kernel."""
    t = 5
    full = (torch.randn(t, v + 3) * 4).bfloat16()
    tg = torch.randint(0, v, (t,))
    gl, ge = torch.randn(t), torch.randn(t)

    def run(base, off, inplace):
        leaf = base.clone().requires_grad_()
        x = (leaf * 1)[:, off : off + v]  # a non-leaf view at an odd element offset
        lp, en = logprobs(x, tg.to(base.device), temperature=0.7, return_entropy=True, inplace_backward=inplace)
        ((lp * gl.to(base.device)).sum() + (en * ge.to(base.device)).sum()).backward()
        return lp.cpu(), en.cpu(), leaf.grad.cpu()

    for off in (0, 1, 3):
        lp_c, en_c, g_c = run(full, off, False)
        for inplace in (False, True):
            lp_g, en_g, g_g = run(full.cuda(), off, inplace)
            close(lp_g, lp_c, atol=5e-5, rtol=1e-5)
            close(en_g, en_c, atol=5e-5, rtol=1e-5)
            close(g_g, g_c, atol=1e-6, rtol=1.6e-2)


def test_logprobs_nan_logit_poisons_only_its_row(device):
    """A NaN logit gives NaN log-prob and entropy for its row, as torch's log_softmax does, and
    leaves the other rows alone (also for a NaN inside an otherwise -inf chunk)."""
    x = random_logits(4, 2000, torch.float32, device)
    x[0, 1234] = float("nan")
    x[2, :] = -math.inf
    x[2, 700] = float("nan")
    x[2, 1999] = 1.0
    tg = torch.tensor([5, 6, 1999, 8], device=device)
    lp, en = logprobs(x, tg, return_entropy=True)
    lp_r, en_r = ref.logprobs_ref(x, tg, return_entropy=True)
    assert torch.isnan(lp[0]) and torch.isnan(en[0]) and torch.isnan(lp[2]) and torch.isnan(lp_r[0])
    close(lp[[1, 3]], lp_r[[1, 3]], **value_tol(torch.float32, 2000))
    close(en[[1, 3]], en_r[[1, 3]], **value_tol(torch.float32, 2000))


def test_second_derivative_raises_instead_of_silent_zeros(device):
    d = grpo_inputs(10, 17, device)
    for make in (
        lambda x: logprobs(x, d["targets"], return_entropy=True)[1].sum(),
        lambda x: grpo_loss(x, d["targets"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"], kl_coef=0.1).loss,
    ):
        x = d["logits"].clone().requires_grad_()
        (g,) = torch.autograd.grad(make(x), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice a tsparse"):
            torch.autograd.grad(g.sum(), x)
    hidden = torch.randn(10, 4, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(17, 4, dtype=torch.float64, device=device)
    (g,) = torch.autograd.grad(fused_linear_logprobs(hidden, weight, d["targets"])[0].sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a tsparse"):
        torch.autograd.grad(g.sum(), hidden)
