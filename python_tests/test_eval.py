"""Evaluation (tsparse.eval): the two data layouts, the scorer on a hand-made predictions file with
known accuracies, resumable runs with matched keep counts, the summary and the CLI."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from tsparse.dualstream.config import load_method_config  # noqa: E402
from tsparse.eval import (  # noqa: E402
    accuracy_by_dataset,
    evaluate,
    format_ablation,
    format_markdown,
    load_eval_samples,
    main,
    score_predictions,
    score_response,
    summarize,
)
from tsparse.infer import InferenceConfig, TokenSparseInference  # noqa: E402

#: the default sparse mode's results file (its fusion method is the method config's default)
FUSION = load_method_config().pruning.fuse
SPARSE = f"sparse-oracle-{FUSION}"


def _write(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _image(path):
    from PIL import Image

    Image.new("L", (56, 56), 100).save(path)


# --------------------------------------------------------------------------------------
def test_scorer_on_a_hand_made_file(tmp_path):
    """HuatuoGPT-Vision layout (options as texts, answer as the option's text, model_output),
    two datasets, every answer form; the accuracies are counted by hand below."""
    opts = ["Pneumonia", "Cardiomegaly", "Normal", "Effusion"]
    rows = [
        # dataset VQA-RAD: gt "Cardiomegaly" = B
        ("VQA-RAD", "Cardiomegaly", "B", True),                                 # bare letter
        ("VQA-RAD", "Cardiomegaly", "b", True),                                 # lowercase
        ("VQA-RAD", "Cardiomegaly", "B) Cardiomegaly", True),                   # letter with text
        ("VQA-RAD", "Cardiomegaly", "(b) cardiomegaly", True),                  # lowercase, parenthesised
        ("VQA-RAD", "Cardiomegaly", "<think>enlarged heart</think><answer>B</answer>", True),
        ("VQA-RAD", "Cardiomegaly", "The answer is B.", True),
        ("VQA-RAD", "Cardiomegaly", "cardiomegaly", True),                      # the option's text
        ("VQA-RAD", "Cardiomegaly", "C", False),                                # wrong letter
        ("VQA-RAD", "Cardiomegaly", None, False),                               # missing
        ("VQA-RAD", "Cardiomegaly", "", False),                                 # empty
        # dataset SLAKE: gt "Normal" = C
        ("SLAKE", "Normal", "C. Normal", True),
        ("SLAKE", "Normal", "<answer>c</answer>", True),
        ("SLAKE", "Normal", "Cardiomegaly", False),                             # a word starting with C is not C
        ("SLAKE", "Normal", "<think>hmm</think><answer></answer>", False),      # empty answer block
        ("SLAKE", "Normal", "I cannot tell", False),                            # no option named
        ("SLAKE", "?", "C", False),                                             # missing ground truth
    ]
    records = []
    for i, (ds, ans, out, _) in enumerate(rows):
        rec = {"question": "What is seen?", "options": opts, "answer": ans, "image": [f"images/{i}.png"],
               "dataset": ds, "test_id": i}
        if out is not None:
            rec["model_output"] = out
        records.append(rec)
    records.append({"question": "Describe.", "options": [], "answer": "x", "image": ["images/x.png"],
                    "dataset": "SLAKE", "question_type": "open", "model_output": "x"})  # skipped
    res = score_predictions(_write(tmp_path / "preds.json", records))
    want_rad = sum(c for ds, *_, c in rows if ds == "VQA-RAD")
    want_slake = sum(c for ds, *_, c in rows if ds == "SLAKE")
    assert (want_rad, want_slake) == (7, 2)
    assert res["datasets"]["VQA-RAD"] == {"n": 10, "correct": 7, "accuracy": 0.7}
    assert res["datasets"]["SLAKE"] == {"n": 6, "correct": 2, "accuracy": 2 / 6}
    assert res["avg"] == pytest.approx((0.7 + 2 / 6) / 2) and res["micro"] == pytest.approx(9 / 16)
    assert res["status"] == {"answered": 12, "unparsed": 1, "missing": 3}


def test_score_response_short_answers_and_errors():
    assert score_response("<answer>Left lung.</answer>", "left lung").correct
    assert not score_response("<answer>right lung</answer>", "left lung").correct
    assert score_response("yes", "Yes", {}).correct
    assert score_response("<think>...</think> A", "A").correct  # answer after the reasoning, no tag
    with pytest.raises(TypeError, match="`answer`"):
        score_response("A", None)


def test_load_eval_samples_layouts(tmp_path):
    for i in range(4):
        _image(tmp_path / f"{i}.png")
    huatuo = [
        {"question": "Which organ?", "options": ["liver", "spleen", "kidney"], "answer": "spleen",
         "image": ["0.png"], "dataset": "SLAKE", "subset": "CT"},
        {"question": "Modality?", "options": ["CT", "MRI"], "answer": "?", "image": ["1.png"], "dataset": "PMC-VQA"},
        {"question": "Open?", "options": [], "answer": "x", "image": ["2.png"], "question_type": "open"},
        {"question": "Label field wins", "options": ["a", "b"], "answer": "a", "answer_label": "B",
         "image": "3.png", "dataset_name": "OmniMedVQA"},
    ]
    items = load_eval_samples(_write(tmp_path / "huatuo.json", huatuo))
    assert [it.key for it in items] == ["0:huatuo_0", "1:huatuo_1", "3:huatuo_3"]
    a, b, c = items
    assert a.sample.question == "Which organ?\nA. liver\nB. spleen\nC. kidney"
    assert a.sample.answer == "B" and a.dataset == "SLAKE" and a.subset == "CT"
    assert a.sample.options == {"A": "liver", "B": "spleen", "C": "kidney"}
    assert b.sample.answer == "?" and b.subset is None
    assert c.sample.answer == "B" and c.dataset == "OmniMedVQA"
    assert len(load_eval_samples(tmp_path / "huatuo.json", skip_open=False)) == 4

    strings = [{"question": "Q1", "options": "['CT', 'MRI']", "answer": "MRI", "image": "0.png"},
               {"question": "Q2", "options": "A. CT\nB. MRI", "answer_label": "A", "answer": "CT", "image": "1.png"}]
    s1, s2 = load_eval_samples(_write(tmp_path / "strings.json", strings))
    assert s1.sample.options == {"A": "CT", "B": "MRI"} and s1.sample.answer == "B"
    assert s2.sample.options == {"A": "CT", "B": "MRI"} and s2.sample.answer == "A"
    assert s2.sample.question == "Q2\nA. CT\nB. MRI"
    with pytest.raises(ValueError, match="`options` string"):
        load_eval_samples(_write(tmp_path / "bad_opts.json", [{"question": "q", "options": "CT or MRI",
                                                                 "answer": "CT", "image": "0.png"}]))

    vitar = [{"image_path": ["0.png"], "question": "<image>\nWhere?\nA) left\nB) right", "answer": "B",
              "bbox": [[0.1, 0.1, 0.4, 0.5]]}]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in vitar), encoding="utf-8")
    (v,) = load_eval_samples(tmp_path / "v.jsonl")
    assert v.sample.question == vitar[0]["question"] and v.sample.answer == "B" and v.dataset == "v"
    assert v.sample.boxes == ((0.1, 0.1, 0.4, 0.5),)
    with pytest.raises(FileNotFoundError, match="record 0"):
        load_eval_samples(_write(tmp_path / "bad.json", [{"question": "q", "answer": "A", "image": "nope.png"}]))


def test_accuracy_by_dataset_subsets():
    acc = accuracy_by_dataset([{"dataset": "a", "subset": "x", "correct": True},
                               {"dataset": "a", "subset": "y", "correct": False},
                               {"dataset": "b", "correct": True}])
    assert acc["datasets"]["a"]["accuracy"] == 0.5 and acc["subsets"]["a/x"]["accuracy"] == 1.0
    assert acc["avg"] == 0.75 and acc["micro"] == pytest.approx(2 / 3) and acc["n"] == 3
    assert accuracy_by_dataset([])["avg"] is None


# --------------------------------------------------------------------------------------
class CountingPipe(TokenSparseInference):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: list = []

    def run_batch(self, questions, **kw):
        self.seen += [q.id for q in questions]
        return super().run_batch(questions, **kw)


def _eval_file(tmp_path, synthetic_samples):
    """The synthetic samples written in the HuatuoGPT layout, two datasets."""
    recs = []
    for i, s in enumerate(synthetic_samples["one"]):
        text = s.question.split("\n")[1]
        recs.append({"question": text, "options": [s.options[k] for k in sorted(s.options)],
                     "answer": s.options[s.answer], "image": [s.images[0]], "bbox": [list(b) for b in s.boxes],
                     "dataset": "left" if i % 2 else "right", "test_id": i})
    return _write(tmp_path / "eval.json", recs)


def test_evaluate_resumes_matches_and_summarizes(tiny_vl, synthetic_samples, tmp_path):
    model, proc = tiny_vl
    data = _eval_file(tmp_path, synthetic_samples)
    cfg = InferenceConfig(boxes="oracle", answer="choice", batch_size=3)
    pipe = CountingPipe(model, proc, method=load_method_config(), config=cfg)
    out = tmp_path / "out"
    modes = ["dense", "sparse", "baseline:random", "baseline:fastv"]
    items = load_eval_samples(data, limit=5)
    kw = dict(model_name="tiny", data_path=str(data), progress=False, log=lambda s: None)
    evaluate(pipe, items, modes, out, **kw)
    assert len(pipe.seen) == 4 * (5 + 1)  # one warm-up sample per mode
    # resume: three more samples, only they run
    items = load_eval_samples(data)
    pipe.seen = []
    s = evaluate(pipe, items, modes, out, warmup=False, **kw)
    assert sorted(pipe.seen) == sorted([it.sample.id for it in items[5:]] * 4)
    recs = {m: [json.loads(x) for x in (out / f"{m}.jsonl").read_text().splitlines()]
            for m in ("dense", SPARSE, "baseline-random-match", "baseline-fastv-match")}
    assert all(len(r) == 8 for r in recs.values())
    sparse = {r["key"]: r["kept_tokens"] for r in recs[SPARSE]}
    for m in ("baseline-random-match", "baseline-fastv-match"):
        assert {r["key"]: r["kept_tokens"] for r in recs[m]} == sparse  # matched per image
    assert all(r["keep_ratio"] < 1 for r in recs[SPARSE])
    # summary
    by = {m["slug"]: m for m in s["modes"]}
    assert [m["slug"] for m in s["modes"]][:2] == ["dense", SPARSE]
    assert by["dense"]["rel"] == 100.0 and by["dense"]["keep_ratio"] == 1.0 and by["dense"]["n"] == 8
    kept = sum(sum(v) for v in sparse.values())
    assert by[SPARSE]["keep_ratio"] == pytest.approx(kept / (8 * 64))
    assert by["baseline-fastv-match"]["keep_ratio"] == by[SPARSE]["keep_ratio"]
    for m in s["modes"]:
        correct = sum(r["correct"] for r in recs[m["slug"]])
        assert m["micro"] == pytest.approx(correct / 8)
        assert m["rel"] == pytest.approx(100 * m["avg"] / by["dense"]["avg"])
        assert m["prefill_ms_per_sample"] > 0 and m["samples_per_s"] > 0
    assert set(s["datasets"]) == {"left", "right"}
    md = (out / "summary.md").read_text()
    assert md.count("\n") == 2 + len(modes) and "| dense | 8 | 1.000 |" in md
    assert json.loads((out / "summary.json").read_text())["modes"][0]["slug"] == "dense"
    # an interrupted write (a cut last line) is dropped and rerun
    f = out / "dense.jsonl"
    text = f.read_text()
    f.write_text(text[: len(text) - 40])
    pipe.seen = []
    evaluate(pipe, items, ["dense"], out, warmup=False, **kw)
    assert len(pipe.seen) == 1 and len(f.read_text().splitlines()) == 8
    # other settings are refused, or replace the old results with overwrite
    pipe.config = InferenceConfig(boxes="oracle", answer="choice", batch_size=3, choice_prefix="<answer>")
    with pytest.raises(ValueError, match="other settings"):
        evaluate(pipe, items, ["dense"], out, **kw)
    evaluate(pipe, items[:2], ["dense"], out, overwrite=True, warmup=False, **kw)
    assert len(f.read_text().splitlines()) == 2


def test_match_needs_the_sparse_run(tiny_vl, synthetic_samples, tmp_path):
    model, proc = tiny_vl
    data = _eval_file(tmp_path, synthetic_samples)
    pipe = TokenSparseInference(model, proc, method=load_method_config(),
                                config=InferenceConfig(boxes="oracle", answer="choice"))
    items = load_eval_samples(data, limit=2)
    with pytest.raises(ValueError, match="run mode 'sparse' first"):
        evaluate(pipe, items, ["baseline:pool"], tmp_path / "o", model_name="tiny", data_path=str(data),
                 progress=False, log=lambda s: None)
    # listed after the baseline, the sparse mode still runs first
    s = evaluate(pipe, items, ["baseline:pool", "sparse"], tmp_path / "m", model_name="tiny", data_path=str(data),
                 progress=False, warmup=False, log=lambda s: None)
    assert [m["slug"] for m in s["modes"]] == [SPARSE, "baseline-pool-match"]
    s = evaluate(pipe, items, ["baseline:pool"], tmp_path / "o", model_name="tiny", data_path=str(data),
                 keep_ratio=0.25, progress=False, log=lambda s: None)
    (m,) = s["modes"]
    assert m["slug"] == "baseline-pool-r0.25" and m["keep_ratio"] == 0.25 and m["rel"] is None
    assert "| baseline:pool (keep 0.25) | 2 | 0.250 |" in format_markdown(summarize(tmp_path / "o"))


def test_cli_embedded_default(tmp_path, monkeypatch, capsys):
    """`python -m tsparse.eval` with no model and no data: the tiny model on the synthetic scans."""
    monkeypatch.setenv("TSPARSE_CACHE", str(tmp_path / "cache"))
    rc = main(["--limit", "3", "--mode", "dense,sparse,baseline:divprune", "--out", str(tmp_path / "res"),
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "embedded default" in out and "| dense | 3 | 1.000 |" in out
    assert f"| sparse (oracle boxes, fusion {FUSION}) | 3 |" in out and "baseline:divprune (keep matched)" in out
    s = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert [m["n"] for m in s["modes"]] == [3, 3, 3]
    assert s["modes"][1]["keep_ratio"] < 1 and s["modes"][1]["settings"]["boxes"] == "oracle"
    assert (tmp_path / "cache" / "synthetic_scans").is_dir()
    rc = main(["--score", str(next((tmp_path / "cache").rglob("val.json")))])
    assert rc == 0 and '"missing": 3' in capsys.readouterr().out  # the data file has no responses


# --------------------------------------------------------------------------------------
# The paper's quantities: sequence length ratio and end-to-end cost, from known token counts
def _record(key, *, kept, visual, prompt, dense_prompt, loc_prompt=0, loc_new=0, correct=True, batch="s-0",
            timings=None, mode="sparse", boxes=(), box_iou=None):
    t = {"preprocess_ms": 1.0, "vision_ms": 1.0, "localize_ms": 0.0, "localize_prefill_ms": 0.0, "prune_ms": 0.0,
         "prefill_ms": 2.0, "decode_ms": 4.0, "total_ms": 8.0}
    t.update(timings or {})
    r = {"key": key, "dataset": "d", "subset": None, "gt": "A", "correct": correct, "prediction": "A",
         "status": "answered", "batch_id": batch, "id": key, "mode": mode, "response": "", "answer": "A",
         "choice": "A", "boxes": list(boxes), "box_source": "generated" if loc_new else None, "box_reason": None,
         "keep_ratio": kept / visual, "kept_tokens": [kept], "visual_tokens": [visual], "fallback": [False],
         "prompt_tokens": prompt, "new_tokens": 3, "timings": t, "batch": 0, "batch_size": 1,
         "dense_prompt_tokens": dense_prompt, "localization_prompt": "full" if loc_new else None,
         "localization_prompt_tokens": loc_prompt, "localization_new_tokens": loc_new}
    if box_iou is not None:
        r["box_iou"] = box_iou
    return r


def _write_run(out, slug, settings, records):
    (out / f"{slug}.run.json").write_text(json.dumps(settings))
    (out / f"{slug}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sequence_length_ratio_and_end_to_end_cost_from_known_counts(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    # dense: 2 samples of 100 visual + 50 text tokens = 150 prompt tokens; 8 ms end to end each
    _write_run(out, "dense", {"mode": "dense", "data": "x"}, [
        _record("0", kept=100, visual=100, prompt=150, dense_prompt=150, batch="s-0", mode="dense"),
        _record("1", kept=100, visual=100, prompt=150, dense_prompt=150, batch="s-1", mode="dense")])
    # sparse: 20 and 40 visual tokens kept (keep 0.3); prompts 70 and 90 of 150 (seq len 160 / 300);
    # the localization stream: 200-token prompts, 30 and 10 generated tokens; 16 ms end to end per sample
    loc = {"localize_ms": 6.0, "localize_prefill_ms": 2.0, "total_ms": 16.0}
    _write_run(out, "sparse-generated-summary", {"mode": "sparse", "data": "x", "boxes": "generated",
                                                 "fuse": "summary", "localization_prompt": "full"}, [
        _record("0", kept=20, visual=100, prompt=70, dense_prompt=150, loc_prompt=200, loc_new=30, batch="t-0",
                timings=loc, box_iou=0.5),
        _record("1", kept=40, visual=100, prompt=90, dense_prompt=150, loc_prompt=200, loc_new=10, batch="t-1",
                timings=loc, correct=False, box_iou=0.25)])
    s = summarize(out)
    dense, sparse = s["modes"]
    assert dense["seq_len_ratio"] == 1.0 and dense["e2e_speedup"] == 1.0 and dense["localization_new_tokens_mean"] == 0
    assert sparse["keep_ratio"] == pytest.approx(60 / 200)
    assert sparse["seq_len_ratio"] == pytest.approx(160 / 300)
    assert sparse["prompt_tokens"] == 160 and sparse["dense_prompt_tokens"] == 300
    assert sparse["localization_new_tokens_mean"] == 20 and sparse["localization_prompt_tokens_mean"] == 200
    assert sparse["localization_ms_per_sample"] == 6.0 and sparse["box_iou"] == pytest.approx(0.375)
    assert sparse["e2e_ms_per_sample"] == 16.0 and sparse["e2e_speedup"] == pytest.approx(0.5)  # slower than dense
    assert sparse["prefill_speedup"] == pytest.approx(1.0)  # the prefill alone would have said "no loss"
    assert sparse["rel"] == pytest.approx(50.0)
    md = format_markdown(s)
    assert "| dense | 2 | 1.000 | 1.000 |" in md
    assert "| sparse (generated boxes, fusion summary) | 2 | 0.300 | 0.533 | 50.0 | 50.0 | 50.0% | 2.00 | 1.00x | 20.0 | 16.00 | 0.50x |" in md
    ab = format_ablation(s, by="fuse")
    assert "| dense | 2 | 100.0 | 100.0% | 1.000 | 1.000 | 0.0 | 0.00 | - | 8.00 | 1.000 |" in ab
    assert "| summary | 2 | 50.0 | 50.0% | 0.300 | 0.533 | 20.0 | 6.00 | 0.375 | 16.00 | 2.000 |" in ab
    assert "| full | 2 |" in format_ablation(s, by="localization_prompt")
    with pytest.raises(ValueError, match="`by`"):
        format_ablation(s, by="mode")


def test_fusion_ablation_runs_each_method(tiny_vl, synthetic_samples, tmp_path):
    model, proc = tiny_vl
    data = _eval_file(tmp_path, synthetic_samples)
    pipe = TokenSparseInference(model, proc, method=load_method_config(),
                                config=InferenceConfig(boxes="oracle", answer="choice", batch_size=4))
    items = load_eval_samples(data, limit=3)
    methods = ["none", "cosine_mean", "nearest_kept", "summary"]
    s = evaluate(pipe, items, ["dense", "sparse"], tmp_path / "a", model_name="tiny", data_path=str(data),
                 progress=False, warmup=False, fusions=methods, log=lambda s: None)
    assert pipe.config.fuse is None  # restored
    by = {m["slug"]: m for m in s["modes"]}
    assert sorted(by) == sorted(["dense"] + [f"sparse-oracle-{m}" for m in methods])
    kept = {m: by[f"sparse-oracle-{m}"]["kept_tokens"] for m in methods}
    assert kept["none"] == kept["cosine_mean"] == kept["nearest_kept"] == kept["summary"] - 3  # + 1 per image
    for m in methods:
        row = by[f"sparse-oracle-{m}"]
        assert row["settings"]["fuse"] == m and 0 < row["seq_len_ratio"] < 1 and row["e2e_speedup"] > 0
    table = format_ablation(s)
    assert [line.split(" | ")[0][2:] for line in table.splitlines()[2:]] == ["dense"] + sorted(methods)


def test_cli_fusion_and_localization_prompt_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TSPARSE_CACHE", str(tmp_path / "cache"))
    rc = main(["--limit", "2", "--fusion", "none,summary", "--out", str(tmp_path / "f"), "--no-progress",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "Fusion ablation" in out and "| summary | 2 |" in out and "| none | 2 |" in out
    rc = main(["--limit", "2", "--localization-prompt", "full,box_only", "--localization-max-new-tokens", "4",
               "--out", str(tmp_path / "l"), "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "Localization prompts" in out and "| box_only | 2 |" in out and "| full | 2 |" in out
    s = json.loads((tmp_path / "l" / "summary.json").read_text())
    loc = [m for m in s["modes"] if m["mode"] == "sparse"]
    assert {m["settings"]["localization_prompt"] for m in loc} == {"full", "box_only"}
    assert all(0 < m["localization_new_tokens_mean"] <= 4 for m in loc)
    capsys.readouterr()
    for bad, flag in ((["--fusion", "mean"], "--fusion"), (["--localization-prompt", "short"], "--localization-prompt")):
        assert main(bad + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]
