"""Per-step metrics (JSON Lines), the PNG plot of the curves, and the summary tables.

``<output_dir>/metrics.jsonl``: one JSON object per optimizer step of every stage, with
``stage``, ``step`` (1-based within the stage), ``global_step``, ``lr``, ``loss``,
``grad_norm``, the reward terms of each stream (``loc/score``, ``loc/format``, ``loc/iou``,
``loc/accuracy``, ``loc/cross_accuracy``, ``sparse/...``), ``loc/box_rate`` (responses with
a usable box), ``keep_ratio`` (kept / dense visual tokens in the sparse stream),
``fallback_rate``, response lengths, verl-named loss metrics per stream
(``actor/pg_loss/localization``, ``actor/pg_clipfrac/sparse``, ...), token counts and
throughputs (``tokens_per_s``: generated + trained tokens per second of the step;
``gen_tokens_per_s``: generated tokens per second of generation) and the time of each
phase (``time/rollout_localization``, ``time/prune``, ``time/rollout_sparse``,
``time/reward``, ``time/old_logp``, ``time/update``, ``time/step``, ...). The warm-up logs
``sft/loss`` and ``sft/nll/<stream>``.

``<output_dir>/eval.jsonl``: the greedy evaluations (``label``, then
:class:`~tsparse.train.evaluate.EvalResult`'s fields).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

__all__ = ["MetricsLogger", "read_jsonl", "stage_means", "quarter_means", "plot_metrics", "format_summary"]


class MetricsLogger:
    """Appends one JSON object per call to ``path`` (flushed, so a crash keeps what was
    logged). ``truncate=True`` starts a fresh file; a resumed run appends, dropping lines
    of steps past the resume point first (``keep_until``)."""

    def __init__(self, path: Union[str, os.PathLike], *, truncate: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate or not self.path.exists():
            self.path.write_text("", encoding="utf-8")

    def keep_until(self, global_step: int) -> None:
        """Drops records with ``global_step`` > the given one (steps a resumed run redoes)."""
        rows = [r for r in read_jsonl(self.path) if int(r.get("global_step", 0)) <= global_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


def read_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_means(records: Iterable[dict], stage: str, keys: Sequence[str]) -> dict:
    """Mean of each key over the stage's records that have it (missing keys are left out)."""
    rows = [r for r in records if r.get("stage") == stage]
    out = {"steps": len(rows)}
    for k in keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def quarter_means(records: Iterable[dict], stage: str, keys: Sequence[str]) -> dict:
    """Whether RL moved a stage's rewards: for each key, the mean over the stage's FIRST quarter
    of steps and over its LAST quarter (``ceil(steps / 4)`` steps each). Returns
    ``{"steps", "quarter", key: {"first", "last", "delta"}}``; keys without values are left out,
    and a stage with fewer than 2 steps gives ``{"steps": n}``."""
    rows = sorted((r for r in records if r.get("stage") == stage), key=lambda r: r.get("step", 0))
    out: dict = {"steps": len(rows)}
    if len(rows) < 2:
        return out
    q = max(1, math.ceil(len(rows) / 4))
    out["quarter"] = q
    for k in keys:
        first = [r[k] for r in rows[:q] if isinstance(r.get(k), (int, float))]
        last = [r[k] for r in rows[-q:] if isinstance(r.get(k), (int, float))]
        if first and last:
            f, l_ = sum(first) / len(first), sum(last) / len(last)
            out[k] = {"first": f, "last": l_, "delta": l_ - f}
    return out


_PANELS = (
    ("reward (score)", ("loc/score", "sparse/score")),
    ("format rate", ("loc/format", "sparse/format")),
    ("IoU / box rate", ("loc/iou", "loc/box_rate")),
    ("accuracy", ("loc/accuracy", "sparse/accuracy")),
    ("visual-token keep ratio", ("keep_ratio",)),
    ("loss", ("loss", "sft/loss")),
    ("tokens / s", ("tokens_per_s",)),
    ("step time (s)", ("time/step",)),
)


