"""The one doorway to tsparse's ops: ``from tsparse.ops import gather_tokens``.

One module per op family:
  * :mod:`tsparse.ops.visual_tokens` - box-to-patch mask, token gather/scatter, token fusion,
    select_visual_tokens.
  * :mod:`tsparse.ops.varlen` - variable-length packing for flash attention (pack/unpack,
    position ids, pack_batch, and flash_attn.bert_padding drop-ins).
  * :mod:`tsparse.ops.grpo` - fused GRPO: log-probs from logits in one read, verl's GRPO loss
    with decoupled per-stream aggregation, fused linear (LM head) variants.

Every op is a ``torch.ops.tsparse`` op (schemas in ``csrc/ops.cpp``) with CPU and CUDA
kernels, a fake kernel for torch.compile and autograd where values flow.
"""

from . import varlen
from .varlen import Packed, PackedBatch, pack_batch, pack_position_ids, pack_varlen, unpack_varlen
from .grpo import (
    GRPOLoss,
    GRPOStreamMetrics,
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    grpo_loss,
    logprobs,
)
from .visual_tokens import (
    FUSION_METHODS,
    SelectedTokens,
    box_to_patch_mask,
    fuse_tokens,
    fuse_visual_tokens,
    fusion_method,
    summary_tokens,
    token_coords,
    gather_tokens,
    scatter_tokens,
    select_visual_tokens,
    token_offsets_from_grid,
)

__all__ = [
    "varlen",
    "Packed",
    "PackedBatch",
    "pack_batch",
    "pack_position_ids",
    "pack_varlen",
    "unpack_varlen",
    "GRPOLoss",
    "GRPOStreamMetrics",
    "fused_linear_grpo_loss",
    "fused_linear_logprobs",
    "grpo_loss",
    "logprobs",
    "FUSION_METHODS",
    "SelectedTokens",
    "box_to_patch_mask",
    "fuse_tokens",
    "fuse_visual_tokens",
    "fusion_method",
    "summary_tokens",
    "token_coords",
    "gather_tokens",
    "scatter_tokens",
    "select_visual_tokens",
    "token_offsets_from_grid",
]
