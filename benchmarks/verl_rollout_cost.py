"""What the sparse stream's rollout costs with HF generate on the actor (the rollout verl 0.9.1
must use for box-pruned tokens; vLLM cannot take them - README, verl section).

    python -m benchmarks.verl_rollout_cost [--image-size 448] [--questions 4] [--new-tokens 32]
        [--repeats 7] [--json PATH]

For a batch of synthetic scans (ViTAR-16K format) and the sparse stream's prompt, on the CPU
with the tiny random Qwen2.5-VL (or ``--model PATH``; the CPU only: it is the measurement the
README quotes for this machine, and the GPU rollout cost is for the GPU session to measure):

* ``dense``: HF ``generate`` on the full prompt (every visual token), exactly
  ``--new-tokens`` new tokens per sequence (EOS ignored, so both arms decode the same count);
* ``sparse``: :func:`tsparse.dualstream.pruning.sparse_stream_inputs` with the ground-truth
  boxes (vision tower + ``select_visual_tokens`` + re-padding; timed as ``prune``) then
  ``sparse_generate`` of the same number of tokens (timed as ``generate``).

Prints one row per arm: median seconds over ``--repeats`` rounds (the arms alternate within a
round, so load from other processes hits both), prompt tokens per sequence,
visual-token keep ratio, decode tokens/s. What it measures is HF generate's cost with and
without pruning on this machine; it says nothing about vLLM, which was not available.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(image_size: int = 448, questions: int = 4, new_tokens: int = 32, repeats: int = 7, model_path: str = "tiny",
        threads: int = 0) -> dict:
    from tsparse.dualstream import SyntheticScanConfig, ensure_synthetic_scans, load_method_config, load_vitar_json
    from tsparse.dualstream.models import load_model_and_processor
    from tsparse.dualstream.pruning import sparse_generate, sparse_stream_inputs

    if threads:
        torch.set_num_threads(threads)
    import tempfile

    root = tempfile.mkdtemp(prefix="tsparse_cost_")
    files = ensure_synthetic_scans(root, SyntheticScanConfig(image_size=image_size, splits={"train": questions}))
    samples = load_vitar_json(files["train"])
    method = load_method_config()
    model, proc = load_model_and_processor(model_path)
    batch = proc.encode_samples(samples, method.prompts.sparse, padding_side="left")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    boxes = [s.boxes for s in samples]

    times = {"dense": [], "prune": [], "generate": []}
    with torch.no_grad():
        model.generate(**inputs, **dict(gen, max_new_tokens=2, min_new_tokens=2))  # warm-up
        # The arms alternate within each round, so a busy neighbour slows both alike.
        for _ in range(repeats):
            t, _ = _timed(lambda: model.generate(**inputs, **gen))
            times["dense"].append(t)
            t, sparse = _timed(lambda: sparse_stream_inputs(
                model, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], boxes,
                pixel_values=batch["pixel_values"], config=method.pruning))
            times["prune"].append(t)
            t, _ = _timed(lambda: sparse_generate(model, sparse, **gen))
            times["generate"].append(t)
    dense_t, prune_t, gen_t = (statistics.median(times[k]) for k in ("dense", "prune", "generate"))
    best = {k: min(v) for k, v in times.items()}
    dense_len = float(batch["attention_mask"].sum(1).float().mean())
    sparse_len = float(sparse.attention_mask.sum(1).float().mean())
    n_seq = len(samples)
    rows = [
        {"arm": "dense", "seconds": dense_t, "min_seconds": best["dense"], "prompt_tokens": dense_len,
         "keep_ratio": 1.0, "decode_tokens_per_s": n_seq * new_tokens / dense_t},
        {"arm": "sparse", "seconds": prune_t + gen_t, "min_seconds": best["prune"] + best["generate"],
         "prune_seconds": prune_t, "generate_seconds": gen_t, "min_prune_seconds": best["prune"],
         "min_generate_seconds": best["generate"], "prompt_tokens": sparse_len, "keep_ratio": sparse.keep_ratio,
         "decode_tokens_per_s": n_seq * new_tokens / (prune_t + gen_t)},
    ]
    return {
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": model_path,
        "image_size": image_size,
        "visual_tokens_per_image": int(batch["image_grid_thw"][0].prod()) // 4,
        "questions": n_seq,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "times": times,
        "rows": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(args.image_size, args.questions, args.new_tokens, args.repeats, args.model, args.threads)
    print(f"{res['model']} model, {res['questions']} questions, {res['image_size']} px "
          f"({res['visual_tokens_per_image']} visual tokens/image), {res['new_tokens']} new tokens, "
          f"{res['threads']} CPU threads, median of {res['repeats']}")
    print(f"{'arm':<8}{'median s':>10}{'min s':>8}{'prune s':>10}{'gen s':>8}{'prompt tok':>12}{'keep':>8}{'tok/s':>8}")
    for r in res["rows"]:
        print(f"{r['arm']:<8}{r['seconds']:>10.3f}{r['min_seconds']:>8.3f}{r.get('prune_seconds', float('nan')):>10.3f}"
              f"{r.get('generate_seconds', r['seconds']):>8.3f}{r['prompt_tokens']:>12.1f}{r['keep_ratio']:>8.3f}"
              f"{r['decode_tokens_per_s']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
