"""Rollouts and the training forward (tsparse.dualstream.rollout / .policy) on the tiny
model: the log-probs the trainer computes for a response are the ones the rollout sampled
it from (dense and pruned streams), responses end at the first stop token, batches keep
their images, and the greedy evaluation scores what it generated."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tsparse.dualstream.config import PruningConfig, load_method_config  # noqa: E402
from tsparse.dualstream.format import parse_boxes  # noqa: E402
from tsparse.dualstream.policy import (  # noqa: E402
    lm_head_weight,
    question_features,
    response_hidden,
    stream_forward_inputs,
    token_logprobs,
)
from tsparse.dualstream.pruning import repeat_samples  # noqa: E402
from tsparse.dualstream.rollout import (  # noqa: E402
    GenerationOptions,
    make_responses,
    response_mask,
    rollout_localization,
    rollout_sparse,
    stop_token_ids,
    take_samples,
    tokenize_targets,
)


def _gen_logp(scores, ids, mask, temperature):
    """Log-probs of the sampled tokens from generate's raw logits at the sampling temperature."""
    logits = torch.stack(scores, 1).float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    return lp[mask.bool()]


def test_response_mask_ends_at_the_first_stop_token():
    ids = torch.tensor([[5, 6, 9, 7, 9], [9, 8, 8, 8, 8], [1, 2, 3, 4, 5], [4, 8, 7, 9, 8]])
    mask = response_mask(ids, [9, 8])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="ids"):
        response_mask(ids[0], [9])


def test_tokenize_targets_end_with_eos_and_round_trip(tiny_vl):
    _, proc = tiny_vl
    texts = ["<think>a</think><answer>B</answer>", "<think>longer text</think><answer>C</answer>"]
    r = tokenize_targets(proc, texts)
    eos = proc.tokenizer.eos_token_id
    lens = r.mask.sum(1).tolist()
    assert [int(r.ids[k, n - 1]) for k, n in enumerate(lens)] == [eos, eos]
    again = make_responses(proc, r.ids, [eos])
    assert again.texts == texts and torch.equal(again.mask, r.mask)


def test_take_samples_matches_repeat_samples(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    samples = [synthetic_samples["two"][0], synthetic_samples["one"][1]]
    enc = proc.encode_samples(samples, load_method_config().prompts.sparse)
    feats = question_features(model, enc, [0, 1])
    kw = dict(image_token_id=model.config.image_token_id)
    rep = repeat_samples(enc, 2, image_embeds=feats, **kw)
    took = take_samples(enc, [0, 0, 1, 1], image_embeds=feats, **kw)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_embeds"):
        assert torch.equal(rep[key], took[key]), key
    assert took["texts"] == rep["texts"]
    swapped = take_samples(enc, [1, 0], image_embeds=feats, **kw)
    assert swapped["image_grid_thw"].tolist() == [[1, 16, 16], [1, 8, 8], [1, 8, 8]]
    assert torch.equal(swapped["image_embeds"], torch.cat([feats[32:], feats[:32]]))
    with pytest.raises(ValueError, match="index"):
        take_samples(enc, [2], **kw)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logprobs_are_the_rollout_policys(tiny_vl, synthetic_samples, temperature):
    """What the trainer scores is what the rollout sampled from: the dense stream's and the
    pruned sparse stream's recomputed log-probs equal generate's own, token for token."""
    model, proc = tiny_vl
    method = load_method_config()
    samples = synthetic_samples["one"][:2]
    enc = proc.encode_samples(samples, method.prompts.localization)
    prompt = {k: v for k, v in enc.items() if k != "texts"}
    weight = lm_head_weight(model)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=True, temperature=temperature, top_k=0,
                             num_return_sequences=2, output_logits=True, return_dict_in_generate=True)
        resp = make_responses(proc, out.sequences[:, enc["input_ids"].shape[1]:], stop_token_ids(model, proc))
        inputs = stream_forward_inputs(model, enc, [0, 0, 1, 1], resp)
        lp = token_logprobs(response_hidden(model, inputs, resp.mask), weight, resp.ids[resp.mask.bool()],
                            temperature=temperature)
    torch.testing.assert_close(lp, _gen_logp(out.logits, resp.ids, resp.mask, temperature), rtol=0, atol=5e-5)

    boxes = [[(0.1, 0.1, 0.55, 0.5)], [(0.4, 0.3, 0.9, 0.8)]] * 2
    loc_feats = question_features(model, enc, [0, 1])
    sp = rollout_sparse(model, proc, samples, method.prompts.sparse, boxes,
                        GenerationOptions(8, temperature=temperature), parents_per_question=2, group_size=1,
                        pruning=method.pruning, image_embeds=loc_feats.detach())
    assert sp.keep_ratio < 1.0 and sp.inputs.input_ids.shape[0] == 4
    with torch.no_grad():
        out = model.generate(**sp.inputs.model_inputs(), max_new_tokens=8, do_sample=True, temperature=temperature,
                             top_k=0, output_logits=True, return_dict_in_generate=True)
        r2 = make_responses(proc, out.sequences, stop_token_ids(model, proc))
        inputs = stream_forward_inputs(model, sp.prompt, [0, 0, 1, 1], r2,
                                       boxes=boxes, pruning=method.pruning)
        lp2 = token_logprobs(response_hidden(model, inputs, r2.mask), weight, r2.ids[r2.mask.bool()],
                             temperature=temperature)
    torch.testing.assert_close(lp2, _gen_logp(out.logits, r2.ids, r2.mask, temperature), rtol=0, atol=5e-5)


