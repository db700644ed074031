"""Prefill time of the sparse stream against its visual-token keep ratio (dense, 77%, 50%, 25%).

The answer stream's prefill is what pruning shortens: the vision tower and the localization
stream see every token whatever the ratio. Each row times one prefill forward of a Qwen2.5-VL
model (``use_cache=True``, ``logits_to_keep=1``: what ``generate`` runs before its first token)
on inputs that tsparse's grounded pruning built (``sparse_stream_inputs`` with a box covering the
wanted share of the image; its original M-RoPE positions), against the dense prefill measured in
the same run. ``ratio`` = dense time / sparse time (the measured speedup); the note gives the
FLOP-count expectation for the same two sequence lengths (:func:`prefill_flops`).

Sizes:
  tiny  the tiny model of configs/models/tiny_qwen2_5_vl.yaml (hidden 64, 2 layers), one
        448 x 448 image (256 visual tokens) and the real prompt text (pytest-benchmark entries)
  cpu   the same model, one 1008 x 1008 image (36 x 36 = 1296 visual tokens, the realistic
        count) and the real prompt (~330 byte-level text tokens); batch 1; what report.py runs
  7b    a RANDOM Qwen2.5-VL-7B-shaped language model (hidden 3584, 28 layers, 28 heads, 4 KV
        heads, FFN 18944, vocab 152064; a 1-block vision tower, unused), bf16, on the GPU; one
        1008 x 1008 image + 150 text tokens (a Qwen-tokenized chat prompt's length), batch 4.
        Needs ~16 GB of GPU memory; profiling/device_check.sh runs it as an optional phase.

    python -m benchmarks.bench_sparse_prefill [--size cpu|tiny|7b] [--device cpu|cuda] [--iters N]
                                              [--threads N] [--json PATH]

Timing: the ratios are timed in interleaved rounds (each once per round), median over rounds;
the note also gives the ratio of the minimum times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from typing import Callable, Optional

import torch

from .common import Row, Timer, environment, format_table, measure_copy_bandwidth, measure_matmul_tflops

KEEP_RATIOS = (1.0, 0.77, 0.5, 0.25)

#: Qwen2.5-VL-7B's language model (shared/notes/qwen2_5_vl.md).
QWEN2_5_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, mrope_section=[16, 24, 24])

SIZES = {
    "tiny": dict(model="tiny", image_side=448, batch=1, text_tokens=None),
    "cpu": dict(model="tiny", image_side=1008, batch=1, text_tokens=None),
    "7b": dict(model="7b", image_side=1008, batch=4, text_tokens=150),
}


# --------------------------------------------------------------------------------------
def prefill_flops(text: dict, seq_len: int, batch: int = 1, *, causal: bool = True) -> float:
    """FLOPs of one prefill forward of a Qwen2-style decoder over ``seq_len`` tokens per sample
    (multiply-adds count 2): per layer the q/k/v/o projections (GQA: k and v have ``kv_heads``),
    causal attention (``L (L + 1) / 2`` query-key pairs for QK^T and again for AV), the SwiGLU MLP
    (3 matrices); the LM head for the last token only. Norms, RoPE and softmax are left out
    (O(L H), negligible). ``causal=False`` counts all ``L^2`` pairs (what a kernel that does not
    skip masked blocks computes, and what ``torch.utils.flop_counter`` counts). ``text`` holds hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, vocab_size."""
    h, f = text["hidden_size"], text["intermediate_size"]
    nh, nkv = text["num_attention_heads"], text["num_key_value_heads"]
    hd = h // nh
    L = seq_len
    proj = 2 * L * h * (nh * hd) * 2 + 2 * L * h * (nkv * hd) * 2  # q, o + k, v
    pairs = L * (L + 1) / 2 if causal else L * L
    attn = 2 * 2 * nh * hd * pairs
    mlp = 3 * 2 * L * h * f
    return batch * (text["num_hidden_layers"] * (proj + attn + mlp) + 2 * h * text["vocab_size"])


def random_qwen2_5_vl(text: dict, *, device, dtype=torch.bfloat16, seed: int = 0):
    """A randomly initialized ``Qwen2_5_VLForConditionalGeneration`` with the given language-model
    sizes (keys as :data:`QWEN2_5_VL_7B_TEXT`), Qwen's real special-token ids, and a 1-block
    vision tower (prefill benchmarks feed image embeddings directly). Built on ``device`` in
    ``dtype`` (no full-precision copy), eval mode."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t = dict(text)
    mrope = t.pop("mrope_section")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=None, eos_token_id=151645, pad_token_id=151643, **t),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=t["hidden_size"],
                           fullatt_block_indexes=[0]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )
    dev = torch.device(device)
    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    # Fork (and restore) the generator the weights are drawn from: the CPU's, or this GPU's.
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval()


