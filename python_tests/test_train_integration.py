"""Integration: a few steps of each stage of ``python -m tsparse.train`` on the tiny default
(small sizes), asserting that the pipeline did real work - boxes parsed from generated text,
visual tokens pruned in stage 2, finite losses, parameters changed by every stage - and that
a checkpoint resumes mid-stage to exactly the parameters of the uninterrupted run.

Sizes: 4 training scans of 112 px (4 x 4 visual tokens), G = G' = 2. The warm-up memorizes
the localization targets of those 4 samples (100 steps at a high learning rate, ~10 s), so
the low-temperature stage-1/2 rollouts write boxes; without it a random model never does.
About 40 s on a 2-core CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from tsparse.train.__main__ import main as cli_main  # noqa: E402
from tsparse.train.checkpoint import find_latest, load_trainer_state  # noqa: E402
from tsparse.train.config import load_train_config  # noqa: E402
from tsparse.train.metrics import format_summary, read_jsonl  # noqa: E402
from tsparse.train.trainer import Trainer  # noqa: E402

WARMUP_STEPS = 100


def _base(root: Path) -> dict:
    scans = root / "scans.yaml"
    scans.write_text(yaml.safe_dump({"image_size": 112, "images_per_sample": 1, "seed": 0,
                                     "splits": {"train": 4, "val": 2}}), encoding="utf-8")
    return {
        "output_dir": str(root / "run"),
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "progress": False,
        "stages": {
            "run": ["warmup", "localization", "sparse"],
            "warmup": {"steps": WARMUP_STEPS, "batch_size": 4, "lr": 1.0e-2, "streams": ["localization"]},
            "localization": {"steps": 2, "questions_per_step": 2, "lr": 1.0e-4},
            "sparse": {"steps": 2, "questions_per_step": 1, "lr": 1.0e-4},
        },
        "data": {"synthetic": str(scans), "synthetic_root": str(root / "data")},
        "method": {
            "prompts": {
                "localization": {"system": "Locate: <think>, <box>[[x1, y1, x2, y2]]</box>, <answer>.",
                                 "user": "{question}"},
                "sparse": {"system": "Answer: <think>, <answer>.", "user": "{question}"},
            },
            "advantages": {"localization_group_size": 2, "sparse_group_size": 2},
        },
        "rollout": {"temperature": 0.3, "max_new_tokens": {"localization": 104, "sparse": 24}},
        "eval": {"samples": 2, "at": ["start", "stage_end"]},
        "checkpoint": {"every": 1, "keep_last": 1},
    }


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _saved_params(ckpt: Path) -> dict:
    """The parameters of a checkpoint, loaded the way --model loads it."""
    from tsparse.dualstream.models import load_model_and_processor

    model, _ = load_model_and_processor(ckpt / "model")
    return _params(model)


def _same(a: dict, b: dict) -> bool:
    assert set(a) == set(b) and len(a) > 10
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = _base(root)
    cfg = load_train_config(base=base)
    lines: list[str] = []
    trainer = Trainer(cfg, log=lines.append)
    init = _params(trainer.model)
    summary = trainer.run()
    out = Path(cfg.output_dir)
    return SimpleNamespace(root=root, base=base, cfg=cfg, trainer=trainer, init=init, summary=summary, out=out,
                           records=read_jsonl(out / "metrics.jsonl"), lines=lines)


def test_every_stage_did_real_work(pipeline):
    recs = pipeline.records
    by = {s: [r for r in recs if r["stage"] == s] for s in ("warmup", "localization", "sparse")}
    assert [len(by[s]) for s in by] == [WARMUP_STEPS, 2, 2]
    assert [r["global_step"] for r in recs] == list(range(1, WARMUP_STEPS + 5))
    # Stage 0: the supervised loss fell (the targets are learned, not just run through).
    sft = [r["sft/loss"] for r in by["warmup"]]
    assert all(math.isfinite(v) for v in sft) and sft[-1] < 0.2 * sft[0]
    # Stage 1: boxes were parsed from GENERATED localization responses, and scored.
    loc = by["localization"]
    assert sum(r["loc/boxes_parsed"] for r in loc) > 0 and max(r["loc/box_rate"] for r in loc) > 0
    assert max(r["loc/iou"] for r in loc) > 0
    # Stage 2: the sparse stream's prompts were pruned to those boxes.
    sp = by["sparse"]
    assert min(r["keep_ratio"] for r in sp) < 1.0
    assert any(r["visual_tokens/kept"] < r["visual_tokens/dense"] for r in sp)
    assert all(r["visual_tokens/dense"] == 2 * 16 for r in sp)  # 1 question x G=2 parents x 16 tokens
    for r in loc + sp:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["optimizer_steps"] == 1
        assert r["tokens/generated"] > 0 and r["tokens_per_s"] > 0
        for key in ("time/rollout_localization", "time/generate_localization", "time/parse", "time/reward",
                    "time/advantage", "time/old_logp", "time/update", "time/step"):
            assert r[key] >= 0.0, key
        assert r["time/step"] >= r["time/rollout_localization"] + r["time/update"]
        assert "actor/pg_loss/localization" in r and "actor/pg_clipfrac/localization" in r
    for r in sp:
        assert r["time/rollout_sparse"] > 0 and r["time/prune"] > 0 and r["sparse/response_len"] > 0
        assert "actor/pg_loss/sparse" in r and "actor/entropy_loss/sparse" in r
        assert {"sparse/score", "sparse/format", "sparse/accuracy", "sparse/cross_accuracy"} <= set(r)
    assert any(r["grad_norm"] > 0 for r in loc + sp)


def test_parameters_changed_in_every_stage_and_checkpoints_hold_them(pipeline):
    ck = pipeline.out / "checkpoints"
    warm, loc, sp = (_saved_params(ck / f"{s}-final") for s in ("warmup", "localization", "sparse"))
    assert not _same(pipeline.init, warm)
    assert not _same(warm, loc)
    assert not _same(loc, sp)
    assert _same(_params(pipeline.trainer.model), sp)  # the last checkpoint is the trained model
    assert find_latest(pipeline.out) == ck / "sparse-final"
    state = load_trainer_state(ck / "sparse-final")["state"]
    assert state["completed"] == ["warmup", "localization", "sparse"] and state["global_step"] == WARMUP_STEPS + 4
    # keep_last=1: older step checkpoints were pruned; stage-end ones stay.
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["localization-final", "localization-step000001", "sparse-final", "sparse-step000001",
                     "warmup-final", f"warmup-step{WARMUP_STEPS - 1:06d}"]


def test_checkpoints_carry_the_method_config_they_were_trained_with(pipeline):
    from tsparse.dualstream.config import method_config_for_model

    model_dir = pipeline.out / "checkpoints" / "sparse-final" / "model"
    assert (model_dir / "tsparse_method.yaml").is_file()
    # Inference / evaluation of this checkpoint use its training prompts, not the defaults.
    assert method_config_for_model(model_dir) == pipeline.trainer.method
    assert method_config_for_model(model_dir, "dualstream") != pipeline.trainer.method
    assert method_config_for_model(None) == method_config_for_model(pipeline.out)  # no file: the default


def test_metrics_plot_evals_and_summary_are_written(pipeline):
    out = pipeline.out
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["label"] for e in evals] == ["random init (untrained)", "after warmup", "after localization",
                                           "after sparse"]
    assert all(e["n"] == 2 for e in evals)
    assert evals[0]["loc_format"] == 0.0 and evals[0]["box_rate"] == 0.0  # the random model writes no box
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"warmup", "localization", "sparse"}
    assert summary["stages"]["sparse"]["steps"] == 2 and summary["stages"]["sparse"]["keep_ratio"] < 1.0
    text = format_summary(pipeline.summary)
    assert "random init (untrained)" in text and "after sparse" in text and "keep ratio" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stages"]["run"] == ["warmup", "localization", "sparse"]


def test_resume_mid_stage_reproduces_the_uninterrupted_run(pipeline, tmp_path, capsys):
    """Resume from the checkpoint after stage-1 step 1 (model, optimizer, RNG, progress) in a
    new output folder: the run continues at step 2 and ends with exactly the parameters the
    uninterrupted run had after stage 1."""
    ck = pipeline.out / "checkpoints"
    base = dict(pipeline.base)
    base["output_dir"] = str(tmp_path / "resumed")
    base["stages"] = {**base["stages"], "run": ["warmup", "localization"]}
    base["checkpoint"] = {"every": 0, "keep_last": 1}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(base), encoding="utf-8")

    resumed = Trainer(load_train_config(cfg_path), resume=ck / "localization-step000001", log=lambda s: None)
    assert resumed.state["stage"] == "localization" and resumed.state["step"] == 1
    assert resumed.state["global_step"] == WARMUP_STEPS + 1 and resumed.state["completed"] == ["warmup"]
    assert _same(_params(resumed.model), _saved_params(ck / "localization-step000001"))
    assert not _same(_params(resumed.model), _saved_params(ck / "localization-final"))
    # A KL reference of the resumed stage is the policy the stage STARTED from (warm-up's end).
    assert resumed.state["stage_start"] == str(ck / "warmup-final" / "model")
    assert _same(_params(resumed._reference()), _saved_params(ck / "warmup-final"))
    resumed._ref_model = None
    resumed.run()
    recs = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["global_step"]) for r in recs] == [("localization", 2, WARMUP_STEPS + 2)]
    assert _same(_params(resumed.model), _saved_params(ck / "localization-final"))
    first = [r for r in pipeline.records if r["stage"] == "localization"][1]
    assert recs[0]["samples"] == first["samples"] and recs[0]["loc/score"] == first["loc/score"]

    # The CLI: --resume (latest = localization-final) with one more stage continues into it.
    rc = cli_main(["--config", str(cfg_path), "--resume", "stages=[warmup, localization, sparse]",
                   "stages.sparse.steps=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Greedy evaluation on 2 validation samples" in out and "after sparse" in out
    recs = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in recs] == [("localization", 2), ("sparse", 1)]
    assert find_latest(tmp_path / "resumed").name == "sparse-final"


def test_mini_batches_epochs_micro_batches_kl_and_frozen_vision(pipeline, tmp_path):
    """The other update paths of a GRPO step on the warmed-up model: 2 mini-batches x 2 PPO
    epochs (4 optimizer steps, the later ones off-policy: ratios != 1), one row per forward,
    a KL penalty against the frozen stage-start policy, sequence-mean aggregation, logits
    materialized (fused_linear off), gradient checkpointing, and a frozen vision tower."""
    base = dict(pipeline.base)
    base.update(output_dir=str(tmp_path / "run"), stages={
        "run": ["localization"],
        "localization": {"steps": 1, "questions_per_step": 2, "ppo_epochs": 2, "mini_batches": 2,
                         "micro_batch_size": 1, "lr": 1.0e-3}})
    base["model"] = {"path": str(pipeline.out / "checkpoints" / "warmup-final" / "model"),
                     "gradient_checkpointing": True, "freeze_vision": True}
    base["loss"] = {"kl_coef": 0.05, "loss_agg": "seq-mean-token-mean", "fused_linear": False}
    base["rollout"] = {**base["rollout"], "temperature": 1.0}
    base["eval"] = {"samples": 0}
    trainer = Trainer(load_train_config(base=base), log=lambda s: None)
    before = _params(trainer.model)
    trainer.run()
    rec = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert rec["optimizer_steps"] == 4 and math.isfinite(rec["loss"])
    assert "kl_loss/localization" in rec and rec["kl_loss/localization"] > 0.0
    assert abs(rec["actor/ppo_kl/localization"]) > 0.0  # later optimizer steps ran off-policy (ratio != 1)
    assert rec["time/ref_logp"] > 0
    assert rec["tokens/trained"] == pytest.approx(2 * 4 * rec["loc/response_len"])  # 2 epochs x 4 rollouts
    after = _params(trainer.model)
    vision = [k for k in before if k.startswith("model.visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not all(torch.equal(before[k], after[k]) for k in before if k not in vision)


def test_warmup_context_curriculum_and_sparse_context_jitter(pipeline, tmp_path):
    """stages.warmup.context_curriculum prunes the localization targets' prompts to the true box
    grown by a margin that rises to the whole image, then dense; sparse_context_jitter grows
    the sparse rows' boxes by random margins up to the whole image."""
    base = dict(pipeline.base, output_dir=str(tmp_path / "cur"))
    base["stages"] = dict(base["stages"], run=["warmup"],
                          warmup=dict(base["stages"]["warmup"], steps=8, context_curriculum=0.5,
                                      sparse_context_jitter=1.0, streams=["localization", "sparse"]))
    trainer = Trainer(load_train_config(base=base), log=lambda *_: None)
    enc = trainer.processor.encode_samples(trainer.train_samples[:2], trainer.method.prompts.localization)
    side = 112 // 28  # 4 x 4 tokens
    assert [trainer._context_margin(s, enc) for s in range(6)] == [0.0, side / 4, side / 2, 3 * side / 4, None, None]
    boxes = [list(s.boxes) for s in trainer.train_samples[:2]]
    grown = [trainer._jitter_context(s, boxes, enc) for s in range(12)]
    for g in grown:
        for (b,), (o,) in zip(g, boxes):
            assert b[0] <= o[0] and b[1] <= o[1] and b[2] >= o[2] and b[3] >= o[3]
    assert any(tuple(b) == (0.0, 0.0, 1.0, 1.0) for g in grown for (b,) in g)  # the whole image
    assert any(b != o for g in grown for (b,), (o,) in zip(g, boxes))
    summary = trainer.run()
    recs = read_jsonl(Path(base["output_dir"]) / "metrics.jsonl")
    margins = [r.get("sft/context_margin") for r in recs]
    assert margins[:4] == [0.0, side / 4, side / 2, 3 * side / 4] and margins[4:] == [None] * 4
    assert all(math.isfinite(r["sft/loss"]) for r in recs) and summary["stages"]["warmup"]["steps"] == 8