def test_shared_features_give_the_same_forward_and_carry_gradients(synthetic_samples):
    from tsparse.dualstream.models import build_tiny

    model, proc = build_tiny()  # private copy: this test writes .grad
    method = load_method_config()
    samples = synthetic_samples["one"][2:4]
    enc = proc.encode_samples(samples, method.prompts.sparse)
    resp = tokenize_targets(proc, ["<think>x</think><answer>A</answer>"] * 3)
    boxes = [[(0.0, 0.0, 0.5, 0.5)], [(0.5, 0.5, 1.0, 1.0)], None]
    own = stream_forward_inputs(model, enc, [1, 0, 1], resp, boxes=boxes, pruning=method.pruning)
    feats = question_features(model, enc, [0, 1])
    shared = stream_forward_inputs(model, enc, [1, 0, 1], resp, boxes=boxes, pruning=method.pruning,
                                   features=([0, 1], feats))
    torch.testing.assert_close(shared.inputs_embeds, own.inputs_embeds, rtol=0, atol=1e-6)
    assert own.keep_ratio < 1.0 and bool(own.fallback.tolist()[2])  # the None row keeps its image
    h = response_hidden(model, shared, resp.mask)
    token_logprobs(h, lm_head_weight(model), resp.ids[resp.mask.bool()]).sum().backward()
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no features"):
        stream_forward_inputs(model, enc, [1], tokenize_targets(proc, ["a"]), features=([0], feats[:64]))


def test_localization_rollout_groups_and_parses(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    method = load_method_config()
    samples = synthetic_samples["one"][:2]
    torch.manual_seed(1)
    loc = rollout_localization(model, proc, samples, method.prompts.localization, GenerationOptions(6),
                               group_size=3)
    assert len(loc.responses) == 6 and loc.question_index == [0, 0, 0, 1, 1, 1]
    assert loc.image_embeds.shape == (128, model.config.text_config.hidden_size)
    assert [b.reason for b in loc.boxes] == [parse_boxes(t).reason for t in loc.responses.texts]
    assert set(loc.timings) == {"encode", "vision", "generate", "parse"}
    greedy = rollout_localization(model, proc, samples, method.prompts.localization,
                                  GenerationOptions(6, do_sample=False), group_size=1)
    again = rollout_localization(model, proc, samples, method.prompts.localization,
                                 GenerationOptions(6, do_sample=False), group_size=1)
    assert torch.equal(greedy.responses.ids, again.responses.ids)
    with pytest.raises(ValueError, match="group_size"):
        rollout_localization(model, proc, samples, method.prompts.localization, GenerationOptions(6), group_size=0)


def test_sparse_rollout_rows_follow_their_parents(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    method = load_method_config()
    samples = synthetic_samples["one"][:2]
    boxes = [None, [(0.0, 0.0, 0.25, 0.25)], [(0.0, 0.0, 1.0, 1.0)], [(0.5, 0.5, 1.0, 0.75)]]
    sp = rollout_sparse(model, proc, samples, method.prompts.sparse, boxes, GenerationOptions(4),
                        parents_per_question=2, group_size=3, pruning=PruningConfig(fuse=True))
    assert len(sp.responses) == 12 and sp.parent_index == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert sp.question_index == [0] * 6 + [1] * 6
    assert sp.inputs.kept_counts.tolist() == [64, 4, 64, 8] and sp.fallback_rate == 0.25
    assert sp.keep_ratio == pytest.approx(140 / 256)
    with pytest.raises(ValueError, match="boxes"):
        rollout_sparse(model, proc, samples, method.prompts.sparse, boxes[:3], GenerationOptions(4),
                       parents_per_question=2, group_size=1)


def test_greedy_eval_of_the_random_model(tiny_vl, synthetic_samples):
    from tsparse.train.evaluate import evaluate

    model, proc = tiny_vl
    method = load_method_config()
    res = evaluate(model, proc, synthetic_samples["one"][:3], method, max_new_tokens_localization=8,
                   max_new_tokens_sparse=6, batch_size=2)
    assert res.n == 3 and res.loc_format == 0.0 and res.box_rate == 0.0 and res.iou == 0.0
    assert res.keep_ratio == 1.0 and res.fallback_rate == 1.0  # no box: every image falls back
    assert 1 <= res.sparse_length <= 6 and res.seconds > 0
    with pytest.raises(ValueError, match="samples"):
        evaluate(model, proc, [], method, max_new_tokens_localization=8, max_new_tokens_sparse=6)


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=4, temperature=0.0), "temperature"),
    (dict(max_new_tokens=4, top_p=1.5), "top_p"), (dict(max_new_tokens=4, top_k=-1), "top_k"),
])
def test_generation_options_name_the_bad_value(bad, match):
    with pytest.raises(ValueError, match=match):
        GenerationOptions(**bad)
