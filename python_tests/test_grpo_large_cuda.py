"""GPU only: the GRPO log-prob kernels just past 2^31 logits elements.

T = 14,123 rows of Qwen2.5-VL's vocabulary (V = 152,064) is T * V = 2,147,599,872 > 2^31 bf16
elements (4.3 GB): every element of the last rows lies beyond 2^31, so a 32-bit element offset
anywhere in the row addressing would read or write the wrong memory there. The last rows (and a
first and a middle one) are compared with torch's fp32 log_softmax; the backward's gradient of the
last rows with torch's (onehot - softmax) * weight, and every other row must stay zero.
Peak GPU memory ~13 GB (logits, their gradient, a few fp32 rows).
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from tsparse.ops import logprobs

pytestmark = [pytest.mark.cuda, requires_cuda]

V = 152_064
T = 2**31 // V + 1  # 14,123
TAIL = 8


@pytest.fixture(scope="module")
def big():
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~13 GB of GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(T, V, device="cuda", dtype=torch.bfloat16, generator=g) * 2).contiguous()
    targets = torch.randint(0, V, (T,), device="cuda", generator=g)
    assert logits.numel() > 2**31 and (T - TAIL) * V > 2**31  # the tail rows lie wholly past 2^31
    yield logits, targets
    del logits
    torch.cuda.empty_cache()


def _rows(t: int) -> list[int]:
    return [0, t // 2] + list(range(t - TAIL, t))


def test_logprobs_and_entropy_past_2_31_elements_match_torch(big):
    logits, targets = big
    lp, ent = logprobs(logits, targets, return_entropy=True)
    rows = torch.tensor(_rows(T), device="cuda")
    ref = torch.log_softmax(logits[rows].float(), dim=-1)
    ref_lp = ref.gather(1, targets[rows, None]).squeeze(1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    torch.testing.assert_close(lp[rows], ref_lp, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ent[rows], ref_ent, atol=2e-4, rtol=1e-5)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


def test_logprobs_backward_past_2_31_elements_writes_the_last_rows_only(big):
    logits, targets = big
    x = logits.detach().requires_grad_()
    lp, _ = logprobs(x, targets)
    w = torch.zeros(T, device="cuda")
    w[T - TAIL:] = torch.linspace(0.5, 2.0, TAIL, device="cuda")
    (lp * w).sum().backward()
    grad = x.grad
    tail = slice(T - TAIL, T)
    p = torch.softmax(logits[tail].float(), dim=-1)
    want = -p * w[tail, None]
    want[torch.arange(TAIL, device="cuda"), targets[tail]] += w[tail]
    torch.testing.assert_close(grad[tail].float(), want, atol=1e-3, rtol=1e-2)
    assert grad[: T - TAIL].abs().amax().item() == 0  # rows with a zero weight: written as zeros
