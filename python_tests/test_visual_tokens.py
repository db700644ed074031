"""Tests of the visual-token ops against the pure-PyTorch references (tsparse/reference.py).

Every test takes a ``device`` ("cpu" always; "cuda" runs when a GPU is usable and skips
otherwise) and fresh random inputs (see conftest.py for the seed).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from torch.autograd import gradcheck

import tsparse
from tsparse import reference as ref
from tsparse.ops import (
    FUSION_METHODS,
    box_to_patch_mask,
    fuse_tokens,
    fuse_visual_tokens,
    fusion_method,
    gather_tokens,
    scatter_tokens,
    select_visual_tokens,
    summary_tokens,
    token_coords,
    token_offsets_from_grid,
)

ROW_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ODD_DIMS = [1, 3, 7, 8, 13, 64, 100, 3584]


# --------------------------------------------------------------------------------------
# Random inputs
def random_grid(num_images: int, max_cells: int = 9, allow_t: bool = True) -> torch.Tensor:
    rows = []
    for _ in range(num_images):
        t = random.choice([1, 1, 2, 3]) if allow_t else 1
        rows.append([t, 2 * random.randint(1, max_cells), 2 * random.randint(1, max_cells)])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def random_boxes(num_images: int, grid: torch.Tensor | None = None, max_boxes: int = 4):
    """Boxes of every kind: inside, straddling, outside, inverted, NaN/inf, degenerate,
    tiny, and boxes whose edges lie exactly on cell boundaries."""
    boxes, offsets = [], [0]
    for i in range(num_images):
        nb = random.randint(0, max_boxes)
        for _ in range(nb):
            kind = random.random()
            if kind < 0.45:
                x1, y1 = random.uniform(0, 0.9), random.uniform(0, 0.9)
                b = [x1, y1, random.uniform(x1, 1.0), random.uniform(y1, 1.0)]
            elif kind < 0.6:
                b = [random.uniform(-0.5, 0.5), random.uniform(-0.5, 0.5), random.uniform(0.5, 1.5), random.uniform(0.5, 1.5)]
            elif kind < 0.65:
                b = [1.2, 1.1, 1.5, 1.9]  # outside
            elif kind < 0.7:
                b = [0.7, 0.2, 0.3, 0.6]  # inverted x
            elif kind < 0.75:
                b = [0.1, 0.1, random.choice([math.nan, math.inf]), 0.5]
            elif kind < 0.8:
                b = [0.4, 0.4, 0.4, 0.8]  # zero width
            elif kind < 0.85:
                x, y = random.random(), random.random()
                b = [x, y, x + 1e-4, y + 1e-4]  # tiny
            else:
                # Edges exactly on cell boundaries (fractions k / cells).
                if grid is not None:
                    wc, hc = int(grid[i, 2]) // 2, int(grid[i, 1]) // 2
                else:
                    wc = hc = 4
                c1, c2 = sorted(random.sample(range(wc + 1), 2)) if wc >= 1 else (0, 1)
                r1, r2 = sorted(random.sample(range(hc + 1), 2)) if hc >= 1 else (0, 1)
                b = [c1 / wc, r1 / hc, c2 / wc, r2 / hc]
            boxes.append(b)
        offsets.append(len(boxes))
    bt = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return bt, torch.tensor(offsets, dtype=torch.int64)


def num_tokens(grid: torch.Tensor, merge: int = 2) -> int:
    return int(sum(t * (h // merge) * (w // merge) for t, h, w in grid.tolist()))


# ======================================================================================
# box_to_patch_mask
@pytest.mark.parametrize("coords", ["normalized", "pixel"])
@pytest.mark.parametrize("empty", ["keep_all", "drop_all"])
@pytest.mark.parametrize("margin,min_coverage", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (1.0, 0.25), (0.0, 0.999)])
def test_box_mask_matches_reference(device, coords, empty, margin, min_coverage):
    for _ in range(4):
        n = random.randint(1, 12)
        grid = random_grid(n)
        boxes, offsets = random_boxes(n, grid)
        if coords == "pixel":
            # Same boxes in pixels of the resized image (14 px patches).
            scale = torch.repeat_interleave(grid[:, [2, 1, 2, 1]].float() * 14, offsets.diff(), dim=0)
            boxes = boxes * scale
        opts = dict(coords=coords, margin=margin, min_coverage=min_coverage, empty=empty)
        keep, counts = box_to_patch_mask(boxes.to(device), offsets, grid, **opts)
        keep_r, counts_r = ref.box_to_patch_mask_ref(boxes, offsets, grid, **opts)
        assert keep.device.type == device and keep.dtype == torch.bool and counts.dtype == torch.int32
        assert keep.shape == (num_tokens(grid),)
        assert torch.equal(keep.cpu(), keep_r.cpu())
        assert torch.equal(counts.cpu(), counts_r.cpu())
        assert int(counts.sum()) == int(keep.sum())


def test_box_mask_known_layout(device):
    # One 8x12-patch image -> 4 x 6 cells (row-major), one 28-px cell = 1/6 of the width.
    grid = torch.tensor([[1, 8, 12]])
    boxes = torch.tensor([[1 / 6, 0.25, 3 / 6, 0.75]], device=device)  # cols 1-2, rows 1-2 exactly
    keep, counts = box_to_patch_mask(boxes, torch.tensor([0, 1]), grid)
    expect = torch.zeros(4, 6, dtype=torch.bool)
    expect[1:3, 1:3] = True
    assert torch.equal(keep.cpu(), expect.reshape(-1))
    assert counts.tolist() == [4]
    # Growing by one cell adds a ring, clipped to the image.
    keep, _ = box_to_patch_mask(boxes, torch.tensor([0, 1]), grid, margin=1.0)
    expect = torch.zeros(4, 6, dtype=torch.bool)
    expect[0:4, 0:4] = True
    assert torch.equal(keep.cpu(), expect.reshape(-1))


def test_box_mask_touching_edge_is_not_overlap(device):
    grid = torch.tensor([[1, 4, 4]])  # 2 x 2 cells
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5]], device=device)  # exactly cell (0, 0)
    keep, _ = box_to_patch_mask(boxes, torch.tensor([0, 1]), grid)
    assert keep.cpu().tolist() == [True, False, False, False]


def test_box_mask_rounds_every_step_like_the_reference(device):
    # x2 = 0.8 * 24 + 0.8 is 20.000000000000004 with separate roundings (device, reference) but
    # exactly 20 with a fused multiply-add, which would drop column 20: the build turns host FMA
    # contraction off (setup.py), so every backend keeps it.
    grid = torch.tensor([[1, 2, 48]])  # 1 x 24 cells
    boxes = torch.tensor([[0.1, 0.1, 0.8, 0.9]], dtype=torch.float64, device=device)
    keep, _ = box_to_patch_mask(boxes, torch.tensor([0, 1]), grid, margin=0.8)
    want, _ = ref.box_to_patch_mask_ref(boxes.cpu(), torch.tensor([0, 1]), grid, margin=0.8)
    assert keep.cpu().tolist() == want.tolist() and want.tolist()[20]


def test_box_mask_min_coverage_is_strict(device):
    grid = torch.tensor([[1, 2, 2]])  # 1 cell
    half = torch.tensor([[0.0, 0.0, 0.5, 1.0]], device=device)  # covers exactly half
    k, _ = box_to_patch_mask(half, torch.tensor([0, 1]), grid, min_coverage=0.5, empty="drop_all")
    assert k.cpu().tolist() == [False]
    k, _ = box_to_patch_mask(half, torch.tensor([0, 1]), grid, min_coverage=0.49, empty="drop_all")
    assert k.cpu().tolist() == [True]


def test_box_mask_coverage_is_per_box_not_union(device):
    grid = torch.tensor([[1, 2, 2]])  # 1 cell, two boxes each covering 40%
    boxes = torch.tensor([[0.0, 0.0, 0.4, 1.0], [0.6, 0.0, 1.0, 1.0]], device=device)
    k, _ = box_to_patch_mask(boxes, torch.tensor([0, 2]), grid, min_coverage=0.5, empty="drop_all")
    assert k.cpu().tolist() == [False]


def test_box_mask_empty_policies_and_no_boxes(device):
    grid = torch.tensor([[1, 4, 4], [2, 2, 4], [1, 2, 2]])
    # image 0: no boxes; image 1: one NaN box only; image 2: a box outside the image.
    boxes = torch.tensor([[math.nan, 0, 1, 1], [1.5, 1.5, 2.0, 2.0]], device=device)
    offsets = torch.tensor([0, 0, 1, 2])
    keep, counts = box_to_patch_mask(boxes, offsets, grid, empty="keep_all")
    assert keep.all() and counts.tolist() == [4, 4, 1]
    keep, counts = box_to_patch_mask(boxes, offsets, grid, empty="drop_all")
    assert not keep.any() and counts.tolist() == [0, 0, 0]


def test_box_mask_temporal_slices_share_boxes(device):
    grid = torch.tensor([[3, 6, 8]])  # 3 slices of 3 x 4 cells
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.5]], device=device)
    keep, counts = box_to_patch_mask(boxes, torch.tensor([0, 1]), grid)
    k = keep.cpu().reshape(3, 12)
    assert torch.equal(k[0], k[1]) and torch.equal(k[0], k[2])
    assert counts.item() == 3 * int(k[0].sum())


def test_box_mask_empty_batch_and_single_token(device):
    keep, counts = box_to_patch_mask(torch.zeros(0, 4, device=device), torch.tensor([0]), torch.zeros(0, 3, dtype=torch.int64))
    assert keep.shape == (0,) and counts.shape == (0,) and keep.device.type == device
    keep, counts = box_to_patch_mask(torch.tensor([[0.2, 0.2, 0.4, 0.4]], device=device), torch.tensor([0, 1]), torch.tensor([[1, 2, 2]]))
    assert keep.tolist() == [True] and counts.tolist() == [1]


def test_box_mask_pixel_equals_normalized(device):
    grid = random_grid(6)
    boxes, offsets = random_boxes(6, grid)
    scale = torch.repeat_interleave(grid[:, [2, 1, 2, 1]].double() * 14, offsets.diff(), dim=0)
    # Powers-of-two-free scaling can round differently; compare on boxes snapped to 1/256 px.
    px = torch.round(boxes.double() * scale * 256) / 256
    norm = px / scale
    a, _ = box_to_patch_mask(px.to(device), offsets, grid, coords="pixel")
    b, _ = box_to_patch_mask(norm.to(device), offsets, grid, coords="normalized")
    ra, _ = ref.box_to_patch_mask_ref(px, offsets, grid, coords="pixel")
    rb, _ = ref.box_to_patch_mask_ref(norm, offsets, grid, coords="normalized")
    assert torch.equal(a.cpu(), ra) and torch.equal(b.cpu(), rb)


@pytest.mark.parametrize("box_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_box_mask_box_dtypes_and_int32_metadata(device, box_dtype):
    grid = random_grid(5).to(torch.int32)
    boxes, offsets = random_boxes(5, grid)
    boxes = boxes.to(box_dtype)
    keep, counts = box_to_patch_mask(boxes.to(device), offsets.to(torch.int32), grid)
    keep_r, counts_r = ref.box_to_patch_mask_ref(boxes, offsets, grid.long())
    assert torch.equal(keep.cpu(), keep_r) and torch.equal(counts.cpu(), counts_r)


def test_box_mask_metadata_on_device(device):
    grid = random_grid(4)
    boxes, offsets = random_boxes(4, grid)
    keep, counts = box_to_patch_mask(boxes.to(device), offsets.to(device), grid.to(device))
    keep_r, counts_r = ref.box_to_patch_mask_ref(boxes, offsets, grid)
    assert torch.equal(keep.cpu(), keep_r) and torch.equal(counts.cpu(), counts_r)


def test_box_mask_bad_inputs(device):
    grid = torch.tensor([[1, 4, 4]])
    offs = torch.tensor([0, 1])
    box = torch.tensor([[0.1, 0.1, 0.5, 0.5]], device=device)
    with pytest.raises(TypeError, match="boxes"):
        box_to_patch_mask(box.long(), offs, grid)
    with pytest.raises(ValueError, match="boxes"):
        box_to_patch_mask(box[:, :3], offs, grid)
    with pytest.raises(TypeError, match="boxes"):
        box_to_patch_mask([[0.1, 0.1, 0.5, 0.5]], offs, grid)
    with pytest.raises(ValueError, match="box_offsets"):
        box_to_patch_mask(box, torch.tensor([0, 1, 1]), grid)
    with pytest.raises(ValueError, match="box_offsets"):
        box_to_patch_mask(box, torch.tensor([0, 2]), grid)
    with pytest.raises(ValueError, match="box_offsets"):
        box_to_patch_mask(torch.zeros(2, 4, device=device), torch.tensor([0, 2, 1, 2]), torch.tensor([[1, 2, 2]] * 3))
    with pytest.raises(TypeError, match="box_offsets"):
        box_to_patch_mask(box, offs.float(), grid)
    with pytest.raises(TypeError, match="image_grid_thw"):
        box_to_patch_mask(box, offs, grid.float())
    with pytest.raises(ValueError, match="image_grid_thw"):
        box_to_patch_mask(box, offs, torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match="image_grid_thw"):
        box_to_patch_mask(box, offs, torch.tensor([[0, 4, 4]]))
    with pytest.raises(ValueError, match="image_grid_thw"):
        box_to_patch_mask(box, offs, torch.tensor([1, 4, 4]))
    with pytest.raises(ValueError, match="coords"):
        box_to_patch_mask(box, offs, grid, coords="relative")
    with pytest.raises(ValueError, match="empty"):
        box_to_patch_mask(box, offs, grid, empty="nothing")
    with pytest.raises(ValueError, match="margin"):
        box_to_patch_mask(box, offs, grid, margin=-1.0)
    with pytest.raises(ValueError, match="margin"):
        box_to_patch_mask(box, offs, grid, margin=math.nan)
    with pytest.raises(ValueError, match="min_coverage"):
        box_to_patch_mask(box, offs, grid, min_coverage=1.0)
    with pytest.raises(ValueError, match="merge_size"):
        box_to_patch_mask(box, offs, grid, merge_size=0)
    with pytest.raises(ValueError, match="patch_size"):
        box_to_patch_mask(box, offs, grid, patch_size=0)
    nan_box = torch.tensor([[0.1, math.nan, 0.5, 0.5]], device=device)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        box_to_patch_mask(nan_box, offs, grid, invalid_boxes="raise")
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        box_to_patch_mask(torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.1, 0.2, 0.5]], device=device),
                          torch.tensor([0, 2]), grid, invalid_boxes="raise")
    # The same NaN box is simply ignored by default.
    keep, _ = box_to_patch_mask(nan_box, offs, grid)
    assert keep.all()


# ======================================================================================
# gather_tokens
def _rows(n, d, dtype, device, layout="contiguous"):
    if layout == "contiguous":
        return torch.randn(n, d, device=device).to(dtype)
    if layout == "row_strided":  # every other row of a bigger tensor (inner dim contiguous)
        return torch.randn(2 * n, d, device=device).to(dtype)[::2]
    if layout == "col_strided":  # non-contiguous inner dimension (copied once by the op)
        return torch.randn(n, 2 * d, device=device).to(dtype)[:, ::2]
    if layout == "transposed":
        return torch.randn(d, n, device=device).to(dtype).t()
    if layout == "offset":  # a storage offset that breaks 16-byte alignment
        return torch.randn(n * d + 1, device=device).to(dtype)[1:].reshape(n, d)
    raise ValueError(layout)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("d", ODD_DIMS)
def test_gather_forward_backward(device, dtype, d):
    n = random.randint(1, 300)
    m = random.randint(0, n)
    x = _rows(n, d, dtype, device).requires_grad_()
    index = torch.randperm(n, device=device)[:m]
    for idx in (index, index.to(torch.int32)):
        y = gather_tokens(x, idx)
        assert y.dtype == dtype and y.shape == (m, d)
        assert torch.equal(y, ref.gather_tokens_ref(x.detach(), idx))
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        (gx_ref,) = torch.autograd.grad(ref.gather_tokens_ref(x, idx), x, g)
        assert torch.equal(gx, gx_ref)  # copies and zeros: exact


@pytest.mark.parametrize("layout", ["row_strided", "col_strided", "transposed", "offset"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_non_contiguous(device, layout, dtype):
    x = _rows(97, 24, dtype, device, layout).requires_grad_()
    idx = torch.randperm(97, device=device)[:50]
    y = gather_tokens(x, idx)
    assert torch.equal(y, x.detach()[idx])
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(x[idx], x, g)
    assert torch.equal(gx, gx_ref)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_gather_duplicates_accumulate(device, dtype):
    x = _rows(50, 19, dtype, device).requires_grad_()
    idx = torch.randint(0, 50, (200,), device=device)
    y = gather_tokens(x, idx, unique_index=False)
    assert torch.equal(y, x.detach()[idx])
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(x.double()[idx], x, g.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(gx.double(), gx_ref.double(), atol=tol * 8, rtol=tol)


def test_gather_duplicates_deterministic(device):
    x = _rows(40, 33, torch.bfloat16, device).requires_grad_()
    idx = torch.randint(0, 40, (400,), device=device)
    g = torch.randn(400, 33, device=device).to(torch.bfloat16)
    runs = [torch.autograd.grad(gather_tokens(x, idx, unique_index=False), x, g)[0] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_gather_empty_and_single(device):
    x = torch.randn(5, 3, device=device, requires_grad=True)
    y = gather_tokens(x, torch.zeros(0, dtype=torch.int64, device=device))
    assert y.shape == (0, 3)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    x0 = torch.randn(0, 7, device=device, requires_grad=True)
    y0 = gather_tokens(x0, torch.zeros(0, dtype=torch.int32, device=device))
    assert y0.shape == (0, 7)
    y0.sum().backward()
    one = torch.randn(1, 3584, device=device, dtype=torch.bfloat16)
    assert torch.equal(gather_tokens(one, torch.tensor([0], device=device)), one)
    dz = torch.randn(4, 0, device=device)
    assert gather_tokens(dz, torch.tensor([3, 1], device=device)).shape == (2, 0)


def test_gather_without_grad_skips_inverse(device):
    x = torch.randn(10, 4, device=device)
    idx = torch.tensor([1, 1, 2], device=device)
    # No autograd: a duplicate under unique_index=True is harmless (no inverse is built).
    assert torch.equal(gather_tokens(x, idx), x[idx])


def test_gather_gradcheck(device):
    x = torch.randn(12, 5, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.randperm(12, device=device)[:7]
    assert gradcheck(lambda t: gather_tokens(t, idx), (x,))
    dup = torch.randint(0, 12, (20,), device=device)
    assert gradcheck(lambda t: gather_tokens(t, dup, unique_index=False), (x,))


def test_gather_scatter_fuse_gradgradcheck(device):
    from torch.autograd import gradgradcheck

    x = torch.randn(10, 4, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.randperm(10, device=device)[:6]
    dup = torch.randint(0, 10, (14,), device=device)
    assert gradgradcheck(lambda t: gather_tokens(t, idx), (x,))
    assert gradgradcheck(lambda t: gather_tokens(t, dup, unique_index=False), (x,))
    fill = torch.randn(10, 4, dtype=torch.float64, device=device, requires_grad=True)
    src = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert gradgradcheck(lambda s, f: scatter_tokens(s, idx, 10, fill=f), (src, fill))
    keep = torch.tensor([True, False, True, True, False, False, True, False, True, True], device=device)
    assert gradgradcheck(lambda t: fuse_tokens(t, keep, [0, 4, 10])[0], (x,))


def test_gather_bad_inputs():
    x = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(IndexError, match="index"):
        gather_tokens(x, torch.tensor([0, 10]))
    with pytest.raises(IndexError, match="index"):
        gather_tokens(x, torch.tensor([-1]))
    with pytest.raises(ValueError, match="index.*more than once"):
        gather_tokens(x, torch.tensor([3, 3]))
    with pytest.raises(TypeError, match="index"):
        gather_tokens(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="index"):
        gather_tokens(x, torch.tensor([[0, 1]]))
    # Row copies work for any dtype (ids, masks, positions).
    xi = torch.randint(0, 9, (10, 3))
    assert torch.equal(gather_tokens(xi, torch.tensor([4, 0])), xi[[4, 0]])
    xb = torch.rand(10, 5) > 0.5
    assert torch.equal(scatter_tokens(xb[:2], torch.tensor([7, 1]), 10), torch.zeros(10, 5, dtype=torch.bool).index_put((torch.tensor([7, 1]),), xb[:2]))
    with pytest.raises(ValueError, match="`x`"):
        gather_tokens(torch.randn(2, 3, 4), torch.tensor([0]))
    with pytest.raises(TypeError, match="`x`"):
        gather_tokens([[1.0]], torch.tensor([0]))


# ======================================================================================
# scatter_tokens
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("d", [1, 7, 8, 64, 3584])
@pytest.mark.parametrize("with_fill", [False, True])
def test_scatter_forward_backward(device, dtype, d, with_fill):
    num_rows = random.randint(1, 200)
    m = random.randint(0, num_rows)
    src = _rows(m, d, dtype, device).requires_grad_()
    fill = _rows(num_rows, d, dtype, device).requires_grad_() if with_fill else None
    for idx in (torch.randperm(num_rows, device=device)[:m], torch.randperm(num_rows, device=device)[:m].int()):
        out = scatter_tokens(src, idx, num_rows, fill=fill)
        out_ref = ref.scatter_tokens_ref(src, idx, num_rows, fill)
        assert out.shape == (num_rows, d) and out.dtype == dtype
        assert torch.equal(out, out_ref.detach())
        g = torch.randn_like(out)
        inputs = (src, fill) if with_fill else (src,)
        grads = torch.autograd.grad(out, inputs, g)
        grads_ref = torch.autograd.grad(out_ref, inputs, g)
        for a, b in zip(grads, grads_ref):
            assert torch.equal(a, b)


def test_scatter_non_contiguous(device):
    src = _rows(30, 16, torch.float32, device, "col_strided")
    fill = _rows(64, 16, torch.float32, device, "transposed")
    idx = torch.randperm(64, device=device)[:30]
    assert torch.equal(scatter_tokens(src, idx, 64, fill=fill), ref.scatter_tokens_ref(src, idx, 64, fill))


def test_scatter_empty(device):
    out = scatter_tokens(torch.zeros(0, 5, device=device), torch.zeros(0, dtype=torch.long, device=device), 4)
    assert torch.equal(out, torch.zeros(4, 5, device=device))
    out = scatter_tokens(torch.zeros(0, 5, device=device), torch.zeros(0, dtype=torch.long, device=device), 0)
    assert out.shape == (0, 5)


def test_scatter_gradcheck(device):
    src = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    fill = torch.randn(11, 5, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.randperm(11, device=device)[:6]
    assert gradcheck(lambda s, f: scatter_tokens(s, idx, 11, fill=f), (src, fill))
    assert gradcheck(lambda s: scatter_tokens(s, idx, 11), (src,))


def test_scatter_bad_inputs():
    src = torch.randn(3, 4)
    with pytest.raises(IndexError, match="index"):
        scatter_tokens(src, torch.tensor([0, 1, 5]), 5)
    with pytest.raises(ValueError, match="index.*more than once"):
        scatter_tokens(src, torch.tensor([0, 1, 1]), 5)
    with pytest.raises(ValueError, match="index"):
        scatter_tokens(src, torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="fill"):
        scatter_tokens(src, torch.tensor([0, 1, 2]), 5, fill=torch.zeros(4, 4))
    with pytest.raises(TypeError, match="fill"):
        scatter_tokens(src, torch.tensor([0, 1, 2]), 5, fill=torch.zeros(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_rows"):
        scatter_tokens(src, torch.tensor([0, 1, 2]), -1)
    with pytest.raises(TypeError, match="num_rows"):
        scatter_tokens(src, torch.tensor([0, 1, 2]), 5.0)


# ======================================================================================
# fuse_tokens
def random_fusion_case(device, dtype, num_images=None, d=None):
    num_images = num_images if num_images is not None else random.randint(1, 6)
    sizes = [random.randint(0, 40) for _ in range(num_images)]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    n = offsets[-1]
    d = d if d is not None else random.choice([1, 5, 16, 33])
    x = torch.randn(n, d, device=device).to(dtype)
    keep = torch.rand(n, device=device) < random.uniform(0.2, 0.9)
    if num_images >= 2 and sizes[0] > 0:
        keep[offsets[0] : offsets[1]] = False  # an image with no kept token
    if num_images >= 3 and sizes[1] > 0:
        keep[offsets[1] : offsets[2]] = True  # an image with every token kept
    return x, keep, offsets


def _check_assignment(x, keep, offsets, assign, tol):
    """Each dropped row is assigned to a kept row of its image whose cosine similarity is
    within `tol` of the best (exact argmax with lowest-index ties when tol == 0)."""
    xd = x.detach().double().cpu()
    a = assign.cpu()
    kc = keep.cpu()
    k_ofs = 0
    for i in range(len(offsets) - 1):
        lo, hi = offsets[i], offsets[i + 1]
        kept = torch.arange(lo, hi)[kc[lo:hi]]
        if kept.numel() == 0:
            assert (a[lo:hi] == -1).all()
            continue
        assert torch.equal(a[kept], torch.arange(k_ofs, k_ofs + kept.numel()))
        for r in torch.arange(lo, hi)[~kc[lo:hi]].tolist():
            sims = torch.nn.functional.cosine_similarity(xd[r : r + 1], xd[kept], eps=1e-8)
            j = int(a[r]) - k_ofs
            assert 0 <= j < kept.numel()
            assert sims[j] >= sims.max() - tol
        k_ofs += kept.numel()


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_fuse_matches_reference(device, dtype):
    for _ in range(3):
        x, keep, offsets = random_fusion_case(device, dtype)
        y, assign = fuse_tokens(x, keep, offsets)
        assert y.shape == (int(keep.sum()), x.shape[1]) and y.dtype == dtype and assign.dtype == torch.int64
        if dtype == torch.float64 and x.shape[1] > 1:
            # No ties among random vectors (D = 1 is all ties: cosine is +-1).
            assert torch.equal(assign.cpu(), ref.fuse_assignment_ref(x, keep, offsets).cpu())
        _check_assignment(x, keep, offsets, assign, tol={torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2))
        # Pooling checked against the reference with the op's own assignment.
        y_ref, _ = ref.fuse_tokens_ref(x, keep, offsets, assign=assign)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(y.double(), y_ref.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_fuse_ties_pick_lowest_index(device, dtype):
    base = torch.randn(1, 8, dtype=torch.float64)
    other = torch.randn(1, 8, dtype=torch.float64)
    # Kept rows 1, 3 and 4 are identical, so every similarity to them ties exactly.
    x = torch.cat([base, base, 0.5 * base, base, base, -base, other]).to(device).to(dtype)
    keep = torch.tensor([False, True, False, True, True, False, True], device=device)
    _, assign = fuse_tokens(x, keep, [0, 7])
    a = assign.cpu().tolist()
    assert a[1] == 0 and a[3] == 1 and a[4] == 2 and a[6] == 3
    # rows 0 and 2 tie between kept rows 1, 3, 4 -> the lowest (output row 0).
    assert a[0] == 0 and a[2] == 0
    # row 5 is -base: the tied kept rows score -1, so it joins whichever of them or `other`
    # scores higher; if it is one of the tied ones, it must be the lowest.
    assert a[5] in (0, 3)


def test_fuse_all_kept_is_identity_and_none_kept_drops(device):
    x = torch.randn(10, 6, device=device)
    y, assign = fuse_tokens(x, torch.ones(10, dtype=torch.bool, device=device), [0, 4, 10])
    assert torch.equal(y, x) and assign.cpu().tolist() == list(range(10))
    y, assign = fuse_tokens(x, torch.zeros(10, dtype=torch.bool, device=device), [0, 4, 10])
    assert y.shape == (0, 6) and (assign == -1).all()


def test_fuse_empty_inputs(device):
    x = torch.randn(0, 5, device=device)
    y, assign = fuse_tokens(x, torch.zeros(0, dtype=torch.bool, device=device), [0])
    assert y.shape == (0, 5) and assign.shape == (0,)
    y, assign = fuse_tokens(x, torch.zeros(0, dtype=torch.bool, device=device), [0, 0, 0])
    assert y.shape == (0, 5)
    one = torch.randn(1, 3, device=device)
    y, assign = fuse_tokens(one, torch.ones(1, dtype=torch.bool, device=device), torch.tensor([0, 1]))
    assert torch.equal(y, one) and assign.tolist() == [0]


def test_fuse_chunked_matches_unchunked(device):
    """Many images under a tiny chunk budget: the chunked path must give the same result."""
    x, keep, offsets = random_fusion_case(device, torch.float64, num_images=12, d=16)
    y1, a1 = fuse_tokens(x, keep, offsets)
    os.environ["TSPARSE_FUSE_CHUNK_BYTES"] = "1"
    try:
        y2, a2 = fuse_tokens(x, keep, offsets)
    finally:
        del os.environ["TSPARSE_FUSE_CHUNK_BYTES"]
    assert torch.equal(a1, a2) and torch.equal(y1, y2)


def test_fuse_ignores_autocast(device):
    """fuse_tokens' similarity matmul stays in its documented precision inside an autocast
    region (an autocast-cast bf16 bmm of fp32 rows would change assignments)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2400, 64, generator=gen).to(device)  # 9 assignments a bf16 matmul would flip
    keep = (torch.rand(2400, generator=gen) < 0.5).to(device)
    offsets = [0, 400, 800, 1200, 1600, 2000, 2400]
    y1, a1 = fuse_tokens(x, keep, offsets)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y2, a2 = fuse_tokens(x, keep, offsets)
    assert torch.equal(a1, a2) and torch.equal(y1, y2) and y2.dtype == torch.float32


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_row_inv_norms_rejects_bad_eps(device, eps):
    with pytest.raises(ValueError, match="`eps`"):
        torch.ops.tsparse.row_inv_norms(torch.randn(3, 4, device=device), eps)


