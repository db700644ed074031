"""Token-sparse inference (tsparse.infer) on the tiny default.

The tiny model is random, so what it writes in the localization stream is random too. To test the
real generate -> decode -> parse -> prune path deterministically, the localization stream's
``generate`` gets a logits processor that forces a chosen, well-formed response token by token:
the pipeline then decodes, parses and prunes exactly as it would for a trained model. Other tests
feed boxes or localization responses directly (the pipeline's provided-response paths)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tsparse.dualstream.config import load_method_config  # noqa: E402
from tsparse.dualstream.data import build_messages, load_images  # noqa: E402
from tsparse.dualstream.format import format_localization_response  # noqa: E402
from tsparse.infer import (  # noqa: E402
    InferenceConfig,
    LocalizationPrompt,
    TokenSparseInference,
    load_eval_config,
    main,
    parse_mode,
)
from tsparse.ops import box_to_patch_mask  # noqa: E402


class ForceResponse:
    """A ``generate`` logits processor that makes row b emit ``rows[b]`` then EOS."""

    def __init__(self, rows, eos):
        self.rows, self.eos = rows, eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]  # inputs_embeds generation: input_ids holds only new tokens
        out = torch.full_like(scores, -float("inf"))
        for b, row in enumerate(self.rows):
            out[b, row[step] if step < len(row) else self.eos] = 0.0
        return out


def _pipe(tiny_vl, **cfg):
    model, proc = tiny_vl
    base = dict(max_new_tokens=4, localization_max_new_tokens=96, batch_size=4)
    base.update(cfg)
    return TokenSparseInference(model, proc, method=load_method_config(), config=InferenceConfig(**base))


def _dense_batch(proc, samples):
    prompt = load_method_config().prompts.sparse
    texts = [proc.apply_chat_template(build_messages(s, prompt)) for s in samples]
    return proc(texts, [load_images(s) for s in samples], padding_side="left")


def test_generated_localization_is_parsed_and_prunes(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    samples = synthetic_samples["one"][:2]
    targets = [format_localization_response("x", [(0.1, 0.2, 0.45, 0.5)], "B"),
               format_localization_response("y", [(0.6, 0.6, 0.9, 0.95), (0.0, 0.0, 0.2, 0.2)], "A")]
    rows = [proc.tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    from transformers import LogitsProcessorList

    pipe = _pipe(tiny_vl, mode="sparse", boxes="generated", fuse=False)
    res = pipe.run_batch(samples, localization_generate_kwargs={
        "logits_processor": LogitsProcessorList([ForceResponse(rows, eos)])})
    grid = torch.tensor([[1, 16, 16]])
    for r, target in zip(res, targets):
        assert r.localization == target  # decoded from generate, special tokens dropped
        assert r.box_source == "generated" and r.box_reason is None
        want = torch.tensor(r.boxes, dtype=torch.float32)
        _, cnt = box_to_patch_mask(want, torch.tensor([0, len(r.boxes)]), grid)
        assert r.kept_tokens == [int(cnt[0])] and r.visual_tokens == [64]
        assert 0 < r.keep_ratio < 1 and r.fallback == [False]
        assert r.timings["localize_ms"] > r.timings["localize_prefill_ms"] > 0
        assert r.new_tokens <= 4 and r.mode == "sparse"
    assert res[0].boxes == [[0.1, 0.2, 0.45, 0.5]]
    assert res[1].boxes == [[0.6, 0.6, 0.9, 0.95], [0.0, 0.0, 0.2, 0.2]]
    # the pruned prompt is shorter by exactly the dropped tokens
    dense = _pipe(tiny_vl, mode="dense").run_batch(samples)
    for r, d in zip(res, dense):
        assert d.prompt_tokens - r.prompt_tokens == 64 - r.kept_tokens[0]


def _forced(proc, texts):
    from transformers import LogitsProcessorList

    rows = [proc.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return rows, {"logits_processor": LogitsProcessorList([ForceResponse(rows, eos)])}


def _loc_prompt_tokens(proc, samples, stream_prompt, prefix=""):
    texts = [proc.apply_chat_template(build_messages(s, stream_prompt)) + prefix for s in samples]
    enc = proc(texts, [load_images(s) for s in samples], padding_side="left")
    return enc["attention_mask"].sum(1).tolist()


def test_box_only_prompt_stops_at_the_box_and_counts_tokens(tiny_vl, synthetic_samples):
    """The same forced localization through the full prompt (until EOS) and the box-only prompt
    (begun with <box>, stopped at </box>): same boxes, same pruning, and the token counts are
    exactly those of the texts generated and of the two prompts."""
    model, proc = tiny_vl
    samples = synthetic_samples["one"][:2]
    boxes = [[(0.1, 0.2, 0.45, 0.5)], [(0.6, 0.6, 0.9, 0.95), (0.0, 0.0, 0.2, 0.2)]]
    full_texts = [format_localization_response("a long rationale", boxes[0], "B"),
                  format_localization_response("y", boxes[1], "A")]
    rows, kw = _forced(proc, full_texts)
    full = _pipe(tiny_vl, mode="sparse", boxes="generated").run_batch(samples, localization_generate_kwargs=kw)
    # after "<box>" the model is forced to write the rest of the same response
    tails = [t[t.index("<box>") + len("<box>"):] for t in full_texts]
    tail_rows, kw2 = _forced(proc, tails)
    cfg = dict(mode="sparse", boxes="generated", localization_prompt="box_only",
               localization_prompts=load_eval_config()["inference"].localization_prompts)
    short = _pipe(tiny_vl, **cfg).run_batch(samples, localization_generate_kwargs=kw2)
    named = cfg["localization_prompts"]["box_only"]
    method_prompt = load_method_config().prompts.localization
    want_full = _loc_prompt_tokens(proc, samples, method_prompt)
    want_short = _loc_prompt_tokens(proc, samples, named.stream_prompt(method_prompt), "<box>")
    for i, (f, b) in enumerate(zip(full, short)):
        assert f.localization == full_texts[i] and f.localization_prompt == "full"
        assert f.localization_new_tokens == len(rows[i]) + 1  # the response and EOS
        upto = tails[i][: tails[i].index("</box>") + len("</box>")]
        assert b.localization == "<box>" + upto and b.localization_prompt == "box_only"
        assert b.localization_new_tokens == len(proc.tokenizer(upto, add_special_tokens=False)["input_ids"])
        assert b.localization_new_tokens < f.localization_new_tokens
        assert f.boxes == b.boxes and f.kept_tokens == b.kept_tokens and b.box_reason is None
        assert f.localization_prompt_tokens == want_full[i] and b.localization_prompt_tokens == want_short[i]
    # a stop string that spans several tokens, over the method's own prompt (system/user inherited)
    custom = {"until_brackets": {"response_prefix": "<box>", "stop": "]]"}}
    res = _pipe(tiny_vl, mode="sparse", boxes="generated", localization_prompt="until_brackets",
                localization_prompts=custom).run_batch(samples, localization_generate_kwargs=kw2)
    for i, r in enumerate(res):
        upto = tails[i][: tails[i].index("]]") + 2]
        assert r.localization == "<box>" + upto and r.boxes == full[i].boxes
        assert r.localization_new_tokens == len(proc.tokenizer(upto, add_special_tokens=False)["input_ids"])
        assert r.localization_prompt_tokens == want_full[i] + 1  # the prefix is one token


@pytest.mark.parametrize("fuse", ["none", "cosine_mean", "nearest_kept", "summary"])
def test_prompt_and_dense_prompt_tokens(tiny_vl, synthetic_samples, fuse):
    samples = synthetic_samples["one"][:3]
    dense = _pipe(tiny_vl, mode="dense").run_batch(samples)
    res = _pipe(tiny_vl, mode="sparse", boxes="oracle", fuse=fuse).run_batch(samples)
    for r, d in zip(res, dense):
        assert d.prompt_tokens == d.dense_prompt_tokens == r.dense_prompt_tokens
        assert r.prompt_tokens == r.dense_prompt_tokens - sum(r.visual_tokens) + sum(r.kept_tokens)
        assert r.localization_prompt is None and r.localization_new_tokens == 0 == r.localization_prompt_tokens
        assert r.kept_tokens[0] == d.visual_tokens[0] * r.keep_ratio
    plain = _pipe(tiny_vl, mode="sparse", boxes="oracle", fuse="none").run_batch(samples)
    extra = 1 if fuse == "summary" else 0  # the summary token is a kept token
    assert [r.kept_tokens[0] for r in res] == [p.kept_tokens[0] + extra for p in plain]


def test_inference_config_fusion_and_localization_prompts():
    assert InferenceConfig(fuse=True).fuse == "cosine_mean" and InferenceConfig(fuse=False).fuse == "none"
    assert InferenceConfig().fuse is None and InferenceConfig(baseline_fuse=False).baseline_fuse == "none"
    assert InferenceConfig(fuse="summary", baseline_fuse="nearest_kept").baseline_fuse == "nearest_kept"
    with pytest.raises(ValueError, match="`fuse` must be one of"):
        InferenceConfig(fuse="mean")
    with pytest.raises(ValueError, match="`localization_prompt` must be one of"):
        InferenceConfig(localization_prompt="box_only")  # not defined in this config
    with pytest.raises(ValueError, match="'full' is the method config's own prompt"):
        InferenceConfig(localization_prompts={"full": {}})
    with pytest.raises(ValueError, match=r"`localization_prompts.x`: unknown key\(s\) \['stopp'\]"):
        InferenceConfig(localization_prompts={"x": {"stopp": "]"}})
    with pytest.raises(ValueError, match="`localization_prompts.x`: `stop` '<' occurs in `response_prefix`"):
        InferenceConfig(localization_prompts={"x": {"response_prefix": "<box>", "stop": "<"}})
    with pytest.raises(ValueError, match="`user` must be null or a str containing"):
        LocalizationPrompt(user="no placeholder")
    with pytest.raises(ValueError, match="`max_new_tokens` must be a positive int"):
        LocalizationPrompt(max_new_tokens=0)
    cfg = load_eval_config()["inference"]
    assert cfg.localization_prompt == "full" and cfg.named_localization_prompt() is None
    box = cfg.named_localization_prompt("box_only")
    assert box.response_prefix == "<box>" and box.stop == "</box>" and "no reasoning" in box.system
    assert box.max_new_tokens == 128
    stop = cfg.named_localization_prompt("box_stop")
    assert stop.system is None and stop.user is None and stop.response_prefix == "" and stop.stop == "</box>"


def test_localization_prompt_token_cap(tiny_vl, synthetic_samples):
    """A prompt's max_new_tokens caps the localization stream (forced to write 20 tokens, no EOS)."""
    _, proc = tiny_vl
    samples = synthetic_samples["one"][:2]
    _, kw = _forced(proc, ["x" * 20] * 2)
    prompts = {"capped": {"max_new_tokens": 5}}
    for limit, want in ((12, 5), (3, 3), (40, 5)):
        res = _pipe(tiny_vl, mode="sparse", boxes="generated", localization_prompt="capped", localization_prompts=prompts,
                    localization_max_new_tokens=limit).run_batch(samples, localization_generate_kwargs=kw)
        assert [r.localization_new_tokens for r in res] == [want, want] and res[0].localization == "x" * want


