"""Visual-token ops: from predicted evidence boxes to a sparse set of visual tokens.

* :func:`box_to_patch_mask` - which merged visual tokens lie inside the boxes.
* :func:`gather_tokens` / :func:`scatter_tokens` - move token rows (differentiable).
* :func:`fuse_tokens` - the paper's token fusion: merge every dropped token into its most
  similar kept token of the same image.
* :func:`select_visual_tokens` - the composition users call.

Token order is Qwen2.5-VL's (``shared/notes/qwen2_5_vl.md``): image i with patch grid
``(t, h, w)`` contributes ``t * (h / merge) * (w / merge)`` merged tokens, t-major then
row-major over the ``(h / merge) x (w / merge)`` cells; images are concatenated.

Errors: bad arguments raise ``TypeError`` (dtype), ``ValueError`` (shape, device, value)
or ``IndexError`` (index out of range) naming the argument. On CUDA, index VALUES are
checked inside the kernels (no host sync): a bad index aborts the kernel with a
device-side error that names the op, exactly like PyTorch's own indexing ops; the CUDA
context is unusable afterwards. The CPU kernels raise the Python errors instead.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _library  # noqa: F401  (loads tsparse._C: the torch.ops.tsparse schemas)
from . import _rows  # noqa: F401  (fake kernels and autograd of the internal row ops)
from .._nvtx import annotate, nvtx_range

__all__ = [
    "box_to_patch_mask",
    "gather_tokens",
    "scatter_tokens",
    "fuse_tokens",
    "select_visual_tokens",
    "SelectedTokens",
    "token_offsets_from_grid",
]

_ops = torch.ops.tsparse
_INT32_MAX = 2**31 - 1
_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------
# Small argument helpers (the C++ side repeats every check that guards memory).
def _need_tensor(value, op: str, arg: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"tsparse.{op}: `{arg}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def _choice(value: str, options: Sequence[str], op: str, arg: str) -> str:
    if value not in options:
        raise ValueError(f"tsparse.{op}: `{arg}` must be one of {list(options)}, got {value!r}")
    return value


def _host_metadata(*tensors: Tensor) -> list[Tensor]:
    """Moves small integer metadata to the CPU as int64, with ONE device->host copy in total
    when any of it lives on a GPU (that copy waits for the device)."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.to(torch.int64) for t in tensors]
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors]).cpu()
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos : pos + t.numel()].reshape(t.shape))
        pos += t.numel()
    return out