def test_fuse_gradcheck(device):
    x, keep, offsets = random_fusion_case(device, torch.float64, num_images=4, d=5)
    x.requires_grad_()
    _, assign = fuse_tokens(x, keep, offsets)
    assert gradcheck(lambda t: fuse_tokens(t, keep, offsets)[0], (x,))
    # Gradient equals the reference's with the same assignment.
    g = torch.randn(int(keep.sum()), 5, dtype=torch.float64, device=device)
    (gx,) = torch.autograd.grad(fuse_tokens(x, keep, offsets)[0], x, g)
    (gx_ref,) = torch.autograd.grad(ref.fuse_tokens_ref(x, keep, offsets, assign=assign)[0], x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_fuse_bad_inputs():
    x = torch.randn(6, 4)
    keep = torch.tensor([True, False] * 3)
    with pytest.raises(TypeError, match="keep"):
        fuse_tokens(x, keep.int(), [0, 6])
    with pytest.raises(ValueError, match="keep"):
        fuse_tokens(x, keep[:5], [0, 6])
    with pytest.raises(ValueError, match="token_offsets"):
        fuse_tokens(x, keep, [0, 5])
    with pytest.raises(ValueError, match="token_offsets"):
        fuse_tokens(x, keep, [0, 4, 3, 6])
    with pytest.raises(TypeError, match="`x`"):
        fuse_tokens(x.long(), keep, [0, 6])
    with pytest.raises(ValueError, match="kept_counts"):
        fuse_tokens(x, keep, [0, 6], kept_counts=[7])
    with pytest.raises(ValueError, match="kept_counts"):  # right total, wrong split
        fuse_tokens(x, keep, [0, 2, 6], kept_counts=[0, 3])
    with pytest.raises(ValueError, match="kept_counts"):  # too few: a kept token would be lost
        fuse_tokens(x, keep, [0, 6], kept_counts=[2])


# ======================================================================================
# Fusion methods: nearest_kept (fuse_tokens with coords), summary, fuse_visual_tokens
def random_grid_keep(device, num_images=None, max_cells=7, p=None):
    """A random grid (t up to 3) and keep mask; images with nothing kept and everything kept."""
    num_images = num_images if num_images is not None else random.randint(1, 5)
    grid = random_grid(num_images, max_cells=max_cells)
    n = num_tokens(grid)
    keep = torch.rand(n) < (p if p is not None else random.uniform(0.05, 0.6))
    offs = token_offsets_from_grid(grid)
    if num_images >= 2:
        keep[offs[0]:offs[1]] = False
    if num_images >= 3:
        keep[offs[1]:offs[2]] = True
    return grid, keep.to(device), offs


def test_fusion_method_names_and_aliases():
    assert FUSION_METHODS == ("none", "cosine_mean", "nearest_kept", "summary")
    assert fusion_method(True) == "cosine_mean" and fusion_method(False) == "none"
    for m in FUSION_METHODS:
        assert fusion_method(m) == m
    for bad in ("mean", 1, None, "Summary"):
        with pytest.raises(ValueError, match="`pruning.fuse` must be one of"):
            fusion_method(bad, "pruning.fuse")


def test_token_coords_matches_reference(device):
    grid = random_grid(4)
    c = token_coords(grid, device=device)
    assert c.dtype == torch.float64 and c.device.type == torch.device(device).type
    assert torch.equal(c.cpu(), ref.token_coords_ref(grid))


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_fuse_nearest_matches_reference(device, dtype):
    for _ in range(3):
        grid, keep, offs = random_grid_keep(device)
        x = torch.randn(offs[-1], random.choice([1, 6, 33]), device=device).to(dtype)
        coords = token_coords(grid, device=device)
        y, assign = fuse_tokens(x, keep, offs, coords=coords)
        # Exact: integer coordinates, ties broken by the lowest index, no floating slack.
        assert torch.equal(assign.cpu(), ref.nearest_assignment_ref(keep, offs, coords).cpu())
        y_ref, _ = ref.fuse_tokens_ref(x, keep, offs, assign=assign)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(y.double(), y_ref.double(), atol=tol, rtol=tol)
        assert y.dtype == dtype and y.shape == (int(keep.sum()), x.shape[1])


def test_fuse_nearest_random_coords_and_ties(device):
    """Any coordinates (not only grids): random integer points with many exact ties."""
    n = 60
    coords = torch.randint(0, 4, (n, 2)).double().to(device)
    keep = (torch.rand(n) < 0.3).to(device)
    keep[0] = True
    offs = [0, 25, 60]
    keep[25] = True
    x = torch.randn(n, 4, dtype=torch.float64, device=device)
    _, assign = fuse_tokens(x, keep, offs, coords=coords)
    assert torch.equal(assign.cpu(), ref.nearest_assignment_ref(keep, offs, coords).cpu())
    # by hand: 1-D points 0, 1, 2, 3, 4 with 0 and 4 kept (and 2 equidistant: the lower kept wins)
    c = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]], dtype=torch.float64, device=device)
    k = torch.tensor([True, False, False, False, True], device=device)
    y, a = fuse_tokens(torch.arange(5.0, dtype=torch.float64, device=device)[:, None], k, [0, 5], coords=c)
    assert a.cpu().tolist() == [0, 0, 0, 1, 1]
    assert y[:, 0].cpu().tolist() == [1.0, 3.5]