def _copy_checkpoints(pipeline, dest: Path, names, latest: str) -> Path:
    import shutil

    root = dest / "checkpoints"
    root.mkdir(parents=True)
    for n in names:
        shutil.copytree(pipeline.out / "checkpoints" / n, root / n)
    (root / "latest").write_text(latest + "\n")
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_checkpoint_problems_are_found_from_sizes_and_headers(pipeline, tmp_path):
    from tsparse.train.checkpoint import checkpoint_problem

    root = _copy_checkpoints(pipeline, tmp_path, ["localization-final"], "localization-final")
    ck = root / "localization-final"
    assert checkpoint_problem(ck) is None
    for rel in ("trainer_state.pt", "model/model.safetensors", "model/config.json"):
        saved = (ck / rel).read_bytes()
        _truncate(ck / rel)
        assert rel in checkpoint_problem(ck)
        (ck / "checkpoint.json").rename(ck / "checkpoint.json.off")  # a checkpoint without the size record
        problem = checkpoint_problem(ck)
        assert (problem is not None and rel.split("/")[-1] in problem) if rel != "model/config.json" else True
        (ck / "checkpoint.json.off").rename(ck / "checkpoint.json")
        (ck / rel).write_bytes(saved)
    assert checkpoint_problem(ck) is None
    (ck / "model" / "model.safetensors").unlink()
    assert "model/model.safetensors is missing" in checkpoint_problem(ck)
    assert checkpoint_problem(root / "nothere") == "the folder does not exist"


