"""CUDA-only behaviour of varlen packing: no host syncs with `total`/`max_seqlen` given, exactly
one without, and device-side errors for a wrong `total` or an inconsistent `cu_seqlens`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tsparse.ops import pack_batch, pack_varlen, unpack_varlen

from benchmarks.common import count_host_syncs
from conftest import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


def _batch(b=16, l=512, h=256):
    lengths = torch.randint(l // 2, l + 1, (b,))
    mask = (torch.arange(l)[None, :] < lengths[:, None]).to(torch.int64).cuda()
    keep = torch.rand(b, l, device="cuda") > 0.23
    keep[:, 0] = True
    ids = torch.randint(0, 152064, (b, l), device="cuda")
    pos = torch.randint(0, 4096, (4, b, l), device="cuda")
    x = torch.randn(b, l, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return mask, keep, ids, pos, x


def test_pack_with_total_makes_no_host_sync():
    mask, keep, ids, pos, x = _batch()
    kept = mask.bool() & keep
    total, longest = int(kept.sum()), int(kept.sum(1).max())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = pack_varlen(x, mask, keep=keep, total=total, max_seqlen=longest)
        p.values.float().sum().backward()
        out = unpack_varlen(p.values, p.indices, *mask.shape)
        batch = pack_batch(ids, mask, pos, keep=keep, total=total, max_seqlen=longest, inputs_embeds=x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert out.shape == x.shape and batch.input_ids.shape == (1, total)


def test_pack_without_total_syncs_exactly_once():
    mask, keep, ids, pos, x = _batch()
    assert count_host_syncs(lambda: pack_varlen(x, mask, keep=keep)) == 1


def test_wrong_total_is_a_device_error():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch, tsparse
        m = torch.ones(2, 8, dtype=torch.bool, device="cuda")
        tsparse.ops.pack_varlen(torch.randn(2, 8, 4, device="cuda"), m, total=5, max_seqlen=8)
        torch.cuda.synchronize()
    """)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "total" in r.stdout + r.stderr


@pytest.mark.parametrize("cu", [[-4, -2, 2], [0, 1, 4], [0, 3, 4]])
def test_inconsistent_cu_seqlens_are_a_device_error(cu):
    # A direct call of the raw op with a cu_seqlens that disagrees with the masks must trap
    # (each block checks its own CSR row before writing), never write outside the outputs.
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import torch, tsparse
        m = torch.ones(2, 2, dtype=torch.bool, device="cuda")
        cu = torch.tensor({cu!r}, dtype=torch.int32, device="cuda")
        torch.ops.tsparse.varlen_pack(m, None, cu, {cu[-1]}, None, None)
        torch.cuda.synchronize()
    """)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "cu_seqlens" in r.stdout + r.stderr


def test_wrong_inverse_is_a_device_error():
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import torch, tsparse
        x = torch.randn(4, 2, device="cuda")
        inv = torch.tensor([1, 0, -1, -1], dtype=torch.int32, device="cuda")
        torch.ops.tsparse.varlen_gather(x, torch.tensor([0, 1], device="cuda"), inv)
        torch.cuda.synchronize()
    """)], capture_output=True, text=True, timeout=120)
    # torch._assert_async: the message reaches stderr where the torch build forwards it to the
    # device assert (2.14 does); otherwise CUDA's "device-side assert triggered".
    out = r.stdout + r.stderr
    assert r.returncode != 0 and ("inverse" in out or "device-side assert" in out), out[-2000:]


def test_multi_chunk_pack_makes_no_host_sync():
    # L = 1100: three 512-token chunks per row, each its own block
    mask, keep, ids, pos, x = _batch(b=8, l=1100, h=64)
    kept = mask.bool() & keep
    total, longest = int(kept.sum()), int(kept.sum(1).max())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pack_batch(ids, mask, pos, keep=keep, total=total, max_seqlen=longest, inputs_embeds=x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert out.input_ids.shape == (1, total)


@pytest.mark.parametrize("shift", [-1, 1])
def test_multi_chunk_cu_seqlens_mismatch_is_a_device_error(shift):
    # Row 0 spans three chunks; a cu_seqlens that moves its end by one must trap (the row's last
    # chunk checks the count, every token checks its position), never write outside the outputs.
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import torch, tsparse
        m = torch.ones(2, 1100, dtype=torch.bool, device="cuda")
        cu = torch.tensor([0, 1100 + ({shift}), 2200], dtype=torch.int32, device="cuda")
        torch.ops.tsparse.varlen_pack(m, None, cu, 2200, None, None)
        torch.cuda.synchronize()
    """)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "cu_seqlens" in r.stdout + r.stderr
