"""grpo_loss(impl="single_read") against impl="two_pass" and the fp64 reference.

On the CPU the single-read op computes the two-pass math row by row with the same functions,
so values and gradients must equal the two-pass path BIT FOR BIT (upstream gradient 1). On a
GPU the cluster kernel reduces each row in another order than the two-pass kernels, so the
comparison uses the tolerances of test_grpo.py; the GPU tests (CUDA-only, skipped here) also
check that the cluster kernel actually ran (profiler), T * V above 2^31, streams, no host sync,
and the fallbacks (fp64, rows too wide for the cluster's shared memory).
"""

from __future__ import annotations

import math

import pytest
import torch

from tsparse import _C
from tsparse import reference as ref
from tsparse.ops import grpo_loss
from tsparse.ops.grpo import CLAMP_EDGES, LOSS_AGG_MODES

from conftest import requires_cuda
from test_grpo import close, close_grad, grad_tol, grpo_inputs, random_logits

ops = torch.ops.tsparse


def run_loss(logits, args, kw, *, impl, inplace=False, upstream=1.0):
    """(GRPOLoss, d (upstream * loss) / d logits) through a non-leaf copy of `logits`."""
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1  # non-leaf: in-place variants may write into it
    res = grpo_loss(x, *args, impl=impl, inplace_backward=inplace, **kw)
    (res.loss * upstream).backward() if upstream != 1.0 else res.loss.backward()
    return res, leaf.grad


def assert_same_result(a, b, ga, gb, exact: bool, dtype=torch.float32, v: int = 100):
    if exact:
        assert torch.equal(a.loss, b.loss)
        assert torch.equal(a.logp, b.logp) and torch.equal(a.ratio, b.ratio)
        for x, y in ((a.entropy, b.entropy), (a.kl, b.kl)):
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
        for x, y in zip(a.metrics, b.metrics):
            assert (x is None) == (y is None) and (x is None or torch.equal(x, y))
        assert torch.equal(ga, gb)
        return
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5 if v > 10000 else 2e-5, rtol=1e-5)
    close(a.loss, b.loss, **tol)
    close(a.logp, b.logp, **tol)
    if a.entropy is not None:
        close(a.entropy, b.entropy, **tol)
    close_grad(ga, gb, dtype)


KW_CASES = {
    "plain": dict(),
    "kl_entropy_streams": dict(kl_type="low_var_kl", kl_coef=0.05, entropy_coef=0.01, stream_weights=[1.0, 0.5, 2.0],
                               clip_high=0.28, temperature=0.8, return_entropy=True),
    "k2_isw_no_entropy_grad": dict(kl_type="k2", kl_coef=0.1, stream_weights=[0.3, 1.0, 1.0], is_weights=True,
                                   temperature=1.3, return_entropy=True),
}


def make_kw(d, case: str, loss_agg: str):
    kw = dict(KW_CASES[case])
    if "kl_coef" in kw:
        kw["ref_logp"] = d["ref"]
    if "stream_weights" in kw:
        kw["stream"] = d["stream"]
    if kw.pop("is_weights", False):
        kw["is_weights"] = d["isw"]
    kw["loss_agg"] = loss_agg
    kw["seq_ids"] = d["seq"]
    if loss_agg == "seq-mean-token-sum-norm":
        kw["loss_scale_factor"] = 7.0  # verl's padded response length, given for a flat batch
    return kw


