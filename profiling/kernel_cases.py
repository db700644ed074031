"""Every tsparse kernel, exercised once, for Nsight Compute and compute-sanitizer.

    python profiling/kernel_cases.py --mode ncu        # realistic shapes, warm-up first, then
                                                     # ONE call of each op between
                                                     # cudaProfilerStart/Stop (ncu
                                                     # --profile-from-start off)
    python profiling/kernel_cases.py --mode sanitize   # small shapes, forward + backward of
                                                     # every op, for memcheck / racecheck
    python profiling/kernel_cases.py --list            # the case names

Each case is a (name, function) pair; the families register theirs in CASES below. On a
machine without a GPU the script runs the same calls on the CPU (useful to check it works).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# this checkout's tsparse, not another one an environment may have installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import tsparse  # noqa: E402
from tsparse.ops import (  # noqa: E402
    box_to_patch_mask,
    fuse_tokens,
    fused_linear_grpo_loss,
    gather_tokens,
    grpo_loss,
    logprobs,
    pack_batch,
    pack_varlen,
    scatter_tokens,
    select_visual_tokens,
    unpack_varlen,
)

Case = tuple[str, Callable[[], object]]


def visual_token_cases(device: torch.device, small: bool) -> list[Case]:
    images, side, hidden = (3, 16, 40) if small else (64, 72, 3584)
    grid = torch.tensor([[1, side, side]] * images)
    lo = torch.rand(images, 2) * 0.12
    boxes = torch.cat([lo, lo + 0.877], dim=1).to(device)
    box_offsets = torch.arange(images + 1)
    n = images * (side // 2) ** 2
    x = torch.randn(n, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    keep, counts = box_to_patch_mask(boxes, box_offsets, grid)
    index = keep.nonzero().reshape(-1)
    offsets = [i * (side // 2) ** 2 for i in range(images + 1)]
    kept_counts = counts.tolist()
    src = x.detach()[index].contiguous()

    def gather_fwd_bwd():
        y = gather_tokens(x, index)
        y.backward(torch.ones_like(y))

    def gather_dup_bwd():
        y = gather_tokens(x, torch.cat([index, index[: index.numel() // 4]]), unique_index=False)
        y.backward(torch.ones_like(y))

    def fuse_fwd_bwd():
        y, _ = fuse_tokens(x, keep, offsets, kept_counts=kept_counts)
        y.backward(torch.ones_like(y))

    mask_grid = torch.tensor([[1, side, side]] * (4 * images))
    mask_boxes = torch.rand(4 * images, 4, device=device) * 0.5
    mask_boxes[:, 2:] += 0.5
    mask_offsets = torch.arange(4 * images + 1)
    mask_tokens = 4 * images * (side // 2) ** 2
    # segments around and far past the 32-member pieces (segment_pieces_kernel), and one past the rows
    seg_lengths = [0, 1, 31, 33, 70, 300 if small else 3000, 5]
    seg_perm = torch.randint(0, n, (sum(seg_lengths),), device=device)
    seg_offsets = torch.tensor([0] + torch.tensor(seg_lengths).cumsum(0).tolist(), device=device)
    return [
        ("box_to_patch_mask", lambda: box_to_patch_mask(mask_boxes, mask_offsets, mask_grid)),
        ("box_to_patch_mask (metadata on the device)",
         lambda: box_to_patch_mask(mask_boxes, mask_offsets.to(device), mask_grid.to(device), num_tokens=mask_tokens)),
        ("segment sums with long segments",
         lambda: torch.ops.tsparse.segment_reduce_rows(x.detach(), seg_perm, seg_offsets, True)),
        ("gather_tokens fwd+bwd", gather_fwd_bwd),
        ("gather_tokens duplicates bwd", gather_dup_bwd),
        ("scatter_tokens fill", lambda: scatter_tokens(src, index, n, fill=x.detach())),
        ("fuse_tokens fwd+bwd", fuse_fwd_bwd),
        ("select_visual_tokens", lambda: select_visual_tokens(x.detach(), boxes, box_offsets, grid)),
    ]


def varlen_cases(device: torch.device, small: bool) -> list[Case]:
    b, l, h = (3, 100, 24) if small else (64, 4096, 3584)
    lengths = torch.randint(int(l * 0.6), l + 1, (b,))
    mask = (torch.arange(l)[None, :] < lengths[:, None]).long().to(device)
    keep = torch.rand(b, l, device=device) > 0.23
    keep[:, 0] = True
    ids = torch.randint(0, 152064, (b, l), device=device)
    pos = torch.randint(0, 4096, (4, b, l), device=device)
    x = torch.randn(b, l, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    kept = mask.bool() & keep
    total, longest = int(kept.sum()), int(kept.sum(1).max())

    def pack_fwd_bwd():
        p = pack_varlen(x, mask, keep=keep, total=total, max_seqlen=longest)
        p.values.backward(torch.ones_like(p.values))

    p = pack_varlen(x.detach(), mask, keep=keep, total=total, max_seqlen=longest)
    # a row of three 512-token chunks and five position rows (the pack kernel's fallback loop)
    lm = 1100
    m2 = torch.ones(2, lm, dtype=torch.bool, device=device)
    m2[1, 900:] = False
    ids2 = torch.randint(0, 152064, (2, lm), device=device)
    pos2 = torch.randint(0, 4096, (5, 2, lm), device=device)
    return [
        ("pack_batch 3 chunks, 5 position rows",
         lambda: pack_batch(ids2, m2, pos2, total=2000, max_seqlen=lm)),
        ("pack_varlen fwd+bwd", pack_fwd_bwd),
        ("unpack_varlen", lambda: unpack_varlen(p.values, p.indices, b, l)),
        ("pack_batch", lambda: pack_batch(ids, mask, pos, keep=keep, total=total, max_seqlen=longest,
                                          inputs_embeds=x.detach())),
    ]


def grpo_cases(device: torch.device, small: bool) -> list[Case]:
    # Realistic: T = 4096 response tokens of Qwen2.5-VL's vocabulary (1.25 GB of bf16 logits).
    t, v, h = (37, 1001, 24) if small else (4096, 152064, 3584)
    logits = torch.randn(t, v, device=device).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (t,), device=device)
    old = torch.randn(t, device=device) - 5
    adv = torch.randn(t, device=device)
    mask = torch.rand(t, device=device) < 0.9
    stream = (torch.arange(t, device=device) >= t // 2).long()
    ref_logp = old + 0.01 * torch.randn(t, device=device)
    hidden = torch.randn(min(t, 1024), h, device=device).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
    tl = hidden.shape[0]

    def logprobs_fwd_bwd():
        lp, ent = logprobs(logits, targets, return_entropy=True)
        (lp.sum() + ent.sum()).backward()

    def grpo_fwd_bwd():
        res = grpo_loss(logits, targets, old, adv, mask, ref_logp=ref_logp, kl_coef=0.01, entropy_coef=0.001,
                        stream=stream, stream_weights=[1.0, 1.0])
        res.loss.backward()

    def fused_linear_fwd_bwd():
        res = fused_linear_grpo_loss(hidden, weight, targets[:tl], old[:tl], adv[:tl], mask[:tl],
                                     stream=stream[:tl], stream_weights=[1.0, 1.0])
        res.loss.backward()

    # The single-read cluster kernel: at the realistic shape 4 CTAs per row; the small shape adds
    # rows of 40,000 logits (2-CTA clusters: distributed shared memory between CTAs) and a
    # non-unit upstream gradient (the scale kernel's pass), in place.
    tw, vw = (3, 40000) if small else (t, v)
    wide = logits if not small else torch.randn(tw, vw, device=device).to(torch.bfloat16).requires_grad_()
    tgt_w = targets if not small else torch.randint(0, vw, (tw,), device=device)

    def single_read_fwd_bwd():
        res = grpo_loss(logits, targets, old, adv, mask, ref_logp=ref_logp, kl_coef=0.01, entropy_coef=0.001,
                        stream=stream, stream_weights=[1.0, 1.0], impl="single_read")
        res.loss.backward()
        y = wide * 1
        res = grpo_loss(y, tgt_w, old[:tw], adv[:tw], mask[:tw], entropy_coef=0.001, impl="single_read",
                        inplace_backward=True)
        (res.loss * 2.0).backward()

    return [
        ("logprobs fwd+bwd (entropy)", logprobs_fwd_bwd),
        ("grpo_loss fwd+bwd (2 streams, KL, entropy)", grpo_fwd_bwd),
        ("grpo_loss single_read fwd+bwd (cluster kernel)", single_read_fwd_bwd),
        ("fused_linear_grpo_loss fwd+bwd", fused_linear_fwd_bwd),
    ]


CASES: dict[str, Callable[[torch.device, bool], list[Case]]] = {
    "visual_tokens": visual_token_cases,
    "varlen": varlen_cases,
    "grpo": grpo_cases,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["ncu", "sanitize"], default="sanitize")
    p.add_argument("--only", default=None, help="comma-separated families: " + ",".join(CASES))
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if tsparse.cuda_kernels_available() else "cpu")
    small = args.mode == "sanitize"
    families = args.only.split(",") if args.only else list(CASES)
    cases = [c for fam in families for c in CASES[fam](device, small)]
    if args.list:
        print("\n".join(name for name, _ in cases))
        return 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.mode == "ncu":
        for _, fn in cases:  # warm-up: allocator, cuBLAS handles, lazy module loading
            fn()
        sync()
        if device.type == "cuda":
            torch.cuda.profiler.start()
    for name, fn in cases:
        fn()
        sync()
        print(f"ran {name}", flush=True)
    if args.mode == "ncu" and device.type == "cuda":
        torch.cuda.profiler.stop()
    print(f"kernel_cases: {len(cases)} cases on {device} ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
