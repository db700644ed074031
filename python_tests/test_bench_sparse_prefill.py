"""The sparse-prefill benchmark's pieces: its FLOP model (against torch's own FLOP counter on a
random Qwen2.5-VL with eager attention), the 7B-shaped model builder at toy sizes, the boxes that
set the keep ratio, and one quick run of the benchmark family on the tiny model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.bench_sparse_prefill import (  # noqa: E402
    KEEP_RATIOS,
    box_for_ratio,
    prefill_flops,
    random_qwen2_5_vl,
    run,
)
from benchmarks.common import Timer  # noqa: E402
from tsparse.ops import box_to_patch_mask  # noqa: E402

SMALL = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, vocab_size=152064, mrope_section=[2, 3, 3])


def test_flop_model_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = random_qwen2_5_vl(SMALL, device="cpu", dtype=torch.float32)
    model.set_attn_implementation("eager")  # attention as matmuls the counter sees
    text = {k: v for k, v in SMALL.items() if k != "mrope_section"}
    for b, L in ((1, 37), (2, 50)):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(input_ids=torch.randint(0, 1000, (b, L)), use_cache=True, logits_to_keep=1)
        hd = SMALL["hidden_size"] // SMALL["num_attention_heads"]
        rope_table = 3 * b * hd * L  # inv_freq @ positions, not part of the model's FLOP count
        assert fc.get_total_flops() == prefill_flops(text, L, b, causal=False) + rope_table
    # the causal count keeps L (L + 1) / 2 of the L^2 pairs
    attn_full = prefill_flops(text, 10, causal=False) - prefill_flops(text, 10)
    assert attn_full == pytest.approx(3 * 4 * 96 * (100 - 55))


def test_random_model_builder_dtype_and_ids():
    model = random_qwen2_5_vl(SMALL, device="cpu", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.image_token_id == 151655 and model.config.text_config.hidden_size == 96
    assert len(model.model.visual.blocks) == 1


@pytest.mark.parametrize("side", [8, 36])
def test_box_for_ratio_keeps_the_cells_it_says(side):
    for ratio in KEEP_RATIOS:
        box, kept = box_for_ratio(side, ratio)
        _, cnt = box_to_patch_mask(torch.tensor([box]), torch.tensor([0, 1]), torch.tensor([[1, 2 * side, 2 * side]]))
        assert int(cnt[0]) == kept and abs(kept / side**2 - ratio) <= 0.5 / side + 1e-9


def test_benchmark_family_runs_on_the_tiny_model():
    rows = run(torch.device("cpu"), "tiny", Timer("cpu", warmup=0, iters=1), log=lambda s: None)
    assert [r.op for r in rows] == ["prefill dense", "prefill keep 0.766", "prefill keep 0.500", "prefill keep 0.250"]
    lengths = [int(r.shape.split("L=")[1].split()[0]) for r in rows]
    assert lengths[0] - lengths[1] == 256 - 196 and lengths == sorted(lengths, reverse=True)
    assert all(r.tsparse_ms > 0 and r.baseline_ms == rows[0].tsparse_ms for r in rows)
    assert "FLOP expectation 1.00x" in rows[0].note and "FLOP expectation 1." in rows[1].note


def test_7b_path_at_toy_sizes():
    """The --size 7b branch (random ids around one 1008-px image, batch 4, bf16) with the 7B
    sizes swapped for toy ones, so the code the GPU phase runs has run once."""
    toy = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=152064, mrope_section=[2, 3, 3])
    rows = run(torch.device("cpu"), "7b", Timer("cpu", warmup=0, iters=1), log=lambda s: None, text=toy)
    assert rows[0].shape == "B=4 L=1446 vis=1296/1296" and rows[0].dtype == "bfloat16"
    assert rows[1].shape == "B=4 L=1142 vis=992/1296"