def test_resume_falls_back_past_a_damaged_checkpoint_and_still_matches(pipeline, tmp_path, capsys):
    """``latest`` names localization-final, whose trainer_state.pt was cut in half: --resume skips
    it with a one-line warning naming it, resumes from localization-step000001, and ends with
    exactly the parameters of the uninterrupted run (as a resume from that checkpoint did)."""
    from tsparse.train.checkpoint import CheckpointWarning, load_latest

    run = tmp_path / "run"
    root = _copy_checkpoints(pipeline, run, ["warmup-final", "localization-step000001", "localization-final"],
                             "localization-final")
    _truncate(root / "localization-final" / "trainer_state.pt")
    base = dict(pipeline.base)
    base["output_dir"] = str(run)
    base["stages"] = {**base["stages"], "run": ["warmup", "localization"]}
    base["checkpoint"] = {"every": 0, "keep_last": 1}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(base), encoding="utf-8")

    with pytest.warns(CheckpointWarning, match=r"skipped localization-final \(trainer_state.pt .*\); "
                                               r"resuming from localization-step000001"):
        found = load_latest(run)
    assert found[0] == root / "localization-step000001"
    rc = cli_main(["--config", str(cfg_path), "--resume"])
    assert rc == 0
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if "warning" in line]
    assert len(warn) == 1 and "localization-final" in warn[0] and "trainer_state.pt" in warn[0], err
    recs = read_jsonl(run / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["global_step"]) for r in recs] == [("localization", 2, WARMUP_STEPS + 2)]
    assert _same(_saved_params(root / "localization-final"), _saved_params(pipeline.out / "checkpoints" /
                                                                           "localization-final"))