@dataclasses.dataclass
class PrefillCase:
    """One model and one dense prompt batch: ``input_ids`` [B, L] with an image of
    ``grid = (1, h, w)`` patches, its random merged visual tokens, and the LM sizes."""

    model: object
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    grid: torch.Tensor
    image_embeds: torch.Tensor
    text: dict
    label: str


def build_case(size: str, device, text: Optional[dict] = None) -> PrefillCase:
    """The model and dense inputs of ``size`` (see the module docs). ``text`` replaces the 7B
    language-model sizes of ``size="7b"`` (keys as :data:`QWEN2_5_VL_7B_TEXT`; tests run that
    path at toy sizes on the CPU)."""
    cfg = SIZES[size]
    device = torch.device(device)
    side = cfg["image_side"]
    patches = side // 14
    n_vis = (patches // 2) ** 2
    if cfg["model"] == "tiny":
        from tsparse.dualstream.config import load_method_config
        from tsparse.dualstream.data import build_messages, VQASample
        from tsparse.dualstream.models import build_tiny

        model, proc = build_tiny()
        model = model.to(device)
        c = model.config.text_config
        text = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                    num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size)
        sample = VQASample("bench", ("x.png",), "<image>\nIn which region of the scan is the lesion located?\n"
                           "A) upper left\nB) upper right\nC) lower left\nD) lower right", "A")
        rendered = proc.apply_chat_template(build_messages(sample, load_method_config().prompts.sparse))
        rendered = rendered.replace(proc.image_token, proc.image_token * n_vis)
        ids = proc.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]
        label = "tiny Qwen2.5-VL (H=64, 2 layers)"
    else:
        sizes = dict(QWEN2_5_VL_7B_TEXT if text is None else text)
        model = random_qwen2_5_vl(sizes, device=device, dtype=torch.bfloat16)
        text = {k: v for k, v in sizes.items() if k != "mrope_section"}
        g = torch.Generator().manual_seed(0)
        n_text = cfg["text_tokens"]
        pre, post = 20, n_text - 20 - 2  # system turn + user start | question + assistant start
        body = [torch.randint(0, 151000, (pre,), generator=g), torch.tensor([151652]),
                torch.full((n_vis,), 151655), torch.tensor([151653]), torch.randint(0, 151000, (post,), generator=g)]
        ids = torch.cat(body)[None]
        label = "Qwen2.5-VL-7B-shaped random (bf16)"
    ids = ids.repeat(cfg["batch"], 1).to(device)
    mask = torch.ones_like(ids)
    grid = torch.tensor([[1, patches, patches]] * cfg["batch"], dtype=torch.int64)
    dtype = model.get_input_embeddings().weight.dtype
    g = torch.Generator().manual_seed(1)
    emb = (torch.randn(cfg["batch"] * n_vis, text["hidden_size"], generator=g) * 0.02).to(device=device, dtype=dtype)
    return PrefillCase(model, ids, mask, grid, emb, text, label)


def box_for_ratio(side_tokens: int, ratio: float) -> tuple[list, int]:
    """A box from the top-left corner covering ``r x c`` token cells with ``r * c`` as close as
    possible to ``ratio`` of the ``side x side`` grid; returns ``(box, r * c)``. Edges sit a hair
    inside cell boundaries, so exactly those cells overlap it."""
    n = side_tokens * side_tokens
    want = ratio * n
    best = min(((r, c) for r in range(1, side_tokens + 1) for c in range(1, side_tokens + 1)),
               key=lambda rc: (abs(rc[0] * rc[1] - want), -rc[0]))
    r, c = best
    eps = 1e-3
    return [0.0, 0.0, (c - eps) / side_tokens, (r - eps) / side_tokens], r * c


