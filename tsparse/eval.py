"""Evaluation of token-sparse inference on medical VQA: accuracy per dataset, relative performance
against the dense run, visual-token keep ratio, prefill and end-to-end latency and throughput.

    python -m tsparse.eval [--model tiny|PATH] [--data FILE] [--mode dense,sparse,baseline:fastv,...]
                           [--keep-ratio match|R] [--out DIR] [--limit N] [--batch-size B]
    python -m tsparse.eval --fusion none,cosine_mean,nearest_kept,summary   # fusion ablation table
    python -m tsparse.eval --boxes generated --localization-prompt full,box_only   # localization prompts
    python -m tsparse.eval --score PREDICTIONS.json       # score existing predictions, no model

Without ``--model`` and ``--data`` it runs the embedded default: the tiny random Qwen2.5-VL on
the synthetic scans (``configs/eval.yaml``, section ``embedded``), on the CPU, no download.

Data (:func:`load_eval_samples`): ViTAR-16K-style JSON (``image_path``, ``question`` with inline
``A) ...`` options, ``answer`` letter, ``bbox``) and the common medical VQA evaluation layout of
HuatuoGPT-Vision's ``medical_multimodel_evaluation_data.json`` (``question``, ``options`` as a
list of texts, ``answer`` as the correct option's TEXT, ``image`` as a list of paths relative to
the file, ``dataset`` and optional ``subset``; ``question_type == "open"`` records are skipped as
its scorer does). JSON Lines works too. Options missing from the question text are appended as
``A. ...`` lines; an answer given as option text becomes its letter (``answer_label`` /
``answer_idx`` fields win when present).

Scoring (:func:`score_response`): the ``<answer>`` block of the response, or, without one, the
text after the reasoning (models that answer directly); an option letter in the forms
:func:`~tsparse.dualstream.rewards.parse_choice` accepts (``"C"``, ``"c"``, ``"(C)"``, ``"C) text"``,
or exactly one option's text, ViTAR-style normalization); a short answer by normalized equality.
No answer, an unparseable one, or a missing ground truth (``"?"``) counts as wrong.

Outputs under ``--out`` (default ``eval_results/<model>__<data>``): one append-only JSONL per mode
(one line per sample, flushed per batch; a rerun skips samples already there, so long files
resume), its settings in ``<mode>.run.json`` (a rerun with other settings is refused unless
``--overwrite``), and ``summary.json`` + ``summary.md`` over every mode evaluated there.

Summary metrics per mode: accuracy per dataset, ``avg`` (mean over datasets, as papers average
benchmarks) and ``micro``; ``rel`` = avg / dense avg (%); ``keep`` = kept / dense visual tokens over
all samples (a ``summary`` fusion token counts as kept); ``seq_len_ratio`` = the answer stream's
prompt tokens over the same prompts' dense lengths, text included (the whole-sequence ratio: the
paper's "% of the original sequence length"); answer-stream prefill ms per sample and its speedup
over dense; the localization stream's prompt and generated tokens per sample (0 when it did not
run: dense, baselines, given or oracle boxes); end-to-end ms per sample (preprocess + vision +
localization prefill and decode + pruning + answer prefill + decode) and its speedup over dense
(``e2e_speedup``: the cost of the WHOLE pipeline, so a speedup is never read off the prefill
alone) and samples/s; prefill tokens/s. Timings are per batch, divided by its samples.

``--fusion a,b,...`` runs the sparse mode once per fusion method (``none``, ``cosine_mean``,
``nearest_kept``, ``summary``) next to dense and prints the ablation table (:func:`format_ablation`:
accuracy, keep ratio, sequence length ratio, end-to-end cost against dense per method);
``--localization-prompt a,b,...`` does the same for named localization prompts (``full``,
``box_only``, ...: localization tokens generated and end-to-end ms per sample, same run).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .dualstream.data import VQASample, load_vitar_json, parse_options, read_records
from .dualstream.format import extract_answer
from .dualstream.rewards import best_match_iou, normalize_text, parse_choice

__all__ = [
    "EvalItem",
    "Score",
    "load_eval_samples",
    "score_response",
    "accuracy_by_dataset",
    "score_predictions",
    "mode_slug",
    "evaluate",
    "summarize",
    "format_markdown",
    "format_ablation",
    "main",
]

PathLike = Union[str, os.PathLike]
_LETTERS = "ABCDEFGHIJ"
_THINK_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)


# --------------------------------------------------------------------------------------
# Data
@dataclass(frozen=True)
class EvalItem:
    """One evaluation question: ``key`` (``"<record index>:<id>"``, what resuming matches on),
    the :class:`~tsparse.dualstream.data.VQASample` (question with its options, answer as a
    letter for multiple choice), ``dataset`` and ``subset`` (``None`` when absent)."""

    key: str
    sample: VQASample
    dataset: str
    subset: Optional[str] = None


def _answer_letter(answer: str, options: Mapping[str, str], meta: Mapping[str, Any]) -> str:
    """The ground truth as an option letter when it names one, else as given."""
    for key in ("answer_label", "answer_idx"):
        v = meta.get(key)
        if isinstance(v, str) and len(v.strip()) == 1 and v.strip().upper() in _LETTERS:
            return v.strip().upper()
    a = answer.strip()
    if len(a) == 1 and a.upper() in _LETTERS and (not options or a.upper() in options):
        return a.upper()
    if options:
        exact = [k for k, v in options.items() if v.strip() == a]
        if len(exact) == 1:
            return exact[0]
        norm = [k for k, v in options.items() if normalize_text(v) == normalize_text(a) != ""]
        if len(norm) == 1:
            return norm[0]
    return a


def load_eval_samples(
    path: PathLike, *, limit: Optional[int] = None, skip_open: bool = True, check_images: bool = True,
) -> list[EvalItem]:
    """Reads an evaluation file (see the module docs for the layouts) into :class:`EvalItem`.

    Args:
        path: a JSON list or JSON Lines (``.jsonl``) file; image paths relative to it.
        limit: the first ``limit`` records only (before skipping open questions).
        skip_open: drop records whose ``question_type`` is ``"open"``.
        check_images: raise ``FileNotFoundError`` naming the record when an image is missing.

    Raises ``ValueError``/``FileNotFoundError`` naming the record and field for malformed input.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`: no such file {str(path)!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"`limit` must be a non-negative int or None, got {limit!r}")
    samples = load_vitar_json(path, check_images=check_images, invalid_boxes="drop", limit=limit)
    out = []
    for i, s in enumerate(samples):
        meta = dict(s.meta)
        if skip_open and str(meta.get("question_type", "")).lower() == "open":
            continue
        options = dict(s.options)
        question = s.question
        if options and not parse_options(question):
            question = question.rstrip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
        answer = _answer_letter(s.answer, options, meta)
        dataset = meta.get("dataset", meta.get("dataset_name", meta.get("data_source")))
        dataset = str(dataset) if dataset not in (None, "") else path.stem
        subset = meta.get("subset")
        subset = str(subset) if subset not in (None, "") else None
        sample = dataclasses.replace(s, question=question, answer=answer, options=options)
        out.append(EvalItem(f"{i}:{s.id}", sample, dataset, subset))
    return out


# --------------------------------------------------------------------------------------
# Scoring
@dataclass(frozen=True)
class Score:
    """``correct``; ``prediction``: the option letter (multiple choice) or normalized short
    answer read from the response (``None`` when none); ``status``: ``"answered"``,
    ``"unparsed"`` (text, but no option named) or ``"missing"`` (empty response)."""

    correct: bool
    prediction: Optional[str]
    status: str


def score_response(response: Optional[str], answer: str, options: Optional[Mapping[str, str]] = None) -> Score:
    """Scores one response against the ground truth (see the module docs).

    Args:
        response: the model's text (``None`` or blank: missing).
        answer: the ground truth: an option letter (multiple choice) or a short answer.
        options: option letter -> text (lets an answer written as option text count).
    """
    if not isinstance(answer, str):
        raise TypeError(f"`answer` must be a str, got {type(answer).__name__}")
    if response is None or not str(response).strip():
        return Score(False, None, "missing")
    response = str(response)
    pred = extract_answer(response)
    if pred is None:
        closes = list(_THINK_CLOSE.finditer(response))
        pred = response[closes[-1].end():] if closes else response
    if not pred.strip():
        return Score(False, None, "missing")
    gt = answer.strip()
    opts = {str(k).strip().upper(): str(v) for k, v in (options or {}).items()}
    if len(gt) == 1 and gt.upper() in _LETTERS:
        letter = parse_choice(pred, opts)
        return Score(letter == gt.upper(), letter, "answered" if letter else "unparsed")
    norm = normalize_text(pred)
    return Score(bool(norm) and norm == normalize_text(gt), norm or None, "answered" if norm else "unparsed")


def accuracy_by_dataset(records: Iterable[Mapping[str, Any]]) -> dict:
    """``{"datasets": {name: {"n", "correct", "accuracy"}}, "avg", "micro", "n"}`` from records
    with ``dataset`` and ``correct``; subsets appear as ``"<dataset>/<subset>"`` under
    ``"subsets"``. ``avg`` is the mean of the datasets' accuracies; ``None`` when empty."""
    per: dict = {}
    sub: dict = {}
    for r in records:
        d = str(r["dataset"])
        c = bool(r["correct"])
        per.setdefault(d, [0, 0])
        per[d][0] += c
        per[d][1] += 1
        if r.get("subset"):
            s = f"{d}/{r['subset']}"
            sub.setdefault(s, [0, 0])
            sub[s][0] += c
            sub[s][1] += 1
    fmt = lambda m: {k: {"n": n, "correct": c, "accuracy": c / n} for k, (c, n) in sorted(m.items())}  # noqa: E731
    datasets = fmt(per)
    n = sum(v["n"] for v in datasets.values())
    return {
        "datasets": datasets,
        "subsets": fmt(sub),
        "avg": (sum(v["accuracy"] for v in datasets.values()) / len(datasets)) if datasets else None,
        "micro": (sum(v["correct"] for v in datasets.values()) / n) if n else None,
        "n": n,
    }


_RESPONSE_FIELDS = ("response", "model_output", "prediction", "output")


def score_predictions(path: PathLike, *, skip_open: bool = True) -> dict:
    """Scores a predictions file without a model: records in either evaluation layout plus the
    model's text in ``response``, ``model_output`` (HuatuoGPT-Vision's field), ``prediction`` or
    ``output`` (absent or null: missing). Images are not needed. Returns
    :func:`accuracy_by_dataset`'s dict plus ``"status"`` counts (answered / unparsed / missing)."""
    path = Path(path)
    raw = read_records(path) if path.is_file() else None
    if raw is None:
        raise FileNotFoundError(f"`path`: no such file {str(path)!r}")
    items = load_eval_samples(path, skip_open=skip_open, check_images=False)
    by_index = {int(it.key.split(":", 1)[0]): it for it in items}
    rows, status = [], {"answered": 0, "unparsed": 0, "missing": 0}
    for i, rec in enumerate(raw):
        it = by_index.get(i)
        if it is None:
            continue
        resp = next((rec[k] for k in _RESPONSE_FIELDS if k in rec), None)
        sc = score_response(resp if resp is None else str(resp), it.sample.answer, it.sample.options)
        status[sc.status] += 1
        rows.append({"dataset": it.dataset, "subset": it.subset, "correct": sc.correct})
    out = accuracy_by_dataset(rows)
    out["status"] = status
    return out


# --------------------------------------------------------------------------------------
# Running
def mode_slug(mode: str, config, keep_ratio: Union[str, float, None] = None, *,
              default_fuse: str = "cosine_mean") -> str:
    """The file stem of a mode's results: ``dense``, ``sparse-<boxes>-<fusion>`` (plus
    ``-loc_<prompt>`` for generated boxes with a localization prompt other than ``full``),
    ``baseline-<name>-<match|r<ratio>>[-<fusion>]``. ``default_fuse``: the fusion method a
    ``config.fuse`` of ``None`` stands for (the method config's ``pruning.fuse``)."""
    from .infer import parse_mode

    kind, name = parse_mode(mode)
    if kind == "dense":
        return "dense"
    if kind == "sparse":
        fuse = config.fuse if config.fuse is not None else default_fuse
        slug = f"sparse-{config.boxes}-{fuse}"
        if config.boxes == "generated" and config.localization_prompt != "full":
            slug += f"-loc_{config.localization_prompt}"
        return slug
    keep = "match" if keep_ratio in (None, "match") else f"r{float(keep_ratio):g}"
    return f"baseline-{name}-{keep}" + ("" if config.baseline_fuse == "none" else f"-{config.baseline_fuse}")


def _run_settings(pipe, mode: str, keep, model_name: str, data_path: str) -> dict:
    from .infer import parse_mode

    cfg = pipe.config
    kind, _ = parse_mode(mode)
    prompts = json.dumps(dataclasses.asdict(pipe.method.prompts), sort_keys=True)
    s = {
        "model": model_name, "data": data_path, "mode": mode,
        "dtype": str(next(pipe.model.parameters()).dtype).replace("torch.", ""),
        "answer": cfg.answer, "prompts_sha": hashlib.sha256(prompts.encode()).hexdigest()[:12],
    }
    if cfg.answer == "choice":
        s["choice_prefix"] = cfg.choice_prefix
    else:
        s["max_new_tokens"] = cfg.max_new_tokens
    if kind == "sparse":
        s.update(boxes=cfg.boxes, fuse=cfg.fuse if cfg.fuse is not None else pipe.method.pruning.fuse,
                 pruning=dataclasses.asdict(pipe.method.pruning))
        if cfg.boxes == "generated":
            s["localization_max_new_tokens"] = cfg.localization_max_new_tokens
            s["max_boxes"] = pipe.method.format.max_boxes
            s["localization_prompt"] = cfg.localization_prompt
            named = cfg.named_localization_prompt()
            if named is not None:
                s["localization_prompt_def"] = dataclasses.asdict(named)
    if kind == "baseline":
        s.update(keep=keep, baseline_fuse=cfg.baseline_fuse, seed=cfg.seed, fastv_layer=cfg.fastv_layer)
    return s


def _load_records(path: Path) -> dict:
    """Reads a results JSONL; a truncated last line (an interrupted write) is cut off the file."""
    if not path.is_file():
        return {}
    out: dict = {}
    good_bytes = 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not line.endswith(b"\n"):
            break
        out[rec["key"]] = rec
        good_bytes += len(line)
    if good_bytes != len(data):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return out


def evaluate(
    pipe,
    items: Sequence[EvalItem],
    modes: Sequence[str],
    out_dir: PathLike,
    *,
    model_name: str,
    data_path: str,
    keep_ratio: Union[str, float] = "match",
    overwrite: bool = False,
    progress: bool = True,
    warmup: bool = True,
    fusions: Optional[Sequence[Union[str, bool]]] = None,
    localization_prompts: Optional[Sequence[str]] = None,
    log=print,
) -> dict:
    """Runs each mode over ``items`` with ``pipe`` (a :class:`~tsparse.infer.TokenSparseInference`),
    appending per-sample results to ``out_dir/<slug>.jsonl`` and skipping samples already there,
    then writes and returns :func:`summarize`'s summary.

    Args:
        modes: e.g. ``["dense", "sparse", "baseline:fastv"]``; run as dense, sparse, then the
            baselines (a baseline with ``keep_ratio="match"`` needs the sparse mode's results).
        keep_ratio: baselines: ``"match"`` (each image keeps exactly what the sparse run kept
            for it) or a ratio in (0, 1].
        model_name, data_path: recorded in the run settings (a rerun must match them).
        overwrite: discard a mode's existing results when its settings differ (else an error).
        warmup: run each mode once on a 1-sample batch before the timed batches (not recorded).
        fusions: run the sparse mode once per fusion method (default: the config's); a baseline
            with ``keep_ratio="match"`` matches the FIRST variant's kept counts.
        localization_prompts: run the sparse mode once per named localization prompt (with
            ``boxes="generated"``; default: the config's); combined with ``fusions``.
    """
    from .infer import parse_mode

    if keep_ratio != "match" and (isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float))
                                  or not 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"`keep_ratio` must be 'match' or a number in (0, 1], got {keep_ratio!r}")
    kinds = {"dense": 0, "sparse": 1, "baseline": 2}
    modes = sorted(dict.fromkeys(modes), key=lambda m: kinds[parse_mode(m)[0]])  # matching needs sparse first
    base_cfg = pipe.config
    if localization_prompts and base_cfg.boxes != "generated" and any(p != base_cfg.localization_prompt
                                                                       for p in localization_prompts):
        raise ValueError("`localization_prompts` apply to generated boxes (boxes='generated'), "
                         f"not boxes={base_cfg.boxes!r}")
    variants = [dataclasses.replace(base_cfg, **({} if f is None else {"fuse": f}),
                                    **({} if lp is None else {"localization_prompt": lp}))
                for f in (list(fusions) if fusions else [None])
                for lp in (list(localization_prompts) if localization_prompts else [None])]
    runs = [(m, c) for m in modes for c in (variants if parse_mode(m)[0] == "sparse" else [base_cfg])]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("`items` have duplicate keys")
    session = f"{int(time.time() * 1e3):x}"
    bs = base_cfg.batch_size
    default_fuse = pipe.method.pruning.fuse
    try:
        for mode, run_cfg in runs:
            pipe.config = run_cfg
            kind, _ = parse_mode(mode)
            keep = keep_ratio if kind == "baseline" else None
            slug = mode_slug(mode, run_cfg, keep, default_fuse=default_fuse)
            settings = _run_settings(pipe, mode, keep, model_name, data_path)
            run_file, res_file = out / f"{slug}.run.json", out / f"{slug}.jsonl"
            if run_file.is_file():
                old = json.loads(run_file.read_text(encoding="utf-8"))
                if old != settings:
                    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                    if not overwrite:
                        raise ValueError(f"{res_file} was produced with other settings (differ: {diff}); "
                                         f"use another --out or --overwrite")
                    res_file.unlink(missing_ok=True)
            run_file.write_text(json.dumps(settings, indent=1), encoding="utf-8")
            done = _load_records(res_file)
            todo = [it for it in items if it.key not in done]
            counts = None
            ratio = float(keep) if kind == "baseline" and keep != "match" else None
            if kind == "baseline" and keep == "match":
                ref_slug = mode_slug("sparse", variants[0], default_fuse=default_fuse)
                ref = _load_records(out / f"{ref_slug}.jsonl")
                missing = [it.key for it in todo if it.key not in ref]
                if missing:
                    raise ValueError(f"{mode} with keep_ratio='match' needs the sparse run's kept counts "
                                     f"({out / (ref_slug + '.jsonl')}) for {len(missing)} sample(s), e.g. "
                                     f"{missing[0]!r}: run mode 'sparse' first or give a keep ratio")
                counts = {it.key: ref[it.key]["kept_tokens"] for it in todo}
            log(f"[{slug}] {len(done)} done, {len(todo)} to run -> {res_file}")
            if todo and warmup:  # one untimed 1-sample batch: first-call costs (allocations, kernels) stay out
                pipe.run_batch([todo[0].sample], mode=mode, keep_counts=[counts[todo[0].key]] if counts else None,
                               keep_ratio=ratio)
            bar = None
            if progress and todo:
                try:
                    from tqdm import tqdm

                    bar = tqdm(total=len(todo), desc=slug, file=sys.stderr, leave=False)
                except ImportError:  # pragma: no cover - tqdm is a dependency
                    bar = None
            with open(res_file, "a", encoding="utf-8") as f:
                for lo in range(0, len(todo), bs):
                    part = todo[lo:lo + bs]
                    kc = [counts[it.key] for it in part] if counts is not None else None
                    results = pipe.run_batch([it.sample for it in part], mode=mode, keep_counts=kc, keep_ratio=ratio)
                    for it, r in zip(part, results):
                        sc = score_response(r.response, it.sample.answer, it.sample.options)
                        rec = {"key": it.key, "dataset": it.dataset, "subset": it.subset, "gt": it.sample.answer,
                               "correct": sc.correct, "prediction": sc.prediction, "status": sc.status,
                               "batch_id": f"{session}-{r.batch}", **r.to_dict()}
                        if r.mode == "sparse" and r.box_source in ("generated", "localization_text") and it.sample.boxes:
                            rec["box_iou"] = best_match_iou(r.boxes, it.sample.boxes)
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    if bar is not None:
                        bar.update(len(part))
            if bar is not None:
                bar.close()
    finally:
        pipe.config = base_cfg
    summary = summarize(out, keys=keys, data_path=data_path)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "summary.md").write_text(format_markdown(summary) + "\n", encoding="utf-8")
    return summary


# --------------------------------------------------------------------------------------
# Summary
_ORDER = {"dense": 0, "sparse": 1, "baseline": 2}


def _mode_metrics(records: list) -> dict:
    acc = accuracy_by_dataset(records)
    kept = sum(sum(r["kept_tokens"]) for r in records)
    vis = sum(sum(r["visual_tokens"]) for r in records)
    batches: dict = {}
    for r in records:
        batches[r["batch_id"]] = (r["timings"], r["batch_size"])
    n_b = sum(bs for _, bs in batches.values())
    tsum = lambda k: sum(t.get(k, 0.0) for t, _ in batches.values())  # noqa: E731
    prefill, total = tsum("prefill_ms"), tsum("total_ms")
    phases = {k[:-3]: tsum(k) / n_b for k in ("preprocess_ms", "vision_ms", "localize_ms", "prune_ms",
                                               "prefill_ms", "decode_ms", "total_ms")} if n_b else {}
    images = [f for r in records for f in r["fallback"]]
    gen = [r for r in records if r.get("box_source") in ("generated", "localization_text")]
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    dense_prompt = sum(r.get("dense_prompt_tokens") or 0 for r in records)
    loc_new = [r.get("localization_new_tokens", 0) for r in records]
    loc_prompt = [r.get("localization_prompt_tokens", 0) for r in records]
    ious = [r["box_iou"] for r in records if r.get("box_iou") is not None]
    n_rec = len(records)
    status: dict = {}
    for r in records:
        status[r["status"]] = status.get(r["status"], 0) + 1
    return {
        **acc,
        "keep_ratio": kept / vis if vis else 1.0,
        "keep_ratio_mean": sum(r["keep_ratio"] for r in records) / len(records) if records else None,
        "kept_tokens": kept,
        "visual_tokens": vis,
        "fallback_rate": (sum(images) / len(images)) if images else 0.0,
        "boxes_parsed_rate": (sum(1 for r in gen if r["boxes"]) / len(gen)) if gen else None,
        "box_iou": (sum(ious) / len(ious)) if ious else None,
        "prompt_tokens": prompt_tokens,
        "dense_prompt_tokens": dense_prompt,
        "seq_len_ratio": (prompt_tokens / dense_prompt) if dense_prompt else None,
        "localization_prompt_tokens_mean": sum(loc_prompt) / n_rec if n_rec else None,
        "localization_new_tokens_mean": sum(loc_new) / n_rec if n_rec else None,
        "localization_ms_per_sample": phases.get("localize"),
        "prefill_ms_per_sample": prefill / n_b if n_b else None,
        "e2e_ms_per_sample": total / n_b if n_b else None,
        "samples_per_s": n_b / (total / 1e3) if total else None,
        "prefill_tokens_per_s": sum(r["prompt_tokens"] for r in records) / (prefill / 1e3) if prefill else None,
        "new_tokens_mean": sum(r["new_tokens"] for r in records) / len(records) if records else None,
        "phases_ms_per_sample": phases,
        "batches": len(batches),
        "status": status,
    }


def summarize(out_dir: PathLike, keys: Optional[Sequence[str]] = None, data_path: Optional[str] = None) -> dict:
    """Aggregates every ``<slug>.jsonl`` under ``out_dir`` (restricted to ``keys`` when given, and
    to runs on ``data_path`` when given): per-mode metrics (see the module docs) and each mode's
    ``rel`` (avg accuracy / the dense mode's, %), ``prefill_speedup`` (dense prefill ms per
    sample / the mode's) and ``e2e_speedup`` (dense end-to-end ms per sample / the mode's: the
    whole pipeline, localization included)."""
    out = Path(out_dir)
    wanted = set(keys) if keys is not None else None
    modes = []
    for res in sorted(out.glob("*.jsonl")):
        run = res.with_suffix(".run.json")
        if not run.is_file():
            continue
        settings = json.loads(run.read_text(encoding="utf-8"))
        if data_path is not None and settings.get("data") != data_path:
            continue
        recs = [r for k, r in _load_records(res).items() if wanted is None or k in wanted]
        if not recs:
            continue
        modes.append({"slug": res.stem, "mode": settings["mode"], "settings": settings, **_mode_metrics(recs)})
    modes.sort(key=lambda m: (_ORDER[m["mode"].split(":")[0]], m["slug"]))
    dense = next((m for m in modes if m["mode"] == "dense"), None)
    for m in modes:
        m["rel"] = (100.0 * m["avg"] / dense["avg"]) if dense and dense["avg"] else None
        m["prefill_speedup"] = (dense["prefill_ms_per_sample"] / m["prefill_ms_per_sample"]) if (
            dense and dense["prefill_ms_per_sample"] and m["prefill_ms_per_sample"]) else None
        m["e2e_speedup"] = (dense["e2e_ms_per_sample"] / m["e2e_ms_per_sample"]) if (
            dense and dense["e2e_ms_per_sample"] and m["e2e_ms_per_sample"]) else None
    datasets = sorted({d for m in modes for d in m["datasets"]})
    return {"out_dir": str(out), "datasets": datasets, "modes": modes}


def _f(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec) + suffix


def _label(m: Mapping[str, Any]) -> str:
    s = m["settings"]
    label = m["mode"]
    if m["mode"] == "sparse":
        extra = f", fusion {s.get('fuse')}"
        if s.get("boxes") == "generated" and s.get("localization_prompt", "full") != "full":
            extra += f", {s['localization_prompt']} prompt"
        label += f" ({s.get('boxes')} boxes{extra})"
    elif m["mode"].startswith("baseline"):
        label += f" (keep {'matched' if s.get('keep') == 'match' else s.get('keep')}"
        label += "" if s.get("baseline_fuse", "none") == "none" else f", fusion {s['baseline_fuse']}"
        label += ")"
    return label


def format_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table: one row per mode; accuracy in %. ``keep``: visual
    tokens kept; ``seq len``: answer-prompt tokens over the dense prompt's (text included);
    ``loc tokens``: localization tokens generated per sample; ``e2e x``: dense end-to-end ms
    per sample over the mode's (whole pipeline, localization included)."""
    ds = list(summary["datasets"])
    head = ["mode", "n", "keep", "seq len"] + ds + ["avg", "rel. to dense", "prefill ms/sample", "prefill x",
                                                    "loc tokens", "e2e ms/sample", "e2e x", "samples/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for m in summary["modes"]:
        row = [_label(m), str(m["n"]), _f(m["keep_ratio"], ".3f"), _f(m.get("seq_len_ratio"), ".3f")]
        row += [_f(100 * m["datasets"][d]["accuracy"] if d in m["datasets"] else None, ".1f") for d in ds]
        row += [_f(None if m["avg"] is None else 100 * m["avg"], ".1f"), _f(m["rel"], ".1f", "%"),
                _f(m["prefill_ms_per_sample"], ".2f"), _f(m["prefill_speedup"], ".2f", "x"),
                _f(m.get("localization_new_tokens_mean"), ".1f"),
                _f(m["e2e_ms_per_sample"], ".2f"), _f(m.get("e2e_speedup"), ".2f", "x"), _f(m["samples_per_s"], ".1f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_ablation(summary: Mapping[str, Any], by: str = "fuse") -> str:
    """One row per variant of the sparse mode (``by="fuse"``: fusion method;
    ``"localization_prompt"``: localization prompt), under the dense row: accuracy (avg, %),
    relative to dense, visual-token keep ratio, sequence length ratio, localization tokens
    generated and ms per sample, box IoU of generated boxes against the data's, end-to-end ms
    per sample and its cost against dense (``e2e cost`` = mode / dense: < 1 is cheaper)."""
    if by not in ("fuse", "localization_prompt"):
        raise ValueError(f"`by` must be 'fuse' or 'localization_prompt', got {by!r}")
    head = [by.replace("_", " "), "n", "accuracy", "rel. to dense", "keep", "seq len", "loc tokens", "loc ms",
            "box IoU", "e2e ms/sample", "e2e cost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    dense = next((m for m in summary["modes"] if m["mode"] == "dense"), None)
    rows = ([("dense", dense)] if dense else []) + [
        (str(m["settings"].get(by, "full")), m) for m in summary["modes"] if m["mode"] == "sparse"]
    for name, m in rows:
        cost = (m["e2e_ms_per_sample"] / dense["e2e_ms_per_sample"]) if (
            dense and dense["e2e_ms_per_sample"] and m["e2e_ms_per_sample"]) else None
        lines.append("| " + " | ".join([
            name, str(m["n"]), _f(None if m["avg"] is None else 100 * m["avg"], ".1f"), _f(m["rel"], ".1f", "%"),
            _f(m["keep_ratio"], ".3f"), _f(m.get("seq_len_ratio"), ".3f"),
            _f(m.get("localization_new_tokens_mean"), ".1f"), _f(m.get("localization_ms_per_sample"), ".2f"),
            _f(m.get("box_iou"), ".3f"), _f(m["e2e_ms_per_sample"], ".2f"), _f(cost, ".3f"),
        ]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
def _default_out(root: str, model: str, data_label: str) -> Path:
    m = "tiny" if model == "tiny" else Path(model).name
    return Path(root) / f"{m}__{data_label}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m tsparse.eval``; see the module docs. A user's mistake prints one line on stderr
    naming it and returns 2 (``--debug`` / ``TSPARSE_DEBUG=1``: the traceback)."""
    from ._cli import run

    return run(_main, argv, "python -m tsparse.eval")


def _check_eval_args(args) -> Optional[Union[str, float]]:
    """Checks the flags before any data or model is loaded; returns ``--keep-ratio`` parsed
    (``"match"``, a float, or ``None`` when not given)."""
    from ._cli import UsageError
    from .infer import _check_keep_ratio, _check_model_args, _check_modes, _positive

    _check_model_args(args)
    for flag, path in (("--data", args.data), ("--score", args.score)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag}: no such file {path!r}")
    if args.mode is not None:
        _check_modes([m.strip() for m in args.mode.split(",")])
    keep = args.keep_ratio
    if keep is not None and keep != "match":
        try:
            keep = float(keep)
        except ValueError:
            raise UsageError(f"--keep-ratio must be 'match' or a number in (0, 1], got {args.keep_ratio!r}") from None
        _check_keep_ratio(keep)
    if args.limit is not None and args.limit < 0:
        raise UsageError(f"--limit must be >= 0, got {args.limit}")
    _positive(args.batch_size, "--batch-size")
    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.localization_max_new_tokens, "--localization-max-new-tokens")
    return keep


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from ._cli import ArgumentParser
    from .infer import TokenSparseInference, _add_model_args, _load, default_data_root, load_eval_config

    p = ArgumentParser(prog="python -m tsparse.eval", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--data", default=None, help="evaluation file (ViTAR-style or HuatuoGPT-Vision layout)")
    p.add_argument("--mode", default=None,
                   help="comma-separated: dense, sparse, baseline:<random|pool|fastv|divprune> (default: config)")
    p.add_argument("--keep-ratio", default=None, help="baselines: 'match' (the sparse run's counts) or a ratio")
    p.add_argument("--boxes", default=None, choices=["generated", "oracle"])
    p.add_argument("--answer", default=None, choices=["generate", "choice"])
    p.add_argument("--fuse", dest="fuse", action="store_true", default=None)
    p.add_argument("--no-fuse", dest="fuse", action="store_false")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--localization-max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="the first N records only")
    p.add_argument("--out", default=None, help="results folder (default eval_results/<model>__<data>)")
    p.add_argument("--overwrite", action="store_true", help="discard results produced with other settings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--score", default=None, metavar="FILE", help="score a predictions file and exit (no model)")
    p.add_argument("--fusion", default=None, metavar="A,B,...",
                   help="fusion ablation: run the sparse mode once per method (none, cosine_mean, nearest_kept, "
                        "summary) next to dense and print the ablation table")
    p.add_argument("--localization-prompt", default=None, metavar="A,B,...",
                   help="named localization prompt(s) of the sparse mode with generated boxes (full, box_only, or a "
                        "name under inference.localization_prompts); several: one run each and a comparison table")
    args = p.parse_args(argv)
    keep_arg = _check_eval_args(args)

    ecfg = load_eval_config(args.config)
    ev = ecfg["eval"]
    if args.score:
        res = score_predictions(args.score, skip_open=bool(ev.get("skip_open", True)))
        print(json.dumps(res, indent=1))
        return 0

    embedded = args.model is None and args.data is None
    emb = ecfg["embedded"] if embedded else {}
    model_name = args.model or "tiny"
    if args.data is None:
        from .dualstream.data import SyntheticScanConfig, ensure_synthetic_scans

        scans = SyntheticScanConfig.load()
        if emb.get("image_size"):
            scans = dataclasses.replace(scans, image_size=int(emb["image_size"]))
        n_val = int(emb.get("samples") or scans.splits.get("val", 64))
        data = str(ensure_synthetic_scans(default_data_root(), dataclasses.replace(scans, splits={"val": n_val}))["val"])
        data_label = f"synthetic_val_{scans.image_size}px"
    else:
        data = args.data
        data_label = Path(data).stem
    limit = args.limit if args.limit is not None else emb.get("samples")
    over = {k: v for k, v in {
        "boxes": args.boxes or emb.get("boxes"), "answer": args.answer or emb.get("answer"), "fuse": args.fuse,
        "max_new_tokens": args.max_new_tokens, "localization_max_new_tokens": args.localization_max_new_tokens,
        "batch_size": args.batch_size if args.batch_size is not None else emb.get("batch_size"),
    }.items() if v is not None}
    from .ops.visual_tokens import fusion_method

    fusions = prompts = None
    if args.fusion is not None:
        try:
            fusions = [fusion_method(f.strip(), "--fusion") for f in args.fusion.split(",")]
        except ValueError as e:
            p.error(str(e).replace("`--fusion`", "--fusion"))
    if args.localization_prompt is not None:
        prompts = [x.strip() for x in args.localization_prompt.split(",")]
        known = ["full"] + sorted(ecfg["inference"].localization_prompts)
        bad = [x for x in prompts if x not in known]
        if bad:
            p.error(f"--localization-prompt: unknown prompt(s) {bad}; known: {known}")
        over["localization_prompt"] = prompts[0]
        if not args.boxes:
            over["boxes"] = "generated"  # the localization stream must run for its prompt to matter
    cfg = dataclasses.replace(ecfg["inference"], **over)
    modes = [m.strip() for m in args.mode.split(",")] if args.mode else list(ev.get("modes", ["dense", "sparse"]))
    if fusions or prompts:  # an ablation: the sparse variants against dense (baselines only when asked)
        modes = [m.strip() for m in args.mode.split(",")] if args.mode else ["dense", "sparse"]
        modes = modes + [m for m in ("dense", "sparse") if m not in modes]
    keep = keep_arg if keep_arg is not None else ev.get("keep_ratio", "match")
    items = load_eval_samples(data, limit=limit, skip_open=bool(ev.get("skip_open", True)))
    out = Path(args.out) if args.out else _default_out(str(ev.get("out_root", "eval_results")), model_name, data_label)

    args.model = model_name
    model, proc = _load(args)
    from .dualstream.config import method_config_for_model

    pipe = TokenSparseInference(model, proc, method=method_config_for_model(
        None if embedded else model_name, args.method_config), config=cfg)
    if embedded:
        boxes = ("boxes from the data (--boxes oracle)" if cfg.boxes == "oracle" else
                 "boxes generated by the random model (--boxes generated: its localization cost is real, its boxes "
                 "are not meaningful)")
        print(f"embedded default: the tiny RANDOM model on the synthetic scans; {boxes} and option likelihood "
              f"(--answer {cfg.answer}), since a random model can neither localize nor write the answer format")
    print(f"model {model_name} ({pipe.device}), data {data}: {len(items)} questions; modes {modes}; "
          f"answer={cfg.answer}, batch {cfg.batch_size}")
    summary = evaluate(pipe, items, modes, out, model_name=model_name, data_path=str(Path(data).resolve()),
                       keep_ratio=keep, overwrite=args.overwrite, progress=not args.no_progress,
                       fusions=fusions, localization_prompts=prompts)
    print()
    print(format_markdown(summary))
    if fusions:
        print("\nFusion ablation (sparse mode per fusion method; e2e cost = end-to-end ms per sample / dense's)")
        print(format_ablation(summary, by="fuse"))
    if prompts:
        print("\nLocalization prompts (sparse mode with generated boxes per prompt; same run)")
        print(format_ablation(summary, by="localization_prompt"))
    print(f"\nresults: {out}/ (summary.json, summary.md, one JSONL per mode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
