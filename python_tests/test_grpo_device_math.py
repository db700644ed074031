"""The GRPO row kernels' accuracy without a GPU.

1. The device arithmetic, emulated on the CPU operation by operation (grpo_device_emulation.py:
   the kernels' own row layout through tsparse._C.grpo_row_layout, fp32 FFMA, a model of
   ex2.approx.ftz at its documented 2 ulp with every result biased the same way or at random,
   the kernels' summation and merge order), stays within the error bound derived in
   profiling/NOTES.md ("Accuracy of the row kernels") of the fp64 reference, for the two-pass
   forward (warp / 128 / 512-thread rows) and the single-read cluster kernel, over row widths
   1 .. 262,144, every 16-byte misalignment, -inf blocks, all -inf rows and logits of +-1e4.
2. The CPU kernels (which share grpo_math.h's state, merge and finish with the CUDA kernels)
   against the fp64 reference on the same extreme rows, V from 1 to 262,144.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import grpo_device_emulation as emu
from tsparse import reference as ref
from tsparse.ops import logprobs


def _rows(v: int, rng: np.random.Generator) -> dict:
    """Named test rows of width v (as bf16-representable fp32 values) and their targets."""
    def bf16(a):
        return torch.from_numpy(np.asarray(a, np.float32)).bfloat16().float().numpy()

    rows = {"randn3": (bf16(rng.standard_normal(v) * 3), int(rng.integers(v)))}
    if v >= 2:
        x = np.zeros(v, np.float32)
        x[v // 2] = 1e4
        rows["dominant"] = (bf16(x), v // 2)
        rows["linspace1e4"] = (bf16(np.linspace(-1e4, 1e4, v)), v - 1)
        x = bf16(rng.standard_normal(v) * 3)
        x[::3] = -np.inf
        rows["neg_inf_blocks"] = (x, 1 if v > 1 else 0)
        x = np.full(v, -1e4, np.float32)
        x[-1] = -9990.0
        rows["all_minus_1e4"] = (bf16(x), 0)
        x = np.full(v, -np.inf, np.float32)
        x[v - 1] = 2.0
        rows["one_finite"] = (x, v - 1)
    return rows


def _reference(x, target, temperature):
    xt = torch.from_numpy(np.asarray(x, np.float64))[None]
    lp, en = ref.logprobs_ref(xt, torch.tensor([target]), temperature=temperature, return_entropy=True)
    return lp.item(), en.item()


CASES = [
    # (V, misalignments in bytes) - the two-pass kernel variant follows from V
    (1, (0, 14)), (7, (0, 2)), (8, (0, 6)), (9, (0, 10)), (300, (0, 2, 14)), (4095, (0, 6)), (4096, (0, 2)),
    (4097, (0, 14)), (32768, (0, 2)), (32769, (0, 6)), (152064, (0, 2)), (262144, (0, 14)),
]


@pytest.mark.parametrize("v,misaligns", CASES, ids=[str(c[0]) for c in CASES])
@pytest.mark.parametrize("kernel", ["two_pass", "cluster"])
def test_emulated_device_forward_within_the_derived_bound(v, misaligns, kernel):
    rng = np.random.default_rng(v)
    fwd = emu.two_pass_forward if kernel == "two_pass" else emu.cluster_forward
    worst = 0.0
    for name, (x, target) in _rows(v, rng).items():
        for temperature in (1.0, 0.7):
            lp_ref, en_ref = _reference(x, target, temperature)
            b_lp, b_en = emu.logp_entropy_bound(x, target, temperature, v, 2, kernel)
            for mis in misaligns:
                for mode in ("up", "down", "rand"):
                    lp, en, _, _ = fwd(x, target, temperature, misalign_bytes=mis, elem=2, mdl=emu.Model(mode, seed=v))
                    assert math.isfinite(lp) and math.isfinite(en), (name, mis, mode)
                    e_lp, e_en = abs(lp - lp_ref), abs(en - en_ref)
                    assert e_lp <= b_lp, (name, temperature, mis, mode, e_lp, b_lp)
                    assert e_en <= b_en, (name, temperature, mis, mode, e_en, b_en)
                    worst = max(worst, e_lp / b_lp, e_en / b_en)
    assert worst > 0  # the check can fail: the emulation does round


@pytest.mark.parametrize("kernel", ["two_pass", "cluster"])
def test_emulated_all_neg_inf_row_is_nan_like_torch(kernel):
    fwd = emu.two_pass_forward if kernel == "two_pass" else emu.cluster_forward
    for v in (5, 4096, 40000):
        x = np.full(v, -np.inf, np.float32)
        lp, en, _, _ = fwd(x, 3, 1.0, mdl=emu.Model("rand"))
        lp_ref, en_ref = _reference(x, 3, 1.0)
        assert math.isnan(lp) and math.isnan(en) and math.isnan(lp_ref) and math.isnan(en_ref)


def test_emulated_nan_logit_poisons_the_row():
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    x[1234] = np.nan
    for fwd in (emu.two_pass_forward, emu.cluster_forward):
        lp, en, _, _ = fwd(x, 7, 1.0, mdl=emu.Model("exact"))
        assert math.isnan(lp) and math.isnan(en)


def test_emulated_bound_is_tight_enough_to_matter():
    """At the reference shape the bound is a few 1e-6 (fp32 noise), far inside the tests'
    5e-5, and the emulated worst case reaches a real fraction of it (the bound is not vacuous)."""
    v = 152064
    rng = np.random.default_rng(1)
    x, target = _rows(v, rng)["randn3"]
    b_lp, _ = emu.logp_entropy_bound(x, target, 1.0, v, 2, "two_pass")
    assert b_lp < 2e-5
    lp_ref, _ = _reference(x, target, 1.0)
    errs = [abs(emu.two_pass_forward(x, target, 1.0, mdl=emu.Model(m))[0] - lp_ref) for m in ("up", "down")]
    assert max(errs) > 0.05 * b_lp, (errs, b_lp)


# ======================================================================================
# The CPU kernels on the same extreme rows (grpo_math.h is shared with the CUDA kernels).
@pytest.mark.parametrize("v", [1, 2, 7, 8, 9, 300, 4095, 4097, 32769, 152064, 262144])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_kernel_extreme_rows_every_width(v, dtype):
    rng = np.random.default_rng(v)
    rows = _rows(v, rng)
    names = list(rows)
    x = torch.from_numpy(np.stack([rows[n][0] for n in names])).to(dtype)
    targets = torch.tensor([rows[n][1] for n in names])
    if v >= 2:  # an all -inf row: NaN log-prob and entropy, as torch's log_softmax
        x = torch.cat([x, torch.full((1, v), -math.inf, dtype=dtype)])
        targets = torch.cat([targets, torch.tensor([0])])
    for temperature in (1.0, 0.7):
        lp, en = logprobs(x, targets, temperature=temperature, return_entropy=True)
        lp_r, en_r = ref.logprobs_ref(x, targets, temperature=temperature, return_entropy=True)
        tol = dict(atol=5e-5 if v > 10000 else 2e-5, rtol=1e-5)
        torch.testing.assert_close(lp.double(), lp_r, equal_nan=True, **tol)
        torch.testing.assert_close(en.double(), en_r, equal_nan=True, **tol)
        if v >= 2:
            assert torch.isnan(lp[-1]) and torch.isnan(en[-1])
            assert torch.isfinite(lp[:-1]).all() and torch.isfinite(en[:-1]).all()
        # Gradient of the finite rows (logp + entropy) against the fp64 reference.
        keep = slice(0, len(names))
        leaf = x[keep].clone().requires_grad_()
        a, b = logprobs(leaf, targets[keep], temperature=temperature, return_entropy=True)
        (g,) = torch.autograd.grad(a.sum() + 0.5 * b.sum(), leaf)
        leaf_r = x[keep].double().requires_grad_()
        a_r, b_r = ref.logprobs_ref(leaf_r, targets[keep], temperature=temperature, return_entropy=True)
        (g_r,) = torch.autograd.grad(a_r.sum() + 0.5 * b_r.sum(), leaf_r)
        assert torch.isfinite(g).all()
        rt = 8e-3 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(g.double(), g_r.to(dtype).double(), atol=2e-5 * g_r.abs().max().item() + 1e-9,
                                   rtol=rt)