def test_random_localization_falls_back_to_the_full_image(tiny_vl, synthetic_samples):
    """Without forcing, the random model writes no box: the sample keeps every token and the
    reason is recorded."""
    res = _pipe(tiny_vl, mode="sparse", boxes="generated", localization_max_new_tokens=8).run_batch(
        synthetic_samples["one"][:1])
    r = res[0]
    assert r.localization is not None and r.boxes == [] and r.box_reason
    assert r.keep_ratio == 1.0 and r.fallback == [True]


def test_full_image_box_gives_the_dense_answer_logits(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    samples = synthetic_samples["one"][2:4] + synthetic_samples["two"][:1]
    full = [[(0.0, 0.0, 1.0, 1.0)]] * 3
    dense_hf = _dense_batch(proc, samples)
    with torch.no_grad():
        ref = model(**dense_hf).logits
    real = dense_hf["attention_mask"].bool()
    for fuse in (True, False):
        prep = _pipe(tiny_vl, mode="sparse", fuse=fuse).prepare_batch(samples, boxes=full)
        assert prep.sparse.keep_ratio == 1.0
        with torch.no_grad():
            got = model(**prep.sparse.model_inputs()).logits
        torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-6)
    prep = _pipe(tiny_vl, mode="dense").prepare_batch(samples)
    with torch.no_grad():
        got = model(**prep.sparse.model_inputs()).logits
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-6)
    # ... and a box that is not the full image changes them
    prep = _pipe(tiny_vl, mode="sparse").prepare_batch(samples, boxes=[[(0.0, 0.0, 0.5, 0.5)]] * 3)
    with torch.no_grad():
        got = model(**prep.sparse.model_inputs()).logits
    assert (got[:, -1] - ref[:, -1]).abs().max() > 1e-4