# ======================================================================================
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("case", list(KW_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_single_read_equals_two_pass_and_reference(device, loss_agg, case, dtype):
    t, v = 48, 211
    d = grpo_inputs(t, v, device, dtype=dtype, num_streams=3)
    d["stream"][d["stream"] == 2] = 1  # an empty stream
    kw = make_kw(d, case, loss_agg)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    two, g_two = run_loss(d["logits"], args, kw, impl="two_pass")
    for inplace in (False, True):
        one, g_one = run_loss(d["logits"], args, kw, impl="single_read", inplace=inplace)
        assert g_one.dtype == dtype and g_one.shape == (t, v)
        assert_same_result(one, two, g_one, g_two, exact=device == "cpu", dtype=dtype, v=v)
        assert (g_one[~d["mask"]] == 0).all()  # masked tokens: zero rows
    # Against the fp64 reference (the loss's value and gradient; on CUDA fp64 runs the two-pass
    # kernels, 16/32-bit logits the cluster kernel).
    exp, g_r = _grad_of_ref(d["logits"], args, kw)
    if dtype == torch.float64:
        close(one.loss, exp["loss"], atol=1e-10, rtol=1e-10)
        close(one.logp, exp["logp"], atol=1e-10, rtol=1e-10)
        close(g_one, g_r, atol=1e-10, rtol=1e-10)
    else:
        close(one.loss, exp["loss"], atol=2e-5, rtol=1e-4)
        close(one.logp, exp["logp"], atol=3e-5, rtol=1e-5)
        # An fp32 ratio may fall on the other side of a clip edge than the fp64 one: compare the
        # tokens whose ratio is not within 1e-4 of an edge (as test_grpo_loss_low_precision_logits).
        r = exp["ratio"].detach()
        hi = 1.0 + kw.get("clip_high", 0.2)
        safe = ((r - 0.8).abs() > 1e-4) & ((r - hi).abs() > 1e-4) & ((r - 3.0).abs() > 1e-4)
        close_grad(g_one[safe], g_r[safe], dtype)


def _grad_of_ref(logits, args, kw):
    leaf = logits.detach().clone().to(torch.float64).requires_grad_()
    out = ref.grpo_loss_ref(leaf, *args, **{k: w for k, w in kw.items() if k != "return_entropy"})
    (g,) = torch.autograd.grad(out["loss"], leaf)
    return out, g


@pytest.mark.parametrize("upstream", [1.0, 0.0, -2.5, 1.7])
def test_single_read_scales_by_the_upstream_gradient(device, upstream):
    d = grpo_inputs(40, 129, device, dtype=torch.float32)
    kw = dict(entropy_coef=0.02, ref_logp=d["ref"], kl_coef=0.1, stream=d["stream"], num_streams=2)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    _, g_two = run_loss(d["logits"], args, kw, impl="two_pass", upstream=upstream)
    for inplace in (False, True):
        _, g_one = run_loss(d["logits"], args, kw, impl="single_read", inplace=inplace, upstream=upstream)
        if upstream == 0.0:
            assert (g_one == 0).all()
        # The two-pass folds the upstream gradient in before the gradient is rounded, the
        # single read multiplies the rounded gradient: one extra rounding.
        close(g_one, g_two, atol=1e-7, rtol=2e-6)


def test_single_read_extreme_logits_and_masked_rows(device):
    t, v = 10, 300
    x = random_logits(t, v, torch.float64, "cpu")
    x[0, :] = 0.0
    x[0, 5] = 1e4
    x[1, ::3] = -math.inf
    x[2, :] = -math.inf
    x[2, 11] = 2.0
    x[3, :] = torch.linspace(-1e4, 1e4, v, dtype=torch.float64)
    x[4, 1::2] = 1e4
    x[6, :] = -1e4
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype).to(device)
        d = grpo_inputs(t, v, device, dtype=dtype)
        d["logits"] = xd
        targets = torch.tensor([5, 1, 11, v - 1, 3, 0, 7, 8, 9, 2], device=device)
        mask = torch.ones(t, dtype=torch.bool, device=device)
        mask[[5, 8]] = False
        args = (targets, d["old"].float(), d["adv"].float(), mask)
        kw = dict(entropy_coef=0.01, temperature=0.6, return_entropy=True)
        two, g_two = run_loss(xd, args, kw, impl="two_pass")
        one, g_one = run_loss(xd, args, kw, impl="single_read")
        assert torch.isfinite(g_one.float()).all() and torch.isfinite(one.loss)
        assert (g_one[[5, 8]] == 0).all()
        assert_same_result(one, two, g_one, g_two, exact=device == "cpu", dtype=dtype, v=v)


def test_single_read_float16_keeps_small_gradients_under_loss_scaling(device):
    """The single read rounds the gradient to the logits' dtype at upstream 1 and scales it in
    backward. In float16 most of a softmax gradient at token-mean lies below the smallest
    subnormal (6e-8) and would be flushed before a loss scaler's factor reaches it (measured on
    the CPU before the fix: ~44% of the elements nonzero instead of ~80% at upstream 65536), so
    grpo_loss runs float16 logits that need a gradient as two_pass; its results then equal
    two_pass's exactly. Forward-only float16 single_read is unaffected."""
    t, v = 96, 2048
    d = grpo_inputs(t, v, device, dtype=torch.float16, mask_p=1.0)
    args = (d["targets"], d["old"].float(), d["adv"].float(), d["mask"])
    scale = 65536.0
    two, g_two = run_loss(d["logits"], args, {}, impl="two_pass", upstream=scale)
    for inplace in (False, True):
        one, g_one = run_loss(d["logits"], args, {}, impl="single_read", inplace=inplace, upstream=scale)
        assert torch.equal(g_one, g_two) and torch.equal(one.loss, two.loss)
    g1 = run_loss(d["logits"], args, {}, impl="two_pass")[1]
    assert (g_two != 0).float().mean() > 1.5 * (g1 != 0).float().mean()  # a case where it matters
    with torch.no_grad():
        fwd = grpo_loss(d["logits"], *args, impl="single_read")
    close(fwd.loss, two.loss, atol=0 if device == "cpu" else 2e-5, rtol=0 if device == "cpu" else 1e-5)


def test_single_read_all_masked_and_empty(device):
    for t in (0, 9):
        d = grpo_inputs(t, 23, device)
        mask = torch.zeros(t, dtype=torch.bool, device=device)
        x = d["logits"].clone().requires_grad_()
        res = grpo_loss(x, d["targets"], d["old"], d["adv"], mask, ref_logp=d["ref"], kl_coef=0.1, entropy_coef=0.1,
                        stream=d["stream"], stream_weights=[1.0, 1.0], impl="single_read")
        assert res.loss.item() == 0.0 and res.logp.shape == (t,)
        res.loss.backward()
        assert x.grad.shape == (t, 23) and (x.grad == 0).all()


@pytest.mark.parametrize("v", [1, 2, 7, 8, 9, 33, 4095, 4097, 32769, 152064, 262144])
def test_single_read_any_width(device, v):
    """Every row width (each a different cluster plan on CUDA: 1 to 8 CTAs, 128 / 512 threads) and
    logits that are a view at an odd element offset with a wider row stride (a scalar head and tail
    per row; the gradient buffer is allocated at the logits' 16-byte phase), in place and not."""
    t = 3 if v > 10000 else 11
    full = random_logits(t, v + 3, torch.bfloat16, device)
    d = grpo_inputs(t, v, device, dtype=torch.float32)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    kw = dict(entropy_coef=0.01, return_entropy=True, temperature=0.9)

    def run(impl, off, inplace):
        leaf = full.clone().requires_grad_()
        x = (leaf * 1)[:, off:off + v]  # a non-leaf view: rows of stride v + 3 at offset `off`
        res = grpo_loss(x, *args, impl=impl, inplace_backward=inplace, **kw)
        res.loss.backward()
        assert (leaf.grad[:, :off] == 0).all() and (leaf.grad[:, off + v:] == 0).all()
        return res, leaf.grad[:, off:off + v]

    for off in (0, 1, 3):
        two, g_two = run("two_pass", off, False)
        for inplace in (False, True):
            one, g_one = run("single_read", off, inplace)
            assert_same_result(one, two, g_one, g_two, exact=device == "cpu", dtype=torch.bfloat16, v=v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_single_read_overlapping_logits_rows(device, dtype):
    """Logits whose rows overlap (an expanded row: row stride 0; an unfolded window: stride < V)
    have one gradient row per logits row, summed by autograd into the shared memory. The gradient
    buffer once took the logits' row stride when the row length was not a whole number of 16-byte
    vectors, so its rows overlapped too and every row's gradient overwrote the others'."""
    t = 6
    for v, step in ((3, 0), (13, 0), (9, 5), (100, 37), (16, 0)):
        base = random_logits(1, (t - 1) * step + v, dtype, device)
        targets = torch.randint(0, v, (t,), device=device)
        d = grpo_inputs(t, v, device, dtype=torch.float32, mask_p=1.0)
        args = (targets, d["old"], d["adv"], d["mask"])
        kw = dict(entropy_coef=0.01, return_entropy=True)

        def run(impl):
            leaf = base.clone().requires_grad_()
            x = leaf[0].as_strided((t, v), (step, 1))  # a non-leaf view with overlapping rows
            res = grpo_loss(x, *args, impl=impl, **kw)
            res.loss.backward()
            return res, leaf.grad

        two, g_two = run("two_pass")
        one, g_one = run("single_read")
        close(one.loss, two.loss, atol=0 if device == "cpu" else 2e-5, rtol=0 if device == "cpu" else 1e-5)
        if device == "cpu":
            assert torch.equal(g_one, g_two), (v, step)
        else:
            close_grad(g_one, g_two, dtype)
    # The gradient buffer is compact and at the logits' 16-byte phase for any row stride.
    full = random_logits(2 * t, 9, torch.bfloat16, device)
    x = full[1::2]  # row stride 18 elements, rows at an odd element offset
    d = grpo_inputs(t, 9, device, dtype=torch.float32)
    out = ops.grpo_loss_fused(x, d["targets"], d["old"].float(), d["adv"].float(), None, None,
                              torch.ones(t, device=device), 1.0, 0.2, 0.2, 3.0, "k1", CLAMP_EDGES, 0.0, 0.0, False,
                              True, True)
    g = out[-1]
    assert g.shape == (t, 9) and g.stride(1) == 1
    assert 9 <= g.stride(0) < 9 + 8 and (g.stride(0) - x.stride(0)) % 8 == 0
    assert (g.data_ptr() - x.data_ptr()) % 16 == 0


def test_single_read_inplace_writes_the_logits_in_forward(device):
    d = grpo_inputs(12, 64, device, dtype=torch.float32)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    leaf = d["logits"].clone().requires_grad_()
    x = leaf * 1
    v0 = x._version
    res = grpo_loss(x, *args, impl="single_read", inplace_backward=True)
    assert x._version > v0  # the logits hold their gradient from the forward on
    res.loss.backward()
    _, g_two = run_loss(d["logits"], args, {}, impl="two_pass")
    close(leaf.grad, g_two, atol=0 if device == "cpu" else 1e-7, rtol=0 if device == "cpu" else 1e-5)
    assert torch.equal(x.detach(), leaf.grad)  # ... which is the gradient (x = leaf * 1)
    # A leaf's values are the user's: never overwritten (a separate gradient buffer instead).
    leaf2 = d["logits"].clone().requires_grad_()
    before = leaf2.detach().clone()
    grpo_loss(leaf2, *args, impl="single_read", inplace_backward=True).loss.backward()
    assert torch.equal(leaf2.detach(), before)
    # Another node that saved the logits: nothing is written into them (the forward-time alias
    # check; test_adversarial_ops has every case), the gradient goes to a separate buffer.
    w = d["logits"].clone().requires_grad_()
    y = w * 1.5
    yb = y.detach().clone()
    s = y.sin()  # saves y
    (grpo_loss(y, *args, impl="single_read", inplace_backward=True).loss + s.sum()).backward()
    assert torch.equal(y.detach(), yb)
    w2 = d["logits"].clone().requires_grad_()
    y2 = w2 * 1.5
    (grpo_loss(y2, *args, impl="single_read").loss + y2.sin().sum()).backward()
    close(w.grad, w2.grad, atol=0, rtol=0)


def test_single_read_autograd_contract(device):
    d = grpo_inputs(10, 17, device)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    x = d["logits"].clone().requires_grad_()
    res = grpo_loss(x, *args, impl="single_read", ref_logp=d["ref"], kl_coef=0.1)
    assert not res.logp.requires_grad and not res.ratio.requires_grad  # only the loss is differentiable
    res.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        res.loss.backward()
    x2 = d["logits"].clone().requires_grad_()
    (g,) = torch.autograd.grad(grpo_loss(x2, *args, impl="single_read").loss, x2, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a tsparse"):
        torch.autograd.grad(g.sum(), x2)
    with torch.no_grad():  # forward only: no gradient buffer at all
        r = grpo_loss(d["logits"], *args, impl="single_read", ref_logp=d["ref"], kl_coef=0.1)
    close(r.loss, res.loss, atol=0, rtol=0)
    close(r.kl, res.kl, atol=0, rtol=0)
    with pytest.raises(ValueError, match="`impl`"):
        grpo_loss(d["logits"], *args, impl="one_pass")


def test_scale_rows_op(device):
    x = torch.randn(5, 37, device=device).bfloat16()
    before = x.clone()
    ops.scale_rows_(x, torch.ones(1, device=device))
    assert torch.equal(x, before)  # scale 1: untouched
    ops.scale_rows_(x, torch.full((1,), -2.5, device=device))
    close(x, (before.float() * -2.5).bfloat16(), atol=0, rtol=0)
    view = torch.randn(4, 40, device=device)[:, 3:30]  # rows at an odd phase, strided
    want = view * 3.0
    ops.scale_rows_(view, torch.full((1,), 3.0, device=device))
    close(view, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="`scale`"):
        ops.scale_rows_(x, torch.ones(2, device=device))


def test_opcheck_single_read_ops(device):
    t, v = 6, 37
    d = grpo_inputs(t, v, device, dtype=torch.float32)
    w = torch.rand(t, device=device)
    base = (d["targets"], d["old"], d["adv"], d["ref"], d["isw"], w, 0.9, 0.2, 0.28, 3.0, "k3", CLAMP_EDGES, 0.05, 0.01,
            True)
    cases = [
        (ops.grpo_loss_fused.default, (d["logits"], *base, True, True)),
        (ops.grpo_loss_fused.default, (d["logits"], *base, False, True)),
        (ops.grpo_loss_fused.default, (d["logits"].bfloat16(), d["targets"], d["old"], d["adv"], None, None, w, 1.0, 0.2,
                                       0.2, 3.0, "k1", CLAMP_EDGES, 0.0, 0.0, False, True, False)),
        (ops.grpo_loss_fused_.default, (d["logits"].clone(), *base, True)),
        (ops.scale_rows_.default, (torch.randn(3, 9, device=device), torch.full((1,), 2.0, device=device))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_row_layout_matches_its_contract():
    """grpo_layout.h, the code the kernels run, through tsparse._C.grpo_row_layout: every element
    of a row is covered once (head + vectors + tail), the cluster slices partition the vectors, the
    owners are inside the row group, and the plan's shared memory stays within its budget."""
    for elem in (2, 4):
        for cols in (1, 2, 7, 8, 9, 15, 16, 17, 4095, 4096, 4097, 32768, 32769, 152064, 262144, 819200, 819201):
            for mis in range(0, 16, elem):
                lay = _C.grpo_row_layout(cols, elem, mis, 512, cols - 1)
                per = 16 // elem
                assert lay["head"] + lay["nvec"] * per + lay["ntail"] == cols
                assert lay["head"] < per and lay["ntail"] < per and lay["tail0"] == lay["head"] + lay["nvec"] * per
                assert (mis + lay["head"] * elem) % 16 == 0 or lay["head"] == cols
                if not lay["cluster_ok"]:
                    assert cols * elem > 8 * 200 * 1024, (cols, elem)
                    continue
                assert lay["ctas"] in (1, 2, 4, 8) and lay["smem_bytes"] <= 200 * 1024
                sl = lay["slices"]
                assert sl[0][0] == 0 and sl[-1][1] == lay["nvec"]
                assert all(a[1] == b[0] for a, b in zip(sl, sl[1:]))
                assert all(e - b <= lay["slice_vecs"] for b, e in sl)
                if cols * elem <= 4 * 76288:  # the reference row (V = 152,064 bf16) is 4 x 76,032 B
                    assert lay["ctas"] <= 4
                for j in {0, cols // 3, cols - 1}:
                    o = _C.grpo_row_layout(cols, elem, mis, lay["threads"], j)
                    assert 0 <= o["owner_rank"] < lay["ctas"] and 0 <= o["owner_thread"] < lay["threads"]
                    assert 0 <= o["owner_lane"] < lay["threads"]


def _kernel_loop_vectors(tid: int, n: int, group: int, unroll: int = 4) -> list[int]:
    """The vectors thread `tid` visits in grpo_device.cuh stream_vectors / grad_vectors (full
    trips of `unroll` vectors group apart, then single vectors), re-derived from the loops."""
    out, v = [], tid
    while v + (unroll - 1) * group < n:
        out += [v + k * group for k in range(unroll)]
        v += unroll * group
    while v < n:
        out.append(v)
        v += group
    return out


def test_cluster_kernel_writes_each_element_once_by_its_owner():
    """The single-read kernel's write phase, simulated from its loops (rank 0's head lanes, the
    last rank's tail lanes, each rank's slice through the vector loop): every element of the row
    is written by exactly one (rank, thread), that is grpo_layout.h cluster_owner's, so the owner's
    rewrite of the target element follows the only other store to it in program order; and no
    thread indexes its shared-memory slice past slice_vecs. The plan's widths 1..8 CTAs, 128 / 512
    threads, every misalignment."""
    for elem in (2, 4):
        for cols in (1, 3, 8, 9, 17, 1000, 4097, 20001, 38017, 76289, 152577):
            for mis in range(0, 16, elem):
                lay = _C.grpo_row_layout(cols, elem, mis, 512, 0)
                per, ctas, thr = 16 // elem, lay["ctas"], lay["threads"]
                count = torch.zeros(cols, dtype=torch.int32)
                rank_of = torch.full((cols,), -1, dtype=torch.int32)
                thread_of = torch.full((cols,), -1, dtype=torch.int32)

                def mark(j, rank, tid):  # j: element indices (a tensor)
                    count[j] += 1
                    rank_of[j] = rank
                    thread_of[j] = tid

                for rank, (b, e) in enumerate(lay["slices"]):
                    if rank == 0:
                        mark(torch.arange(lay["head"]), 0, torch.arange(lay["head"], dtype=torch.int32))
                    if rank == ctas - 1:
                        mark(lay["tail0"] + torch.arange(lay["ntail"]), rank,
                             torch.arange(lay["ntail"], dtype=torch.int32))
                    vec_thread = torch.full((e - b,), -1, dtype=torch.int32)
                    for tid in range(min(thr, e - b)):
                        vs = _kernel_loop_vectors(tid, e - b, thr)
                        assert not vs or max(vs) < lay["slice_vecs"]
                        vec_thread[vs] = tid
                    assert (vec_thread >= 0).all()
                    j = lay["head"] + (b + torch.arange(e - b)).repeat_interleave(per) * per + torch.arange(per).repeat(e - b)
                    mark(j, rank, vec_thread.repeat_interleave(per))
                assert (count == 1).all(), (cols, elem, mis)
                for j in sorted({0, 1, per - 1, per, cols // 2, cols - per, cols - 2, cols - 1} & set(range(cols))):
                    o = _C.grpo_row_layout(cols, elem, mis, thr, j)
                    assert (rank_of[j].item(), thread_of[j].item()) == (o["owner_rank"], o["owner_thread"]), (
                        cols, elem, mis, j)


# ======================================================================================
# CUDA-only (skipped without a GPU).
def _kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("v,dtype,cluster", [(152064, torch.bfloat16, True), (4096, torch.float16, False),
                                             (262144, torch.float32, True), (1 << 20, torch.bfloat16, False),
                                             (1000, torch.float64, False)])
def test_cuda_single_read_path_choice(v, dtype, cluster):
    """The cluster kernel runs where the plan fits and the two-pass kernels (same results)
    elsewhere: fp64, rows over 8 x 200 KB; grpo_loss runs float16 logits that need a gradient
    as two_pass (no cluster kernel, no scale kernel: loss scaling), the op itself still runs the
    cluster kernel for them."""
    t = 4
    d = grpo_inputs(t, v, "cuda", dtype=dtype)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    kw = dict(entropy_coef=0.01, ref_logp=d["ref"], kl_coef=0.02)
    names = _kernel_names(lambda: run_loss(d["logits"], args, kw, impl="single_read"))
    ran_cluster = any("grpo_loss_cluster_kernel" in n for n in names)
    assert ran_cluster == cluster, names
    assert any("scale_rows_kernel" in n for n in names) == (dtype != torch.float16)
    if dtype == torch.float16:
        w = torch.where(d["mask"], 1.0 / t, 0.0).float()
        op_args = (d["targets"], d["old"].float(), d["adv"].float(), d["ref"].float(), None, w, 1.0, 0.2, 0.2, 3.0,
                   "k1", CLAMP_EDGES, 0.02, 0.01, True, True)
        outs = {}
        for single in (True, False):
            names = _kernel_names(lambda: outs.__setitem__(single, ops.grpo_loss_fused(d["logits"], *op_args,
                                                                                      single)))
            assert any("grpo_loss_cluster_kernel" in n for n in names) == single, names
        for a, b in zip(outs[True], outs[False]):
            close(a.float(), b.float(), atol=5e-5, rtol=1e-3)
    two, g_two = run_loss(d["logits"], args, kw, impl="two_pass")
    one, g_one = run_loss(d["logits"], args, kw, impl="single_read")
    assert_same_result(one, two, g_one, g_two, exact=False, dtype=dtype, v=v)


@pytest.mark.cuda
@requires_cuda
def test_cuda_single_read_makes_no_host_sync_and_follows_the_stream():
    d = grpo_inputs(256, 152064 // 8, "cuda", dtype=torch.bfloat16)
    args = (d["targets"], d["old"], d["adv"], d["mask"])
    kw = dict(ref_logp=d["ref"], kl_coef=0.1, entropy_coef=0.01, stream=d["stream"], num_streams=2,
              loss_agg="seq-mean-token-mean", seq_ids=d["seq"])
    _, g_ref = run_loss(d["logits"], args, kw, impl="single_read")
    side = torch.cuda.Stream()
    x = d["logits"].clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            y = x * 1
            res = grpo_loss(y, *args, impl="single_read", inplace_backward=True, **kw)
            res.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(x.grad, g_ref)  # same kernels, same order: bit for bit


@pytest.mark.cuda
@requires_cuda
def test_cuda_single_read_above_2_pow_31_elements():
    """T * V > 2^31 (4.3 GB of bf16 logits): the last rows against the two-pass path run on those
    rows alone (token-sum: a row's gradient depends on its own row only)."""
    v = 152064
    t = (1 << 31) // v + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 3.2 * t * v * 2:
        pytest.skip("needs ~14 GB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(t, v, device="cuda", dtype=torch.bfloat16)
    for r0 in range(0, t, 2048):
        x[r0:r0 + 2048] = (torch.randn(min(2048, t - r0), v, device="cuda", generator=g) * 2).bfloat16()
    d = grpo_inputs(t, 8, "cuda", dtype=torch.float32)
    targets = torch.randint(0, v, (t,), device="cuda", generator=g)
    args = (targets, d["old"], d["adv"], d["mask"])
    kw = dict(loss_agg="token-sum", entropy_coef=0.01, return_entropy=True)
    xl = x.requires_grad_()
    res = grpo_loss(xl, *args, impl="single_read", **kw)
    res.loss.backward()
    tail = slice(t - 40, t)
    sub_args = tuple(a[tail] for a in args)
    two, g_two = run_loss(x.detach()[tail], sub_args, kw, impl="two_pass")
    close(res.logp[tail], two.logp, atol=5e-5, rtol=1e-5)
    close(res.entropy[tail], two.entropy, atol=5e-5, rtol=1e-5)
    close_grad(xl.grad[tail], g_two, torch.bfloat16)
