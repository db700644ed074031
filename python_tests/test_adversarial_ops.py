"""Regression tests for issue 14's ops side: what a hostile (or careless) caller can do to the
public and raw ops, each case once silently wrong or unclear on main.

1. ``inplace_backward=True`` only ever overwrites memory nothing else can observe.
2. A meta tensor mixed with CPU tensors is refused by every raw op, naming the argument; a
   meta tensor where values are read on the host is refused by the public op, by name.
3. ``accum_dtype`` of the fused linear ops: floating dtypes only.
4. ``token_offsets_from_grid`` makes ``box_to_patch_mask``'s checks.
5. ``pack_varlen(max_seqlen=k)`` checks the caller's bound.
6. ``torch.compile`` of the in-place paths and of ``grpo_loss(stream=...)`` with fullgraph.
7. NaN on masked tokens: tsparse's gradient stays finite (verl's does not); the reference too.
Plus messages that name the caller's argument, not an internal one, and wrong-typed scalars.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from tsparse import reference as ref
from tsparse.ops import (
    box_to_patch_mask,
    fuse_tokens,
    fuse_visual_tokens,
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    gather_tokens,
    grpo_loss,
    logprobs,
    pack_batch,
    pack_position_ids,
    pack_varlen,
    scatter_tokens,
    select_visual_tokens,
    summary_tokens,
    token_coords,
    token_offsets_from_grid,
    unpack_varlen,
    varlen,
)

from conftest import requires_cuda

ops = torch.ops.tsparse
T, V = 6, 13


def _targets(device="cpu"):
    return torch.randint(0, V, (T,), device=device)


def _loss_of(kind: str, targets):
    """A scalar loss of the logits through the op under test, with ``inplace_backward=True``."""
    old, adv = torch.randn(T, dtype=torch.float64), torch.randn(T, dtype=torch.float64)
    mask = torch.ones(T, dtype=torch.bool)
    mask[1] = False

    def f(logits, inplace=True):
        if kind == "logprobs":
            lp, en = logprobs(logits, targets, return_entropy=True, inplace_backward=inplace)
            return (lp * torch.arange(1.0, T + 1, dtype=lp.dtype)).sum() + en.sum()
        impl = "single_read" if kind == "grpo_loss_single_read" else "two_pass"
        return grpo_loss(logits, targets, old, adv, mask, entropy_coef=0.01, inplace_backward=inplace,
                         impl=impl).loss

    return f


# ======================================================================================
# 1. The in-place backward writes only memory nothing else can observe. grpo_loss_single_read:
# grpo_loss(impl="single_read") writes the gradient during the FORWARD; the same rule holds.
OPS = ["logprobs", "grpo_loss", "grpo_loss_single_read"]


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("view", ["slice", "view", "parameter_reshape", "expand_as_view"])
def test_inplace_never_writes_a_view_of_a_leaf(kind, view):
    tg = _targets()
    f = _loss_of(kind, tg)
    base = torch.randn(T, V, dtype=torch.float64)
    if view == "slice":
        leaf = base.clone().requires_grad_()
        x = leaf[:, :]
    elif view == "view":
        leaf = base.reshape(-1).clone().requires_grad_()
        x = leaf.view(T, V)
    elif view == "parameter_reshape":
        leaf = torch.nn.Parameter(base.reshape(-1).clone())
        x = leaf.reshape(T, V)
    else:
        leaf = base.clone().requires_grad_()
        x = leaf.view_as(leaf)
    before = leaf.detach().clone()
    f(x).backward()
    assert torch.equal(leaf.detach(), before)  # main: the leaf held its gradient afterwards
    ref_leaf = base.clone().requires_grad_()
    f(ref_leaf, inplace=False).backward()
    torch.testing.assert_close(leaf.grad.reshape(T, V), ref_leaf.grad, rtol=0, atol=0)


def _run_inplace(kind, make_logits):
    """Builds logits with ``make_logits(w) -> (logits, kept)`` from a fresh leaf ``w``, runs the
    op with inplace_backward=True and backward; returns (w.grad, logits before, logits after,
    kept before, kept after, the out-of-place gradient)."""
    tg = _targets()
    f = _loss_of(kind, tg)
    w0 = torch.randn(1, T, V, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    logits, kept = make_logits(w)
    lb = logits.detach().clone()
    kb = kept.detach().clone() if kept is not None else None
    f(logits).backward()
    w2 = w0.clone().requires_grad_()
    logits2, _ = make_logits(w2)
    f(logits2, inplace=False).backward()
    return w.grad, lb, logits.detach(), kb, (kept.detach() if kept is not None else None), w2.grad


@pytest.mark.parametrize("kind", OPS)
def test_inplace_writes_a_plain_non_leaf(kind):
    g, lb, la, _, _, g_ref = _run_inplace(kind, lambda w: (w[0] * 2.0, None))
    assert not torch.equal(lb, la)  # the in-place path is still taken where it is safe
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("kind", OPS)
def test_inplace_writes_a_whole_view_of_a_temporary(kind):
    # out.squeeze(0) of a temporary: the base is the logits in another shape, held by nobody.
    g, lb, la, _, _, g_ref = _run_inplace(kind, lambda w: ((w * 2.0).squeeze(0), None))
    assert not torch.equal(lb, la)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("case", ["whole_view_base_kept", "partial_view_base_kept", "other_view_kept",
                                  "detached_alias", "data_alias"])
def test_inplace_leaves_memory_the_caller_can_observe(kind, case):
    def make(w):
        if case == "whole_view_base_kept":
            base = w * 2.0
            return base.squeeze(0), base
        if case == "partial_view_base_kept":
            full = torch.cat([w[0] * 2.0, w[0]], dim=1)  # [T, 2V]
            return full[:, :V], full
        if case == "other_view_kept":
            base = (w * 2.0).squeeze(0)
            return base, base[:2]
        x = w[0] * 2.0
        return x, (x.detach() if case == "detached_alias" else x.data)

    g, lb, la, kb, ka, g_ref = _run_inplace(kind, make)
    assert torch.equal(ka, kb), case  # main: the kept tensor held the gradient
    assert torch.equal(la, lb)
    assert torch.equal(g, g_ref)


class _SavesOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x * 3.0
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * 3.0 + 0.0 * y  # reads its saved output


@pytest.mark.parametrize("kind", OPS)
@pytest.mark.parametrize("producer", ["tanh", "exp", "softmax", "sigmoid", "custom_function_saving_output"])
def test_inplace_with_logits_the_producing_op_saved(kind, producer):
    """An op inside the model that saved its output for its own backward (runs after ours):
    main overwrote that saved output (autograd then raised 'modified by an inplace operation',
    or a custom Function read the gradient as its output)."""
    fn = {"tanh": torch.tanh, "exp": lambda z: torch.exp(z * 0.1), "softmax": lambda z: torch.softmax(z, -1),
          "sigmoid": torch.sigmoid, "custom_function_saving_output": _SavesOutput.apply}[producer]
    g, lb, la, _, _, g_ref = _run_inplace(kind, lambda w: (fn(w[0]), None))
    assert torch.equal(la, lb)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("kind", OPS)
def test_inplace_with_logits_another_node_saved(kind):
    """Another autograd node saved the logits themselves and runs its backward after ours
    (main: autograd raised 'modified by an inplace operation')."""
    tg = _targets()
    f = _loss_of(kind, tg)
    w = torch.randn(T, V, dtype=torch.float64, requires_grad=True)
    x = w * 2.0
    s = x.sin()  # saves x; created first, so its backward runs after the op's
    (f(x) + s.sum()).backward()
    w2 = w.detach().clone().requires_grad_()
    x2 = w2 * 2.0
    (f(x2, inplace=False) + x2.sin().sum()).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


def test_inplace_twice_on_the_same_logits():
    tg = _targets()
    w = torch.randn(T, V, dtype=torch.float64, requires_grad=True)
    x = w * 2.0
    a, _ = logprobs(x, tg, inplace_backward=True)
    b, _ = logprobs(x, tg.flip(0), inplace_backward=True)
    (a.sum() + 2 * b.sum()).backward()
    w2 = w.detach().clone().requires_grad_()
    x2 = w2 * 2.0
    (logprobs(x2, tg)[0].sum() + 2 * logprobs(x2, tg.flip(0))[0].sum()).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


def _single_read(x, tg, inplace=True, **kw):
    old, adv = torch.zeros(T, dtype=x.dtype), torch.linspace(-1, 1, T, dtype=x.dtype)
    mask = torch.ones(T, dtype=torch.bool)
    return grpo_loss(x, tg, old, adv, mask, impl="single_read", inplace_backward=inplace, **kw)


def test_single_read_inplace_logits_hold_the_gradient_once_the_forward_returns():
    """The documented contract: the write happens in the forward, so the logits hold d loss /
    d logits as soon as the op returns (before backward), and backward hands that memory on."""
    tg = _targets()
    w = torch.randn(T, V, dtype=torch.float64, requires_grad=True)
    x = w * 2.0
    out = _single_read(x, tg)
    x2 = (w.detach() * 2.0).requires_grad_()
    (g_ref,) = torch.autograd.grad(_single_read(x2, tg, inplace=False).loss, x2)
    assert torch.equal(x.detach(), g_ref)  # already during the forward
    out.loss.backward()
    torch.testing.assert_close(w.grad, 2.0 * g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("inplace_impl", ["single_read", "two_pass"])
def test_logits_that_hold_their_gradient_are_refused_by_a_later_op(inplace_impl):
    """A second tsparse GRPO op on logits an in-place path overwrote would read the gradient as
    logits: it raises, naming `logits` (single_read: right after the forward; two_pass: after
    the backward)."""
    tg = _targets()
    w = torch.randn(T, V, dtype=torch.float64, requires_grad=True)
    x = w * 2.0
    if inplace_impl == "single_read":
        out = _single_read(x, tg)
    else:
        out = grpo_loss(x, tg, torch.zeros(T), torch.ones(T), torch.ones(T, dtype=torch.bool), inplace_backward=True)
        out.loss.backward()
    with pytest.raises(ValueError, match=r"tsparse\.logprobs: `logits` hold their gradient"):
        logprobs(x, tg)
    with pytest.raises(ValueError, match=r"tsparse\.grpo_loss: `logits` hold their gradient"):
        _single_read(x, tg, inplace=False)
    if inplace_impl == "single_read":
        out.loss.backward()  # the backward's scale keeps the mark
        with pytest.raises(ValueError, match=r"`logits` hold their gradient"):
            logprobs(x, tg)
    x.detach().copy_(torch.randn(T, V, dtype=torch.float64))  # the caller writes new logits: usable again
    logprobs(x, tg)


def test_single_read_does_not_write_in_place_under_saved_tensor_hooks():
    """Saved-tensor hooks may keep tensors on the Python side, where the counts cannot see them."""
    tg = _targets()
    w = torch.randn(T, V, dtype=torch.float64, requires_grad=True)
    x = w * 2.0
    xb = x.detach().clone()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = _single_read(x, tg)
    assert torch.equal(x.detach(), xb)
    out.loss.backward()
    w2 = w.detach().clone().requires_grad_()
    _single_read(w2 * 2.0, tg, inplace=False).loss.backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


def test_single_read_inplace_in_no_grad_and_for_logits_without_grad_writes_nothing():
    tg = _targets()
    x = torch.randn(T, V, dtype=torch.float64)
    xb = x.clone()
    _single_read(x, tg)  # no grad needed: no gradient, no write
    w = torch.randn(T, V, dtype=torch.float64, requires_grad=True)
    y = w * 2.0
    yb = y.detach().clone()
    with torch.no_grad():
        _single_read(y, tg)
    assert torch.equal(x, xb) and torch.equal(y.detach(), yb)


# ======================================================================================
# 2. Meta tensors mixed with real ones.
def _meta(t):
    return t.to("meta")


def _raw_cases():
    x = torch.randn(5, 3)
    idx = torch.tensor([0, 2])
    logits = torch.randn(4, 6)
    tg = torch.tensor([0, 1, 2, 3])
    lp, rm, ln, en = ops.logprobs(logits, tg, 1.0, True)
    z = torch.zeros(4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    seqlens, cu = ops.varlen_seqlens(mask, None)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.6]])
    offs, grid = torch.tensor([0, 1]), torch.tensor([[1, 4, 4]])
    row_map = torch.tensor([1, -1, 0])
    inv = torch.tensor([0, -1, 1, -1, -1], dtype=torch.int32)
    return [
        ("gather_rows", "index", lambda m: ops.gather_rows(x, m(idx), False)),
        ("scatter_rows", "index", lambda m: ops.scatter_rows(x[:2], m(idx), 5, None)),
        ("scatter_rows", "fill", lambda m: ops.scatter_rows(x[:2], idx, 5, m(x))),
        ("box_to_patch_mask", "box_offsets", lambda m: ops.box_to_patch_mask(boxes, m(offs), grid, 4, False, 14, 2,
                                                                             0.0, 0.0, True)),
        ("box_to_patch_mask", "image_grid_thw", lambda m: ops.box_to_patch_mask(boxes, offs, m(grid), 4, False, 14,
                                                                                2, 0.0, 0.0, True)),
        ("fuse_tokens", "keep", lambda m: ops.fuse_tokens(x, m(torch.ones(5, dtype=torch.bool)), [0, 5], [5])),
        ("compose_rows", "src", lambda m: ops.compose_rows(m(x), row_map, None, None)),
        ("compose_rows", "fill", lambda m: ops.compose_rows(x[:2], row_map, m(x[:3]), None)),
        ("compose_rows", "row_scale", lambda m: ops.compose_rows(x, row_map, None, m(torch.ones(5)))),
        ("segment_reduce_rows", "perm", lambda m: ops.segment_reduce_rows(x, m(torch.arange(5)),
                                                                          torch.tensor([0, 2, 5]), False)),
        ("segment_reduce_rows", "offsets", lambda m: ops.segment_reduce_rows(x, torch.arange(5),
                                                                             m(torch.tensor([0, 2, 5])), False)),
        ("varlen_seqlens", "keep", lambda m: ops.varlen_seqlens(mask, m(mask))),
        ("varlen_pack", "cu_seqlens", lambda m: ops.varlen_pack(mask, None, m(cu), 6, None, None)),
        ("varlen_pack", "input_ids", lambda m: ops.varlen_pack(mask, None, cu, 6, m(mask.long()), None)),
        ("varlen_gather", "inverse", lambda m: ops.varlen_gather(x, idx, m(inv))),
        ("logprobs", "targets", lambda m: ops.logprobs(logits, m(tg), 1.0, False)),
        ("logprobs_backward", "row_max", lambda m: ops.logprobs_backward(logits, tg, m(rm), ln, en, lp, None, 1.0)),
        ("logprobs_backward", "grad_logp", lambda m: ops.logprobs_backward(logits, tg, rm, ln, en, m(lp), None, 1.0)),
        ("logprobs_backward_", "log_norm", lambda m: ops.logprobs_backward_(logits.clone(), tg, rm, m(ln), en, lp,
                                                                            None, 1.0)),
        ("grpo_token_terms", "advantages", lambda m: ops.grpo_token_terms(z, z, m(z), None, None, 0.2, 0.2, 3.0,
                                                                          "k1", 3)),
        ("grpo_token_terms", "is_weights", lambda m: ops.grpo_token_terms(z, z, z, None, m(z), 0.2, 0.2, 3.0,
                                                                          "k1", 3)),
        # raw ops main added with the single-read grpo_loss and the nearest_kept fusion
        ("grpo_loss_fused", "targets", lambda m: ops.grpo_loss_fused(logits, m(tg), z, z, None, None, z + 1, 1.0,
                                                                     0.2, 0.2, 3.0, "k1", 3, 0.0, 0.0, False,
                                                                     True, True)),
        ("grpo_loss_fused", "token_weight", lambda m: ops.grpo_loss_fused(logits, tg, z, z, None, None, m(z + 1),
                                                                          1.0, 0.2, 0.2, 3.0, "k1", 3, 0.0, 0.0,
                                                                          False, True, True)),
        ("grpo_loss_fused", "ref_logp", lambda m: ops.grpo_loss_fused(logits, tg, z, z, m(z), None, z + 1, 1.0, 0.2,
                                                                      0.2, 3.0, "k1", 3, 0.1, 0.0, False, False,
                                                                      True)),
        ("grpo_loss_fused_", "advantages", lambda m: ops.grpo_loss_fused_(logits.clone(), tg, z, m(z), None, None,
                                                                          z + 1, 1.0, 0.2, 0.2, 3.0, "k1", 3, 0.0,
                                                                          0.0, False, True)),
        ("grpo_loss_fused_", "is_weights", lambda m: ops.grpo_loss_fused_(logits.clone(), tg, z, z, None, m(z + 1),
                                                                          z + 1, 1.0, 0.2, 0.2, 3.0, "k1", 3, 0.0,
                                                                          0.0, False, True)),
        ("scale_rows_", "scale", lambda m: ops.scale_rows_(logits.clone(), m(torch.tensor([2.0])))),
        ("fuse_tokens_nearest", "coords", lambda m: ops.fuse_tokens_nearest(
            x, torch.tensor([True, False, True, False, False]), m(torch.zeros(5, 2, dtype=torch.float64)), [0, 5],
            [2])),
        ("fuse_tokens_nearest", "keep", lambda m: ops.fuse_tokens_nearest(
            x, m(torch.tensor([True, False, True, False, False])), torch.zeros(5, 2, dtype=torch.float64), [0, 5],
            [2])),
    ]


@pytest.mark.parametrize("case", _raw_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def test_raw_op_refuses_a_meta_tensor_among_cpu_tensors(case):
    """main: the fake kernel ran and returned uninitialised CPU memory."""
    _op, arg, call = case
    call(lambda t: t)  # the all-CPU call works
    with pytest.raises(ValueError, match=rf"`{arg}` is on meta"):
        call(_meta)


def test_raw_ops_on_meta_tensors_alone_still_infer_shapes():
    x = torch.randn(5, 3, device="meta")
    out, inv = ops.gather_rows(x, torch.tensor([0, 2], device="meta"), True)
    assert out.shape == (2, 3) and out.device.type == "meta" and inv.shape == (5,)
    keep, counts = ops.box_to_patch_mask(torch.rand(1, 4, device="meta"), torch.tensor([0, 1]),
                                         torch.tensor([[1, 4, 4]]), 4, False, 14, 2, 0.0, 0.0, True)
    assert keep.device.type == "meta" and keep.shape == (4,)  # metadata on the CPU is fine
    lp = logprobs(torch.randn(4, 6, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"))[0]
    assert lp.shape == (4,) and lp.device.type == "meta"
    p = pack_varlen(torch.randn(2, 3, 4, device="meta"), torch.ones(2, 3, device="meta"), total=6, max_seqlen=3)
    assert p.values.shape == (6, 4)
    mz = torch.zeros(4, device="meta")
    outs = ops.grpo_loss_fused(torch.randn(4, 6, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"), mz,
                               mz, None, None, mz, 1.0, 0.2, 0.2, 3.0, "k1", 3, 0.0, 0.01, False, True, True)
    assert outs[1].shape == (4,) and outs[-1].shape == (4, 6) and outs[-1].device.type == "meta"
    y, assign, _ = ops.fuse_tokens_nearest(torch.randn(5, 3, device="meta"), torch.ones(5, dtype=torch.bool,
                                           device="meta"), torch.zeros(5, 2, dtype=torch.float64, device="meta"),
                                           [0, 5], [5])
    assert y.shape == (5, 3) and assign.shape == (5,)


def test_public_ops_refuse_meta_tensors_whose_values_they_read():
    boxes, offs, grid = torch.tensor([[0.1, 0.1, 0.6, 0.6]]), torch.tensor([0, 1]), torch.tensor([[1, 4, 4]])
    msg = "meta tensors are not supported here"
    cases = [
        ("box_to_patch_mask", "box_offsets", lambda: box_to_patch_mask(boxes, _meta(offs), grid)),
        ("box_to_patch_mask", "image_grid_thw", lambda: box_to_patch_mask(boxes, offs, _meta(grid))),
        ("box_to_patch_mask", "boxes", lambda: box_to_patch_mask(_meta(boxes), offs, grid, invalid_boxes="raise")),
        ("token_offsets_from_grid", "image_grid_thw", lambda: token_offsets_from_grid(_meta(grid))),
        ("fuse_tokens", "keep", lambda: fuse_tokens(torch.randn(4, 3, device="meta"),
                                                    torch.ones(4, dtype=torch.bool, device="meta"), [0, 4])),
        ("fuse_tokens", "token_offsets", lambda: fuse_tokens(torch.randn(4, 3), torch.ones(4, dtype=torch.bool),
                                                             _meta(torch.tensor([0, 4])))),
        ("select_visual_tokens", "image_embeds", lambda: select_visual_tokens(torch.randn(4, 3, device="meta"), boxes,
                                                                              offs, grid)),
        ("pack_varlen", "attention_mask", lambda: pack_varlen(torch.randn(2, 3, 4, device="meta"),
                                                              torch.ones(2, 3, device="meta"))),
        ("grpo_loss", "stream", lambda: grpo_loss(torch.randn(4, 6, device="meta"),
                                                  torch.zeros(4, dtype=torch.long, device="meta"),
                                                  *(torch.zeros(4, device="meta"),) * 2,
                                                  torch.ones(4, dtype=torch.bool, device="meta"),
                                                  stream=torch.zeros(4, dtype=torch.long, device="meta"))),
    ]
    for op, arg, call in cases:
        with pytest.raises(ValueError, match=rf"tsparse\.{op}: `{arg}` is a meta tensor; {msg}"):
            call()


def test_public_ops_name_the_device_of_a_meta_tensor_beside_cpu_ones():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="`index` is on meta"):
        gather_tokens(x, torch.tensor([0, 1], device="meta"))
    with pytest.raises(ValueError, match="`fill` is on meta"):
        scatter_tokens(x[:2], torch.tensor([0, 1]), 4, fill=torch.zeros(4, 3, device="meta"))
    with pytest.raises(ValueError, match="`old_logp` is on meta"):
        grpo_loss(torch.randn(4, 6), torch.zeros(4, dtype=torch.long), torch.zeros(4, device="meta"), torch.zeros(4),
                  torch.ones(4, dtype=torch.bool))


# ======================================================================================
# 3. accum_dtype
@pytest.mark.parametrize("bad", [torch.int64, torch.int32, torch.bool, torch.complex64, "float32", 32, float])
def test_fused_linear_accum_dtype_must_be_floating(bad):
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(6, 3, requires_grad=True)
    tg = torch.tensor([0, 1, 2, 5])
    z, m = torch.zeros(4), torch.ones(4, dtype=torch.bool)
    with pytest.raises(TypeError, match="`accum_dtype` must be None or a floating torch.dtype"):
        fused_linear_logprobs(h, w, tg, accum_dtype=bad)
    with pytest.raises(TypeError, match="`accum_dtype` must be None or a floating torch.dtype"):
        fused_linear_grpo_loss(h, w, tg, z, z, m, accum_dtype=bad)


def test_fused_linear_floating_accum_dtypes_work():
    h = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(6, 3, requires_grad=True)
    tg = torch.tensor([0, 1, 2, 5])
    fused_linear_logprobs(h, w, tg)[0].sum().backward()
    g_ref = w.grad.clone()
    for dt in (torch.float32, torch.float64):
        w.grad = None
        fused_linear_logprobs(h, w, tg, accum_dtype=dt, chunk_size=1)[0].sum().backward()
        torch.testing.assert_close(w.grad, g_ref)  # main: int64 gave an all-zero weight gradient


# ======================================================================================
# 4. token_offsets_from_grid makes box_to_patch_mask's checks
@pytest.mark.parametrize("grid,merge,exc", [
    ([[1, -4, 4]], 2, ValueError),
    ([[0, 4, 4]], 2, ValueError),
    ([[1, 4, 0]], 2, ValueError),
    ([[1, 3, 4]], 2, ValueError),
    ([[1.0, 4.0, 4.0]], 2, TypeError),
    ([[1.5, 4.0, 4.0]], 2, TypeError),
    ([[1, 4, 4]], 0, ValueError),
    ([[1, 4, 4]], -2, ValueError),
    ([[1, 4, 4]], 2.0, ValueError),
    ([[1, 4, 4]], True, ValueError),
    ([[1, 4]], 2, ValueError),
])
def test_token_offsets_from_grid_checks_like_box_to_patch_mask(grid, merge, exc):
    g = torch.tensor(grid)
    with pytest.raises(exc, match=r"tsparse\.token_offsets_from_grid: `(image_grid_thw|merge_size)"):
        token_offsets_from_grid(g, merge)
    # box_to_patch_mask rejects the same grid / merge_size
    n = g.shape[0] if g.dim() == 2 else 1
    with pytest.raises((ValueError, TypeError)):
        box_to_patch_mask(torch.zeros(0, 4), torch.zeros(n + 1, dtype=torch.long), g, merge_size=merge)


def test_token_offsets_from_grid_good_grids():
    assert token_offsets_from_grid(torch.tensor([[1, 4, 6], [2, 2, 2]])) == [0, 6, 8]
    assert token_offsets_from_grid(torch.tensor([[1, 4, 6]], dtype=torch.int32), 1) == [0, 24]
    assert token_offsets_from_grid(torch.zeros(0, 3, dtype=torch.long)) == [0]


# ======================================================================================
# 5. pack_varlen checks the caller's max_seqlen
def test_pack_varlen_rejects_a_max_seqlen_below_the_longest_row():
    x = torch.randn(3, 5, 2)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    for kw in (dict(max_seqlen=1), dict(max_seqlen=4, total=13)):
        with pytest.raises(ValueError, match=r"`max_seqlen` = \d+"):
            pack_varlen(x, mask, **kw)  # main: returned max_seqlen=1 for a longest row of 5
    with pytest.raises(ValueError, match="`max_seqlen`"):
        pack_batch(torch.zeros(3, 5, dtype=torch.long), mask, max_seqlen=4, total=13)
    assert pack_varlen(x, mask, max_seqlen=5).max_seqlen == 5
    assert pack_varlen(x, mask, max_seqlen=9, total=13).max_seqlen == 9  # an upper bound
    for bad in (-1, 2.5, "5", True):
        with pytest.raises(ValueError, match="`max_seqlen`"):
            pack_varlen(x, mask, max_seqlen=bad)


# ======================================================================================
# 6. torch.compile
@pytest.mark.parametrize("kind", OPS)
def test_compile_fullgraph_with_inplace_backward(kind):
    """main: _use_inplace read logits.grad_fn before asking whether it was compiling."""
    tg = _targets()
    f = _loss_of(kind, tg)
    compiled = torch.compile(lambda w: f(w * 2.0), fullgraph=True, backend="aot_eager")
    w0 = torch.randn(T, V, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(w).backward()
    w2 = w0.clone().requires_grad_()
    f(w2 * 2.0, inplace=False).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph_grpo_loss_with_streams_on_the_cpu():
    """main: the CPU range check of `stream` read values on the host (a graph break)."""
    tg = _targets()
    old, adv = torch.randn(T), torch.randn(T)
    mask = torch.rand(T) > 0.2
    stream = torch.tensor([0, 1, 0, 1, 1, 0])
    seq = torch.tensor([0, 0, 1, 1, 2, 2])

    def loss(x, s):
        return grpo_loss(x, tg, old, adv, mask, stream=s, num_streams=2, loss_agg="seq-mean-token-mean",
                         seq_ids=seq).loss

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x0 = torch.randn(T, V)
    x = x0.clone().requires_grad_()
    compiled(x, stream).backward()
    x2 = x0.clone().requires_grad_()
    loss(x2, stream).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with pytest.raises(RuntimeError, match=r"`stream` values must lie in \[0, 2\)"):
        compiled(x0, stream + 2)  # the range check runs inside the graph


# ======================================================================================
# 7. NaN on masked tokens
def test_reference_loss_is_finite_with_nan_logits_on_a_masked_row():
    tg = _targets()
    logits = torch.randn(T, V, dtype=torch.float64)
    logits[2] = float("nan")
    mask = torch.ones(T, dtype=torch.bool)
    mask[2] = False
    old, adv = torch.randn(T, dtype=torch.float64), torch.randn(T, dtype=torch.float64)
    for loss_agg in ("token-mean", "seq-mean-token-mean"):
        kw = dict(loss_agg=loss_agg, seq_ids=torch.arange(T) // 2, entropy_coef=0.01)
        exp = ref.grpo_loss_ref(logits, tg, old, adv, mask, **kw)
        assert torch.isfinite(exp["loss"])  # main: NaN (logp.sum() * 0)
        got = grpo_loss(logits, tg, old, adv, mask, **kw)
        torch.testing.assert_close(got.loss, exp["loss"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["advantages", "old_logp", "is_weights"])
def test_nan_input_on_a_masked_token_keeps_the_gradient_finite(bad):
    """The documented difference from verl: a non-finite input on a masked token contributes
    exactly 0 here (verl's gradient at that token is NaN). The gradient equals the one with
    that input replaced by any finite value."""
    tg = _targets()
    logits = torch.randn(T, V, dtype=torch.float64)
    mask = torch.ones(T, dtype=torch.bool)
    mask[3] = False
    inputs = dict(old_logp=torch.randn(T, dtype=torch.float64), advantages=torch.randn(T, dtype=torch.float64),
                  is_weights=torch.rand(T, dtype=torch.float64) + 0.5)
    clean = {k: v.clone() for k, v in inputs.items()}
    inputs[bad][3] = float("nan")
    for loss_agg in ("token-mean", "seq-mean-token-sum"):
        kw = dict(loss_agg=loss_agg, seq_ids=torch.arange(T) // 2)
        x = logits.clone().requires_grad_()
        loss = grpo_loss(x, tg, mask=mask, **inputs, **kw).loss
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        x2 = logits.clone().requires_grad_()
        grpo_loss(x2, tg, mask=mask, **clean, **kw).loss.backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    try:
        from verl.trainer.ppo import core_algos
        from verl.workers.config import ActorConfig
    except Exception:  # pragma: no cover - verl is a dev dependency
        return
    cfg = ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=8,
                      use_torch_compile=False)
    if bad == "old_logp":
        return  # verl: a NaN old log-prob goes through clamp, whose gradient at NaN is 0
    lp = ref.logprobs_ref(logits, tg)[0].detach().requires_grad_()
    inputs["old_logp"][3] = lp[3].detach()  # ratio 1 at the masked token: not clipped, so the NaN reaches logp
    vloss, _ = core_algos.get_policy_loss_fn("vanilla")(inputs["old_logp"][None], lp[None], inputs["advantages"][None],
                                                        mask[None], "token-mean", cfg, inputs["is_weights"][None])
    (g,) = torch.autograd.grad(vloss, lp)
    assert torch.isnan(g[3])  # verl: NaN at the masked token (the difference the README documents)


# ======================================================================================
# seq-mean-token-sum-norm and loss_scale_factor
def test_seq_mean_token_sum_norm_is_seq_mean_token_sum_over_the_factor():
    d = dict(targets=_targets(), old_logp=torch.randn(T, dtype=torch.float64),
             advantages=torch.randn(T, dtype=torch.float64), mask=torch.rand(T) > 0.3)
    seq = torch.arange(T) // 2
    logits = torch.randn(T, V, dtype=torch.float64)
    a = grpo_loss(logits, **d, loss_agg="seq-mean-token-sum", seq_ids=seq).loss
    b = grpo_loss(logits, **d, loss_agg="seq-mean-token-sum-norm", seq_ids=seq, loss_scale_factor=7).loss
    torch.testing.assert_close(b, a / 7, rtol=1e-14, atol=0)
    # the fused linear op takes the same mode (same plan)
    h, w = torch.randn(T, 5, dtype=torch.float64), torch.randn(V, 5, dtype=torch.float64)
    c = fused_linear_grpo_loss(h, w, **d, loss_agg="seq-mean-token-sum-norm", seq_ids=seq, loss_scale_factor=7).loss
    e = grpo_loss(h @ w.t(), **d, loss_agg="seq-mean-token-sum-norm", seq_ids=seq, loss_scale_factor=7).loss
    torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`loss_scale_factor`"):
        grpo_loss(logits, **d, loss_agg="seq-mean-token-sum-norm", seq_ids=seq)
    with pytest.raises(ValueError, match="`loss_scale_factor`"):
        grpo_loss(logits, **d, loss_scale_factor=4.0)  # token-mean: it would be ignored
    for bad, exc in ((0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("4", TypeError)):
        with pytest.raises(exc, match="`loss_scale_factor`"):
            grpo_loss(logits, **d, loss_agg="seq-mean-token-sum-norm", seq_ids=seq, loss_scale_factor=bad)


def test_clip_ratio_c_at_most_one_is_a_value_error():
    z, m = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.bool)
    for c in (1.0, 0.5, -3.0):
        with pytest.raises(ValueError, match="`clip_ratio_c` must be a finite number > 1"):
            grpo_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), z, z, m, clip_ratio_c=c)


# ======================================================================================
# Messages name the caller's argument; wrong-typed scalars are refused.
def test_select_visual_tokens_names_image_embeds():
    boxes, offs, grid = torch.tensor([[0.1, 0.1, 0.6, 0.6]]), torch.tensor([0, 1]), torch.tensor([[1, 4, 4]])
    for fuse in (True, False):
        with pytest.raises(TypeError, match=r"select_visual_tokens: `image_embeds` must be float32"):
            select_visual_tokens(torch.zeros(4, 3, dtype=torch.long), boxes, offs, grid, fuse=fuse)
    with pytest.raises(ValueError, match=r"select_visual_tokens: `image_embeds` must be 2-D"):
        select_visual_tokens(torch.zeros(4), boxes, offs, grid)
    with pytest.raises(TypeError, match=r"select_visual_tokens: `image_grid_thw` must be int32 or int64"):
        select_visual_tokens(torch.zeros(4, 3), boxes, offs, grid.float())  # main: silently truncated
    with pytest.raises(TypeError, match=r"unknown mask option"):
        select_visual_tokens(torch.zeros(4, 3), boxes, offs, grid, marg=1.0)


def test_flash_attn_drop_ins_name_their_arguments():
    hs = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"unpad_input: `hidden_states` must have shape"):
        varlen.unpad_input(hs[0], mask)
    with pytest.raises(TypeError, match=r"unpad_input: `hidden_states` must be a torch.Tensor"):
        varlen.unpad_input([1, 2], mask)
    with pytest.raises(ValueError, match=r"unpad_input: `attention_mask`"):
        varlen.unpad_input(hs, mask[0])
    for bad_unused in (mask[:, :1], mask[:1], torch.ones(3, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"unpad_input: `unused_mask` must have the shape"):
            varlen.unpad_input(hs, mask, bad_unused)  # main: [2, 1] broadcast silently
    values = torch.randn(4, 5)
    with pytest.raises(TypeError, match=r"pad_input: `indices` must be int32 or int64"):
        varlen.pad_input(values, torch.arange(4).float(), 2, 3)
    with pytest.raises(IndexError, match=r"pad_input: `indices` holds 6"):
        varlen.pad_input(values, torch.tensor([0, 1, 2, 6]), 2, 3)
    with pytest.raises(ValueError, match=r"pad_input: `indices` holds 1 more than once"):
        varlen.pad_input(values, torch.tensor([0, 1, 1, 2]), 2, 3)
    with pytest.raises(ValueError, match=r"pad_input: `hidden_states` \[nnz, \.\.\.\] and `indices`"):
        varlen.pad_input(values[:3], torch.tensor([0, 1, 2, 3]), 2, 3)
    with pytest.raises(IndexError, match=r"index_first_axis: `indices` holds 9"):
        varlen.index_first_axis(torch.randn(6, 2), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"index_first_axis: `indices` holds 1 more than once"):
        varlen.index_first_axis(torch.randn(6, 2, requires_grad=True), torch.tensor([1, 1]))
    with pytest.raises(TypeError, match=r"pack_position_ids: `indices` must be int32 or int64"):
        pack_position_ids(torch.zeros(3, 2, 3, dtype=torch.long), torch.tensor([0.0]))
    with pytest.raises(IndexError, match=r"pack_position_ids: `indices` holds 6"):
        pack_position_ids(torch.zeros(3, 2, 3, dtype=torch.long), torch.tensor([6]))


def test_wrong_typed_scalars_get_a_clear_message():
    boxes, offs, grid = torch.tensor([[0.1, 0.1, 0.6, 0.6]]), torch.tensor([0, 1]), torch.tensor([[1, 4, 4]])
    for name, bad in (("margin", "1"), ("margin", None), ("min_coverage", "0"), ("min_coverage", [0.1])):
        with pytest.raises(TypeError, match=rf"box_to_patch_mask: `{name}` must be a number"):
            box_to_patch_mask(boxes, offs, grid, **{name: bad})  # main: margin='1' was accepted
    with pytest.raises(ValueError, match=r"box_to_patch_mask: `merge_size`"):
        box_to_patch_mask(boxes, offs, grid, merge_size=True)
    z, m = torch.zeros(4), torch.ones(4, dtype=torch.bool)
    args = (torch.randn(4, 6), torch.zeros(4, dtype=torch.long), z, z, m)
    s = torch.tensor([0, 1, 0, 1])
    for bad in (["a", "b"], "ab", [1.0, None], 3, [True, 1.0]):
        with pytest.raises(TypeError, match=r"grpo_loss: `stream_weights` must be a sequence of numbers"):
            grpo_loss(*args, stream=s, stream_weights=bad)
    with pytest.raises(ValueError, match=r"`stream_weights` must be finite"):
        grpo_loss(*args, stream=s, stream_weights=[1.0, float("nan")])
    for bad in ("2", 2.0, 0, 10**6, True):
        with pytest.raises(ValueError, match=r"`num_streams` must be an int in \[1, 64\]"):
            grpo_loss(*args, stream=s, num_streams=bad)
    with pytest.raises(IndexError, match=r"`stream` holds 99999: at most 64 streams"):
        grpo_loss(*args, stream=torch.tensor([0, 99999, 0, 1]))  # not a [T, 100000] one-hot
    vals = torch.randn(2, 3)
    for bad in ("x", None, [0]):
        with pytest.raises(TypeError, match=r"unpack_varlen: `fill` must be a number"):
            unpack_varlen(vals, torch.tensor([0, 1]), 1, 3, fill=bad)
    for bad in (1.5, 2**40, float("inf")):
        with pytest.raises(ValueError, match=r"unpack_varlen: `fill` = .* does not fit"):
            unpack_varlen(torch.zeros(2, 3, dtype=torch.int32), torch.tensor([0, 1]), 1, 3, fill=bad)
    out = unpack_varlen(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 2]), 1, 3, fill=-100)
    assert out[0, 1].tolist() == [-100] * 3
    with pytest.raises(TypeError, match=r"fuse_tokens: `token_offsets` must hold ints"):
        fuse_tokens(torch.randn(4, 3), torch.ones(4, dtype=torch.bool), [0, 2.5, 4])
    with pytest.raises(TypeError, match=r"fuse_tokens: `kept_counts` must hold ints"):
        fuse_tokens(torch.randn(4, 3), torch.ones(4, dtype=torch.bool), [0, 4], kept_counts=["4"])


# ======================================================================================
# Found by the hostile sweep (random calls of every public and raw op).
def test_fake_kernels_check_ranks_and_required_tensors():
    m = torch.randn((), device="meta")
    with pytest.raises(ValueError, match=r"tsparse\.row_inv_norms: `x` must be 2-D"):
        ops.row_inv_norms(m, 1e-8)  # was: IndexError: tuple index out of range
    with pytest.raises(ValueError, match=r"tsparse\.gather_tokens: `index` must be 1-D"):
        ops.gather_rows(torch.randn(3, 2, device="meta"), torch.zeros(2, 2, dtype=torch.long, device="meta"), False)
    with pytest.raises(TypeError, match=r"tsparse\.gather_tokens: `index` must be a tensor, got None"):
        ops.gather_rows(torch.randn(3, 2, device="meta"), None, False)  # was: AttributeError
    with pytest.raises(TypeError, match=r"tsparse\.logprobs_backward_: `logits` must be a tensor"):
        z = torch.zeros(2, device="meta")
        ops.logprobs_backward_(None, torch.zeros(2, dtype=torch.long, device="meta"), z, z, z, z, None, 1.0)


def test_select_visual_tokens_refuses_meta_boxes_by_name():
    with pytest.raises(ValueError, match=r"select_visual_tokens: `boxes` is a meta tensor"):
        select_visual_tokens(torch.randn(4, 3), torch.rand(1, 4, device="meta"), torch.tensor([0, 1]),
                             torch.tensor([[1, 4, 4]]))  # was: Cannot copy out of meta tensor


def test_row_counts_beyond_int64_are_named():
    with pytest.raises(ValueError, match=r"scatter_tokens: `num_rows` must be in \[0, 2\^63\)"):
        scatter_tokens(torch.randn(1, 2), torch.tensor([0]), 2**64)  # was: "expected int, found int"
    # Below 2^63 but too many bytes for the output (was torch's "Storage size calculation
    # overflowed"): the raw op, the public op, and the fake kernel name `num_rows`.
    for n in (2**62, 2**63 - 1, 2**61 + 1):
        with pytest.raises(ValueError, match=r"tsparse\.scatter_tokens: `num_rows` = \d+ is too large"):
            ops.scatter_rows(torch.randn(1, 2), torch.tensor([0]), n, None)
        with pytest.raises(ValueError, match=r"tsparse\.scatter_tokens: `num_rows` = \d+ is too large"):
            scatter_tokens(torch.randn(1, 2), torch.tensor([0]), n)
        with pytest.raises(ValueError, match=r"tsparse\.scatter_tokens: `num_rows` = \d+ is too large"):
            ops.scatter_rows(torch.randn(1, 2, device="meta"), torch.tensor([0], device="meta"), n, None)
    with pytest.raises(ValueError, match=r"pad_input: `batch` \* `seqlen`"):
        varlen.pad_input(torch.randn(1, 2), torch.tensor([0]), 2**40, 2**40)


# ======================================================================================
# The arguments and raw ops main added (single-read grpo_loss, fusion methods), to the same bar.
def test_grpo_scalars_take_numpy_numbers_like_the_other_ops():
    """grpo.py's own number check took int / float only (a numpy float32 clip was a TypeError
    while box_to_patch_mask's margin took it): both now use _checks.number."""
    np = pytest.importorskip("numpy")
    args = (torch.randn(4, 6), torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.ones(4),
            torch.ones(4, dtype=torch.bool))
    a = grpo_loss(*args, clip_low=np.float32(0.25), temperature=np.float64(0.9), stream=torch.tensor([0, 1, 0, 1]),
                  stream_weights=[np.float32(1.0), 2]).loss
    b = grpo_loss(*args, clip_low=0.25, temperature=0.9, stream=torch.tensor([0, 1, 0, 1]), stream_weights=[1.0, 2]).loss
    assert torch.equal(a, b)
    for bad in ("0.2", True, torch.tensor(0.2)):
        with pytest.raises(TypeError, match=r"grpo_loss: `clip_low` must be a number"):
            grpo_loss(*args, clip_low=bad)


def test_grpo_loss_impl_is_checked_by_name():
    args = (torch.randn(4, 6), torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.zeros(4),
            torch.ones(4, dtype=torch.bool))
    for bad in ("single-read", "SINGLE_READ", None, 1, True):
        with pytest.raises(ValueError, match=r"tsparse\.grpo_loss: `impl` must be one of \['two_pass', 'single_read'\]"):
            grpo_loss(*args, impl=bad)


def test_scale_rows_checks_what_it_writes():
    with pytest.raises(TypeError, match=r"tsparse\.scale_rows_: `x` must be float32"):
        ops.scale_rows_(torch.ones(2, 3, dtype=torch.long), torch.tensor([2.0]))  # was: torch's cast error
    with pytest.raises(ValueError, match=r"tsparse\.scale_rows_: `x` rows must not overlap"):
        ops.scale_rows_(torch.ones(1, 3).expand(4, 3), torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"tsparse\.scale_rows_: `x` must have a contiguous last dimension"):
        ops.scale_rows_(torch.ones(3, 4).t(), torch.tensor([2.0]))
    with pytest.raises(TypeError, match=r"tsparse\.scale_rows_: `scale` must be a floating tensor"):
        ops.scale_rows_(torch.ones(2, 3), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"tsparse\.scale_rows_: `scale` must be a one-element tensor"):
        ops.scale_rows_(torch.ones(2, 3), torch.tensor([2.0, 3.0]))
    with pytest.raises(TypeError, match=r"tsparse\.scale_rows_: `scale` must be a tensor, got None"):
        ops.scale_rows_(torch.ones(2, 3), None)  # the sweep: torch's "tensor does not have a device"
    x = torch.ones(3, 8)[:, 1:6]  # strided rows, contiguous last dimension
    ops.scale_rows_(x, torch.tensor([2.5], dtype=torch.float64))
    assert (x == 2.5).all()


def test_fusion_method_names_are_checked_by_name():
    x, keep = torch.randn(4, 3), torch.tensor([True, False, False, True])
    grid = torch.tensor([[1, 4, 4]])
    for bad in ("mean", "Cosine_Mean", None, 1, 0):
        with pytest.raises(ValueError, match=r"tsparse\.fuse_visual_tokens: `fuse` must be one of"):
            fuse_visual_tokens(x, keep, grid, fuse=bad)
        with pytest.raises(ValueError, match=r"tsparse\.select_visual_tokens: `fuse` must be one of"):
            select_visual_tokens(x, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0, 1]), grid, fuse=bad)