def test_dense_mode_is_hf_generate(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    samples = synthetic_samples["one"][:3]
    res = _pipe(tiny_vl, mode="dense", max_new_tokens=6).run_batch(samples)
    b = _dense_batch(proc, samples)
    with torch.no_grad():
        out = model.generate(**b, max_new_tokens=6, do_sample=False)
    ref = proc.batch_decode(out[:, b["input_ids"].shape[1]:])
    assert [r.response for r in res] == ref
    full = _pipe(tiny_vl, mode="sparse", max_new_tokens=6).run_batch(samples, boxes=[[(0, 0, 1, 1)]] * 3)
    assert [r.response for r in full] == ref


def test_provided_localization_texts_and_oracle_boxes(tiny_vl, synthetic_samples):
    samples = synthetic_samples["one"][:2]
    texts = ["<think>x</think><box>[[0.0, 0.0, 0.5, 0.5]]</box><answer>A</answer>", "no boxes here"]
    res = _pipe(tiny_vl, mode="sparse").run_batch(samples, localization_texts=texts)
    assert res[0].boxes == [[0.0, 0.0, 0.5, 0.5]] and res[0].kept_tokens == [16]
    assert res[0].box_source == "localization_text" and res[0].timings["localize_ms"] == 0
    assert res[1].boxes == [] and "no <box> tag" in res[1].box_reason and res[1].keep_ratio == 1.0
    res = _pipe(tiny_vl, mode="sparse", boxes="oracle").run_batch(samples)
    for r, s in zip(res, samples):
        assert r.box_source == "oracle" and r.boxes == [list(b) for b in s.boxes] and r.keep_ratio < 1


@pytest.mark.parametrize("mode", ["baseline:random", "baseline:pool", "baseline:fastv", "baseline:divprune"])
def test_baselines_through_the_pipeline(tiny_vl, synthetic_samples, mode):
    samples = synthetic_samples["one"][:1] + synthetic_samples["two"][:1]
    res = _pipe(tiny_vl, mode=mode, answer="choice").run_batch(samples, keep_counts=[[10], [3, 7]])
    assert res[0].kept_tokens == [10] and res[1].kept_tokens == [3, 7] and res[1].visual_tokens == [16, 16]
    res = _pipe(tiny_vl, mode=mode, keep_ratio=0.5, answer="choice").run_batch(samples)
    assert res[0].kept_tokens == [32] and res[1].kept_tokens == [8, 8]


def test_choice_answers(tiny_vl, synthetic_samples):
    from PIL import Image

    s = synthetic_samples["one"][0]
    q_open = {"question": "What is shown?", "images": [Image.new("L", (56, 56), 90)], "id": "open"}
    res = _pipe(tiny_vl, mode="dense", answer="choice").run_batch([s, q_open])
    r = res[0]
    assert set(r.option_probs) == set(s.options) and abs(sum(r.option_probs.values()) - 1) < 1e-5
    best = max(r.option_probs, key=r.option_probs.get)
    assert r.response == f"<think>\n</think>\n<answer>{best}</answer>" and r.answer == best == r.choice
    assert r.new_tokens == 0 and r.timings["decode_ms"] == 0 and r.timings["prefill_ms"] > 0
    assert res[1].response == "" and res[1].answer is None and res[1].option_probs is None and res[1].id == "open"


def test_run_splits_batches_and_timings_add_up(tiny_vl, synthetic_samples):
    samples = synthetic_samples["one"][:5]
    res = _pipe(tiny_vl, mode="sparse", boxes="oracle", batch_size=2).run(samples)
    assert [r.id for r in res] == [s.id for s in samples]
    assert [r.batch_size for r in res] == [2, 2, 2, 2, 1] and len({r.batch for r in res}) == 3
    for r in res:
        t = r.timings
        parts = sum(v for k, v in t.items() if k not in ("total_ms", "localize_prefill_ms"))
        assert all(v >= 0 for v in t.values()) and parts <= t["total_ms"] + 1e-3


def test_bad_arguments(tiny_vl, synthetic_samples):
    s = synthetic_samples["one"][:2]
    with pytest.raises(ValueError, match="`mode`"):
        parse_mode("baseline:sparsevlm")
    with pytest.raises(ValueError, match="`boxes` has 1 entries for 2 questions"):
        _pipe(tiny_vl, mode="sparse").run_batch(s, boxes=[None])
    with pytest.raises(ValueError, match="apply to mode='sparse'"):
        _pipe(tiny_vl, mode="dense").run_batch(s, boxes=[None, None])
    with pytest.raises(ValueError, match="`keep_counts`/`keep_ratio` apply to baselines"):
        _pipe(tiny_vl, mode="sparse").run_batch(s, keep_counts=[[1], [1]])
    with pytest.raises(ValueError, match="needs `keep_counts`, `keep_ratio` or config.keep_ratio"):
        _pipe(tiny_vl, mode="baseline:random").run_batch(s)
    with pytest.raises(ValueError, match="`answer`"):
        InferenceConfig(answer="beam")
    with pytest.raises(ValueError, match="`inference`: unknown key"):
        InferenceConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="`question`"):
        _pipe(tiny_vl, mode="dense").run_batch([{"images": ["x.png"]}])


