"""pytest-benchmark entries for the fused GRPO ops and their PyTorch baselines (`make bench`).

Sizes are kept small enough for the CPU machine (T = 128 tokens of V = 152,064 bf16 logits);
on a GPU they run on CUDA. The full-size comparison table with ratios, bandwidth and peak
memory is `python -m benchmarks.report --only grpo`.
"""

from __future__ import annotations

import pytest
import torch

from tsparse import reference as ref
from tsparse.ops import fused_linear_grpo_loss, grpo_loss, logprobs

from .bench_grpo import make_inputs
from .common import BENCH_DEVICE as DEVICE
from .common import sync as _sync
from .common import synced as _run


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(DEVICE, 128, 152064)


@pytest.mark.benchmark(group="logprobs fwd")
def test_logprobs_tsparse(benchmark, inputs):
    benchmark(_run(lambda: logprobs(inputs["logits"], inputs["targets"], return_entropy=True)))


@pytest.mark.benchmark(group="logprobs fwd")
def test_logprobs_torch(benchmark, inputs):
    benchmark(_run(lambda: ref.logprobs_ref(inputs["logits"], inputs["targets"], return_entropy=True,
                                            dtype=torch.float32)))


def _fwd_bwd(loss_fn, inputs):
    base = inputs["logits"]

    def setup():
        x = base.detach().clone().requires_grad_()
        return (x * 1,), {}

    def fn(y):
        torch.autograd.grad(loss_fn(y), y)
        _sync()

    return setup, fn


@pytest.mark.benchmark(group="grpo_loss fwd+bwd")
def test_grpo_loss_tsparse(benchmark, inputs):
    d = inputs
    setup, fn = _fwd_bwd(lambda y: grpo_loss(y, d["targets"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
                                             kl_coef=0.01, entropy_coef=0.001, stream=d["stream"], num_streams=2,
                                             inplace_backward=True).loss, d)
    benchmark.pedantic(fn, setup=setup, rounds=5)


@pytest.mark.benchmark(group="grpo_loss fwd+bwd")
def test_grpo_loss_tsparse_single_read(benchmark, inputs):
    d = inputs
    setup, fn = _fwd_bwd(lambda y: grpo_loss(y, d["targets"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
                                             kl_coef=0.01, entropy_coef=0.001, stream=d["stream"], num_streams=2,
                                             inplace_backward=True, impl="single_read").loss, d)
    benchmark.pedantic(fn, setup=setup, rounds=5)


@pytest.mark.benchmark(group="grpo_loss fwd+bwd")
def test_grpo_loss_torch(benchmark, inputs):
    d = inputs
    setup, fn = _fwd_bwd(lambda y: ref.grpo_loss_ref(y, d["targets"], d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
                                                     kl_coef=0.01, entropy_coef=0.001, stream=d["stream"],
                                                     num_streams=2, dtype=torch.float32)["loss"], d)
    benchmark.pedantic(fn, setup=setup, rounds=3)


@pytest.mark.benchmark(group="fused linear grpo fwd+bwd")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul+grpo_loss"])
def test_fused_linear(benchmark, fused):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    t, h, v = 256, 256, 32768
    hidden = (torch.randn(t, h, device=DEVICE, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE, generator=g) * 0.05).requires_grad_()
    d = make_inputs(DEVICE, t, 8, seed=1)
    targets = torch.randint(0, v, (t,), device=DEVICE, generator=g)
    args = (targets, d["old"] - 10, d["adv"], d["mask"])

    def fn():
        if fused:
            loss = fused_linear_grpo_loss(hidden, weight, *args, chunk_size=64).loss
        else:
            loss = grpo_loss(hidden @ weight.t(), *args, inplace_backward=True).loss
        torch.autograd.grad(loss, (hidden, weight))
        _sync()

    benchmark(fn)