def test_fuse_nearest_chunked_matches_unchunked(device):
    grid, keep, offs = random_grid_keep(device, num_images=10)
    x = torch.randn(offs[-1], 8, dtype=torch.float64, device=device)
    coords = token_coords(grid, device=device)
    y1, a1 = fuse_tokens(x, keep, offs, coords=coords)
    os.environ["TSPARSE_FUSE_CHUNK_BYTES"] = "1"
    try:
        y2, a2 = fuse_tokens(x, keep, offs, coords=coords)
    finally:
        del os.environ["TSPARSE_FUSE_CHUNK_BYTES"]
    assert torch.equal(a1, a2) and torch.equal(y1, y2)


def test_fuse_nearest_gradcheck(device):
    grid, keep, offs = random_grid_keep(device, num_images=3, max_cells=4, p=0.3)
    x = torch.randn(offs[-1], 3, dtype=torch.float64, device=device, requires_grad=True)
    coords = token_coords(grid, device=device)
    _, assign = fuse_tokens(x, keep, offs, coords=coords)
    assert gradcheck(lambda t: fuse_tokens(t, keep, offs, coords=coords)[0], (x,))
    g = torch.randn(int(keep.sum()), 3, dtype=torch.float64, device=device)
    (gx,) = torch.autograd.grad(fuse_tokens(x, keep, offs, coords=coords)[0], x, g)
    (gx_ref,) = torch.autograd.grad(ref.fuse_tokens_ref(x, keep, offs, assign=assign)[0], x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_fuse_nearest_bad_inputs():
    x = torch.randn(6, 4)
    keep = torch.tensor([True, False] * 3)
    c = torch.zeros(6, 2, dtype=torch.float64)
    # The public op's name (fuse_tokens), not the raw op's (fuse_tokens_nearest).
    with pytest.raises(TypeError, match=r"tsparse\.fuse_tokens: `coords` must be float64"):
        fuse_tokens(x, keep, [0, 6], coords=c.float())
    with pytest.raises(ValueError, match=r"tsparse\.fuse_tokens: `coords` must have shape"):
        fuse_tokens(x, keep, [0, 6], coords=c[:5])
    with pytest.raises(TypeError, match="coords"):
        fuse_tokens(x, keep, [0, 6], coords=[[0.0, 0.0]] * 6)
    with pytest.raises(ValueError, match=r"tsparse\.fuse_tokens: .*kept_counts"):
        fuse_tokens(x, keep, [0, 6], coords=c, kept_counts=[2])


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_summary_tokens_match_reference(device, dtype):
    for _ in range(3):
        grid, keep, offs = random_grid_keep(device)
        x = torch.randn(offs[-1], random.choice([1, 5, 16]), device=device).to(dtype)
        y, assign, keep_out, is_summary = summary_tokens(x, keep, grid)
        y_ref, assign_ref, keep_ref, summary_ref = ref.summary_tokens_ref(x, keep, grid)
        assert torch.equal(keep_out.cpu(), keep_ref.cpu()) and torch.equal(assign.cpu(), assign_ref.cpu())
        assert torch.equal(is_summary.cpu(), summary_ref.cpu())
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(y.double(), y_ref.double(), atol=tol, rtol=tol)
        # the box's own tokens are NOT mixed: every kept row is bit-identical to its input row
        kept_rows = keep_out.nonzero().reshape(-1)
        plain = ~is_summary
        assert torch.equal(y[plain], x[kept_rows[plain]])
        # one summary token per image with both kept and dropped tokens, none otherwise
        counts = [(int(keep[a:b].sum()), b - a) for a, b in zip(offs, offs[1:])]
        assert int(is_summary.sum()) == sum(1 for k, n in counts if 0 < k < n)


def test_summary_slot_is_the_dropped_cell_nearest_the_centre(device):
    # one 4 x 6 image (grid h=8, w=12): centre (1.5, 2.5) -> cells (1,2),(1,3),(2,2),(2,3) tie
    grid = torch.tensor([[1, 8, 12]])
    x = torch.randn(24, 3, dtype=torch.float64, device=device)
    keep = torch.zeros(24, dtype=torch.bool, device=device)
    keep[0] = True  # a box in the top-left corner
    _, _, keep_out, is_summary = summary_tokens(x, keep, grid)
    assert keep_out.nonzero().reshape(-1).cpu().tolist() == [0, 1 * 6 + 2]  # lowest of the tied centre cells
    keep[1 * 6 + 2] = True  # that cell is kept now: the next tied centre cell takes the summary
    y, assign, keep_out, is_summary = summary_tokens(x, keep, grid)
    assert keep_out.nonzero().reshape(-1).cpu().tolist() == [0, 8, 9]
    assert is_summary.cpu().tolist() == [False, False, True]
    dropped = ~keep
    torch.testing.assert_close(y[2], x[dropped].mean(0))
    assert (assign[dropped] == 2).all() and assign[0] == 0 and assign[8] == 1
    # all kept / none kept: no summary token
    for k in (torch.ones(24, dtype=torch.bool, device=device), torch.zeros(24, dtype=torch.bool, device=device)):
        y, assign, keep_out, is_summary = summary_tokens(x, k, grid)
        assert torch.equal(keep_out, k) and not bool(is_summary.any()) and y.shape[0] == int(k.sum())


def test_summary_gradcheck(device):
    grid, keep, offs = random_grid_keep(device, num_images=3, max_cells=4, p=0.3)
    x = torch.randn(offs[-1], 3, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(lambda t: summary_tokens(t, keep, grid)[0], (x,))
    g = torch.randn(summary_tokens(x, keep, grid)[0].shape, dtype=torch.float64, device=device)
    (gx,) = torch.autograd.grad(summary_tokens(x, keep, grid)[0], x, g)
    (gx_ref,) = torch.autograd.grad(ref.summary_tokens_ref(x, keep, grid)[0], x, g)
    torch.testing.assert_close(gx, gx_ref)


def test_summary_bad_inputs():
    grid = torch.tensor([[1, 4, 4]])
    x = torch.randn(4, 3)
    keep = torch.tensor([True, False, False, False])
    with pytest.raises(ValueError, match="summary_tokens.*image_grid_thw"):
        summary_tokens(torch.randn(5, 3), torch.zeros(5, dtype=torch.bool), grid)
    with pytest.raises(TypeError, match="summary_tokens.*`keep` must be bool"):
        summary_tokens(x, keep.int(), grid)
    with pytest.raises(TypeError, match="summary_tokens.*`x`"):
        summary_tokens(x.long(), keep, grid)
    with pytest.raises(ValueError, match="summary_tokens.*kept_counts"):
        summary_tokens(x, keep, grid, kept_counts=[5])
    with pytest.raises(ValueError, match="summary_tokens.*`kept_counts` does not match"):
        summary_tokens(x, keep, grid, kept_counts=[2])  # in range, but not the mask's count
    y, _, _, s = summary_tokens(torch.randn(0, 3), torch.zeros(0, dtype=torch.bool), torch.zeros(0, 3, dtype=torch.int64))
    assert y.shape == (0, 3) and s.shape == (0,)


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_fuse_visual_tokens_every_method_matches_reference(device, method):
    grid, keep, offs = random_grid_keep(device, num_images=4)
    x = torch.randn(offs[-1], 7, dtype=torch.float64, device=device, requires_grad=True)
    sel = fuse_visual_tokens(x, keep, grid, fuse=method)
    y_ref, idx_ref, keep_ref = ref.fuse_visual_tokens_ref(x.detach(), keep, grid, method)
    assert torch.equal(sel.keep.cpu(), keep_ref.cpu()) and torch.equal(sel.index.cpu(), idx_ref.cpu())
    torch.testing.assert_close(sel.embeds, y_ref)
    assert sel.offsets.tolist()[-1] == sel.embeds.shape[0] == int(sel.counts.sum())
    assert torch.equal(sel.offsets.diff().cpu(), sel.counts.long().cpu())
    assert (sel.assign is None) == (method == "none") and (sel.summary is None) == (method != "summary")
    sel.embeds.square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("fuse", list(FUSION_METHODS) + [True, False])
def test_select_every_fusion_matches_reference(device, fuse):
    grid = random_grid(5, max_cells=6)
    boxes, offsets = random_boxes(5, grid)
    x = torch.randn(num_tokens(grid), 12, dtype=torch.float64, device=device)
    sel = select_visual_tokens(x, boxes, offsets, grid, fuse=fuse, margin=0.25)
    y_ref, idx_ref, keep_ref = ref.select_visual_tokens_ref(x, boxes, offsets, grid, fuse=fuse, margin=0.25)
    assert torch.equal(sel.keep.cpu(), keep_ref.cpu()) and torch.equal(sel.index.cpu(), idx_ref.cpu())
    torch.testing.assert_close(sel.embeds, y_ref)
    assert int(sel.counts.sum()) == sel.embeds.shape[0]


# ======================================================================================
# select_visual_tokens
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_select_matches_reference(device, fuse, dtype):
    grid = random_grid(5, max_cells=6)
    boxes, offsets = random_boxes(5, grid)
    n = num_tokens(grid)
    x = torch.randn(n, 24, device=device).to(dtype).requires_grad_()
    sel = select_visual_tokens(x, boxes, offsets, grid, fuse=fuse, margin=0.25)
    y_ref, idx_ref, keep_ref = ref.select_visual_tokens_ref(x.detach(), boxes, offsets, grid, fuse=fuse, margin=0.25)
    assert torch.equal(sel.keep.cpu(), keep_ref.cpu())
    assert torch.equal(sel.index.cpu(), idx_ref.cpu())
    assert sel.offsets.tolist()[-1] == sel.embeds.shape[0] == int(sel.counts.sum())
    assert torch.equal(sel.offsets.diff().cpu(), sel.counts.long().cpu())
    if fuse and dtype == torch.float64:
        torch.testing.assert_close(sel.embeds, y_ref)
    elif not fuse:
        assert torch.equal(sel.embeds, y_ref)
        assert sel.assign is None
    sel.embeds.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_select_full_image_box_is_dense(device):
    grid = torch.tensor([[1, 6, 8], [2, 4, 4], [1, 2, 2]])
    n = num_tokens(grid)
    x = torch.randn(n, 10, device=device)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    for fuse in (True, False) + FUSION_METHODS:
        sel = select_visual_tokens(x, boxes, torch.tensor([0, 1, 2, 3]), grid, fuse=fuse)
        assert torch.equal(sel.embeds, x)
        assert torch.equal(sel.index.cpu(), torch.arange(n))


def test_select_bad_inputs(device):
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match="image_embeds"):
        select_visual_tokens(torch.randn(5, 3, device=device), torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([0, 1]), grid)
    with pytest.raises(TypeError, match="image_embeds"):
        select_visual_tokens(None, torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([0, 1]), grid)


def test_token_offsets_from_grid():
    assert token_offsets_from_grid(torch.tensor([[1, 4, 6], [2, 2, 2]])) == [0, 6, 8]
    with pytest.raises(ValueError, match="image_grid_thw"):
        token_offsets_from_grid(torch.tensor([[1, 3, 6]]))


# ======================================================================================
# torch.library.opcheck on every op (schema, fake kernel, autograd registration, AOT)
def _opcheck_cases(device):
    x = torch.randn(9, 6, device=device, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 0, 7], device=device)
    keep = torch.tensor([True, False, True, True, False, False, True, False, True], device=device)
    grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0]], device=device)
    perm = torch.tensor([2, 0, 1, 5], device=device)
    offs = torch.tensor([0, 1, 1, 4], device=device)
    ops = torch.ops.tsparse
    return [
        (ops.box_to_patch_mask.default, (boxes, torch.tensor([0, 1, 2]), grid, 7, False, 14, 2, 0.0, 0.0, True)),
        (ops.gather_rows.default, (x, idx, True)),
        (ops.gather_rows.default, (x, torch.tensor([1, 1, 3], device=device), False)),
        (ops.scatter_rows.default, (x[:3].detach().clone().requires_grad_(), idx, 9, x)),
        (ops.scatter_rows.default, (x[:3].detach().clone().requires_grad_(), idx.int(), 9, None)),
        (ops.fuse_tokens.default, (x, keep, [0, 6, 9], [3, 2])),
        (ops.fuse_tokens_nearest.default, (x, keep, torch.randint(0, 4, (9, 2), device=device).double(), [0, 6, 9], [3, 2])),
        (ops.compose_rows.default, (x, torch.tensor([2, -1, 0], device=device), None, None)),
        (ops.compose_rows.default, (None, torch.tensor([2, -1, 0], device=device), x[:3].detach(), None)),
        (ops.compose_rows.default, (x, torch.tensor([2, -1, 0], device=device), None, torch.rand(9, device=device))),
        (ops.segment_reduce_rows.default, (x.detach(), perm, offs, True)),
        (ops.row_inv_norms.default, (x.detach(), 1e-8)),
    ]


