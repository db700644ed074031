"""The trainer's parts: fp32-master AdamW, the learning-rate schedule, micro-batch splits,
checkpoint files and RNG state, metrics JSON Lines, the plot and the summary tables."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
import torch

from tsparse.train import checkpoint as ckpt
from tsparse.train.metrics import MetricsLogger, format_summary, plot_metrics, read_jsonl, stage_means
from tsparse.train.optim import TrainerOptimizer, lr_at
from tsparse.train.trainer import micro_batches, pick_device, pick_dtype


def _steps(opt: TrainerOptimizer, p: torch.nn.Parameter, n: int, grad: float = 1.0) -> None:
    for _ in range(n):
        opt.zero_grad()
        p.grad = torch.full_like(p, grad)
        opt.clip_and_step(0.0)


def test_master_weights_keep_small_updates_a_bf16_model_would_round_away():
    """lr 1e-3 steps on a bf16 weight of 1.0 (bf16 spacing there: 2^-7): plain AdamW never
    moves it; with an fp32 master copy the updates accumulate."""
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    mastered = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    o1 = TrainerOptimizer([plain], lr=1e-3, weight_decay=0.0)
    o2 = TrainerOptimizer([mastered], lr=1e-3, weight_decay=0.0, master_weights="device")
    _steps(o1, plain, 20)
    _steps(o2, mastered, 20)
    assert torch.equal(plain.detach(), torch.ones(4, dtype=torch.bfloat16))
    master = o2.master_parameters()[0]
    assert master.dtype == torch.float32 and float(master[0].detach()) == pytest.approx(0.98, abs=2e-4)
    assert torch.equal(mastered.detach(), master.detach().to(torch.bfloat16))
    assert float(mastered.detach()[0]) < 0.99


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e9])
@pytest.mark.parametrize("master", ["device", "cpu"])
def test_master_step_equals_fp32_adamw_with_clipping(master, max_norm):
    """The fp32-master step (``cpu``: one parameter at a time through a reused staging buffer)
    is AdamW + clip_grad_norm_ on fp32 copies of the weights and gradients, over several steps
    and parameters of different sizes, one of them without a gradient."""
    torch.manual_seed(0)
    shapes = [(7, 5), (3,), (11, 2, 2), (4,)]
    model = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in model]
    opt = TrainerOptimizer(model, lr=1e-2, weight_decay=0.1, master_weights=master)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for step in range(4):
        grads = [torch.randn(s).to(torch.bfloat16) for s in shapes]
        opt.zero_grad()
        ref_opt.zero_grad()
        for i, (p, r, g) in enumerate(zip(model, ref, grads)):
            if i == 3 and step % 2 == 1:
                continue  # no gradient this step: neither stepped nor decayed
            p.grad, r.grad = g.clone(), g.float()
        norm = opt.clip_and_step(max_norm)
        with_grad = [r for r in ref if r.grad is not None]
        if max_norm > 0:
            want = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
        else:
            want = float(torch.linalg.vector_norm(torch.stack([r.grad.norm() for r in with_grad])))
        ref_opt.step()
        assert norm == pytest.approx(want, rel=1e-6)
        for m, r in zip(opt.master_parameters(), ref):
            torch.testing.assert_close(m.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        for p, m in zip(model, opt.master_parameters()):
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))


def test_cpu_master_skips_a_non_finite_step():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = TrainerOptimizer([p], lr=0.1, master_weights="cpu")
    p.grad = torch.tensor([1.0, float("nan"), 0.0], dtype=torch.bfloat16)
    assert math.isnan(opt.clip_and_step(1.0))
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.bfloat16)) and p.grad is None


@pytest.mark.parametrize("master", ["none", "cpu"])
def test_optimizer_state_round_trips(master):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    oa = TrainerOptimizer([a], lr=0.1, master_weights=master)
    _steps(oa, a, 3, grad=0.5)
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)  # as a checkpoint stores it (no tensor shared with `oa`)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    with torch.no_grad():
        b.copy_(a)
    ob = TrainerOptimizer([b], lr=0.1, master_weights=master)
    ob.load_state_dict(state)
    _steps(oa, a, 2, grad=-0.3)
    _steps(ob, b, 2, grad=-0.3)
    assert torch.equal(a.detach(), b.detach())
    other = "cpu" if master == "none" else "none"
    with pytest.raises(ValueError, match="master_weights"):
        TrainerOptimizer([b], lr=0.1, master_weights=other).load_state_dict(state)


def test_clip_and_step_reports_the_norm_and_clips():
    p = torch.nn.Parameter(torch.zeros(4))
    o = TrainerOptimizer([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.full((4,), 3.0)
    assert o.clip_and_step(1.0) == pytest.approx(6.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)
    o.zero_grad()
    p.grad = torch.tensor([float("nan"), 0, 0, 0])
    before = p.detach().clone()
    assert math.isnan(o.clip_and_step(1.0)) and torch.equal(p.detach(), before)  # non-finite: no step
    with pytest.raises(ValueError, match="trainable"):
        TrainerOptimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], lr=1.0)


def test_lr_schedule():
    assert [lr_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_at(s, 1.0, 0, total_steps=5, schedule="cosine", min_lr_ratio=0.1) for s in range(6)]
    assert cos[0] == 1.0 and cos[-1] == pytest.approx(0.1) and cos == sorted(cos, reverse=True)
    assert lr_at(2, 1.0, 0, total_steps=4, schedule="cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(1, 1.0, 0, total_steps=4, schedule="linear")


def test_micro_batches_split_each_stream_evenly():
    assert micro_batches([[0, 1, 2], [0, 1, 2, 3, 4, 5]], None) == [[[0, 1, 2], [0, 1, 2, 3, 4, 5]]]
    assert micro_batches([[0, 1, 2], [0, 1, 2, 3, 4, 5]], 2) == [[[0], [0, 1]], [[1], [2, 3]], [[2], [4, 5]]]
    assert micro_batches([[0, 1], []], 1) == [[[0], []], [[1], []]]


def test_device_and_dtype_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")


def test_rng_state_round_trips():
    state = ckpt.rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), float(np.random.rand()), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoint_pruning_keeps_finals_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("localization-step000002", "localization-step000004", "localization-step000006",
                 "localization-final", "sparse-step000002"):
        (root / name / "model").mkdir(parents=True)
        (root / name / "model" / "config.json").write_text("{}")  # find_latest wants a complete checkpoint
        torch.save({"state": {}}, root / name / ckpt.STATE_FILE)
    (root / "latest").write_text("localization-step000002\n")
    removed = ckpt.prune_checkpoints(root, "localization", keep_last=1)
    assert [p.name for p in removed] == ["localization-step000004"]
    left = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert left == ["localization-final", "localization-step000002", "localization-step000006", "sparse-step000002"]
    assert ckpt.find_latest(tmp_path) == root / "localization-step000002"
    assert ckpt.checkpoint_name("sparse", 12) == "sparse-step000012" and ckpt.checkpoint_name("sparse", None) == \
        "sparse-final"
    with pytest.raises(FileNotFoundError, match="not a tsparse.train checkpoint"):
        ckpt.load_trainer_state(tmp_path)


def test_metrics_logger_truncates_keeps_and_drops_non_finite(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLogger(path)
    for g in range(1, 5):
        log.log({"stage": "localization" if g < 3 else "sparse", "global_step": g, "loss": float(g),
                 "keep_ratio": 0.5 if g >= 3 else None, "x": float("inf")})
    rows = read_jsonl(path)
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4] and rows[0]["x"] is None
    assert stage_means(rows, "sparse", ["loss", "keep_ratio", "missing"]) == {"steps": 2, "loss": 3.5,
                                                                              "keep_ratio": 0.5}
    MetricsLogger(path, truncate=False).keep_until(2)
    assert [r["global_step"] for r in read_jsonl(path)] == [1, 2]
    MetricsLogger(path)
    assert read_jsonl(path) == []


def test_plot_and_summary(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [{"stage": "warmup", "global_step": 1, "sft/loss": 3.0, "time/step": 0.5},
            {"stage": "localization", "global_step": 2, "loc/score": 1.0, "loc/format": 0.5, "loss": 0.1,
             "time/step": 1.0, "tokens_per_s": 100.0}]
    png = plot_metrics(recs, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    summary = {"stages": {"warmup": stage_means(recs, "warmup", ["sft/loss", "time/step"]),
                          "localization": stage_means(recs, "localization", ["loss", "loc/format", "time/step"])},
               "evals": [{"label": "random init (untrained)", "n": 4, "loc_format": 0.0, "box_rate": 0.0, "iou": 0.0,
                          "loc_accuracy": 0.25, "sparse_format": 0.0, "sparse_accuracy": 0.0, "keep_ratio": 1.0,
                          "fallback_rate": 1.0, "sparse_length": 60.0, "seconds": 1.0}],
               "seconds": 3.0, "output_dir": "x"}
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0].startswith("Training") and "warmup" in text and "3.000" in text and "0.500" in text
    assert "Greedy evaluation on 4 validation samples" in text and "random init (untrained)" in text
    json.dumps(summary)


# --------------------------------------------------------------------------------------
def test_cached_encoder_returns_what_the_processor_returns(tiny_vl, synthetic_samples):
    from tsparse.dualstream.config import load_method_config
    from tsparse.train.encode_cache import CachedEncoder

    _, proc = tiny_vl
    prompts = load_method_config().prompts
    cache = CachedEncoder(proc)
    for samples in (synthetic_samples["one"][:3], synthetic_samples["two"][:3],
                    [synthetic_samples["one"][2], synthetic_samples["one"][0], synthetic_samples["one"][2]]):
        for prompt in (prompts.localization, prompts.sparse):
            for side in ("left", "right"):
                want = proc.encode_samples(samples, prompt, padding_side=side)
                for _ in range(2):  # a miss, then a hit
                    got = cache.encode_samples(samples, prompt, padding_side=side)
                    assert set(got) == set(want) and got["texts"] == want["texts"]
                    for k in want:
                        if k != "texts":
                            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert cache.hits > 0 and cache.misses == 3 * 2 + 3 * 2  # one per distinct (sample, prompt)
    assert cache.decode([65, 66]) == proc.decode([65, 66]) and cache.tokenizer is proc.tokenizer
    # A byte bound keeps the cache small: the least recently used images go first.
    small = CachedEncoder(proc, max_bytes=1)
    small.encode_samples(synthetic_samples["one"][:3], prompts.sparse)
    assert len(small._pixels) == 1
    got = small.encode_samples(synthetic_samples["one"][:3], prompts.sparse)
    assert torch.equal(got["pixel_values"], proc.encode_samples(synthetic_samples["one"][:3], prompts.sparse)["pixel_values"])
    with pytest.raises(ValueError, match="samples"):
        cache.encode_samples([], prompts.sparse)


def test_quarter_means_and_the_summary_with_baselines():
    from tsparse.train.metrics import quarter_means

    recs = [{"stage": "sparse", "step": k, "loc/score": float(k), "sparse/score": 10.0 - k} for k in range(1, 9)]
    q = quarter_means(recs, "sparse", ["loc/score", "sparse/score", "missing"])
    assert q["steps"] == 8 and q["quarter"] == 2 and "missing" not in q
    assert q["loc/score"] == {"first": 1.5, "last": 7.5, "delta": 6.0}
    assert q["sparse/score"]["delta"] == -6.0
    assert quarter_means(recs[:1], "sparse", ["loc/score"]) == {"steps": 1}
    assert quarter_means(recs[:5], "sparse", ["loc/score"])["quarter"] == 2  # ceil(5 / 4)
    ev = {"label": "after sparse", "n": 64, "loc_format": 1.0, "box_rate": 1.0, "iou": 0.5, "loc_accuracy": 0.6,
          "sparse_format": 1.0, "sparse_accuracy": 0.7, "keep_ratio": 0.2, "fallback_rate": 0.0, "sparse_length": 9.0,
          "seconds": 2.0, "dense_format": 1.0, "dense_accuracy": 0.55}
    summary = {"rl_progress": {"sparse": q}, "evals": [ev],
               "baselines": {"n": 64, "fixed_box_iou": 0.1, "fixed_box": [0.2, 0.3, 0.6, 0.7], "chance_accuracy": 0.37,
                             "majority_accuracy": 0.47, "majority_answer": "A", "question_majority_accuracy": 0.5}}
    text = format_summary(summary)
    assert "localization reward 1.500 -> 7.500 (+6.000)" in text and "sparse reward 8.500 -> 2.500 (-6.000)" in text
    assert "Greedy evaluation on 64 validation samples" in text and "dense acc" in text and "0.550" in text
    assert "baseline: best fixed box [0.20, 0.30, 0.60, 0.70]" in text and "baseline: always A" in text
    assert "baseline: chance" in text and "0.370" in text


def test_fixed_box_search_matches_brute_force_and_baselines():
    from tsparse.dualstream.data import VQASample
    from tsparse.dualstream.rewards import iou_reward
    from tsparse.train.evaluate import baselines, fixed_box_search

    rng = random.Random(3)
    gts = []
    for _ in range(12):
        boxes = []
        for _ in range(rng.randint(0, 2)):
            x, y = sorted(rng.sample(range(11), 2)), sorted(rng.sample(range(11), 2))
            boxes.append([x[0] / 10, y[0] / 10, x[1] / 10, y[1] / 10])
        gts.append(boxes)
    best, box = fixed_box_search(gts, step=0.25)
    grid = [k / 4 for k in range(5)]
    brute = max((sum(iou_reward([(a, b, c, d)], g) for g in gts) / len(gts), (a, b, c, d))
                for a in grid for c in grid if c > a for b in grid for d in grid if d > b)
    assert best == pytest.approx(brute[0], abs=1e-12) and box == pytest.approx(brute[1])
    assert fixed_box_search([], step=0.5) == (0.0, ())
    with pytest.raises(ValueError, match="step"):
        fixed_box_search(gts, step=0.3)
    opts = {"A": "x", "B": "y", "C": "z", "D": "w"}
    samples = [VQASample(str(i), ("a.png",), q, a, ((0.1, 0.1, 0.3, 0.3),), o) for i, (q, a, o) in enumerate([
        ("q1", "A", opts), ("q1", "A", opts), ("q1", "B", opts), ("q2", "B", {"A": "x", "B": "y"}),
        ("q2", "B", {"A": "x", "B": "y"}), ("q3", "C", {})])]
    b = baselines(samples, step=0.05)
    assert b["n"] == 6 and b["fixed_box_iou"] == pytest.approx(1.0) and b["fixed_box"] == pytest.approx([0.1, 0.1, 0.3, 0.3])
    assert b["chance_accuracy"] == pytest.approx((3 / 4 + 2 / 2 + 0) / 6)
    assert b["majority_answer"] in ("A", "B") and b["majority_accuracy"] == pytest.approx(3 / 6)
    assert b["question_majority_accuracy"] == pytest.approx((2 + 2 + 1) / 6)
    assert baselines([]) == {"n": 0}