@pytest.mark.parametrize("method", ["none", "cosine_mean", "nearest_kept", "summary"])
def test_fuse_visual_tokens_checks_a_callers_kept_counts(method):
    """A caller's kept_counts size the output: with "none" a wrong count silently truncated (or
    padded) the kept rows; every method now checks them against the mask."""
    x, keep = torch.randn(8, 3), torch.tensor([True, False, False, True, False, True, True, False])
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    good = fuse_visual_tokens(x, keep, grid, fuse=method, kept_counts=[2, 2])
    ref_sel = fuse_visual_tokens(x, keep, grid, fuse=method)
    assert torch.equal(good.embeds, ref_sel.embeds) and torch.equal(good.counts, ref_sel.counts)
    for bad in ([1, 2], [2, 1], [3, 1]):
        with pytest.raises(ValueError, match=r"tsparse\.fuse_visual_tokens: `kept_counts` does not match"):
            fuse_visual_tokens(x, keep, grid, fuse=method, kept_counts=bad)
    for bad, exc in (([2], ValueError), ([2, 5], ValueError), ([2.0, 2], TypeError), (["2", 2], TypeError)):
        with pytest.raises(exc, match=r"tsparse\.fuse_visual_tokens: `kept_counts`"):
            fuse_visual_tokens(x, keep, grid, fuse=method, kept_counts=bad)