def run(device: torch.device, size: str, timer: Timer, log: Callable[[str], None] = print,
        text: Optional[dict] = None) -> list[Row]:
    """The report family: prefill rows for each keep ratio (``size`` "full" means "cpu" here: the
    7B-shaped case runs only through ``--size 7b``, see the module docs; ``text`` as
    :func:`build_case`)."""
    size = "cpu" if size == "full" else size
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {list(SIZES)} (or 'full'), got {size!r}")
    from tsparse.dualstream.pruning import sparse_stream_inputs

    case = build_case(size, device, text)
    model = case.model
    b = case.input_ids.shape[0]
    side = int(case.grid[0, 1]) // 2
    rows: list[Row] = []
    results, inputs = {}, {}
    with torch.no_grad():
        for ratio in KEEP_RATIOS:
            box, kept = box_for_ratio(side, ratio)

            def prune(box=box):
                return sparse_stream_inputs(model, case.input_ids, case.attention_mask, case.grid, [[box]] * b,
                                            image_embeds=case.image_embeds, fuse=True)

            sp = prune()
            assert int(sp.kept_counts[0]) == kept
            t_prune = timer(prune)
            inputs[ratio] = sp.model_inputs()
            results[ratio] = dict(L=int(sp.attention_mask[0].sum()), kept=kept, prune_ms=t_prune["median_ms"], t=[])
            del sp
        # Interleaved rounds (every ratio once per round), so load that changes during the run
        # (a shared CPU) hits all ratios alike; median and min over the rounds.
        one = Timer(device, warmup=0, iters=1)
        step = {r: (lambda x=inputs[r]: model(**x, use_cache=True, logits_to_keep=1)) for r in KEEP_RATIOS}
        for _ in range(timer.warmup):
            for r in KEEP_RATIOS:
                step[r]()
        for _ in range(timer.iters):
            for r in KEEP_RATIOS:
                results[r]["t"].append(one(step[r])["median_ms"])
    for ratio in KEEP_RATIOS:
        r = results[ratio]
        r["ms"], r["min_ms"] = statistics.median(r["t"]), min(r["t"])
        log(f"  keep {r['kept']}/{side * side}: L={r['L']}, prefill {r['ms']:.2f} ms (min {r['min_ms']:.2f}), "
            f"prune {r['prune_ms']:.2f} ms")
    dense = results[1.0]
    dt = str(case.image_embeds.dtype).replace("torch.", "")
    for ratio in KEEP_RATIOS:
        r = results[ratio]
        flop = prefill_flops(case.text, r["L"], b)
        expect = prefill_flops(case.text, dense["L"], b) / flop
        rows.append(Row(
            f"prefill keep {r['kept'] / (side * side):.3f}" if ratio < 1 else "prefill dense",
            f"B={b} L={r['L']} vis={r['kept']}/{side * side}", dt, r["ms"], "dense prefill", dense["ms"],
            tflop=flop / 1e12,
            note=f"FLOP expectation {expect:.2f}x; min-time ratio {dense['min_ms'] / r['min_ms']:.2f}x; "
                 f"prune {r['prune_ms']:.2f} ms; {case.label}"))
    del case, model
    return rows


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="cpu", choices=sorted(SIZES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); 1 keeps a shared, loaded CPU from oversubscribing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.size == "7b" and device.type != "cuda":
        p.error("--size 7b needs a GPU (about 16 GB of memory)")
    iters = args.iters or (20 if device.type == "cuda" else 10)
    env = environment(device)
    print(f"sparse prefill benchmark ({args.size}) - {env['date']}; {env.get('gpu') or env.get('cpu')}; "
          f"torch {env['torch']}")
    copy = measure_copy_bandwidth(device)
    mm = measure_matmul_tflops(device)
    print(f"  measured copy {copy:.1f} GB/s, matmul {mm:.2f} TFLOP/s")
    rows = run(device, args.size, Timer(device, warmup=3, iters=iters), log=lambda s: print(s, flush=True))
    print()
    print(format_table(rows, copy, mm))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "anchors": {"copy_gbps": copy, "matmul_tflops": mm}, "size": args.size,
                       "rows": [dict(dataclasses.asdict(r), ratio=r.ratio, tflops=r.tflops) for r in rows]},
                      f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