def test_opcheck_every_op(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_torch_compile_gather_and_select_path(device):
    x = torch.randn(20, 8, device=device)
    idx = torch.randperm(20, device=device)[:9]

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, idx):
        return torch.ops.tsparse.gather_rows(x, idx, False)[0] * 2

    assert torch.equal(f(x, idx), x[idx] * 2)


# ======================================================================================
# Token order against Qwen2.5-VL itself (tiny random model built from a config).
def _tiny_qwen25_vl():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], window_size=112),
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval(), cfg


def test_token_order_matches_qwen2_5_vl_rope_index():
    model, cfg = _tiny_qwen25_vl()
    grid = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 6, 10]])
    sizes = (grid.prod(-1) // 4).tolist()
    ids = [1, 2, 3]
    for k in sizes:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * k + [cfg.vision_end_token_id, 7, 8]
    input_ids = torch.tensor([ids])
    mm = (input_ids == cfg.image_token_id).int()
    pos, _ = model.model.get_rope_index(input_ids, mm, image_grid_thw=grid)
    img_pos = pos[:, 0, input_ids[0] == cfg.image_token_id]  # [3, total image tokens] in feature order

    # The vision tower emits exactly the tokens box_to_patch_mask enumerates, image by image.
    with torch.no_grad():
        feats = model.model.get_image_features(torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14), grid)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    assert [f.shape[0] for f in feats] == sizes

    offsets = token_offsets_from_grid(grid)
    for i, (t, h, w) in enumerate(grid.tolist()):
        hc, wc = h // 2, w // 2
        p = img_pos[:, offsets[i] : offsets[i + 1]]
        rows = p[1] - p[1].min()
        cols = p[2] - p[2].min()
        for _ in range(5):
            r1, r2 = sorted(random.sample(range(hc + 1), 2))
            c1, c2 = sorted(random.sample(range(wc + 1), 2))
            # A box whose edges sit inside the chosen cells' span (shrunk by a quarter cell).
            box = torch.tensor([[(c1 + 0.25) / wc, (r1 + 0.25) / hc, (c2 - 0.25) / wc, (r2 - 0.25) / hc]])
            others = [torch.zeros(0, 4)] * len(sizes)
            others[i] = box
            all_boxes = torch.cat(others)
            box_offsets = torch.tensor([0] + [int(j == i) for j in range(len(sizes))]).cumsum(0)
            keep, _ = box_to_patch_mask(all_boxes, box_offsets, grid, empty="drop_all")
            kept = keep[offsets[i] : offsets[i + 1]]
            expect = (rows >= r1) & (rows < r2) & (cols >= c1) & (cols < c2)
            assert torch.equal(kept, expect), (i, r1, r2, c1, c2)