def test_resume_falls_back_when_latest_names_a_missing_folder_or_weights_are_cut(pipeline, tmp_path):
    from tsparse.train.checkpoint import CheckpointWarning, find_latest, load_latest

    run = tmp_path / "run"
    root = _copy_checkpoints(pipeline, run, ["warmup-final", "localization-step000001", "localization-final"],
                             "sparse-final")
    with pytest.warns(CheckpointWarning, match=r"`latest` names 'sparse-final', which does not exist; "
                                               r"resuming from localization-final"):
        path, payload = load_latest(run)
    assert path == root / "localization-final" and payload["state"]["stage_done"] is True
    _truncate(root / "localization-final" / "model" / "model.safetensors")
    with pytest.warns(CheckpointWarning, match=r"localization-final \(model/model.safetensors has \d+ bytes"):
        path, _ = load_latest(run)
    assert path == root / "localization-step000001" == find_latest(run)
    for d in root.iterdir():
        if d.is_dir():
            _truncate(d / "trainer_state.pt")
    with pytest.warns(CheckpointWarning, match="no complete checkpoint"):
        assert load_latest(run) is None


def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(pipeline, tmp_path, capsys):
    run = tmp_path / "run"
    root = _copy_checkpoints(pipeline, run, ["localization-step000001"], "localization-step000001")
    _truncate(root / "localization-step000001" / "trainer_state.pt")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({**pipeline.base, "output_dir": str(run)}), encoding="utf-8")
    assert cli_main(["--config", str(cfg_path), "--resume-from", str(root / "localization-step000001")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer_state.pt" in err[0] and "localization-step000001" in err[0]
