"""One named fusion method on every path: the trainer's rollout and its training forward (which
recomputes pruning and fusion from the current visual features) give the same inputs and the
same log-probs for each method, a method config chooses it by name (the old booleans still
work), and a bad name is one line naming the key."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from tsparse.dualstream.config import MethodConfig, PruningConfig, load_method_config, load_yaml  # noqa: E402
from tsparse.dualstream.policy import (  # noqa: E402
    lm_head_weight,
    question_features,
    response_hidden,
    stream_forward_inputs,
    token_logprobs,
)
from tsparse.dualstream.rollout import GenerationOptions, make_responses, rollout_sparse, stop_token_ids  # noqa: E402
from tsparse.ops import FUSION_METHODS  # noqa: E402


@pytest.mark.parametrize("fuse", FUSION_METHODS)
def test_training_forward_recomputes_the_rollouts_fusion(tiny_vl, synthetic_samples, fuse):
    """The sparse rollout prunes with `fuse`; the training forward of its responses, pruning
    again from freshly computed features with the same config, sees the same embeddings and
    scores the sampled tokens with generate's own log-probs."""
    model, proc = tiny_vl
    method = load_method_config()
    pruning = dataclasses.replace(method.pruning, fuse=fuse)
    samples = synthetic_samples["one"][:2]
    enc = proc.encode_samples(samples, method.prompts.localization)
    boxes = [[(0.1, 0.1, 0.55, 0.5)], [(0.4, 0.3, 0.9, 0.8)]] * 2
    feats = question_features(model, enc, [0, 1])
    sp = rollout_sparse(model, proc, samples, method.prompts.sparse, boxes, GenerationOptions(6),
                        parents_per_question=2, group_size=1, pruning=pruning, image_embeds=feats.detach())
    plain = rollout_sparse(model, proc, samples, method.prompts.sparse, boxes, GenerationOptions(6),
                           parents_per_question=2, group_size=1, pruning=dataclasses.replace(pruning, fuse="none"),
                           image_embeds=feats.detach())
    extra = 1 if fuse == "summary" else 0  # one summary token per pruned image
    assert (sp.inputs.kept_counts == plain.inputs.kept_counts + extra).all()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**sp.inputs.model_inputs(), max_new_tokens=6, do_sample=True, top_k=0,
                             output_logits=True, return_dict_in_generate=True)
        resp = make_responses(proc, out.sequences, stop_token_ids(model, proc))
        inputs = stream_forward_inputs(model, sp.prompt, [0, 0, 1, 1], resp, boxes=boxes, pruning=pruning)
        lp = token_logprobs(response_hidden(model, inputs, resp.mask), lm_head_weight(model), resp.ids[resp.mask.bool()])
    lp_gen = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, resp.ids[..., None])[..., 0]
    torch.testing.assert_close(lp, lp_gen[resp.mask.bool()], rtol=0, atol=5e-5)
    n = sp.inputs.prompt_length
    torch.testing.assert_close(inputs.inputs_embeds[:, :n], sp.inputs.inputs_embeds, rtol=0, atol=1e-6)


def test_method_config_fusion_names_and_back_compat(tmp_path):
    base = load_yaml("dualstream")
    assert load_method_config().pruning.fuse in FUSION_METHODS
    for value, want in ((True, "cosine_mean"), (False, "none"), ("summary", "summary"), ("nearest_kept", "nearest_kept")):
        data = {**base, "pruning": {**base.get("pruning", {}), "fuse": value}}
        assert MethodConfig.from_dict(data).pruning.fuse == want
    assert PruningConfig(fuse=True) == PruningConfig(fuse="cosine_mean")
    with pytest.raises(ValueError, match=r"^`pruning.fuse` must be one of \['none', 'cosine_mean', 'nearest_kept', "
                                         r"'summary'\] \(or true = cosine_mean, false = none\), got 'avg'$"):
        PruningConfig(fuse="avg")
    # a checkpoint's saved method config (booleans from before the names) still loads
    (tmp_path / "m.yaml").write_text((
        "prompts:\n  localization: {system: s, user: '{question}'}\n  sparse: {system: s, user: '{question}'}\n"
        "pruning: {fuse: true}\n"), encoding="utf-8")
    assert load_method_config(tmp_path / "m.yaml").pruning.fuse == "cosine_mean"
