"""Compares tsparse.train runs: each run's RL reward (first quarter -> last quarter of each RL
stage's steps), its last greedy evaluation and the baselines, as one table; with ``--plot``, the
RL stages' reward curves of all runs in one PNG (moving average over ``--window`` steps).

    python scripts/compare_runs.py runs/demo_localization runs/demo_question --plot docs/x.png
    python scripts/compare_runs.py localization=runs/a question=runs/b

Each argument is a run's ``output_dir`` (it reads ``metrics.jsonl`` and ``summary.json``), or
``LABEL=DIR``. Used for the README's measurement of ``advantages.sparse_group``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsparse.train.metrics import quarter_means, read_jsonl  # noqa: E402

CURVES = (("loc/score", "localization reward"), ("sparse/score", "sparse reward"), ("loc/iou", "IoU (sampled)"),
          ("sparse/accuracy", "sparse accuracy (sampled)"))
EVAL_KEYS = (("iou", "IoU"), ("loc_accuracy", "loc acc"), ("dense_accuracy", "dense acc"),
             ("sparse_accuracy", "sparse acc"), ("keep_ratio", "keep"))


def load(arg: str) -> tuple[str, list, dict]:
    label, _, path = arg.rpartition("=")
    run = Path(path)
    records = read_jsonl(run / "metrics.jsonl")
    if not records:
        raise SystemExit(f"compare_runs: {run / 'metrics.jsonl'}: no records (not a tsparse.train output_dir?)")
    summary_path = run / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return label or run.name, records, summary


def fmt(v) -> str:
    return "-" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.3f}"


def table(runs) -> str:
    rows = []
    for label, records, summary in runs:
        row = [label]
        for stage, key in (("localization", "loc/score"), ("sparse", "loc/score"), ("sparse", "sparse/score")):
            q = quarter_means(records, stage, [key]).get(key)
            row.append(f"{q['first']:.3f} -> {q['last']:.3f}" if q else "-")
        last = (summary.get("evals") or [{}])[-1]
        row += [fmt(last.get(k)) for k, _ in EVAL_KEYS]
        rows.append(row)
    headers = ["run", "stage 1 loc reward", "stage 2 loc reward", "stage 2 sparse reward"] + [n for _, n in EVAL_KEYS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def plot(runs, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, name) in zip(axes, CURVES):
        for label, records, _ in runs:
            pts = [(r["global_step"], r[key]) for r in records
                   if r.get("stage") in ("localization", "sparse") and isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                      for i in range(len(ys))]
            ax.plot(xs, smooth, label=label)
        ax.set_title(f"{name} ({window}-step mean)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/compare_runs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="output_dir of each run, or LABEL=DIR")
    p.add_argument("--plot", type=Path, default=None, help="write the RL reward curves to this PNG")
    p.add_argument("--window", type=int, default=5, help="moving-average window of the curves (steps)")
    args = p.parse_args(argv)
    runs = [load(a) for a in args.runs]
    print(table(runs))
    if args.plot is not None:
        plot(runs, args.plot, max(1, args.window))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