def test_token_order_temporal_slices_match_video_positions():
    model, cfg = _tiny_qwen25_vl()
    grid = torch.tensor([[2, 4, 6]])  # a 2-slice video grid
    k = int(grid.prod()) // 4
    ids = torch.tensor([[1, cfg.vision_start_token_id] + [cfg.video_token_id] * k + [cfg.vision_end_token_id]])
    mm = (ids == cfg.video_token_id).int() * 2
    pos, _ = model.model.get_rope_index(ids, mm, video_grid_thw=grid)
    p = pos[:, 0, ids[0] == cfg.video_token_id]
    rows, cols = p[1] - p[1].min(), p[2] - p[2].min()
    # cells: 2 rows x 3 cols per slice; the box covers row 1, column 0 of every slice.
    keep, _ = box_to_patch_mask(torch.tensor([[0.0, 0.55, 0.3, 1.0]]), torch.tensor([0, 1]), grid, empty="drop_all")
    assert torch.equal(keep, (rows >= 1) & (cols < 1))
    assert p[0].unique().numel() == 2  # two temporal slices, t-major


# ======================================================================================
# Build checks
def test_build_info_fields():
    info = tsparse.build_info()
    for key in ("torch_version", "cuda_kernels", "cuda_version", "cuda_arch_list", "version"):
        assert key in info
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if torch.version.cuda is None:
        assert info["cuda_kernels"] is False