def test_fusion_composites_check_their_arguments_by_name():
    x, keep = torch.randn(4, 3), torch.tensor([True, False, False, True])
    grid = torch.tensor([[1, 4, 4]])
    cases = [
        (TypeError, r"fuse_visual_tokens: `image_embeds` must be float32", lambda: fuse_visual_tokens(x.long(), keep, grid)),
        (ValueError, r"fuse_visual_tokens: `keep` must have shape \[N\] with N = image_embeds",
         lambda: fuse_visual_tokens(x, keep[:3], grid)),
        (ValueError, r"fuse_visual_tokens: `image_grid_thw` must have shape", lambda: fuse_visual_tokens(x, keep, grid[0])),
        (ValueError, r"fuse_visual_tokens: `merge_size` must be a positive int",
         lambda: fuse_visual_tokens(x, keep, grid, merge_size=0)),
        (ValueError, r"fuse_visual_tokens: `image_grid_thw\[0\]` = \(1, 4, 3\)",
         lambda: fuse_visual_tokens(x, keep, torch.tensor([[1, 4, 3]]))),
        (ValueError, r"fuse_visual_tokens: `image_embeds` is a meta tensor",
         lambda: fuse_visual_tokens(x.to("meta"), keep.to("meta"), grid)),
        (TypeError, r"summary_tokens: `x` must be float32", lambda: summary_tokens(x.to(torch.complex64), keep, grid)),
        (ValueError, r"summary_tokens: `keep` is a meta tensor", lambda: summary_tokens(x, keep.to("meta"), grid)),
        (ValueError, r"summary_tokens: `image_grid_thw` is a meta tensor", lambda: summary_tokens(x, keep, grid.to("meta"))),
        (TypeError, r"summary_tokens: `image_grid_thw` must be int32 or int64",
         lambda: summary_tokens(x, keep, grid.float())),
        (ValueError, r"summary_tokens: `x` has 4 rows but `image_grid_thw` describes 8",
         lambda: summary_tokens(x, keep, torch.tensor([[2, 4, 4]]))),
        (ValueError, r"token_coords: `image_grid_thw\[0\]` = \(0, 4, 4\) must be positive",
         lambda: token_coords(torch.tensor([[0, 4, 4]]))),
        (ValueError, r"token_coords: `merge_size` must be a positive int", lambda: token_coords(grid, merge_size=2.0)),
        (ValueError, r"token_coords: `device` must be a torch.device", lambda: token_coords(grid, device="gpu:x")),
        (TypeError, r"fuse_tokens: `coords` must be float64", lambda: fuse_tokens(x, keep, [0, 4], coords=torch.zeros(4, 3))),
        (TypeError, r"fuse_tokens: `coords` must be a torch.Tensor", lambda: fuse_tokens(x, keep, [0, 4], coords=[0.0] * 4)),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()
    assert token_coords(grid).shape == (4, 3)
    if not torch.cuda.is_available():  # found by the sweep: device=3 (cuda:3) was "Found no NVIDIA driver"
        with pytest.raises(ValueError, match=r"token_coords: `device` is cuda:3 but no such CUDA device"):
            token_coords(grid, device=3)
    with pytest.raises(ValueError, match=r"pack_varlen: `total` must be a non-negative int \(below 2\^63\)"):
        pack_varlen(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), total=2**64)  # was the raw schema's error


