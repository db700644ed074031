"""pytest-benchmark entries: the sparse stream's prefill at full and 77% visual-token keep
(`make bench`; the tiny model with one 448-px image, on CUDA when present). The table with all
ratios and the FLOP expectation is `python -m benchmarks.bench_sparse_prefill`."""

from __future__ import annotations

import pytest
import torch

from tsparse.dualstream.pruning import sparse_stream_inputs

from .bench_sparse_prefill import box_for_ratio, build_case
from .common import BENCH_DEVICE as DEVICE
from .common import sync


@pytest.fixture(scope="module")
def prefill_inputs():
    case = build_case("tiny", DEVICE)
    side = int(case.grid[0, 1]) // 2
    out = {}
    with torch.no_grad():
        for ratio in (1.0, 0.77):
            box, _ = box_for_ratio(side, ratio)
            sp = sparse_stream_inputs(case.model, case.input_ids, case.attention_mask, case.grid, [[box]],
                                      image_embeds=case.image_embeds)
            out[ratio] = sp.model_inputs()
    return case.model, out


def _prefill(model, inputs):
    def fn():
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        sync()
        return out

    return fn


@pytest.mark.benchmark(group="sparse prefill")
def test_prefill_dense(benchmark, prefill_inputs):
    model, inputs = prefill_inputs
    benchmark(_prefill(model, inputs[1.0]))


@pytest.mark.benchmark(group="sparse prefill")
def test_prefill_keep_77(benchmark, prefill_inputs):
    model, inputs = prefill_inputs
    benchmark(_prefill(model, inputs[0.77]))
