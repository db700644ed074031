"""Visual-token ops: from predicted evidence boxes to a sparse set of visual tokens.

* :func:`box_to_patch_mask` - which merged visual tokens lie inside the boxes.
* :func:`gather_tokens` / :func:`scatter_tokens` - move token rows (differentiable).
* :func:`fuse_tokens` - the paper's token fusion: merge every dropped token into its most
  similar kept token of the same image (or, with ``coords``, into the nearest one).
* :func:`summary_tokens` - the alternative that leaves every kept token unmixed: the dropped
  tokens of each image pooled into ONE extra summary token of that image.
* :func:`fuse_visual_tokens` - one of the named fusion methods (:data:`FUSION_METHODS`) on a
  token mask.
* :func:`select_visual_tokens` - the composition users call.

Fusion methods (what happens to the tokens a selection drops; ``fuse=`` of the functions
below, ``pruning.fuse`` of ``configs/dualstream.yaml``):

* ``"none"`` - dropped tokens are removed; the kept ones are gathered unchanged.
* ``"cosine_mean"`` - each dropped token is merged into the most cosine-similar kept token of
  its image; each kept row becomes the mean of itself and its members (:func:`fuse_tokens`).
* ``"nearest_kept"`` - the same mean, but each dropped token joins the spatially NEAREST kept
  token of its image (squared distance between (t, row, col) cells; ties: the lowest index):
  the interior of a box stays unmixed, its border absorbs the surroundings.
* ``"summary"`` - every kept token stays exactly as it was; the dropped tokens of each image
  are averaged into one extra token that takes the place (sequence column and ORIGINAL M-RoPE
  position) of the image's dropped token nearest to the image centre (ties: the lowest index),
  so it is a real (t, row, col) cell of that image's Qwen2.5-VL layout. An image with nothing
  dropped (or nothing kept) gets none. The summary token counts as a kept token (it occupies a
  sequence position): kept counts grow by one per pruned image.

``True`` / ``False`` are accepted everywhere for ``"cosine_mean"`` / ``"none"`` (the meaning
the boolean ``fuse`` always had).

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
from . import _checks
from . import _rows  # noqa: F401  (fake kernels and autograd of the internal row ops)
from .._nvtx import annotate, nvtx_range

__all__ = [
    "FUSION_METHODS",
    "fusion_method",
    "box_to_patch_mask",
    "gather_tokens",
    "scatter_tokens",
    "fuse_tokens",
    "summary_tokens",
    "token_coords",
    "fuse_visual_tokens",
    "select_visual_tokens",
    "SelectedTokens",
    "token_offsets_from_grid",
]

#: The named fusion methods (module docs): what happens to the visual tokens a selection drops.
FUSION_METHODS = ("none", "cosine_mean", "nearest_kept", "summary")


def fusion_method(value, where: str = "fuse", op: Optional[str] = None) -> str:
    """A fusion method's name: one of :data:`FUSION_METHODS`, or the boolean the option used
    to be (``True`` -> ``"cosine_mean"``, ``False`` -> ``"none"``). ``ValueError`` naming
    ``where`` (and the op ``op``, when given) otherwise."""
    if value is True:
        return "cosine_mean"
    if value is False:
        return "none"
    if isinstance(value, str) and value in FUSION_METHODS:
        return value
    prefix = f"tsparse.{op}: " if op else ""
    raise ValueError(
        f"{prefix}`{where}` must be one of {list(FUSION_METHODS)} (or true = cosine_mean, false = none), got "
        f"{value!r}"
    )

_ops = torch.ops.tsparse
_INT32_MAX = 2**31 - 1
_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: keyword options of box_to_patch_mask that select_visual_tokens passes through
_MASK_OPTIONS = ("coords", "patch_size", "merge_size", "margin", "min_coverage", "empty", "invalid_boxes")


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


def _host_metadata(op: str, **named: Tensor) -> list[Tensor]:
    """Moves small integer metadata to the CPU as int64, with ONE device->host copy in total
    when any of it lives on a GPU (that copy waits for the device). Meta tensors have no values
    to read: refused, naming the argument."""
    for arg, t in named.items():
        _checks.not_meta(t, op, arg, "its values are read on the host")
    tensors = list(named.values())
    if all(t.device.type == "cpu" for t in tensors):
        return [t.to(torch.int64) for t in tensors]
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors]).cpu()
    out, pos = [], 0
    for t in tensors:
        out.append(flat[pos : pos + t.numel()].reshape(t.shape))
        pos += t.numel()
    return out


def _to_device_owned(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without a host sync and without reading the caller's memory after the
    call returns. A host->GPU ``non_blocking`` copy from PINNED memory is a DMA that may run
    after the op returned, so a caller writing to its (pinned) tensor right after the call
    would change the result: the values are first copied into a fresh pinned buffer the op owns
    (the caching host allocator keeps it alive until the copy is done), as the CUDA
    ``box_to_patch_mask`` does for its metadata. A pageable tensor is staged by CUDA before the
    copy call returns; GPU->GPU copies are ordered on the stream."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda" and t.is_pinned():
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t)
        t = staged
    return t.to(device, non_blocking=True)


def _check_grid(image_grid_thw, op: str, merge_size) -> None:
    """Type and shape of ``image_grid_thw`` and ``merge_size`` (the values are checked where they
    are read)."""
    _need_tensor(image_grid_thw, op, "image_grid_thw")
    if image_grid_thw.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tsparse.{op}: `image_grid_thw` must be int32 or int64, got {image_grid_thw.dtype}")
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(
            f"tsparse.{op}: `image_grid_thw` must have shape [num_images, 3] (t, h, w), got "
            f"{tuple(image_grid_thw.shape)}"
        )
    if isinstance(merge_size, bool) or not isinstance(merge_size, int) or merge_size < 1:
        raise ValueError(f"tsparse.{op}: `merge_size` must be a positive int, got {merge_size!r}")


def token_offsets_from_grid(image_grid_thw: Tensor, merge_size: int = 2) -> list[int]:
    """CSR offsets ``[num_images + 1]`` of each image's merged tokens (host ints).

    ``image_grid_thw``: int32 / int64 ``[num_images, 3]``, every ``(t, h, w)`` positive with
    ``h`` and ``w`` multiples of ``merge_size`` (a positive int) - the checks
    :func:`box_to_patch_mask` makes. Reads ``image_grid_thw`` on the host (a device->host copy
    if it lives on a GPU; a meta tensor is refused).
    """
    return _grid_offsets(image_grid_thw, merge_size, "token_offsets_from_grid")


def _grid_offsets(image_grid_thw: Tensor, merge_size: int, op: str) -> list[int]:
    """:func:`token_offsets_from_grid`, errors naming the caller's op ``op``."""
    _check_grid(image_grid_thw, op, merge_size)
    (grid,) = _host_metadata(op, image_grid_thw=image_grid_thw)
    offsets = [0]
    m = merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"tsparse.{op}: `image_grid_thw[{i}]` = ({t}, {h}, {w}) must be positive")
        if h % m or w % m:
            raise ValueError(
                f"tsparse.{op}: `image_grid_thw[{i}]` = ({t}, {h}, {w}): h and w must be multiples of "
                f"merge_size = {m}"
            )
        offsets.append(offsets[-1] + t * (h // m) * (w // m))
    return offsets


# --------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes for torch.compile / meta tensors).
@torch.library.register_fake("tsparse::box_to_patch_mask")
def _box_to_patch_mask_fake(boxes, box_offsets, image_grid_thw, num_tokens, pixel_coords,
                            patch_size, merge_size, margin, min_coverage, keep_all_when_empty):
    op = "box_to_patch_mask"
    _checks.fake_same_device(op, "boxes", boxes)
    _checks.fake_dims(op, boxes=(boxes, 2), box_offsets=(box_offsets, 1), image_grid_thw=(image_grid_thw, 2))
    for arg, t in (("box_offsets", box_offsets), ("image_grid_thw", image_grid_thw)):
        if t is None:
            raise TypeError(f"tsparse.{op}: `{arg}` must be a tensor, got None")
        # Read on the host by the real kernels: the CPU, or `boxes`' device (copied once).
        if t.device.type != "cpu" and t.device != boxes.device:
            _checks.fake_same_device(op, "boxes", boxes, **{arg: t})
        if boxes.device.type != "meta":
            _checks.not_meta(t, op, arg, "its values are read on the host")
    keep = boxes.new_empty((num_tokens,), dtype=torch.bool)
    counts = boxes.new_empty((image_grid_thw.shape[0],), dtype=torch.int32)
    return keep, counts


@torch.library.register_fake("tsparse::gather_rows")
def _gather_rows_fake(x, index, build_inverse):
    _checks.fake_same_device("gather_tokens", "x", x, index=index)
    _checks.fake_dims("gather_tokens", x=(x, 2), index=(index, 1))
    out = x.new_empty((index.shape[0], x.shape[1]))
    inverse = x.new_empty((x.shape[0] if build_inverse else 0,), dtype=torch.int32)
    return out, inverse


@torch.library.register_fake("tsparse::scatter_rows")
def _scatter_rows_fake(src, index, num_rows, fill):
    _checks.fake_same_device("scatter_tokens", "src", src, ("fill",), index=index, fill=fill)
    _checks.fake_dims("scatter_tokens", src=(src, 2), index=(index, 1))
    if isinstance(num_rows, int) and num_rows < 0:
        raise ValueError(f"tsparse.scatter_tokens: `num_rows` must be >= 0, got {num_rows}")
    if isinstance(num_rows, int) and isinstance(src.shape[1], int) and \
            num_rows > (2**63 - 1) // (src.shape[1] * src.element_size() + 4):  # as csrc/common/row_args.h
        raise ValueError(
            f"tsparse.scatter_tokens: `num_rows` = {num_rows} is too large: the [num_rows, {src.shape[1]}] output and "
            "its int32 row map would need more than 2^63 bytes"
        )
    out = src.new_empty((num_rows, src.shape[1]))
    inverse = src.new_empty((num_rows,), dtype=torch.int32)
    return out, inverse


@torch.library.register_fake("tsparse::fuse_tokens")
def _fuse_tokens_fake(x, keep, token_offsets, kept_counts):
    return _fused_rows_fake("fuse_tokens", x, keep, kept_counts)


def _fused_rows_fake(op, x, keep, kept_counts):
    _checks.fake_same_device(op, "x", x, keep=keep)
    _checks.fake_dims(op, x=(x, 2), keep=(keep, 1))
    if all(isinstance(c, int) for c in kept_counts) and any(c < 0 for c in kept_counts):  # (not SymInts)
        raise ValueError(f"tsparse.{op}: `kept_counts` must be >= 0, got {list(kept_counts)[:4]}")
    k = sum(kept_counts)
    return (
        x.new_empty((k, x.shape[1])),
        x.new_empty((x.shape[0],), dtype=torch.int64),
        x.new_empty((k,), dtype=torch.float32),
    )


@torch.library.register_fake("tsparse::fuse_tokens_nearest")
def _fuse_tokens_nearest_fake(x, keep, coords, token_offsets, kept_counts):
    _checks.fake_same_device("fuse_tokens_nearest", "x", x, coords=coords)
    _checks.fake_dims("fuse_tokens_nearest", coords=(coords, 2))
    return _fused_rows_fake("fuse_tokens_nearest", x, keep, kept_counts)


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


def _fuse_nearest_backward(ctx, grad_y, _grad_assign, _grad_inv_count):
    grad_x = _fuse_backward(ctx, grad_y, None, None)[0]
    return grad_x, None, None, None, None


torch.library.register_autograd("tsparse::fuse_tokens_nearest", _fuse_nearest_backward, setup_context=_fuse_setup)


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
    for name, v in (("merge_size", merge_size), ("patch_size", patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"tsparse.{op}: `{name}` must be a positive int, got {v!r}")
    margin = _checks.number(margin, op, "margin")
    min_coverage = _checks.number(min_coverage, op, "min_coverage")
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
        grid, offsets = _host_metadata(op, image_grid_thw=image_grid_thw, box_offsets=box_offsets)
        if num_tokens is None:
            num_tokens = 0
            if grid.dim() == 2 and grid.shape[1] == 3:
                num_tokens = sum(t * (h // merge_size) * (w // merge_size) for t, h, w in grid.tolist())
        # a given `num_tokens` is checked by the op, after the grid rows it is computed from
    if invalid_boxes == "raise":
        _checks.not_meta(boxes, op, "boxes", "invalid_boxes='raise' reads the boxes on the host")
        _raise_on_invalid_boxes(boxes, op)
    return _ops.box_to_patch_mask(
        boxes, offsets, grid, num_tokens, coords == "pixel", patch_size, merge_size,
        margin, min_coverage, empty == "keep_all",
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
    if isinstance(num_rows, bool) or not isinstance(num_rows, int):
        raise TypeError(f"tsparse.{op}: `num_rows` must be an int, got {type(num_rows).__name__}")
    if not 0 <= num_rows < 2**63:
        raise ValueError(f"tsparse.{op}: `num_rows` must be in [0, 2^63), got {num_rows}")
    return _ops.scatter_rows(src, index, num_rows, fill)[0]


def _int_list(values, op: str, arg: str) -> list[int]:
    """A sequence of Python ints (or a 1-D int tensor, read on the host) as a list of ints;
    floats, bools and strings are refused instead of truncated."""
    if isinstance(values, Tensor):
        if values.dtype not in (torch.int32, torch.int64) or values.dim() != 1:
            raise TypeError(f"tsparse.{op}: `{arg}` must be a 1-D int32/int64 tensor or a list of ints, got "
                            f"{values.dtype} {tuple(values.shape)}")
        (t,) = _host_metadata(op, **{arg: values})
        return [int(v) for v in t.tolist()]
    try:
        items = list(values)
    except TypeError:
        raise TypeError(f"tsparse.{op}: `{arg}` must be a list of ints, got {type(values).__name__}") from None
    out = []
    for v in items:
        if isinstance(v, bool) or isinstance(v, (float, str)) or not hasattr(v, "__index__"):
            raise TypeError(f"tsparse.{op}: `{arg}` must hold ints, got {type(v).__name__} {v!r}")
        try:
            out.append(int(v.__index__()))
        except (TypeError, ValueError, RuntimeError):  # e.g. a float or multi-element tensor
            raise TypeError(f"tsparse.{op}: `{arg}` must hold ints, got {type(v).__name__} {v!r}") from None
    return out


def _kept_counts(keep: Tensor, token_offsets: Sequence[int]) -> list[int]:
    """Per-image number of kept tokens, read on the host (ONE device->host copy on a GPU)."""
    if len(token_offsets) <= 1:
        return []
    csum = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep.to(torch.int64), 0, out=csum[1:])
    bounds = torch.tensor(token_offsets, dtype=torch.int64).to(keep.device, non_blocking=True)
    return (csum[bounds[1:]] - csum[bounds[:-1]]).tolist()


def _offsets_list(token_offsets, op: str, n: int) -> list[int]:
    offsets = _int_list(token_offsets, op, "token_offsets")
    if not offsets or offsets[0] != 0 or offsets[-1] != n or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(
            f"tsparse.{op}: `token_offsets` must be non-decreasing from 0 to N = {n}, "
            f"got {offsets[:4]}{'...' if len(offsets) > 4 else ''}"
        )
    return offsets


def _check_keep(x: Tensor, keep: Tensor, op: str, x_arg: str = "x") -> None:
    if keep.dtype != torch.bool:
        raise TypeError(f"tsparse.{op}: `keep` must be bool, got {keep.dtype}")
    if keep.dim() != 1 or x.dim() != 2 or keep.shape[0] != x.shape[0]:
        raise ValueError(
            f"tsparse.{op}: `keep` must have shape [N] with N = {x_arg}.shape[0]; got keep "
            f"{tuple(keep.shape)} and {x_arg} {tuple(x.shape)}"
        )
    if keep.device != x.device:
        raise ValueError(f"tsparse.{op}: `keep` is on {keep.device} but `{x_arg}` is on {x.device}")


def _check_rows_keep(x, keep, op: str, x_arg: str) -> None:
    """``x`` a floating ``[N, D]`` tensor with data, ``keep`` its bool ``[N]`` mask (the
    composites below index on the host: meta tensors are refused)."""
    _need_tensor(x, op, x_arg)
    _need_tensor(keep, op, "keep")
    if x.dtype not in _ROW_DTYPES:
        raise TypeError(f"tsparse.{op}: `{x_arg}` must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"tsparse.{op}: `{x_arg}` must be 2-D [N, D], got {tuple(x.shape)}")
    for arg, t in ((x_arg, x), ("keep", keep)):
        _checks.not_meta(t, op, arg, "the output is sized and indexed on the host")
    _check_keep(x, keep, op, x_arg)


def _checked_kept_counts(keep: Tensor, offsets: Sequence[int], kept_counts, op: str) -> list[int]:
    """The per-image kept counts: ``kept_counts`` (a caller's, checked against ``keep``: eagerly
    on the CPU, with a device assert and no host sync on a GPU) or read from ``keep`` (one
    device->host copy on a GPU)."""
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    if kept_counts is None:
        return _kept_counts(keep, offsets)
    counts = _int_list(kept_counts, op, "kept_counts")
    if len(counts) != len(sizes) or any(not 0 <= c <= m for c, m in zip(counts, sizes)):
        raise ValueError(
            f"tsparse.{op}: `kept_counts` {counts[:4]}{'...' if len(counts) > 4 else ''} does not fit the images' "
            f"token counts {sizes[:4]}{'...' if len(sizes) > 4 else ''}"
        )
    if keep.shape[0]:
        # The caller's counts size the output: they must be the mask's own.
        csum = torch.cat([keep.new_zeros(1, dtype=torch.int64), torch.cumsum(keep.to(torch.int64), 0)])
        bounds = torch.tensor(offsets, dtype=torch.int64).to(keep.device, non_blocking=True)
        want = torch.tensor(counts, dtype=torch.int64).to(keep.device, non_blocking=True)
        _checks.check_on_device(((csum[bounds[1:]] - csum[bounds[:-1]]) == want).all(), op,
                                "`kept_counts` does not match the number of kept tokens of `keep` in each image")
    return counts


@annotate("fuse_tokens")
def fuse_tokens(
    x: Tensor,
    keep: Tensor,
    token_offsets: Union[Tensor, Sequence[int]],
    *,
    kept_counts: Optional[Sequence[int]] = None,
    coords: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Token fusion: merge every dropped token into its most similar (or nearest) kept token.

    Per image (``token_offsets``, CSR over rows of ``x``), each dropped token
    (``keep == False``) is merged into the kept token of the same image with the highest
    cosine similarity (ties: the lowest index; eps 1e-8 on the norms) - or, when ``coords``
    is given, into the kept token NEAREST in those coordinates (squared Euclidean distance;
    ties: the lowest index; the ``"nearest_kept"`` fusion method with :func:`token_coords`).
    Each output row is the mean of one kept token and the tokens merged into it.

    Args:
        x: ``[N, D]`` float32 / float16 / bfloat16 / float64.
        keep: bool ``[N]`` on ``x``'s device.
        token_offsets: ``[num_images + 1]`` ints (a list, or an int tensor read on the host).
        kept_counts: optional per-image kept counts, if the caller already has them on the
            host (e.g. from :func:`box_to_patch_mask`); saves the one device->host copy.
        coords: optional float64 ``[N, C]`` on ``x``'s device: each token's coordinates
            (e.g. its (t, row, col) cell). Distances are exact for integer coordinates below
            2^25, so ties are exact.

    Returns:
        ``y``: ``[K, D]`` (K = number of kept tokens), the fused kept rows in their original
        order; ``assign``: int64 ``[N]``, each input row's output row (``-1`` only for the
        tokens of an image with no kept token, which are dropped).

    Differentiable in ``x`` (the assignment is not): the backward is one kernel.
    Syncs: the output size K needs the per-image kept counts on the host - one
    device->host copy when ``keep`` is on a GPU and ``kept_counts`` is not given.
    Similarities are computed in fp32 (fp64 for fp64 inputs; distances in fp64) by a batched
    matmul over the images, in chunks of bounded memory.
    """
    op = "fuse_tokens"
    _need_tensor(x, op, "x")
    _need_tensor(keep, op, "keep")
    _check_keep(x, keep, op)
    offsets = _offsets_list(token_offsets, op, x.shape[0])
    if kept_counts is not None:
        counts = _int_list(kept_counts, op, "kept_counts")
    else:
        _checks.not_meta(keep, op, "keep", "the kept counts that size the output are read on the host; pass "
                         "`kept_counts`")
        counts = _kept_counts(keep, offsets)
    if coords is None:
        y, assign, _ = _ops.fuse_tokens(x, keep, offsets, counts)
    else:
        _need_tensor(coords, op, "coords")
        with _checks.renamed_errors(op, ("fuse_tokens_nearest",), {}):
            y, assign, _ = _ops.fuse_tokens_nearest(x, keep, coords, offsets, counts)
    return y, assign


def token_coords(
    image_grid_thw: Tensor, merge_size: int = 2, device: Union[str, torch.device, None] = None
) -> Tensor:
    """float64 ``[N, 3]``: the ``(t, row, col)`` cell of every merged visual token, Qwen2.5-VL
    order (images concatenated), on ``device`` (one host->device copy) - the ``coords`` of
    :func:`fuse_tokens` for the ``"nearest_kept"`` fusion method. ``image_grid_thw`` is checked
    as in :func:`token_offsets_from_grid`."""
    op = "token_coords"
    _check_grid(image_grid_thw, op, merge_size)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"tsparse.{op}: `device` must be a torch.device or a device string, got {device!r}") from None
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"tsparse.{op}: `device` is {device} but no such CUDA device is usable here")
    (grid,) = _host_metadata(op, image_grid_thw=image_grid_thw)
    _grid_offsets(grid, merge_size, op)  # positive (t, h, w), h and w multiples of merge_size
    parts = []
    for t, h, w in grid.tolist():
        hh, ww = h // merge_size, w // merge_size
        k = torch.arange(t * hh * ww, dtype=torch.int64)
        parts.append(torch.stack([k // (hh * ww), (k // ww) % hh, k % ww], dim=1))
    out = torch.cat(parts).to(torch.float64) if parts else torch.zeros(0, 3, dtype=torch.float64)
    return out.to(device, non_blocking=True) if device is not None else out


def _segment_mean_by_assign(x: Tensor, assign: Tensor, num_out: int) -> Tensor:
    """``y[r]`` = mean of the rows of ``x`` with ``assign == r`` (rows with ``-1`` are dropped),
    in row order: a stable sort of ``assign`` and one ``segment_reduce_rows`` (differentiable,
    deterministic). Every output row must have a member."""
    keys, perm = torch.sort(assign, stable=True)
    offsets = torch.searchsorted(keys, torch.arange(num_out + 1, dtype=torch.int64, device=assign.device))
    return _ops.segment_reduce_rows(x, perm, offsets, True)


@annotate("summary_tokens")
def summary_tokens(
    x: Tensor,
    keep: Tensor,
    image_grid_thw: Tensor,
    *,
    kept_counts: Optional[Sequence[int]] = None,
    merge_size: int = 2,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``"summary"`` fusion method: every kept token unchanged, plus ONE summary token per
    image holding the mean of that image's dropped tokens.

    The summary token takes the place of the image's dropped token nearest to the image
    centre (cell ``((T-1)/2, (H-1)/2, (W-1)/2)`` in (t, row, col), squared distance; ties: the
    lowest index): in a pruned sequence it sits at that token's column with that token's
    ORIGINAL M-RoPE position - a real cell of the image's Qwen2.5-VL layout, never one a kept
    token uses. Images with no dropped or no kept token get no summary token.

    Args:
        x: ``[N, D]`` float32 / float16 / bfloat16 / float64 (Qwen2.5-VL token order).
        keep: bool ``[N]`` on ``x``'s device.
        image_grid_thw: int ``[num_images, 3]`` (read on the host).
        kept_counts: optional per-image kept counts on the host (saves the one device->host copy).
        merge_size: the vision merger's spatial merge (2 for Qwen2.5-VL).

    Returns ``(y [K', D], assign int64 [N], keep_out bool [N], is_summary bool [K'])``:
    ``keep_out`` is ``keep`` plus the summary slots, ``y`` its rows in order (kept rows equal
    to ``x``'s, summary rows the mean of their image's dropped rows), ``assign`` each input
    row's output row (-1: dropped with its image), ``is_summary`` marks the summary rows.
    Differentiable in ``x`` (a deterministic segment mean). Syncs: none when
    ``kept_counts`` is given and ``image_grid_thw`` is on the CPU, else one copy.
    """
    op = "summary_tokens"
    _check_rows_keep(x, keep, op, "x")
    _check_grid(image_grid_thw, op, merge_size)
    (grid,) = _host_metadata(op, image_grid_thw=image_grid_thw)
    offsets = _grid_offsets(grid, merge_size, op)
    if offsets[-1] != x.shape[0]:
        raise ValueError(f"tsparse.{op}: `x` has {x.shape[0]} rows but `image_grid_thw` describes {offsets[-1]} tokens")
    counts = _checked_kept_counts(keep, offsets, kept_counts, op)
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    n, dev = x.shape[0], x.device
    with_slot = [i for i, (c, m) in enumerate(zip(counts, sizes)) if 0 < c < m]
    if not with_slot:
        idx = torch.nonzero_static(keep, size=sum(counts)).reshape(-1)
        assign = torch.full((n,), -1, dtype=torch.int64, device=dev)
        assign[idx] = torch.arange(idx.shape[0], dtype=torch.int64, device=dev)
        y = gather_tokens(x, idx)
        return y, assign, keep.clone(), torch.zeros(y.shape[0], dtype=torch.bool, device=dev)
    # Doubled, centred integer coordinates: squared distance to the centre without fractions.
    centred = []
    for t, h, w in grid.tolist():
        hh, ww = h // merge_size, w // merge_size
        k = torch.arange(t * hh * ww, dtype=torch.int64)
        c = torch.stack([k // (hh * ww), (k // ww) % hh, k % ww], dim=1) * 2
        centred.append(c - torch.tensor([t - 1, hh - 1, ww - 1], dtype=torch.int64))
    dist = torch.cat(centred).square().sum(1).to(dev, non_blocking=True)
    image_of = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64),
                                       output_size=n).to(dev, non_blocking=True)
    big = torch.iinfo(torch.int64).max
    rows = torch.arange(n, dtype=torch.int64, device=dev)
    key = torch.where(keep, torch.full_like(dist, big), dist * n + rows)  # unique per row: ties -> lowest index
    best = torch.full((len(sizes),), big, dtype=torch.int64, device=dev).scatter_reduce(0, image_of, key, "amin")
    slot_img = torch.tensor(with_slot, dtype=torch.int64).to(dev, non_blocking=True)
    slots = best.index_select(0, slot_img) % n
    keep_out = keep.clone()
    keep_out[slots] = True
    rank = torch.cumsum(keep_out.to(torch.int64), 0) - 1
    slot_rank = torch.full((len(sizes),), -1, dtype=torch.int64, device=dev)
    slot_rank[slot_img] = rank.index_select(0, slots)
    assign = torch.where(keep_out, rank, slot_rank.index_select(0, image_of))
    k_out = sum(counts) + len(with_slot)
    y = _segment_mean_by_assign(x, assign, k_out)
    is_summary = torch.zeros(k_out, dtype=torch.bool, device=dev)
    is_summary[slot_rank.index_select(0, slot_img)] = True
    return y, assign, keep_out, is_summary


class SelectedTokens(NamedTuple):
    """What :func:`select_visual_tokens` and :func:`fuse_visual_tokens` return."""

    embeds: Tensor  #: ``[K, D]`` kept (fused or gathered) visual-token embeddings
    index: Tensor  #: int64 ``[K]``: row of each kept token in the input embeddings
    counts: Tensor  #: int32 ``[num_images]``: kept tokens per image (on the input's device)
    offsets: Tensor  #: int64 ``[num_images + 1]``: CSR offsets of each image's rows in ``embeds``
    keep: Tensor  #: bool ``[N]``: the token mask (with ``"summary"``: the summary slots included)
    assign: Optional[Tensor]  #: int64 ``[N]`` output row of each input token (any fusion; ``None`` for ``"none"``)
    summary: Optional[Tensor] = None  #: bool ``[K]``: the summary rows (``"summary"`` only)


@annotate("fuse_visual_tokens")
def fuse_visual_tokens(
    image_embeds: Tensor,
    keep: Tensor,
    image_grid_thw: Tensor,
    *,
    fuse: Union[bool, str] = "cosine_mean",
    kept_counts: Optional[Sequence[int]] = None,
    merge_size: int = 2,
) -> SelectedTokens:
    """Applies a named fusion method (:data:`FUSION_METHODS`, module docs) to a token mask.

    Args:
        image_embeds: ``[N, D]`` visual features in Qwen2.5-VL order.
        keep: bool ``[N]`` the tokens a selection keeps (boxes, or any baseline's choice).
        image_grid_thw: int ``[num_images, 3]`` (read on the host).
        fuse: ``"none"``, ``"cosine_mean"``, ``"nearest_kept"``, ``"summary"`` (or ``True`` /
            ``False`` for ``"cosine_mean"`` / ``"none"``).
        kept_counts: per-image kept counts of ``keep`` on the host, if known (saves the one
            device->host copy that sizes the output).
        merge_size: the vision merger's spatial merge.

    Returns a :class:`SelectedTokens` (with ``"summary"``, ``keep``/``index``/``counts`` include
    the summary slots). Differentiable in ``image_embeds``.
    """
    op = "fuse_visual_tokens"
    method = fusion_method(fuse, "fuse", op)
    _check_rows_keep(image_embeds, keep, op, "image_embeds")
    _check_grid(image_grid_thw, op, merge_size)
    (grid,) = _host_metadata(op, image_grid_thw=image_grid_thw)
    token_offsets = _grid_offsets(grid, merge_size, op)
    if image_embeds.shape[0] != token_offsets[-1]:
        raise ValueError(
            f"tsparse.{op}: `image_embeds` must have shape [N, D] with N = {token_offsets[-1]} "
            f"(the merged tokens described by `image_grid_thw`), got {tuple(image_embeds.shape)}"
        )
    counts = _checked_kept_counts(keep, token_offsets, kept_counts, op)
    return _fuse_visual(image_embeds, keep, grid, token_offsets, method, counts, merge_size)


def _fuse_visual(image_embeds: Tensor, keep: Tensor, grid: Tensor, token_offsets: list[int], method: str,
                 counts: list[int], merge_size: int) -> SelectedTokens:
    """:func:`fuse_visual_tokens` on checked arguments (``counts``: ``keep``'s own)."""
    summary = None
    assign = None
    if method == "summary":
        embeds, assign, keep, summary = summary_tokens(image_embeds, keep, grid, kept_counts=counts,
                                                       merge_size=merge_size)
        sizes = [b - a for a, b in zip(token_offsets, token_offsets[1:])]
        counts = [c + (1 if 0 < c < m else 0) for c, m in zip(counts, sizes)]
    elif method == "cosine_mean":
        embeds, assign = fuse_tokens(image_embeds, keep, token_offsets, kept_counts=counts)
    elif method == "nearest_kept":
        coords = token_coords(grid, merge_size, device=image_embeds.device)
        embeds, assign = fuse_tokens(image_embeds, keep, token_offsets, kept_counts=counts, coords=coords)
    total = sum(counts)
    kept_index = torch.nonzero_static(keep, size=total).reshape(-1)
    if method == "none":
        embeds = gather_tokens(image_embeds, kept_index)
    out_offsets = [0]
    for c in counts:
        out_offsets.append(out_offsets[-1] + c)
    offsets_t = torch.tensor(out_offsets, dtype=torch.int64).to(image_embeds.device, non_blocking=True)
    counts_t = torch.tensor(counts, dtype=torch.int32).to(image_embeds.device, non_blocking=True)
    return SelectedTokens(embeds, kept_index, counts_t, offsets_t, keep, assign, summary)


@annotate("select_visual_tokens")
def select_visual_tokens(
    image_embeds: Tensor,
    boxes: Tensor,
    box_offsets: Tensor,
    image_grid_thw: Tensor,
    *,
    fuse: Union[bool, str] = True,
    **mask_options,
) -> SelectedTokens:
    """From evidence boxes to the sparse visual tokens: mask, then a fusion method.

    Args:
        image_embeds: ``[N, D]`` the visual features in Qwen2.5-VL order (the merger's output).
        boxes, box_offsets, image_grid_thw, **mask_options: as :func:`box_to_patch_mask`
            (``coords``, ``patch_size``, ``merge_size``, ``margin``, ``min_coverage``,
            ``empty``, ``invalid_boxes``).
        fuse: the fusion method (module docs): ``"cosine_mean"`` (= ``True``, the default:
            dropped tokens merged into their most similar kept token, :func:`fuse_tokens`),
            ``"none"`` (= ``False``: kept tokens gathered unchanged, :func:`gather_tokens`),
            ``"nearest_kept"`` or ``"summary"`` (:func:`fuse_visual_tokens`).

    Returns a :class:`SelectedTokens`. Differentiable in ``image_embeds``.

    Syncs: exactly one device->host copy - the per-image kept counts that size the output -
    when ``box_offsets`` and ``image_grid_thw`` are on the CPU (as the HF processor returns
    them); if they live on the GPU they add one more copy.
    """
    op = "select_visual_tokens"
    method = fusion_method(fuse, "fuse", op)
    _need_tensor(image_embeds, op, "image_embeds")
    _need_tensor(image_grid_thw, op, "image_grid_thw")
    _need_tensor(box_offsets, op, "box_offsets")
    if image_embeds.dtype not in _ROW_DTYPES:
        raise TypeError(
            f"tsparse.{op}: `image_embeds` must be float32, float16, bfloat16 or float64, got {image_embeds.dtype}"
        )
    if image_embeds.dim() != 2:
        raise ValueError(f"tsparse.{op}: `image_embeds` must be 2-D [N, D], got {tuple(image_embeds.shape)}")
    _checks.not_meta(image_embeds, op, "image_embeds", "the kept counts that size the output are read on the host")
    unknown = sorted(set(mask_options) - set(_MASK_OPTIONS))
    if unknown:
        raise TypeError(f"tsparse.{op}: unknown mask option(s) {unknown}; allowed: {list(_MASK_OPTIONS)}")
    merge_size = mask_options.get("merge_size", 2)
    _check_grid(image_grid_thw, op, merge_size)
    if box_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tsparse.{op}: `box_offsets` must be int32 or int64, got {box_offsets.dtype}")
    grid, offs = _host_metadata(op, image_grid_thw=image_grid_thw, box_offsets=box_offsets)
    with nvtx_range("select_visual_tokens/mask"):
        _checks.not_meta(_need_tensor(boxes, op, "boxes"), op, "boxes", "the kept counts that size the output are "
                         "read on the host")
        boxes = _to_device_owned(boxes, image_embeds.device)
        keep, kept_counts = box_to_patch_mask(boxes, offs, grid, **mask_options)
    if image_embeds.dim() != 2 or image_embeds.shape[0] != keep.shape[0]:
        raise ValueError(
            f"tsparse.{op}: `image_embeds` must have shape [N, D] with N = {keep.shape[0]} "
            f"(the merged tokens described by `image_grid_thw`), got {tuple(image_embeds.shape)}"
        )
    counts = kept_counts.tolist()  # the one sync: sizes the output
    with nvtx_range(f"select_visual_tokens/{method}"):
        # the mask op's own counts: no check against the mask needed
        sel = _fuse_visual(image_embeds, keep, grid, _grid_offsets(grid, merge_size, op), method, counts,
                           merge_size)
    if method != "summary":  # the mask op's own counts tensor (no copy back to the device)
        sel = sel._replace(counts=kept_counts)
    return sel