# ======================================================================================
# CUDA (skipped without a GPU): the same rules on the device, checks without host syncs.
@pytest.mark.cuda
@requires_cuda
def test_cuda_max_seqlen_below_the_longest_row_is_a_device_error():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch, tsparse
        m = torch.ones(2, 8, dtype=torch.bool, device="cuda")
        torch.cuda.set_sync_debug_mode("error")  # the check itself must not sync
        p = tsparse.ops.pack_varlen(torch.randn(2, 8, 4, device="cuda"), m, total=16, max_seqlen=3)
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    """)], capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and ("max_seqlen" in out or "device-side assert" in out), out[-2000:]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("kind", OPS)
def test_cuda_inplace_rules(kind):
    tg = _targets("cuda")

    def g(logits, inplace=True):  # the loss on the GPU
        if kind == "logprobs":
            return logprobs(logits, tg, inplace_backward=inplace)[0].sum()
        z = torch.zeros(T, device="cuda", dtype=logits.dtype)
        impl = "single_read" if kind == "grpo_loss_single_read" else "two_pass"
        return grpo_loss(logits, tg, z, z + 1, torch.ones(T, dtype=torch.bool, device="cuda"),
                         inplace_backward=inplace, impl=impl).loss

    leaf = torch.randn(T, V, device="cuda", requires_grad=True)
    before = leaf.detach().clone()
    g(leaf[:, :]).backward()
    assert torch.equal(leaf.detach(), before)  # a leaf view: never written
    w = torch.randn(T, V, device="cuda", requires_grad=True)
    x = torch.tanh(w)
    xb = x.detach().clone()
    g(x).backward()
    assert torch.equal(x.detach(), xb)  # saved by tanh: never written
    w2 = w.detach().clone().requires_grad_()
    g(torch.tanh(w2), inplace=False).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)
    y = w.detach() * 2.0
    y.requires_grad_()
    z = y * 1.0
    zb = z.detach().clone()
    g(z).backward()
    assert not torch.equal(z.detach(), zb)  # a plain non-leaf: written in place


@pytest.mark.cuda
@requires_cuda
def test_cuda_meta_beside_cuda_is_refused():
    x = torch.randn(5, 3, device="cuda")
    with pytest.raises(ValueError, match="`index` is on"):
        ops.gather_rows(x, torch.tensor([0, 1], device="meta"), False)
    with pytest.raises(ValueError, match="`targets` is on"):
        ops.logprobs(torch.randn(2, 4, device="cuda"), torch.zeros(2, dtype=torch.long, device="meta"), 1.0, False)


@pytest.mark.cuda
@requires_cuda
def test_cuda_pinned_boxes_are_not_read_after_the_op_returns():
    """select_visual_tokens copies a caller's CPU boxes to the GPU without a host sync; from
    PINNED memory that copy is a DMA that could run after the call returned, so a write to the
    boxes right after the call would change the result. The copy goes through a fresh pinned
    buffer (select_visual_tokens syncs once later anyway, but the copy itself must not depend on
    it). Checked on the copy helper with the stream held busy, then end to end."""
    from tsparse.ops.visual_tokens import _to_device_owned

    dev = torch.device("cuda")
    src = torch.arange(1 << 16, dtype=torch.float32).pin_memory()
    want = src.clone()
    torch.cuda._sleep(200_000_000)  # the copy queues behind ~0.1 s of GPU work
    out = _to_device_owned(src, dev)
    src.fill_(-1.0)  # the caller's next write, before the copy ran
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), want)
    grid, offs = torch.tensor([[1, 16, 16]]), torch.tensor([0, 1])
    x = torch.randn(64, 8, device="cuda")
    boxes = torch.tensor([[0.0, 0.0, 0.4, 0.4]]).pin_memory()
    ref_sel = select_visual_tokens(x, boxes.clone(), offs, grid, fuse="none")
    sel = select_visual_tokens(x, boxes, offs, grid, fuse="none")
    boxes.fill_(float("nan"))
    torch.cuda.synchronize()
    assert torch.equal(sel.keep, ref_sel.keep) and torch.equal(sel.embeds, ref_sel.embeds)