def plot_metrics(records: Sequence[dict], path: Union[str, os.PathLike], *, title: Optional[str] = None) -> Path:
    """Writes a PNG grid of the training curves against the global step, stage boundaries
    marked (matplotlib, Agg backend). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    bounds = []
    prev = None
    for r in records:
        if r.get("stage") != prev:
            bounds.append((r.get("global_step", 0), r.get("stage")))
            prev = r.get("stage")
    for ax, (name, keys) in zip(axes.flat, _PANELS):
        drawn = False
        lo, hi = math.inf, -math.inf
        for k in keys:
            pts = [(r["global_step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=k)
                lo, hi = min(lo, min(xs)), max(hi, max(xs))
                drawn = True
        for x, st in bounds:  # stage boundaries inside this panel's steps (RL panels skip the warm-up)
            if lo < x <= hi:
                ax.axvline(x - 0.5, color="0.7", lw=0.8, ls="--")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
    if bounds:
        axes.flat[0].text(0.0, 1.12, "stages: " + ", ".join(f"{s} from step {x}" for x, s in bounds),
                          transform=axes.flat[0].transAxes, fontsize=8)
    fig.suptitle(title or "tsparse.train", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


TRAIN_KEYS = ("loss", "sft/loss", "loc/score", "loc/format", "loc/iou", "loc/accuracy", "loc/cross_accuracy",
              "loc/box_rate", "loc/sparsity", "sparse/score", "sparse/format", "sparse/accuracy", "sparse/cross_accuracy",
              "keep_ratio", "time/step", "tokens_per_s")


def format_summary(summary: dict) -> str:
    """The two tables the trainer prints at the end: per stage, the training means (reward
    terms, format rate, IoU, keep ratio, step time), and the greedy evaluations before
    training and after each stage."""
    out = []
    stages = summary.get("stages", {})
    if stages:
        headers = ["stage", "steps", "loss", "loc reward", "loc format", "IoU", "loc acc", "cross acc",
                   "box rate", "sparse reward", "sparse format", "sparse acc", "keep ratio", "step s", "tok/s"]
        rows = []
        for name, m in stages.items():
            loss = m.get("loss", m.get("sft/loss"))
            rows.append([name, str(m.get("steps", 0)), _fmt(loss), _fmt(m.get("loc/score")), _fmt(m.get("loc/format")),
                         _fmt(m.get("loc/iou")), _fmt(m.get("loc/accuracy")), _fmt(m.get("loc/cross_accuracy")),
                         _fmt(m.get("loc/box_rate")), _fmt(m.get("sparse/score")), _fmt(m.get("sparse/format")),
                         _fmt(m.get("sparse/accuracy")), _fmt(m.get("keep_ratio")), _fmt(m.get("time/step"), 2),
                         _fmt(m.get("tokens_per_s"), 0)])
        out.append("Training, mean over each stage's steps (warm-up: supervised, no rollouts)")
        out.append(_table(headers, rows))
    progress = summary.get("rl_progress", {})
    lines = []
    for stage, p in progress.items():
        parts = [f"{name} {p[k]['first']:.3f} -> {p[k]['last']:.3f} ({p[k]['delta']:+.3f})"
                 for k, name in (("loc/score", "localization reward"), ("sparse/score", "sparse reward"))
                 if isinstance(p.get(k), Mapping)]
        if parts:
            lines.append(f"  {stage} ({p['steps']} steps, quarters of {p['quarter']}): " + "; ".join(parts))
    if lines:
        out.append("")
        out.append("RL reward, mean of the first quarter of each stage's steps -> mean of the last quarter")
        out.extend(lines)
    evals = summary.get("evals", [])
    if evals:
        n = evals[-1].get("n")
        headers = ["model", "loc format", "box rate", "IoU", "loc acc", "dense acc", "sparse format", "sparse acc",
                   "keep ratio", "fallback", "eval s"]
        rows = [[e["label"], _fmt(e["loc_format"]), _fmt(e["box_rate"]), _fmt(e["iou"]), _fmt(e["loc_accuracy"]),
                 _fmt(e.get("dense_accuracy")), _fmt(e["sparse_format"]), _fmt(e["sparse_accuracy"]),
                 _fmt(e["keep_ratio"]), _fmt(e["fallback_rate"]), _fmt(e["seconds"], 1)] for e in evals]
        b = summary.get("baselines") or {}
        if b.get("n"):
            box = ", ".join(f"{v:.2f}" for v in b.get("fixed_box", []))
            rows.append([f"baseline: best fixed box [{box}]", "-", "-", _fmt(b.get("fixed_box_iou")), "-", "-", "-",
                         "-", "-", "-", "-"])
            for key, name in (("chance_accuracy", "baseline: chance"),
                              ("majority_accuracy", f"baseline: always {b.get('majority_answer', '?')}"),
                              ("question_majority_accuracy", "baseline: blind (majority per question)")):
                if b.get(key) is not None:
                    v = _fmt(b[key])
                    rows.append([name, "-", "-", "-", v, v, "-", v, "-", "-", "-"])
        out.append("")
        out.append(f"Greedy evaluation on {n} validation samples (localization -> boxes -> pruned sparse answer; "
                   f"dense acc: the same checkpoint answering from every visual token)")
        out.append(_table(headers, rows))
    if summary.get("seconds") is not None:
        out.append("")
        out.append(f"total {summary['seconds']:.1f} s; output in {summary.get('output_dir')}")
    return "\n".join(out)