def test_cli(tiny_vl, synthetic_samples, capsys):
    s = synthetic_samples["one"][0]
    rc = main(["--image", s.images[0], "--question", s.question, "--mode", "sparse", "--boxes",
               "[[0.0, 0.0, 0.5, 1.0]]", "--answer", "choice", "--json", "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept_tokens"] == [32] and out["box_source"] == "given" and out["answer"] in s.options
    # a named fusion method: the summary token makes it 33
    rc = main(["--image", s.images[0], "--question", s.question, "--mode", "sparse", "--boxes",
               "[[0.0, 0.0, 0.5, 1.0]]", "--answer", "choice", "--json", "--device", "cpu", "--fusion", "summary"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["kept_tokens"] == [33]
    # the box-only localization prompt (the random model writes no box: full-image fallback)
    rc = main(["--image", s.images[0], "--question", s.question, "--mode", "sparse", "--answer", "choice",
               "--localization-prompt", "box_only", "--localization-max-new-tokens", "6", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["localization_prompt"] == "box_only" and out["localization"].startswith("<box>")
    assert 1 <= out["localization_new_tokens"] <= 6
    assert main(["--localization-prompt", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--localization-prompt: unknown prompt 'nope'" in err[0]


def test_eval_config_loads_and_rejects_unknown_keys(tmp_path):
    cfg = load_eval_config()
    assert cfg["inference"].answer == "generate" and cfg["eval"]["keep_ratio"] == "match"
    assert cfg["embedded"]["boxes"] == "oracle" and "baseline:fastv" in cfg["eval"]["modes"]
    (tmp_path / "a.yaml").write_text("eval: {modez: [dense]}\n")
    with pytest.raises(ValueError, match="`eval`: unknown key"):
        load_eval_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("eval: {modes: [sparsevlm]}\n")
    with pytest.raises(ValueError, match="`mode`"):
        load_eval_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("training: {}\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_eval_config(tmp_path / "c.yaml")