def token_offsets_from_grid(image_grid_thw: Tensor, merge_size: int = 2) -> list[int]:
    """CSR offsets ``[num_images + 1]`` of each image's merged tokens (host ints).

    Reads ``image_grid_thw`` on the host (a device->host copy if it lives on a GPU).
    """
    (grid,) = _host_metadata(image_grid_thw)
    if grid.dim() != 2 or grid.shape[-1] != 3:
        raise ValueError(f"`image_grid_thw` must have shape [num_images, 3], got {tuple(grid.shape)}")
    offsets = [0]
    m = int(merge_size)
    for t, h, w in grid.tolist():
        if h % m or w % m:
            raise ValueError(
                f"`image_grid_thw` row ({t}, {h}, {w}): h and w must be multiples of merge_size={m}"
            )
        offsets.append(offsets[-1] + t * (h // m) * (w // m))
    return offsets


# --------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes for torch.compile / meta tensors).
@torch.library.register_fake("tsparse::box_to_patch_mask")
def _box_to_patch_mask_fake(boxes, box_offsets, image_grid_thw, num_tokens, pixel_coords,
                            patch_size, merge_size, margin, min_coverage, keep_all_when_empty):
    keep = boxes.new_empty((num_tokens,), dtype=torch.bool)
    counts = boxes.new_empty((image_grid_thw.shape[0],), dtype=torch.int32)
    return keep, counts


@torch.library.register_fake("tsparse::gather_rows")
def _gather_rows_fake(x, index, build_inverse):
    torch._check(x.dim() == 2, lambda: "tsparse.gather_tokens: `x` must be 2-D [N, D]")
    torch._check(index.dim() == 1, lambda: "tsparse.gather_tokens: `index` must be 1-D")
    out = x.new_empty((index.shape[0], x.shape[1]))
    inverse = x.new_empty((x.shape[0] if build_inverse else 0,), dtype=torch.int32)
    return out, inverse


@torch.library.register_fake("tsparse::scatter_rows")
def _scatter_rows_fake(src, index, num_rows, fill):
    torch._check(src.dim() == 2, lambda: "tsparse.scatter_tokens: `src` must be 2-D [M, D]")
    out = src.new_empty((num_rows, src.shape[1]))
    inverse = src.new_empty((num_rows,), dtype=torch.int32)
    return out, inverse


@torch.library.register_fake("tsparse::fuse_tokens")
def _fuse_tokens_fake(x, keep, token_offsets, kept_counts):
    k = sum(kept_counts)
    return (
        x.new_empty((k, x.shape[1])),
        x.new_empty((x.shape[0],), dtype=torch.int64),
        x.new_empty((k,), dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------
# Autograd. Each backward is itself made of tsparse ops (one kernel where possible).
def _gather_setup(ctx, inputs, output):
    x, index, build_inverse = inputs
    ctx.num_rows = x.shape[0]
    ctx.unique = bool(build_inverse)
    ctx.save_for_backward(index, output[1])


def _gather_backward(ctx, grad_out, _grad_inverse):
    index, inverse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    if ctx.unique:
        # ONE kernel writes every row of the dense gradient: the copied row or zeros.
        grad_x = _ops.compose_rows(grad_out, inverse, None, None)
    else:
        # Duplicates: deterministic segment sums over a stable sort of the indices.
        grad_x = _rows.segment_sum_by_key(grad_out, index, ctx.num_rows)
    return grad_x, None, None


torch.library.register_autograd("tsparse::gather_rows", _gather_backward, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    src, index, num_rows, fill = inputs
    ctx.has_fill = fill is not None
    ctx.save_for_backward(index, output[1])


def _scatter_backward(ctx, grad_out, _grad_inverse):
    index, inverse = ctx.saved_tensors
    grad_src = grad_fill = None
    if ctx.needs_input_grad[0]:
        grad_src = _ops.gather_rows(grad_out, index, False)[0]
    if ctx.has_fill and ctx.needs_input_grad[3]:
        # grad_out rows not overwritten by `src`, zeros where they were.
        grad_fill = _ops.compose_rows(None, inverse, grad_out, None)
    return grad_src, None, None, grad_fill


torch.library.register_autograd("tsparse::scatter_rows", _scatter_backward, setup_context=_scatter_setup)


def _fuse_setup(ctx, inputs, output):
    _, assign, inv_count = output
    ctx.save_for_backward(assign, inv_count)


def _fuse_backward(ctx, grad_y, _grad_assign, _grad_inv_count):
    assign, inv_count = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    # Each input row receives its output row's gradient divided by the row's member count
    # (zero for tokens of an image with no kept token): one kernel.
    grad_x = _ops.compose_rows(grad_y, assign, None, inv_count)
    return grad_x, None, None, None


torch.library.register_autograd("tsparse::fuse_tokens", _fuse_backward, setup_context=_fuse_setup)


# --------------------------------------------------------------------------------------
# Public ops.
@annotate("box_to_patch_mask")
def box_to_patch_mask(
    boxes: Tensor,
    box_offsets: Tensor,
    image_grid_thw: Tensor,
    *,
    coords: str = "normalized",
    patch_size: int = 14,
    merge_size: int = 2,
    margin: float = 0.0,
    min_coverage: float = 0.0,
    empty: str = "keep_all",
    invalid_boxes: str = "ignore",
    num_tokens: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Marks the merged visual tokens that lie inside each image's evidence boxes.

    Args:
        boxes: float ``[num_boxes, 4]`` as ``(x1, y1, x2, y2)``, any floating dtype, on the
            CPU or a GPU (the kernel runs there).
        box_offsets: int ``[num_images + 1]``, CSR: image i owns
            ``boxes[box_offsets[i]:box_offsets[i + 1]]``.
        image_grid_thw: int ``[num_images, 3]``, each image's patch grid ``(t, h, w)``;
            ``h`` and ``w`` must be multiples of ``merge_size``.
        coords: ``"normalized"`` (0-1 of the image side) or ``"pixel"`` (pixels of the
            resized image, ``patch_size * w`` by ``patch_size * h``).
        patch_size, merge_size: a merged token covers a cell of ``patch_size * merge_size``
            pixels square (Qwen2.5-VL: 14 and 2, so 28 px).
        margin: grow each box by this many cells on every side (then clip to the image).
        min_coverage: a token is kept when a single box covers MORE than this fraction of
            its cell (``0.0``: any positive overlap; touching an edge is not overlap).
            Coverage is per box, not of the union of boxes.
        empty: an image whose boxes select no token at all (no boxes, only invalid boxes,
            boxes outside the image or too small for ``min_coverage``) keeps all its tokens
            (``"keep_all"``, the safe fallback for training) or none (``"drop_all"``).
        invalid_boxes: ``"ignore"`` (default): boxes with a non-finite coordinate, or with
            ``x2 <= x1`` or ``y2 <= y1``, are skipped; ``"raise"``: they raise ``ValueError``
            naming the first one (reads ``boxes`` on the host: a device sync on a GPU).
        num_tokens: the merged tokens ``image_grid_thw`` describes (sum of ``t * h * w /
            merge_size**2``), if known on the host; only needed to avoid the host sync when the
            metadata lives on a GPU (a wrong value aborts the kernel with a device-side error).

    Every temporal slice of an image uses the image's boxes.

    Returns:
        ``keep``: bool ``[total_tokens]`` in Qwen2.5-VL token order, on ``boxes``' device;
        ``kept_counts``: int32 ``[num_images]``.

    Syncs: none when ``box_offsets`` and ``image_grid_thw`` are on the CPU (as the HF processor
    returns them: the per-image table is built on the host and copied from pinned memory
    asynchronously), and none when they live on ``boxes``' GPU and ``num_tokens`` is given (a
    small kernel builds the table there and checks the values with device-side asserts).
    Otherwise (no ``num_tokens``, CPU ``boxes``, or metadata on another GPU) GPU metadata is
    copied to the host once (one sync).
    """
    op = "box_to_patch_mask"
    _need_tensor(boxes, op, "boxes")
    _need_tensor(box_offsets, op, "box_offsets")
    _need_tensor(image_grid_thw, op, "image_grid_thw")
    _choice(coords, ("normalized", "pixel"), op, "coords")
    _choice(empty, ("keep_all", "drop_all"), op, "empty")
    _choice(invalid_boxes, ("ignore", "raise"), op, "invalid_boxes")
    if not isinstance(merge_size, int) or merge_size < 1:
        raise ValueError(f"tsparse.{op}: `merge_size` must be a positive int, got {merge_size!r}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"tsparse.{op}: `patch_size` must be a positive int, got {patch_size!r}")
    if image_grid_thw.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tsparse.{op}: `image_grid_thw` must be int32 or int64, got {image_grid_thw.dtype}")
    if box_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tsparse.{op}: `box_offsets` must be int32 or int64, got {box_offsets.dtype}")
    if num_tokens is not None and (not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 0):
        raise ValueError(f"tsparse.{op}: `num_tokens` must be a non-negative int or None, got {num_tokens!r}")
    # The device plan needs every GPU-resident piece of metadata on `boxes`' device (the op runs
    # there); CPU boxes or metadata on another GPU take the host path, as without `num_tokens`.
    meta_on_gpu = [t for t in (image_grid_thw, box_offsets) if t.device.type != "cpu"]
    if num_tokens is not None and meta_on_gpu and all(t.device == boxes.device for t in meta_on_gpu):
        grid, offsets = image_grid_thw, box_offsets  # planned and checked on the device: no sync
    else:
        grid, offsets = _host_metadata(image_grid_thw, box_offsets)
        if num_tokens is None:
            num_tokens = 0
            if grid.dim() == 2 and grid.shape[1] == 3:
                num_tokens = sum(t * (h // merge_size) * (w // merge_size) for t, h, w in grid.tolist())
        # a given `num_tokens` is checked by the op, after the grid rows it is computed from
    if invalid_boxes == "raise":
        _raise_on_invalid_boxes(boxes, op)
    return _ops.box_to_patch_mask(
        boxes, offsets, grid, num_tokens, coords == "pixel", patch_size, merge_size,
        float(margin), float(min_coverage), empty == "keep_all",
    )


def _raise_on_invalid_boxes(boxes: Tensor, op: str) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or boxes.numel() == 0:
        return  # shape errors are reported by the op itself
    b = boxes.detach().to(torch.float64)
    bad = ~(torch.isfinite(b).all(dim=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"tsparse.{op}: `boxes[{i}]` = {b[i].tolist()} is invalid (non-finite, or x2 <= x1 "
            "or y2 <= y1); pass invalid_boxes='ignore' to skip such boxes"
        )


@annotate("gather_tokens")
def gather_tokens(x: Tensor, index: Tensor, *, unique_index: bool = True) -> Tensor:
    """Rows of ``x`` picked by ``index``: ``y = x[index]``.

    Args:
        x: ``[N, D]`` float32 / float16 / bfloat16 / float64, any ``D``; rows may be strided
            (a non-contiguous inner dimension is copied once).
        index: int32 or int64 ``[M]``, values in ``[0, N)``; on ``x``'s device.
        unique_index: promise that ``index`` has no duplicates. Then the backward is ONE
            kernel that writes every row of the dense ``[N, D]`` gradient (the copied
            gradient row or zeros); the forward records the inverse map (N int32) for it
            and a duplicate is an error. ``False``: duplicates are allowed and their
            gradients accumulate (deterministically, in fp32, in index order).

    Returns ``[M, D]``, same dtype and device as ``x``. No host sync.
    """
    op = "gather_tokens"
    _need_tensor(x, op, "x")
    _need_tensor(index, op, "index")
    build = bool(
        unique_index
        and x.requires_grad
        and torch.is_grad_enabled()
        and index.dim() == 1
        and index.shape[0] <= _INT32_MAX
    )
    return _ops.gather_rows(x, index, build)[0]


@annotate("scatter_tokens")
def scatter_tokens(
    src: Tensor, index: Tensor, num_rows: int, *, fill: Optional[Tensor] = None
) -> Tensor:
    """The inverse of :func:`gather_tokens`: ``out[index] = src``, other rows from ``fill``.

    Args:
        src: ``[M, D]`` float32 / float16 / bfloat16 / float64.
        index: int32 or int64 ``[M]``, unique values in ``[0, num_rows)``.
        num_rows: rows of the output.
        fill: optional ``[num_rows, D]`` tensor (same dtype/device as ``src``) supplying
            the rows not in ``index``; zeros when omitted.

    Returns ``[num_rows, D]``. One kernel writes every output row once (no memset + scatter).
    Differentiable in ``src`` and ``fill``. A duplicate index is an error. No host sync.
    """
    op = "scatter_tokens"
    _need_tensor(src, op, "src")
    _need_tensor(index, op, "index")
    if fill is not None:
        _need_tensor(fill, op, "fill")
    if not isinstance(num_rows, int):
        raise TypeError(f"tsparse.{op}: `num_rows` must be an int, got {type(num_rows).__name__}")
    return _ops.scatter_rows(src, index, num_rows, fill)[0]


def _kept_counts(keep: Tensor, token_offsets: Sequence[int]) -> list[int]:
    """Per-image number of kept tokens, read on the host (ONE device->host copy on a GPU)."""
    if len(token_offsets) <= 1:
        return []
    csum = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep.to(torch.int64), 0, out=csum[1:])
    bounds = torch.tensor(token_offsets, dtype=torch.int64).to(keep.device, non_blocking=True)
    return (csum[bounds[1:]] - csum[bounds[:-1]]).tolist()


@annotate("fuse_tokens")
def fuse_tokens(
    x: Tensor,
    keep: Tensor,
    token_offsets: Union[Tensor, Sequence[int]],
    *,
    kept_counts: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Tensor]:
    """Token fusion: merge every dropped token into its most similar kept token.

    Per image (``token_offsets``, CSR over rows of ``x``), each dropped token
    (``keep == False``) is merged into the kept token of the same image with the highest
    cosine similarity (ties: the lowest index; eps 1e-8 on the norms). Each output row is
    the mean of one kept token and the tokens merged into it.

    Args:
        x: ``[N, D]`` float32 / float16 / bfloat16 / float64.
        keep: bool ``[N]`` on ``x``'s device.
        token_offsets: ``[num_images + 1]`` ints (a list, or an int tensor read on the host).
        kept_counts: optional per-image kept counts, if the caller already has them on the
            host (e.g. from :func:`box_to_patch_mask`); saves the one device->host copy.

    Returns:
        ``y``: ``[K, D]`` (K = number of kept tokens), the fused kept rows in their original
        order; ``assign``: int64 ``[N]``, each input row's output row (``-1`` only for the
        tokens of an image with no kept token, which are dropped).

    Differentiable in ``x`` (the assignment is not): the backward is one kernel.
    Syncs: the output size K needs the per-image kept counts on the host - one
    device->host copy when ``keep`` is on a GPU and ``kept_counts`` is not given.
    Similarities are computed in fp32 (fp64 for fp64 inputs) by a batched matmul over the
    images, in chunks of bounded memory.
    """
    op = "fuse_tokens"
    _need_tensor(x, op, "x")
    _need_tensor(keep, op, "keep")
    if isinstance(token_offsets, Tensor):
        (t,) = _host_metadata(token_offsets)
        offsets = [int(v) for v in t.reshape(-1).tolist()]
    else:
        offsets = [int(v) for v in token_offsets]
    if keep.dtype != torch.bool:
        raise TypeError(f"tsparse.{op}: `keep` must be bool, got {keep.dtype}")
    if keep.dim() != 1 or x.dim() != 2 or keep.shape[0] != x.shape[0]:
        raise ValueError(
            f"tsparse.{op}: `keep` must have shape [N] with N = x.shape[0]; got keep "
            f"{tuple(keep.shape)} and x {tuple(x.shape)}"
        )
    if not offsets or offsets[0] != 0 or offsets[-1] != x.shape[0] or any(
        b < a for a, b in zip(offsets, offsets[1:])
    ):
        raise ValueError(
            f"tsparse.{op}: `token_offsets` must be non-decreasing from 0 to N = {x.shape[0]}, "
            f"got {offsets[:4]}{'...' if len(offsets) > 4 else ''}"
        )
    if keep.device != x.device:
        raise ValueError(f"tsparse.{op}: `keep` is on {keep.device} but `x` is on {x.device}")
    counts = list(kept_counts) if kept_counts is not None else _kept_counts(keep, offsets)
    y, assign, _ = _ops.fuse_tokens(x, keep, offsets, [int(c) for c in counts])
    return y, assign


class SelectedTokens(NamedTuple):
    """What :func:`select_visual_tokens` returns."""

    embeds: Tensor  #: ``[K, D]`` kept (fused or gathered) visual-token embeddings
    index: Tensor  #: int64 ``[K]``: row of each kept token in the input embeddings
    counts: Tensor  #: int32 ``[num_images]``: kept tokens per image (on the input's device)
    offsets: Tensor  #: int64 ``[num_images + 1]``: CSR offsets of each image's rows in ``embeds``
    keep: Tensor  #: bool ``[N]``: the token mask
    assign: Optional[Tensor]  #: int64 ``[N]`` output row of each input token (fusion only)


@annotate("select_visual_tokens")
def select_visual_tokens(
    image_embeds: Tensor,
    boxes: Tensor,
    box_offsets: Tensor,
    image_grid_thw: Tensor,
    *,
    fuse: bool = True,
    **mask_options,
) -> SelectedTokens:
    """From evidence boxes to the sparse visual tokens: mask, then fusion or plain gather.

    Args:
        image_embeds: ``[N, D]`` the visual features in Qwen2.5-VL order (the merger's output).
        boxes, box_offsets, image_grid_thw, **mask_options: as :func:`box_to_patch_mask`
            (``coords``, ``patch_size``, ``merge_size``, ``margin``, ``min_coverage``,
            ``empty``, ``invalid_boxes``).
        fuse: ``True``: dropped tokens are merged into kept ones (:func:`fuse_tokens`);
            ``False``: kept tokens are gathered unchanged (:func:`gather_tokens`).

    Returns a :class:`SelectedTokens`. Differentiable in ``image_embeds``.

    Syncs: exactly one device->host copy - the per-image kept counts that size the output -
    when ``box_offsets`` and ``image_grid_thw`` are on the CPU (as the HF processor returns
    them); if they live on the GPU they add one more copy.
    """
    op = "select_visual_tokens"
    _need_tensor(image_embeds, op, "image_embeds")
    _need_tensor(image_grid_thw, op, "image_grid_thw")
    _need_tensor(box_offsets, op, "box_offsets")
    merge_size = mask_options.get("merge_size", 2)
    grid, offs = _host_metadata(image_grid_thw, box_offsets)
    with nvtx_range("select_visual_tokens/mask"):
        boxes = _need_tensor(boxes, op, "boxes").to(image_embeds.device, non_blocking=True)
        keep, kept_counts = box_to_patch_mask(boxes, offs, grid, **mask_options)
    if image_embeds.dim() != 2 or image_embeds.shape[0] != keep.shape[0]:
        raise ValueError(
            f"tsparse.{op}: `image_embeds` must have shape [N, D] with N = {keep.shape[0]} "
            f"(the merged tokens described by `image_grid_thw`), got {tuple(image_embeds.shape)}"
        )
    token_offsets = token_offsets_from_grid(grid, merge_size)
    counts = kept_counts.tolist()  # the one sync: sizes the output
    total = sum(counts)
    kept_index = torch.nonzero_static(keep, size=total).reshape(-1)
    assign = None
    if fuse:
        with nvtx_range("select_visual_tokens/fuse"):
            embeds, assign = fuse_tokens(image_embeds, keep, token_offsets, kept_counts=counts)
    else:
        with nvtx_range("select_visual_tokens/gather"):
            embeds = gather_tokens(image_embeds, kept_index)
    out_offsets = [0]
    for c in counts:
        out_offsets.append(out_offsets[-1] + c)
    offsets_t = torch.tensor(out_offsets, dtype=torch.int64).to(image_embeds.device, non_blocking=True)
    return SelectedTokens(embeds, kept_index, kept_counts, offsets_t, keep, assign)
