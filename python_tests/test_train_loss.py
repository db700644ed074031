"""The trainer's decoupled dual-stream GRPO objective (tsparse.dualstream.policy) on the real
tsparse ops: each stream's gradient is unchanged when the other stream's tokens are doubled,
micro-batches sum to the full batch's gradient, and the supervised warm-up loss."""

from __future__ import annotations

import pytest
import torch

from tsparse.dualstream.policy import (
    LossSettings,
    micro_batch_stream_weights,
    policy_loss,
    sft_loss,
    token_logprobs,
)
from tsparse.train.trainer import micro_batches

H, V = 8, 13


def _stream(n_seq: int, stream: int, gen: torch.Generator):
    """Sequences of one stream: per-token hidden, targets, old log-probs near the current
    ones (ratios around 1, some clipped) and one advantage per sequence."""
    lens = torch.randint(2, 6, (n_seq,), generator=gen).tolist()
    t = sum(lens)
    adv_seq = torch.randn(n_seq, generator=gen)
    return {
        "hidden": torch.randn(t, H, generator=gen, dtype=torch.float64),
        "targets": torch.randint(0, V, (t,), generator=gen),
        "noise": 0.3 * torch.randn(t, generator=gen, dtype=torch.float64),
        "adv": torch.repeat_interleave(adv_seq, torch.tensor(lens)).double(),
        "lens": lens,
        "stream": stream,
    }


def _cat(parts, weight, settings, *, stream_ids=True, stream_weights=None):
    """Loss over the concatenated parts; returns (loss result, hidden leaf, row offsets)."""
    hidden = torch.cat([p["hidden"] for p in parts]).clone().requires_grad_(True)
    targets = torch.cat([p["targets"] for p in parts])
    with torch.no_grad():
        cur = token_logprobs(hidden.detach(), weight.detach(), targets, fused_linear=False)
    old = cur + torch.cat([p["noise"] for p in parts])
    adv = torch.cat([p["adv"] for p in parts])
    stream = torch.cat([torch.full((p["hidden"].shape[0],), p["stream"], dtype=torch.int64) for p in parts])
    seq, base = [], 0
    for p in parts:
        for n in p["lens"]:
            seq.append(torch.full((n,), base, dtype=torch.int64))
            base += 1
    seq_ids = torch.cat(seq)
    if stream_ids:
        res = policy_loss(hidden, weight, targets, old, adv, stream, settings, stream_weights=stream_weights,
                          seq_ids=seq_ids)
    else:  # one stream over everything: verl's single-stream loss, the control
        from tsparse.ops import grpo_loss

        res = grpo_loss(torch.nn.functional.linear(hidden, weight), targets, old, adv,
                        torch.ones_like(targets, dtype=torch.bool), loss_agg=settings.loss_agg,
                        seq_ids=seq_ids if settings.loss_agg.startswith("seq-") else None)
    res.loss.backward()
    offs = [0]
    for p in parts:
        offs.append(offs[-1] + p["hidden"].shape[0])
    return res, hidden.grad, offs


@pytest.mark.parametrize("fused_linear", [True, False])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_each_streams_gradient_is_unchanged_when_the_other_streams_tokens_are_doubled(fused_linear, loss_agg):
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    loc, sp = _stream(4, 0, gen), _stream(6, 1, gen)
    settings = LossSettings(loss_agg=loss_agg, fused_linear=fused_linear,
                            stream_weights={"localization": 1.0, "sparse": 0.7})
    res, g, offs = _cat([loc, sp], weight, settings)
    assert torch.isfinite(res.loss) and float(res.metrics.clipfrac.max()) > 0  # the clip is in play
    g_loc, g_sp = g[offs[0]:offs[1]], g[offs[1]:offs[2]]
    assert g_loc.abs().sum() > 0 and g_sp.abs().sum() > 0

    # The sparse stream's tokens doubled (every sparse sequence twice): localization untouched.
    _, g2, offs2 = _cat([loc, sp, sp], weight, settings)
    torch.testing.assert_close(g2[offs2[0]:offs2[1]], g_loc, rtol=1e-9, atol=1e-12)
    # ...and the sparse stream's own gradient is the same in total, spread over the copies.
    torch.testing.assert_close(g2[offs2[1]:offs2[2]] + g2[offs2[2]:offs2[3]], g_sp, rtol=1e-9, atol=1e-12)

    # The localization stream's tokens doubled: the sparse gradient untouched.
    _, g3, offs3 = _cat([loc, loc, sp], weight, settings)
    torch.testing.assert_close(g3[offs3[2]:offs3[3]], g_sp, rtol=1e-9, atol=1e-12)

    # The control: one aggregation over both streams (verl's single-stream loss) DOES let
    # the sparse token count rescale the localization gradient - the test can tell.
    _, c1, o1 = _cat([loc, sp], weight, settings, stream_ids=False)
    _, c2, o2 = _cat([loc, sp, sp], weight, settings, stream_ids=False)
    assert not torch.allclose(c1[o1[0]:o1[1]], c2[o2[0]:o2[1]], rtol=1e-6, atol=1e-9)


