"""CUDA-only behaviour of the visual-token ops: host syncs and device-side index errors.
(Every test in test_visual_tokens.py also runs on CUDA through its `device` parameter.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tsparse.ops import box_to_patch_mask, fuse_tokens, gather_tokens, scatter_tokens, select_visual_tokens

from benchmarks.common import count_host_syncs
from conftest import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


def test_gather_scatter_fuse_make_no_host_sync():
    x = torch.randn(1000, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randperm(1000, device="cuda")[:700]
    keep = torch.rand(1000, device="cuda") < 0.7
    counts = [int(keep[:500].sum()), int(keep[500:].sum())]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = gather_tokens(x, idx)
        y.backward(torch.ones_like(y))
        y2 = gather_tokens(x, idx, unique_index=False)
        y2.backward(torch.ones_like(y2))
        s = scatter_tokens(y.detach(), idx, 1000, fill=x.detach())
        f, _ = fuse_tokens(x, keep, [0, 500, 1000], kept_counts=counts)
        f.float().sum().backward()
        box_to_patch_mask(torch.rand(3, 4, device="cuda"), torch.tensor([0, 1, 3]), torch.tensor([[1, 4, 4], [1, 8, 8]]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert s.shape == (1000, 3584)


def test_select_visual_tokens_syncs_exactly_once():
    grid = torch.tensor([[1, 72, 72]] * 4)
    x = torch.randn(4 * 1296, 256, device="cuda", dtype=torch.bfloat16)
    boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9]] * 4, device="cuda")
    offsets = torch.arange(5)
    for fuse in (True, False):
        assert count_host_syncs(lambda: select_visual_tokens(x, boxes, offsets, grid, fuse=fuse)) == 1


def _run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_out_of_range_index_is_a_device_error():
    r = _run_child("""
        import torch, tsparse
        x = torch.randn(10, 64, device="cuda")
        y = tsparse.ops.gather_tokens(x, torch.tensor([1, 10], device="cuda"))
        torch.cuda.synchronize()
    """)
    assert r.returncode != 0
    assert "gather_tokens" in r.stdout + r.stderr and "out of range" in r.stdout + r.stderr


def test_duplicate_index_under_unique_promise_is_a_device_error():
    r = _run_child("""
        import torch, tsparse
        x = torch.randn(10, 64, device="cuda", requires_grad=True)
        y = tsparse.ops.gather_tokens(x, torch.tensor([1, 1], device="cuda"))
        torch.cuda.synchronize()
    """)
    assert r.returncode != 0 and "more than once" in r.stdout + r.stderr
    r = _run_child("""
        import torch, tsparse
        out = tsparse.ops.scatter_tokens(torch.randn(2, 8, device="cuda"), torch.tensor([3, 3], device="cuda"), 5)
        torch.cuda.synchronize()
    """)
    assert r.returncode != 0 and "scatter_tokens" in r.stdout + r.stderr


def test_fuse_with_counts_that_disagree_with_keep_is_a_device_error():
    # Same total, wrong split between images: checked asynchronously (no host sync).
    r = _run_child("""
        import torch, tsparse
        x = torch.randn(4, 8, device="cuda")
        keep = torch.tensor([True, False, True, True], device="cuda")
        tsparse.ops.fuse_tokens(x, keep, [0, 2, 4], kept_counts=[2, 1])
        torch.cuda.synchronize()
    """)
    # torch._assert_async: the message reaches stderr where the torch build forwards it to the
    # device assert (2.14 does); otherwise CUDA's "device-side assert triggered".
    out = r.stdout + r.stderr
    assert r.returncode != 0 and ("kept_counts" in out or "device-side assert" in out), out[-2000:]


def test_cuda_matches_cpu_bitwise_for_masks_and_copies():
    grid = torch.tensor([[1, 72, 72], [2, 36, 48]])
    boxes = torch.rand(5, 4) * 0.5
    boxes[:, 2:] += 0.5
    offsets = torch.tensor([0, 3, 5])
    k_cpu, c_cpu = box_to_patch_mask(boxes, offsets, grid, margin=0.5)
    k_gpu, c_gpu = box_to_patch_mask(boxes.cuda(), offsets, grid, margin=0.5)
    assert torch.equal(k_cpu, k_gpu.cpu()) and torch.equal(c_cpu, c_gpu.cpu())


# ---- issue 12 step 4: box_to_patch_mask plans without a host sync wherever its metadata lives
@pytest.mark.parametrize("meta_on_gpu", [(False, False), (True, True), (True, False), (False, True)])
def test_box_mask_makes_no_host_sync_and_matches_cpu(meta_on_gpu):
    grid = torch.tensor([[1, 72, 72], [2, 36, 48], [1, 16, 16]] * 40)
    n_img = grid.shape[0]
    boxes = torch.rand(2 * n_img, 4) * 0.5
    boxes[:, 2:] += 0.5
    offsets = torch.arange(0, 2 * n_img + 1, 2)
    keep_cpu, counts_cpu = box_to_patch_mask(boxes, offsets, grid, margin=0.5)
    g = grid.cuda() if meta_on_gpu[0] else grid
    o = offsets.cuda() if meta_on_gpu[1] else offsets
    b = boxes.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep, counts = torch.ops.tsparse.box_to_patch_mask(b, o, g, int(keep_cpu.numel()), False, 14, 2, 0.5, 0.0, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(keep.cpu(), keep_cpu) and torch.equal(counts.cpu(), counts_cpu)


@pytest.mark.parametrize("case", ["grid", "offsets", "tokens"])
def test_box_mask_bad_gpu_metadata_is_a_device_error(case):
    grid = "[[1, 4, 4], [1, 4, 3]]" if case == "grid" else "[[1, 4, 4], [1, 4, 4]]"
    offs = "[0, 2, 1]" if case == "offsets" else "[0, 1, 2]"
    tokens = 9 if case == "tokens" else 8
    r = _run_child(f"""
        import torch, tsparse
        boxes = torch.rand(2, 4, device="cuda") * 0.5
        g = torch.tensor({grid}, device="cuda")
        o = torch.tensor({offs}, device="cuda")
        torch.ops.tsparse.box_to_patch_mask(boxes, o, g, {tokens}, False, 14, 2, 0.0, 0.0, True)
        torch.cuda.synchronize()
    """)
    assert r.returncode != 0 and "box_to_patch_mask" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


def test_segment_reduce_long_segment_on_cuda_equals_cpu_bitwise():
    # one 5000-member segment (a uniform background sent to one kept token) next to short ones:
    # summed in 157 pieces by many CTAs on CUDA, in the same order on the CPU
    x = torch.randn(800, 3584).to(torch.bfloat16)
    lengths = [5000, 1, 2, 40, 0, 7]
    perm = torch.randint(0, 800, (sum(lengths),))
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    for mean in (True, False):
        cpu = torch.ops.tsparse.segment_reduce_rows(x, perm, offsets, mean)
        gpu = torch.ops.tsparse.segment_reduce_rows(x.cuda(), perm.cuda(), offsets.cuda(), mean)
        assert torch.equal(gpu.cpu(), cpu)


def test_box_to_patch_mask_with_num_tokens_makes_no_host_sync_on_gpu_metadata():
    grid = torch.tensor([[1, 72, 72], [2, 36, 48]], device="cuda")
    offsets = torch.tensor([0, 1, 3], device="cuda")
    boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], device="cuda")
    n = 36 * 36 + 2 * 18 * 24
    assert count_host_syncs(lambda: box_to_patch_mask(boxes, offsets, grid, num_tokens=n)) == 0
    assert count_host_syncs(lambda: box_to_patch_mask(boxes, offsets, grid)) == 1
    k1, c1 = box_to_patch_mask(boxes, offsets, grid, num_tokens=n)
    k2, c2 = box_to_patch_mask(boxes.cpu(), offsets.cpu(), grid.cpu())
    assert torch.equal(k1.cpu(), k2) and torch.equal(c1.cpu(), c2)


# ---- Review 2026-12-05 ----
def test_box_mask_num_tokens_with_cpu_boxes_and_gpu_metadata():
    # The device plan runs on `boxes`' device; with CPU boxes the metadata must go to the host as
    # it does without `num_tokens` (passing `num_tokens` used to route this call to the CUDA op,
    # which rejects CPU boxes).
    grid = torch.tensor([[1, 72, 72], [2, 36, 48]])
    offsets = torch.tensor([0, 1, 3])
    boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    n = 36 * 36 + 2 * 18 * 24
    expect = box_to_patch_mask(boxes, offsets, grid)
    for g, o in ((grid.cuda(), offsets.cuda()), (grid.cuda(), offsets), (grid, offsets.cuda())):
        keep, counts = box_to_patch_mask(boxes, o, g, num_tokens=n)
        assert keep.device.type == "cpu"
        assert torch.equal(keep, expect[0]) and torch.equal(counts, expect[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_box_mask_num_tokens_with_metadata_on_another_gpu():
    grid = torch.tensor([[1, 8, 8], [1, 4, 6]])
    offsets = torch.tensor([0, 1, 2])
    boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5]])
    expect = box_to_patch_mask(boxes, offsets, grid)
    keep, counts = box_to_patch_mask(boxes.to("cuda:0"), offsets.to("cuda:1"), grid.to("cuda:1"), num_tokens=22)
    assert torch.equal(keep.cpu(), expect[0]) and torch.equal(counts.cpu(), expect[1])


@pytest.mark.parametrize("n_img", [1023, 1024, 1025, 2500])
def test_box_mask_device_plan_beyond_one_block_of_images(n_img):
    # box_plan_kernel is one block of 1024 threads; more images go round its loop with a running
    # token offset (carry). Compare the device plan with the host plan around and past 1024.
    g = torch.tensor([[1, 4, 4], [2, 6, 4], [1, 2, 8]]).repeat((n_img + 2) // 3, 1)[:n_img]
    grid = g.to(torch.int32)
    boxes = torch.rand(n_img, 4) * 0.5
    boxes[:, 2:] += 0.5
    boxes[::7] = torch.tensor([0.0, 0.0, 0.3, 0.3])
    offsets = torch.arange(n_img + 1, dtype=torch.int32)
    offsets[1::5] -= 1  # some images without a box, some with two
    offsets[-1] = n_img
    n = int((g[:, 0] * (g[:, 1] // 2) * (g[:, 2] // 2)).sum())
    keep_cpu, counts_cpu = box_to_patch_mask(boxes, offsets, grid, empty="drop_all")
    keep, counts = box_to_patch_mask(boxes.cuda(), offsets.cuda(), grid.cuda(), num_tokens=n, empty="drop_all")
    assert torch.equal(keep.cpu(), keep_cpu) and torch.equal(counts.cpu(), counts_cpu)


@pytest.mark.parametrize("meta", ["cpu", "mixed"])
def test_box_mask_pinned_tables_outlive_their_async_copies(meta):
    # The per-image table (host metadata) and the pinned copy of CPU metadata (mixed) go to the GPU
    # by non_blocking copies from pinned memory that is freed when the op returns; the caching host
    # allocator must not hand that memory to the next call before its copy has run. Queue the
    # copies behind a long kernel so 64 calls are in flight at once, each with a different table.
    cases = []
    for k in range(64):
        n_img = 1 + k % 5
        grid = torch.tensor([[1 + k % 2, 2 * (1 + (k + i) % 7), 2 * (1 + (k * i) % 5)] for i in range(n_img)])
        boxes = torch.rand(n_img, 4) * 0.5
        boxes[:, 2:] += 0.5
        offsets = torch.arange(n_img + 1)
        cases.append((boxes.cuda(), offsets, grid, box_to_patch_mask(boxes, offsets, grid)))
    results = []
    offsets_gpu = {id(c[1]): c[1].cuda() for c in cases}
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of every copy below
    for boxes, offsets, grid, _ in cases:  # boxes already on the GPU: only the op's own copies queue
        if meta == "cpu":
            results.append(box_to_patch_mask(boxes, offsets, grid))
        else:
            n = int((grid[:, 0] * (grid[:, 1] // 2) * (grid[:, 2] // 2)).sum())
            results.append(box_to_patch_mask(boxes, offsets_gpu[id(offsets)], grid, num_tokens=n))
    torch.cuda.synchronize()
    for (_, _, _, (keep_cpu, counts_cpu)), (keep, counts) in zip(cases, results):
        assert torch.equal(keep.cpu(), keep_cpu) and torch.equal(counts.cpu(), counts_cpu)


def test_box_mask_does_not_read_a_callers_pinned_metadata_after_returning():
    # CPU metadata beside GPU metadata goes to the GPU by an async copy. From a caller's tensor that
    # is already pinned, pin_memory() is the tensor itself, so the copy read it after the op had
    # returned: a write right after the call (queued behind a long kernel here) changed the mask.
    grid = torch.tensor([[1, 8, 8], [1, 4, 6]])
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    offsets = torch.tensor([0, 1, 3]).pin_memory()
    expect = box_to_patch_mask(boxes, offsets.clone(), grid)
    b, g = boxes.cuda(), grid.cuda()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    keep, counts = box_to_patch_mask(b, offsets, g, num_tokens=22)
    offsets.copy_(torch.tensor([0, 3, 3]))  # still valid, a different mask
    torch.cuda.synchronize()
    assert torch.equal(keep.cpu(), expect[0]) and torch.equal(counts.cpu(), expect[1])
