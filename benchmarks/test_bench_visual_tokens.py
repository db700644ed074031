"""pytest-benchmark entries for the visual-token ops and their PyTorch baselines (`make bench`).

Sizes are kept small enough for the CPU machine; on a GPU they run on CUDA. The full-size
comparison table with ratios and bandwidth is `python -m benchmarks.report`.
"""

from __future__ import annotations

import pytest
import torch

from tsparse import reference as ref
from tsparse.ops import box_to_patch_mask, fuse_tokens, gather_tokens, scatter_tokens, summary_tokens, token_coords

from .bench_visual_tokens import make_inputs
from .common import BENCH_DEVICE as DEVICE
from .common import sync as _sync
from .common import synced as _run


@pytest.fixture(scope="module")
def inputs():
    grid, boxes, box_offsets, x = make_inputs(DEVICE, images=4, side=72, hidden=3584)
    keep, counts = box_to_patch_mask(boxes, box_offsets, grid)
    index = keep.nonzero().reshape(-1)
    offsets = [i * 1296 for i in range(5)]
    return dict(grid=grid, boxes=boxes, box_offsets=box_offsets, x=x, keep=keep, counts=counts.tolist(),
                index=index, offsets=offsets)


@pytest.mark.benchmark(group="box_to_patch_mask")
def test_box_mask_tsparse(benchmark, inputs):
    benchmark(_run(lambda: box_to_patch_mask(inputs["boxes"], inputs["box_offsets"], inputs["grid"])))


@pytest.mark.benchmark(group="box_to_patch_mask")
def test_box_mask_reference(benchmark, inputs):
    benchmark(_run(lambda: ref.box_to_patch_mask_ref(inputs["boxes"], inputs["box_offsets"], inputs["grid"])))


@pytest.mark.benchmark(group="gather fwd")
def test_gather_tsparse(benchmark, inputs):
    benchmark(_run(lambda: gather_tokens(inputs["x"], inputs["index"])))


@pytest.mark.benchmark(group="gather fwd")
def test_gather_index_select(benchmark, inputs):
    benchmark(_run(lambda: inputs["x"].index_select(0, inputs["index"])))


@pytest.mark.benchmark(group="gather bwd")
def test_gather_bwd_tsparse(benchmark, inputs):
    x = inputs["x"].detach().requires_grad_()
    y = gather_tokens(x, inputs["index"])
    g = torch.ones_like(y)
    benchmark(_run(lambda: torch.autograd.grad(y, x, g, retain_graph=True)))


@pytest.mark.benchmark(group="gather bwd")
def test_gather_bwd_autograd_indexing(benchmark, inputs):
    x = inputs["x"].detach().requires_grad_()
    y = x[inputs["index"]]
    g = torch.ones_like(y)
    benchmark(_run(lambda: torch.autograd.grad(y, x, g, retain_graph=True)))


@pytest.mark.benchmark(group="scatter fwd")
def test_scatter_tsparse(benchmark, inputs):
    src = inputs["x"][inputs["index"]]
    benchmark(_run(lambda: scatter_tokens(src, inputs["index"], inputs["x"].shape[0], fill=inputs["x"])))


@pytest.mark.benchmark(group="scatter fwd")
def test_scatter_index_put(benchmark, inputs):
    src = inputs["x"][inputs["index"]]
    benchmark(_run(lambda: inputs["x"].index_put((inputs["index"],), src)))


@pytest.mark.benchmark(group="fuse fwd")
def test_fuse_tsparse(benchmark, inputs):
    benchmark(_run(lambda: fuse_tokens(inputs["x"], inputs["keep"], inputs["offsets"], kept_counts=inputs["counts"])))


@pytest.mark.benchmark(group="fuse fwd")
def test_fuse_eager_torch(benchmark, inputs):
    benchmark(_run(lambda: ref.fuse_tokens_eager(inputs["x"], inputs["keep"], inputs["offsets"])))


@pytest.mark.benchmark(group="fuse fwd")
def test_fuse_nearest_kept_tsparse(benchmark, inputs):
    coords = token_coords(inputs["grid"], device=inputs["x"].device)
    benchmark(_run(lambda: fuse_tokens(inputs["x"], inputs["keep"], inputs["offsets"], kept_counts=inputs["counts"],
                                       coords=coords)))


@pytest.mark.benchmark(group="fuse fwd")
def test_fuse_summary_tsparse(benchmark, inputs):
    benchmark(_run(lambda: summary_tokens(inputs["x"], inputs["keep"], inputs["grid"], kept_counts=inputs["counts"])))