def test_stream_weights_scale_each_streams_gradient_alone():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    loc, sp = _stream(3, 0, gen), _stream(3, 1, gen)
    base = LossSettings(stream_weights={"localization": 1.0, "sparse": 1.0})
    half = LossSettings(stream_weights={"localization": 1.0, "sparse": 0.5})
    _, g1, o = _cat([loc, sp], weight, base)
    _, g2, _ = _cat([loc, sp], weight, half)
    torch.testing.assert_close(g2[o[0]:o[1]], g1[o[0]:o[1]], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2[o[1]:o[2]], 0.5 * g1[o[1]:o[2]], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_agg", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_sum_to_the_full_batch_gradient(loss_agg):
    """Splitting a step into micro-batches (each stream's rows in consecutive chunks, as the
    trainer does) with micro_batch_stream_weights gives the full batch's gradient."""
    gen = torch.Generator().manual_seed(99)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    seqs = [_stream(1, 0, gen) for _ in range(5)] + [_stream(1, 1, gen) for _ in range(7)]
    settings = LossSettings(loss_agg=loss_agg, stream_weights={"localization": 1.0, "sparse": 0.5})
    full, g_full, _ = _cat(seqs, weight, settings)
    loc_rows, sp_rows = list(range(5)), list(range(5, 12))
    tot_tok = [sum(seqs[r]["lens"][0] for r in loc_rows), sum(seqs[r]["lens"][0] for r in sp_rows)]
    tot_seq = [5, 7]
    chunks = micro_batches([loc_rows, sp_rows], 2)
    assert len(chunks) == 4 and [len(c[0]) + len(c[1]) for c in chunks] == [4, 3, 3, 2]
    grads, total = [], 0.0
    for loc_c, sp_c in chunks:
        parts = [seqs[r] for r in loc_c + sp_c]
        m_tok = [sum(seqs[r]["lens"][0] for r in loc_c), sum(seqs[r]["lens"][0] for r in sp_c)]
        w = micro_batch_stream_weights(settings.weights(), loss_agg, m_tok, [len(loc_c), len(sp_c)], tot_tok, tot_seq)
        res, g, _ = _cat(parts, weight, settings, stream_weights=w)
        grads.append(g)
        total += float(res.loss.detach())
    # Rows come out in chunk order; put them back in sequence order.
    order = [r for loc_c, sp_c in chunks for r in loc_c + sp_c]
    pieces = dict(zip(order, torch.split(torch.cat(grads), [seqs[r]["lens"][0] for r in order])))
    g_micro = torch.cat([pieces[r] for r in range(12)])
    torch.testing.assert_close(g_micro, g_full, rtol=1e-9, atol=1e-12)
    assert total == pytest.approx(float(full.loss.detach()), rel=1e-9, abs=1e-12)


def test_micro_batch_weights_of_an_absent_stream_are_zero():
    w = micro_batch_stream_weights([1.0, 2.0], "token-mean", [5, 0], [2, 0], [10, 8], [4, 3])
    assert w == [0.5, 0.0]
    assert micro_batch_stream_weights([1.0, 2.0], "token-sum", [5, 0], [2, 0], [10, 8], [4, 3]) == [1.0, 0.0]
    assert micro_batch_stream_weights([1.0, 2.0], "seq-mean-token-mean", [5, 3], [2, 1], [10, 8], [4, 3]) == \
        pytest.approx([0.5, 2.0 / 3.0])


def test_sft_loss_is_each_streams_mean_nll():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(V, H, generator=gen)
    hidden = torch.randn(9, H, generator=gen)
    targets = torch.randint(0, V, (9,), generator=gen)
    stream = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    loss, per = sft_loss(hidden, weight, targets, stream, stream_weights=(1.0, 0.5))
    expect = -ref[:4].mean() - 0.5 * ref[4:].mean()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    assert per["localization"] == pytest.approx(float(-ref[:4].mean()), rel=1e-5)
    fused, _ = sft_loss(hidden, weight, targets, stream, stream_weights=(1.0, 0.5), fused_linear=True)
    unfused, _ = sft_loss(hidden, weight, targets, stream, stream_weights=(1.0, 0.5), fused_linear=False)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


def test_policy_loss_needs_the_reference_for_kl():
    settings = LossSettings(kl_coef=0.1)
    h = torch.randn(3, H)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(h, torch.randn(V, H), torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.zeros(3),
                    torch.zeros(3, dtype=torch.int64), settings)


@pytest.mark.parametrize("bad, match", [
    ({"clip_ratio_c": 1.0}, "loss.clip_ratio_c"),
    ({"loss_agg": "seq-mean-token-sum-norm"}, "loss.loss_agg"),
    ({"kl_type": "kl3"}, "loss.kl_type"),
    ({"stream_weights": {"dense": 1.0}}, "loss.stream_weights"),
    ({"stream_weights": {"sparse": -1.0}}, "loss.stream_weights.sparse"),
    ({"chunk_size": 0}, "loss.chunk_size"),
])
def test_loss_settings_name_the_bad_key(bad, match):
    with pytest.raises(ValueError, match=match):
        LossSettings(**bad)
