"""Two-level GRPO advantages: grouping, verl's normalization, per-token expansion."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tsparse.dualstream.advantages import (
    LOCALIZATION,
    SPARSE,
    dual_stream_advantages,
    expand_to_packed,
    expand_to_tokens,
    grpo_advantages,
)
from tsparse.dualstream.config import AdvantageConfig


def _reference(scores, ids, eps=1e-6, norm=True):
    """verl 0.9.1 compute_grpo_outcome_advantage, written out with Python lists."""
    groups = {}
    for s, i in zip(scores, ids):
        groups.setdefault(i, []).append(s)
    stats = {}
    for i, vals in groups.items():
        if len(vals) == 1:
            stats[i] = (0.0, 1.0)
        else:
            m = sum(vals) / len(vals)
            stats[i] = (m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)))
    return [(s - stats[i][0]) / (stats[i][1] + eps) if norm else s - stats[i][0] for s, i in zip(scores, ids)]


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantages_match_reference(norm):
    for _ in range(20):
        n = random.randint(1, 30)
        scores = [random.choice([0.0, 0.5, 1.0, 2.5, random.random()]) for _ in range(n)]
        ids = [random.randint(0, 5) * 7 - 3 for _ in range(n)]  # arbitrary (negative, sparse) ids
        out = grpo_advantages(scores, ids, norm_adv_by_std=norm)
        assert out.dtype == torch.float32
        assert out.tolist() == pytest.approx(_reference(scores, ids, norm=norm), abs=2e-5)


def test_grpo_advantages_match_verl():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    for _ in range(10):
        n = random.randint(1, 40)
        s = torch.randn(n)
        ids = torch.randint(0, 6, (n,))
        for norm in (True, False):
            ref, _ = core_algos.compute_grpo_outcome_advantage(
                s[:, None].clone(), torch.ones(n, 1), ids.numpy(), norm_adv_by_std_in_grpo=norm
            )
            torch.testing.assert_close(grpo_advantages(s, ids, norm_adv_by_std=norm), ref[:, 0], atol=1e-6, rtol=1e-6)


def test_grpo_edge_cases():
    # A group of one: mean 0, std 1 -> the score itself (over 1 + eps).
    assert grpo_advantages([3.0], [0]).tolist() == pytest.approx([3.0 / (1 + 1e-6)])
    # Identical scores: zero advantages (std 0 -> divided by eps only).
    assert grpo_advantages([1.0, 1.0, 1.0], [0, 0, 0]).tolist() == [0.0, 0.0, 0.0]
    assert grpo_advantages([], []).numel() == 0
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="scores"):
        grpo_advantages([float("nan")], [0])
    with pytest.raises(ValueError, match="epsilon"):
        grpo_advantages([1.0], [0], epsilon=0.0)
    with pytest.raises(TypeError, match="group_ids"):
        grpo_advantages(torch.ones(2), torch.zeros(2))


def test_two_level_groups():
    q, g, gp = 3, 4, 5
    loc = torch.rand(q, g)
    sp = torch.rand(q, g, gp)
    out = dual_stream_advantages(loc, sp)
    for qi in range(q):
        assert out.localization[qi].tolist() == pytest.approx(_reference(loc[qi].tolist(), [0] * g), abs=1e-5)
        for i in range(g):  # one group per localization rollout
            assert out.sparse[qi, i].tolist() == pytest.approx(_reference(sp[qi, i].tolist(), [0] * gp), abs=1e-5)
    assert out.sparse_groups[1, 2, 3] == 1 * g + 2 and out.localization_groups[2, 1] == 2
    # Per-question sparse groups: all G*G' sparse rollouts of a question together.
    outq = dual_stream_advantages(loc, sp, sparse_group="question")
    for qi in range(q):
        assert outq.sparse[qi].reshape(-1).tolist() == pytest.approx(
            _reference(sp[qi].reshape(-1).tolist(), [0] * (g * gp)), abs=1e-5)
    assert torch.equal(outq.localization, out.localization)


def test_groups_are_independent():
    """Changing one group's rewards leaves every other group's advantages unchanged - the
    localization stream's included (the decoupling the method needs)."""
    loc = torch.rand(2, 3)
    sp = torch.rand(2, 3, 4)
    a = dual_stream_advantages(loc, sp)
    sp2 = sp.clone()
    sp2[1, 2] = sp2[1, 2] * 10 + 3
    b = dual_stream_advantages(loc, sp2)
    assert torch.equal(a.localization, b.localization)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.equal(a.sparse[mask], b.sparse[mask])
    assert not torch.equal(a.sparse[1, 2], b.sparse[1, 2])


def test_constant_term_within_group_cancels():
    sp = torch.rand(1, 2, 4)
    shifted = sp + torch.tensor([0.5, 0.0]).view(1, 2, 1)  # a per-parent constant (cross-feedback)
    loc = torch.rand(1, 2)
    a = dual_stream_advantages(loc, sp)
    b = dual_stream_advantages(loc, shifted)
    torch.testing.assert_close(a.sparse, b.sparse, atol=1e-5, rtol=0)
    c = dual_stream_advantages(loc, sp, sparse_group="question")
    d = dual_stream_advantages(loc, shifted, sparse_group="question")
    assert not torch.allclose(c.sparse, d.sparse, atol=1e-3)


def test_flat_layout_and_stream_ids():
    loc = torch.rand(2, 3)
    sp = torch.rand(2, 3, 2)
    out = dual_stream_advantages(loc, sp, config=AdvantageConfig(norm_adv_by_std=False))
    adv, stream = out.flat()
    assert adv.shape == (6 + 12,) and stream.dtype == torch.int64
    assert stream[:6].tolist() == [LOCALIZATION] * 6 and stream[6:].tolist() == [SPARSE] * 12
    assert adv[:6].tolist() == pytest.approx(out.localization.reshape(-1).tolist())
    assert adv[6 + 1 * 6 + 2 * 2 + 1].item() == pytest.approx(out.sparse[1, 2, 1].item())  # (q=1, i=2, j=1)
    assert adv[:3].sum().item() == pytest.approx(0.0, abs=1e-6)  # centred (Dr.GRPO)
    only = dual_stream_advantages(loc)
    assert only.sparse is None and only.flat()[1].tolist() == [LOCALIZATION] * 6


def test_dual_stream_shape_errors():
    with pytest.raises(ValueError, match="localization_rewards"):
        dual_stream_advantages(torch.rand(3))
    with pytest.raises(ValueError, match="sparse_rewards"):
        dual_stream_advantages(torch.rand(2, 3), torch.rand(2, 2, 4))
    with pytest.raises(ValueError, match="sparse_group"):
        dual_stream_advantages(torch.rand(2, 3), sparse_group="batch")
    with pytest.raises(ValueError, match="advantages.sparse_group"):
        AdvantageConfig(sparse_group="batch")


def test_expand_to_tokens_and_packed():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    assert expand_to_tokens(adv, mask).tolist() == [[0.5, 0.5, 0.0], [-1.0, 0.0, 0.0], [2.0, 2.0, 2.0]]
    stream = torch.tensor([0, 1, 1])
    assert expand_to_tokens(stream, mask).tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert expand_to_packed(adv, mask.sum(1)).tolist() == [0.5, 0.5, -1.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="values"):
        expand_to_tokens(adv[:2], mask)
    with pytest.raises(ValueError, match="lengths"):
        expand_to_packed(adv, [1, 2])