def test_python_dash_m_prints_build_info():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "tsparse"], capture_output=True, text=True, check=True).stdout
    assert "torch_version" in out and "gpu_usable" in out and "cuda_kernels" in out


def test_extension_contains_sm90a_code():
    info = tsparse.build_info()
    if not info["cuda_kernels"]:
        pytest.skip("built without CUDA kernels")
    import glob
    import importlib.util
    import shutil
    import subprocess

    spec = importlib.util.find_spec("nvidia")
    cands = []
    if spec is not None:
        for base in spec.submodule_search_locations:
            cands += glob.glob(os.path.join(base, "*", "bin", "cuobjdump"))
    exe = next((c for c in cands if os.path.exists(c)), None) or shutil.which("cuobjdump")
    if exe is None:
        pytest.skip("cuobjdump not installed (dev extra nvidia-cuda-cuobjdump)")
    if not os.access(exe, os.X_OK):
        os.chmod(exe, 0o755)
    so = tsparse._C.__file__
    listing = subprocess.run([exe, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    archs = [a.strip() for a in str(info["cuda_arch_list"]).replace(";", " ").split() if a.strip()]
    if "9.0a" in archs:
        assert "sm_90a" in listing, listing
    assert ".cubin" in listing


def test_eager_fusion_baseline_agrees(device):
    """The benchmark baseline does the same work as the op (same assignment and pooling)."""
    x, keep, offsets = random_fusion_case(device, torch.float64, num_images=5, d=12)
    y, assign = fuse_tokens(x, keep, offsets)
    y_e, assign_e = ref.fuse_tokens_eager(x, keep, offsets)
    assert torch.equal(assign, assign_e)
    torch.testing.assert_close(y, y_e.to(y.dtype), atol=1e-5, rtol=1e-5)


def test_nvtx_ranges_wrap_ops_when_enabled():
    import subprocess
    import sys

    code = (
        "import torch, tsparse, tsparse._nvtx as n\n"
        "from tsparse.ops import gather_tokens, select_visual_tokens\n"
        "assert n.ENABLED\n"
        "assert hasattr(gather_tokens, '__wrapped__')\n"
        "x = torch.randn(8, 4)\n"
        "assert torch.equal(gather_tokens(x, torch.tensor([1, 2])), x[[1, 2]])\n"
        "sel = select_visual_tokens(torch.randn(4, 3), torch.tensor([[0., 0., .5, .5]]), torch.tensor([0, 1]), torch.tensor([[1, 4, 4]]))\n"
        "assert sel.embeds.shape[0] == 1\n"
    )
    env = dict(os.environ, TSPARSE_NVTX="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    from tsparse.ops import gather_tokens as g

    assert not hasattr(g, "__wrapped__")  # disabled by default: no wrapper at all


# --------------------------------------------------------------------------------------
# The row kernels' shared order and paths (issue 12 step 4): the CPU and CUDA kernels sum long
# segments in the same pieces (tsparse/segment_plan.h), so both must equal this piecewise sum
# bit for bit; the CUDA run of these tests is the CPU == CUDA check.
SEGMENT_PIECE = 32  # kSegmentPiece


def _piecewise_segment_sum(x, perm, offsets, mean):
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.cpu().to(acc_dtype)
    perm, offsets = perm.cpu().tolist(), offsets.cpu().tolist()
    out = torch.zeros(len(offsets) - 1, x.shape[1], dtype=acc_dtype)
    for r in range(len(offsets) - 1):
        beg, end = offsets[r], offsets[r + 1]
        acc = torch.zeros(x.shape[1], dtype=acc_dtype)
        if end - beg <= SEGMENT_PIECE:
            for i in range(beg, end):
                acc = acc + xs[perm[i]]
        else:
            i = beg
            while i < end:  # pieces cut at multiples of the piece size in perm positions
                j = min(end, (i // SEGMENT_PIECE + 1) * SEGMENT_PIECE)
                part = torch.zeros(x.shape[1], dtype=acc_dtype)
                for m in range(i, j):
                    part = part + xs[perm[m]]
                acc = acc + part
                i = j
        if mean and end > beg:
            acc = acc * (torch.ones((), dtype=acc_dtype) / (end - beg))
        out[r] = acc
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("cols", [64, 24, 7])  # 16-byte packs (64, and 24 for fp32/fp64) and the element path
def test_segment_reduce_long_segments_in_the_shared_piece_order(device, dtype, cols):
    lengths = [0, 1, 31, 32, 33, 64, 65, 70, 0, 500, 3, 97]  # around and far past the piece size
    first = 5  # perm positions before the first segment are unused: pieces follow perm positions
    n_src = 40
    total = first + sum(lengths)
    perm = torch.randint(0, n_src, (total,), device=device)
    offsets = torch.tensor([first] + [first + sum(lengths[: k + 1]) for k in range(len(lengths))], device=device)
    wide = torch.randn(n_src, cols + 8, device=device).to(dtype)
    x = wide[:, :cols]  # a row stride that is not the width
    for mean in (False, True):
        out = torch.ops.tsparse.segment_reduce_rows(x, perm, offsets, mean)
        assert torch.equal(out.cpu(), _piecewise_segment_sum(x, perm, offsets, mean)), (dtype, cols, mean)


def test_non_unique_gather_backward_sums_long_duplicate_runs(device):
    # gather_tokens with unique_index=False: the backward is a segment sum per source row; a row
    # gathered 300 times is one long segment, summed in pieces
    x = torch.randn(6, 40, device=device, dtype=torch.float32, requires_grad=True)
    idx = torch.tensor([3] * 300 + [1, 4, 4] + [0] * 33, device=device)
    y = gather_tokens(x, idx, unique_index=False)
    g = torch.randn_like(y)
    y.backward(g)
    expect = torch.zeros(6, 40, dtype=torch.float64)
    expect.index_add_(0, idx.cpu(), g.double().cpu())
    torch.testing.assert_close(x.grad.double().cpu(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("cols", [264, 24, 7])  # 33 packs of bf16 (a partial trip of 4 x 32 lanes), short, odd
def test_scaled_rows_match_their_formula_bitwise(device, dtype, cols):
    # compose_rows with row_scale (the token-fusion backward): out[r] = src[map[r]] * scale, fp32 math
    src = torch.randn(50, cols, device=device).to(dtype)
    row_map = torch.randint(-1, 50, (70,), device=device)
    scale = torch.rand(50, device=device)
    out = torch.ops.tsparse.compose_rows(src, row_map, None, scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m = row_map.cpu()
    expect = (src.cpu().to(acc)[m.clamp(min=0)] * scale.cpu().to(acc)[m.clamp(min=0)][:, None]).to(dtype)
    expect[m < 0] = 0
    assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize("cols", [3592, 3584, 264, 9])  # bf16: 449 / 448 / 33 units of 16 B, and 2-byte units
def test_gather_and_scatter_rows_with_partial_trips(device, cols):
    x = torch.randn(300, cols, device=device).to(torch.bfloat16)
    idx = torch.randperm(300, device=device)[:211]
    assert torch.equal(gather_tokens(x, idx), x[idx])
    out = scatter_tokens(x[idx], idx, 300, fill=torch.zeros_like(x))
    expect = torch.zeros_like(x)
    expect[idx] = x[idx]
    assert torch.equal(out, expect)


# --------------------------------------------------------------------------------------
# Review 2026-12-05: `num_tokens` on host metadata. A given value gives the same mask as the
# computed one; a wrong one names `num_tokens`; and it is checked only AFTER the grid rows it is
# computed from, so a bad grid is reported as a bad grid (it was reported as a `num_tokens`
# mismatch whenever the caller's count differed from the floor-divided sum).
def test_box_mask_num_tokens_on_host_metadata(device):
    grid = torch.tensor([[1, 8, 8], [2, 4, 6], [1, 2, 2]])
    boxes, offsets = random_boxes(3, grid)
    n = num_tokens(grid)
    keep, counts = box_to_patch_mask(boxes.to(device), offsets, grid)
    keep2, counts2 = box_to_patch_mask(boxes.to(device), offsets, grid, num_tokens=n)
    assert torch.equal(keep2.cpu(), keep.cpu()) and torch.equal(counts2.cpu(), counts.cpu())
    for wrong in (n - 1, n + 1):
        with pytest.raises(ValueError, match="`num_tokens` = "):
            box_to_patch_mask(boxes.to(device), offsets, grid, num_tokens=wrong)
    for bad in (-1, 2.0, True, torch.tensor(n)):
        with pytest.raises(ValueError, match="`num_tokens` must be"):
            box_to_patch_mask(boxes.to(device), offsets, grid, num_tokens=bad)
    odd = torch.tensor([[1, 4, 6], [1, 4, 3]])  # w = 3 is not a multiple of merge_size = 2
    with pytest.raises(ValueError, match="multiples of merge_size"):
        box_to_patch_mask(boxes[:2].to(device), torch.tensor([0, 1, 2]), odd, num_tokens=9)


# The segment reduction and the scaled rows on every layout the CUDA launchers choose a width for:
# 16-byte packs (contiguous), a row stride that breaks them ("row_stride": D + 1), a base pointer
# that breaks them ("offset"), every other row, and no members at all; long segments included, so
# segment_pieces_kernel runs in both its 16-byte and its element flavour. Bit-exact against the
# shared piece order (the CUDA run of this test is the fallback paths' CPU == CUDA check).
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_stride", "offset", "row_strided"])
def test_segment_reduce_and_scaled_rows_on_every_layout(device, dtype, layout):
    n, cols = 40, 64
    if layout == "row_stride":
        x = torch.randn(n, cols + 1, device=device).to(dtype)[:, :cols]
    else:
        x = _rows(n, cols, dtype, device, layout)
    lengths = [3, 0, 70, 33, 1, 32, 0]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
    perm = torch.randint(0, n, (sum(lengths),), device=device)
    for mean in (False, True):
        out = torch.ops.tsparse.segment_reduce_rows(x, perm, offsets, mean)
        assert torch.equal(out.cpu(), _piecewise_segment_sum(x, perm, offsets, mean)), (mean,)
    empty = torch.ops.tsparse.segment_reduce_rows(x, perm[:0], torch.zeros(4, dtype=torch.int64, device=device), True)
    assert torch.equal(empty.cpu(), torch.zeros(3, cols, dtype=dtype))
    row_map = torch.randint(-1, n, (50,), device=device)
    scale = torch.rand(n, device=device)
    out = torch.ops.tsparse.compose_rows(x, row_map, None, scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    m = row_map.cpu().clamp(min=0)
    expect = (x.cpu().to(acc)[m] * scale.cpu().to(acc)[m][:, None]).to(dtype)
    expect[row_map.cpu() < 0] = 0
    assert torch.equal(out.cpu(), expect)
