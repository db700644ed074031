"""scripts/compare_runs.py: the table of first -> last quarter RL rewards and last evaluation of
several tsparse.train runs (used for the README's sparse_group measurement)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "scripts" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, name: str, loc_scores, sparse_scores, sparse_acc: float) -> Path:
    d = tmp_path / name
    d.mkdir()
    recs = [{"stage": "localization", "step": i + 1, "global_step": i + 1, "loc/score": s}
            for i, s in enumerate(loc_scores)]
    n0 = len(recs)
    recs += [{"stage": "sparse", "step": i + 1, "global_step": n0 + i + 1, "loc/score": 2.0, "sparse/score": s}
             for i, s in enumerate(sparse_scores)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "summary.json").write_text(json.dumps({"evals": [{"iou": 0.5, "loc_accuracy": 0.9, "dense_accuracy": 0.8,
                                                           "sparse_accuracy": sparse_acc, "keep_ratio": 0.2}]}))
    return d


def test_table_reports_quarter_means_and_the_last_eval(tmp_path, capsys):
    mod = _load_script()
    a = _run(tmp_path, "a", [1.0, 1.0, 3.0, 3.0], [1.0] * 4 + [2.0] * 4, 0.875)  # quarters: 1 step / 2 steps
    b = _run(tmp_path, "b", [2.0, 2.0, 2.0, 1.0], [1.5] * 8, 0.5)
    png = tmp_path / "curves.png"
    assert mod.main([f"first={a}", str(b), "--plot", str(png), "--window", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    row_a = next(line for line in out if line.startswith("first "))
    row_b = next(line for line in out if line.startswith("b "))
    assert "1.000 -> 3.000" in row_a and "2.000 -> 2.000" in row_a and "1.000 -> 2.000" in row_a
    assert "0.875" in row_a and "0.500" in row_b and "2.000 -> 1.000" in row_b and "1.500 -> 1.500" in row_b
    assert png.is_file() and png.stat().st_size > 1000


def test_a_folder_without_metrics_is_named(tmp_path):
    mod = _load_script()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="metrics.jsonl: no records"):
        mod.main([str(tmp_path / "empty")])
