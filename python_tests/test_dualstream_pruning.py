"""Qwen2.5-VL pruning to the boxes: dense equivalence, original M-RoPE positions against the
model's own get_rope_index, several images per sample, fallback, fusion, gradients, and
generate / teacher-forcing consistency - all on the tiny random model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tsparse.dualstream.config import PruningConfig, load_method_config  # noqa: E402
from tsparse.dualstream.data import build_messages, load_images  # noqa: E402
from tsparse.dualstream.format import parse_boxes  # noqa: E402
from tsparse.dualstream.models import build_tiny  # noqa: E402
from tsparse.dualstream.pruning import (  # noqa: E402
    SparseInputs,
    extend_sparse_inputs,
    repeat_samples,
    sparse_generate,
    sparse_stream_inputs,
)
from tsparse.ops import box_to_patch_mask, select_visual_tokens  # noqa: E402

FULL = (0.0, 0.0, 1.0, 1.0)


def _batch(proc, samples, *, padding_side="left", suffixes=None):
    prompts = load_method_config().prompts
    texts = [proc.apply_chat_template(build_messages(s, prompts.sparse)) for s in samples]
    if suffixes:
        texts = [t + x for t, x in zip(texts, suffixes)]
    return proc(texts, [load_images(s) for s in samples], padding_side=padding_side)


def _sparse(model, b, boxes, **kw):
    return sparse_stream_inputs(model, b["input_ids"], b["attention_mask"], b["image_grid_thw"], boxes,
                                pixel_values=b["pixel_values"], **kw)


def _dense_positions(model, b):
    mm = (b["input_ids"] == model.config.image_token_id).int()
    pos, deltas = model.model.get_rope_index(b["input_ids"], mm, image_grid_thw=b["image_grid_thw"],
                                             attention_mask=b["attention_mask"])
    return pos, deltas


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fuse", [True, False, "nearest_kept", "summary"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_full_image_box_reproduces_the_dense_forward(tiny_vl, synthetic_samples, fuse, padding_side):
    model, proc = tiny_vl
    samples = synthetic_samples["one"][:2] + synthetic_samples["two"][:1]
    b = _batch(proc, samples, padding_side=padding_side, suffixes=["", " a longer prompt", "x"])
    with torch.no_grad():
        dense = model(**b).logits
        sp = _sparse(model, b, [[FULL]] * 3, fuse=fuse, padding_side=padding_side)
        sparse = model(**sp.model_inputs()).logits
    assert sp.keep_ratio == 1.0 and not sp.fallback.any()
    assert torch.equal(sp.input_ids, b["input_ids"]) and torch.equal(sp.attention_mask, b["attention_mask"])
    real = b["attention_mask"].bool()
    torch.testing.assert_close(sparse[real], dense[real], rtol=0, atol=1e-6)


def test_positions_are_the_dense_rope_positions(tiny_vl, synthetic_samples):
    """Kept tokens carry the positions the model's own get_rope_index gives them on the full
    sequence; kept image tokens are exactly the cells the box overlaps."""
    model, proc = tiny_vl
    samples = synthetic_samples["one"][2:5]
    b = _batch(proc, samples, suffixes=["", "zz", "a much longer tail of text"])
    boxes = [[(0.1, 0.2, 0.45, 0.5)], [(0.6, 0.55, 0.95, 0.9), (0.0, 0.0, 0.2, 0.1)], [samples[2].boxes[0]]]
    sp = _sparse(model, b, boxes, fuse=False)
    pos, deltas = _dense_positions(model, b)
    assert sp.keep_ratio < 1.0 and sp.padding_side == "left"
    image_id = model.config.image_token_id
    offsets = [0] + torch.cumsum(sp.total_counts, 0).tolist()
    for row in range(3):
        real = sp.attention_mask[row].bool()
        src = sp.source_index[row, real]
        assert bool((src[1:] > src[:-1]).all()) and bool((sp.source_index[row, ~real] == -1).all())
        assert torch.equal(sp.position_ids[:, row, real], pos[:, row, src])
        assert torch.equal(sp.input_ids[row, real], b["input_ids"][row, src])
        assert sp.text_position_ids[row, real].tolist() == list(range(int(real.sum())))
        # Every non-image token survives; image tokens only where the box is.
        dense_real = b["attention_mask"][row].bool()
        dense_text = dense_real & (b["input_ids"][row] != image_id)
        assert set(dense_text.nonzero()[:, 0].tolist()) <= set(src.tolist())
        # rope_deltas from the full sequence: dense max position + 1 - kept length.
        assert sp.rope_deltas[row, 0] == pos[:, row, dense_real].max() + 1 - real.sum()
        assert sp.rope_deltas[row, 0] == deltas[row, 0] + (dense_real.sum() - real.sum())
        # Kept image tokens = cells (row, col) of the 8x8 grid that the boxes overlap.
        img = real & (sp.input_ids[row] == image_id)
        p = sp.position_ids[:, row, img]
        start = pos[1, row, b["input_ids"][row] == image_id].min()
        cells = set(zip((p[1] - start).tolist(), (p[2] - start).tolist()))
        expect = {(r, c) for r in range(8) for c in range(8)
                  if any((c + 1) / 8 > x1 and c / 8 < x2 and (r + 1) / 8 > y1 and r / 8 < y2
                         for x1, y1, x2, y2 in boxes[row])}
        assert cells == expect and len(cells) == int(sp.kept_counts[row])
        assert sp.visual_keep[offsets[row]:offsets[row + 1]].sum() == len(expect)


def test_sparse_forward_equals_dense_forward_with_pruned_tokens_masked(tiny_vl, synthetic_samples):
    """Without fusion the sparse forward is the dense forward in which no token attends to a
    pruned visual token - which holds only if every kept token keeps its dense position."""
    model, proc = tiny_vl
    samples = synthetic_samples["one"][5:7]
    b = _batch(proc, samples)
    assert not b["attention_mask"].all()  # left padding: the 4-D mask must drop those keys too
    boxes = [[(0.05, 0.1, 0.4, 0.45)], [(0.5, 0.5, 0.8, 0.95)]]
    sp = _sparse(model, b, boxes, fuse=False)
    pos, _ = _dense_positions(model, b)
    n, L = b["input_ids"].shape
    key_ok = torch.zeros(n, L, dtype=torch.bool)
    for row in range(n):
        key_ok[row, sp.source_index[row, sp.attention_mask[row].bool()]] = True
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & key_ok[:, None, :]
    mask4d = torch.zeros(n, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        dense = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                      attention_mask=mask4d, position_ids=pos).logits
        sparse = model(**sp.model_inputs()).logits
        naive = dict(sp.model_inputs())
        naive["position_ids"] = naive["position_ids"][:1].expand(4, -1, -1)  # re-numbered 0..n-1
        wrong = model(**naive).logits
    for row in range(n):
        real = sp.attention_mask[row].bool()
        src = sp.source_index[row, real]
        torch.testing.assert_close(sparse[row, real], dense[row, src], rtol=0, atol=2e-6)
        assert (wrong[row, real] - dense[row, src]).abs().max() > 1e-3  # the test can tell


def test_several_images_per_sample(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    two, one = synthetic_samples["two"][0], synthetic_samples["one"][0]
    b = _batch(proc, [two, one])
    assert b["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8], [1, 16, 16]]
    box = (0.0, 0.0, 0.45, 0.45)
    sp = _sparse(model, b, [[box], [box]])  # box_scope="sample": each image of a sample
    assert sp.image_sample.tolist() == [0, 0, 1]
    assert sp.total_counts.tolist() == [16, 16, 64]
    _, ref_counts = box_to_patch_mask(torch.tensor([box] * 3), torch.tensor([0, 1, 2, 3]), b["image_grid_thw"])
    assert sp.kept_counts.tolist() == ref_counts.tolist() == [4, 4, 16]
    assert sp.keep_ratio == pytest.approx(24 / 96)
    assert sp.sample_keep_ratio().tolist() == pytest.approx([8 / 32, 16 / 64])
    # Per-image boxes: each image its own.
    per_image = [[(0.5, 0.5, 1.0, 1.0)], [FULL], [(0.0, 0.0, 0.1, 0.1)]]
    sp2 = _sparse(model, b, per_image, box_scope="image")
    assert sp2.kept_counts.tolist() == [4, 16, 1]
    image_id = model.config.image_token_id
    assert (sp2.input_ids[0] == image_id).sum() == 20 and (sp2.input_ids[1] == image_id).sum() == 1
    with torch.no_grad():
        assert torch.isfinite(model(**sp2.model_inputs()).logits).all()


@pytest.mark.parametrize("fallback", ["full_image", "drop_image"])
def test_fallback_when_no_usable_box(tiny_vl, synthetic_samples, fallback):
    model, proc = tiny_vl
    samples = synthetic_samples["one"][:3] + synthetic_samples["two"][:1]
    b = _batch(proc, samples)
    no_box = parse_boxes("<think>hm</think><answer>A</answer>")
    assert no_box.boxes == ()
    boxes = [no_box, [(0.6, 0.2, 0.3, 0.5), (float("nan"), 0, 1, 1)], [(1.2, 1.2, 1.5, 1.5)], [(0.0, 0.0, 0.3, 0.3)]]
    sp = _sparse(model, b, boxes, fallback=fallback)
    assert sp.fallback.tolist() == [True, True, True, False, False]
    kept_fallback = [64, 64, 64] if fallback == "full_image" else [0, 0, 0]
    assert sp.kept_counts.tolist() == kept_fallback + [4, 4]
    image_id, vs, ve = model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id
    if fallback == "drop_image":
        row = sp.input_ids[0, sp.attention_mask[0].bool()].tolist()
        assert image_id not in row and row[row.index(vs) + 1] == ve  # an empty image span stays well formed
    with torch.no_grad():
        assert torch.isfinite(model(**sp.model_inputs()).logits).all()
    cfg = PruningConfig(fallback=fallback)
    assert _sparse(model, b, boxes, config=cfg).kept_counts.tolist() == sp.kept_counts.tolist()


def test_fusion_places_the_fused_rows(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    b = _batch(proc, synthetic_samples["one"][:2])
    boxes = [[(0.2, 0.2, 0.6, 0.6)], [(0.5, 0.0, 1.0, 0.4)]]
    fused = _sparse(model, b, boxes, fuse=True)
    plain = _sparse(model, b, boxes, fuse=False)
    assert torch.equal(fused.input_ids, plain.input_ids) and torch.equal(fused.position_ids, plain.position_ids)
    with torch.no_grad():
        feats = torch.cat(model.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output)
    box_t = torch.tensor([boxes[0][0], boxes[1][0]])
    ref = select_visual_tokens(feats, box_t, torch.tensor([0, 1, 2]), b["image_grid_thw"], fuse=True)
    img = (fused.input_ids == model.config.image_token_id) & fused.attention_mask.bool()
    torch.testing.assert_close(fused.inputs_embeds[img], ref.embeds, rtol=0, atol=0)
    assert not torch.allclose(fused.inputs_embeds[img], plain.inputs_embeds[img])
    torch.testing.assert_close(plain.inputs_embeds[img], feats[ref.index], rtol=0, atol=0)
    text = fused.attention_mask.bool() & ~img
    torch.testing.assert_close(fused.inputs_embeds[text], plain.inputs_embeds[text], rtol=0, atol=0)
    # Precomputed embeddings give the same inputs as running the vision tower.
    again = sparse_stream_inputs(model, b["input_ids"], b["attention_mask"], b["image_grid_thw"], boxes,
                                 image_embeds=feats)
    torch.testing.assert_close(again.inputs_embeds, fused.inputs_embeds, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["nearest_kept", "summary"])
def test_named_fusion_methods_place_their_rows(tiny_vl, synthetic_samples, method):
    """nearest_kept and summary through sparse_stream_inputs: the embeddings at the image
    columns are select_visual_tokens' rows for that method; with summary the boxes' own tokens
    are bit-identical to the unfused ones and one extra token per image carries the mean of the
    dropped tokens."""
    model, proc = tiny_vl
    b = _batch(proc, synthetic_samples["one"][:2])
    boxes = [[(0.2, 0.2, 0.6, 0.6)], [(0.5, 0.0, 1.0, 0.4)]]
    sp = _sparse(model, b, boxes, fuse=method)
    plain = _sparse(model, b, boxes, fuse="none")
    assert PruningConfig(fuse=method).fuse == method
    with torch.no_grad():
        feats = torch.cat(model.model.get_image_features(b["pixel_values"], b["image_grid_thw"]).pooler_output)
    box_t = torch.tensor([boxes[0][0], boxes[1][0]])
    ref = select_visual_tokens(feats, box_t, torch.tensor([0, 1, 2]), b["image_grid_thw"], fuse=method)
    img = (sp.input_ids == model.config.image_token_id) & sp.attention_mask.bool()
    torch.testing.assert_close(sp.inputs_embeds[img], ref.embeds, rtol=0, atol=0)
    assert torch.equal(sp.visual_keep, ref.keep)
    if method == "nearest_kept":
        assert torch.equal(sp.kept_counts, plain.kept_counts) and torch.equal(sp.input_ids, plain.input_ids)
        return
    # summary: one more token per image than the plain selection, the rest unmixed
    assert (sp.kept_counts == plain.kept_counts + 1).all()
    assert sp.keep_ratio > plain.keep_ratio
    per_image = torch.split(feats, sp.total_counts.tolist())
    keeps = torch.split(sp.visual_keep, sp.total_counts.tolist())
    plain_keeps = torch.split(plain.visual_keep, plain.total_counts.tolist())
    for row in range(2):
        real = sp.attention_mask[row].bool()
        cols = real & (sp.input_ids[row] == model.config.image_token_id)
        emb = sp.inputs_embeds[row, cols]
        extra = (keeps[row] & ~plain_keeps[row]).nonzero().reshape(-1)
        assert extra.numel() == 1
        kept_rows = keeps[row].nonzero().reshape(-1)
        slot = int((kept_rows == extra[0]).nonzero())
        box_rows = [i for i in range(kept_rows.numel()) if i != slot]
        torch.testing.assert_close(emb[box_rows], per_image[row][kept_rows[box_rows]], rtol=0, atol=0)
        torch.testing.assert_close(emb[slot], per_image[row][~plain_keeps[row]].mean(0), rtol=1e-6, atol=1e-6)


def test_summary_token_position_follows_qwen2_5_vl_layout(tiny_vl, synthetic_samples):
    """The summary token sits at the column of the image's dropped token nearest the centre and
    carries that token's own get_rope_index position: (t, row, col) offsets of a real cell of the
    image, distinct from every kept token's, and the text after the image keeps its positions."""
    model, proc = tiny_vl
    samples = synthetic_samples["one"][2:5]
    b = _batch(proc, samples, suffixes=["", "zz", "a longer tail"])
    boxes = [[(0.0, 0.0, 0.2, 0.2)], [(0.3, 0.3, 0.7, 0.7)], [(0.6, 0.55, 0.95, 0.9)]]
    sp = _sparse(model, b, boxes, fuse="summary")
    plain = _sparse(model, b, boxes, fuse="none")
    pos, deltas = _dense_positions(model, b)
    image_id = model.config.image_token_id
    for row in range(3):
        real = sp.attention_mask[row].bool()
        src = sp.source_index[row, real]
        assert torch.equal(sp.position_ids[:, row, real], pos[:, row, src])  # every column: its dense position
        assert torch.equal(sp.rope_deltas, plain.rope_deltas - (sp.attention_mask.sum(1) - plain.attention_mask.sum(1))[:, None])
        # the one extra column is an image column of this row
        extra = sorted(set(src.tolist()) - set(plain.source_index[row][plain.attention_mask[row].bool()].tolist()))
        assert len(extra) == 1 and int(b["input_ids"][row, extra[0]]) == image_id
        img_cols = (b["input_ids"][row] == image_id) & b["attention_mask"][row].bool()
        start_t, start_h, start_w = (pos[k, row, img_cols].min() for k in range(3))
        t, h, w = (int(pos[k, row, extra[0]]) for k in range(3))
        cell = (t - int(start_t), h - int(start_h), w - int(start_w))
        # the dropped cell nearest the 8 x 8 image's centre (3.5, 3.5), ties: lowest raster index
        dropped = [(r, c) for r in range(8) for c in range(8)
                   if not any((c + 1) / 8 > x1 and c / 8 < x2 and (r + 1) / 8 > y1 and r / 8 < y2
                              for x1, y1, x2, y2 in boxes[row])]
        best = min(dropped, key=lambda rc: ((rc[0] - 3.5) ** 2 + (rc[1] - 3.5) ** 2, rc[0] * 8 + rc[1]))
        assert cell == (0,) + best
        kept_cells = {tuple(int(pos[k, row, c]) for k in range(3)) for c in src.tolist() if int(b["input_ids"][row, c]) == image_id}
        assert len(kept_cells) == int(sp.kept_counts[row])  # all distinct, the summary's included
    with torch.no_grad():  # and the model runs on it
        assert torch.isfinite(model(**sp.model_inputs()).logits).all()


def test_gradients_reach_the_vision_tower_and_embeddings(synthetic_samples):
    model, proc = build_tiny()  # a private copy: this test writes .grad
    b = _batch(proc, synthetic_samples["one"][:2])
    sp = _sparse(model, b, [[(0.1, 0.1, 0.5, 0.5)], [(0.4, 0.4, 0.9, 0.9)]])
    assert sp.inputs_embeds.requires_grad
    logits = model(**sp.model_inputs()).logits
    logits.float().logsumexp(-1).mean().backward()
    vis = [p.grad for p in model.model.visual.parameters() if p.grad is not None]
    assert vis and any(g.abs().sum() > 0 for g in vis)
    assert model.model.language_model.embed_tokens.weight.grad.abs().sum() > 0


def test_generate_and_teacher_forcing_agree(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    b = _batch(proc, synthetic_samples["one"][:2], suffixes=["", "longer"])
    sp = _sparse(model, b, [[(0.1, 0.1, 0.5, 0.5)], [(0.3, 0.3, 0.9, 0.7)]])
    with torch.no_grad():
        out = model.generate(**sp.model_inputs(), max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        ext = extend_sparse_inputs(model, sp, out.sequences)
        tf = model(**ext.model_inputs()).logits
    L = sp.prompt_length
    assert ext.prompt_length == L and ext.input_ids.shape[1] == L + 6
    torch.testing.assert_close(tf[:, L - 1 : -1], torch.stack(out.logits, 1), rtol=0, atol=2e-5)
    # Appended tokens continue the dense positions: last prompt position + 1, + 2, ...
    last = sp.position_ids[0, :, -1]
    assert ext.position_ids[:, :, L:].tolist() == [[[int(p) + 1 + k for k in range(6)] for p in last]] * 3
    assert torch.equal(ext.rope_deltas, sp.rope_deltas)
    # The helper samples num_return_sequences per sample, repeating rows consecutively.
    with torch.no_grad():
        ids = sparse_generate(model, sp, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert ids.shape == (4, 3)


def test_extend_with_padded_responses(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    b = _batch(proc, synthetic_samples["one"][:2])
    sp = _sparse(model, b, [[FULL], [(0.0, 0.0, 0.5, 0.5)]])
    tokens = torch.tensor([[10, 11, 12], [20, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ext = extend_sparse_inputs(model, sp, tokens, mask)
    L = sp.prompt_length
    assert ext.attention_mask[:, L:].tolist() == mask.tolist()
    assert ext.position_ids[0, 1, L:].tolist() == [int(sp.position_ids[0, 1, -1]) + 1, 0, 0]
    assert ext.text_position_ids[1, L] == sp.attention_mask[1].sum()
    with pytest.raises(ValueError, match="right-padded"):
        extend_sparse_inputs(model, sp, tokens, torch.tensor([[1, 1, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match="token_ids"):
        extend_sparse_inputs(model, sp, tokens[:1])


def test_repeat_samples_then_prune_equals_pruning_each_copy(tiny_vl, synthetic_samples):
    """One sparse prompt per localization rollout: repeat each sample (images included), give
    each copy its own boxes; every row equals pruning that sample alone with those boxes."""
    model, proc = tiny_vl
    samples = [synthetic_samples["two"][1], synthetic_samples["one"][3]]
    enc = proc.encode_samples(samples, load_method_config().prompts.sparse)
    with torch.no_grad():
        feats = torch.cat(model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output)
    rep = repeat_samples(enc, 3, image_token_id=model.config.image_token_id, image_embeds=feats)
    assert rep["input_ids"].shape[0] == 6 and rep["texts"][:3] == [enc["texts"][0]] * 3
    assert rep["image_grid_thw"].tolist() == [[1, 8, 8]] * 6 + [[1, 16, 16]] * 3
    assert rep["pixel_values"].shape[0] == 6 * 64 + 3 * 256 and rep["image_embeds"].shape[0] == 6 * 16 + 3 * 64
    boxes = [[(0.1 * k, 0.1, 0.5 + 0.1 * k, 0.6)] for k in range(6)]
    with torch.no_grad():
        both = sparse_stream_inputs(model, rep["input_ids"], rep["attention_mask"], rep["image_grid_thw"], boxes,
                                    pixel_values=rep["pixel_values"], padding_side="right")
        from_embeds = sparse_stream_inputs(model, rep["input_ids"], rep["attention_mask"], rep["image_grid_thw"],
                                           boxes, image_embeds=rep["image_embeds"], padding_side="right")
    torch.testing.assert_close(from_embeds.inputs_embeds, both.inputs_embeds, rtol=0, atol=1e-6)
    for row in range(6):
        b = row // 3
        single = proc.encode_samples([samples[b]], load_method_config().prompts.sparse)
        with torch.no_grad():
            one = sparse_stream_inputs(model, single["input_ids"], single["attention_mask"], single["image_grid_thw"],
                                       [boxes[row]], pixel_values=single["pixel_values"], padding_side="right")
        n = int(one.attention_mask.sum())
        assert torch.equal(both.input_ids[row, :n], one.input_ids[0, :n])
        assert torch.equal(both.position_ids[:, row, :n], one.position_ids[:, 0, :n])
        torch.testing.assert_close(both.inputs_embeds[row, :n], one.inputs_embeds[0, :n], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="repeats"):
        repeat_samples(enc, 0, image_token_id=model.config.image_token_id)
    with pytest.raises(ValueError, match="unknown key"):
        repeat_samples({**enc, "labels": enc["input_ids"]}, 2, image_token_id=model.config.image_token_id)


def test_bad_inputs_name_the_argument(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    b = _batch(proc, synthetic_samples["one"][:2])
    args = (b["input_ids"], b["attention_mask"], b["image_grid_thw"], [[FULL], [FULL]])
    with pytest.raises(ValueError, match="exactly one of `pixel_values` and `image_embeds`"):
        sparse_stream_inputs(model, *args)
    with pytest.raises(ValueError, match="exactly one"):
        sparse_stream_inputs(model, *args, pixel_values=b["pixel_values"], image_embeds=torch.zeros(128, 64))
    with pytest.raises(ValueError, match="image_embeds"):
        sparse_stream_inputs(model, *args, image_embeds=torch.zeros(100, 64))
    with pytest.raises(ValueError, match="does not match"):
        sparse_stream_inputs(model, b["input_ids"], b["attention_mask"], torch.tensor([[1, 8, 8], [1, 8, 8]]),
                             [[FULL], [FULL]], image_embeds=torch.zeros(32, 64))
    with pytest.raises(ValueError, match="t must be 1"):
        sparse_stream_inputs(model, b["input_ids"], b["attention_mask"], torch.tensor([[2, 16, 8], [1, 16, 16]]),
                             [[FULL], [FULL]], image_embeds=torch.zeros(128, 64))
    with pytest.raises(ValueError, match="boxes"):
        sparse_stream_inputs(model, *args[:3], [[FULL]], pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match="box_scope='image'"):
        sparse_stream_inputs(model, *args[:3], [[FULL]] * 3, pixel_values=b["pixel_values"], box_scope="image")
    with pytest.raises(ValueError, match="box_scope='sample'"):
        sparse_stream_inputs(model, *args[:3], [[FULL]] * 3, pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        sparse_stream_inputs(model, *args[:3], [[(0.1, 0.2, 0.3)], [FULL]], pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match="attention_mask"):
        sparse_stream_inputs(model, b["input_ids"], b["attention_mask"][:, 1:], *args[2:], pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match="input_ids"):
        sparse_stream_inputs(model, b["input_ids"].float(), *args[1:], pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match="video"):
        ids = b["input_ids"].clone()
        ids[0, 0] = model.config.video_token_id
        sparse_stream_inputs(model, ids, *args[1:], pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match="pruning.fallback"):
        sparse_stream_inputs(model, *args, pixel_values=b["pixel_values"], fallback="keep")
    with pytest.raises(TypeError, match="model"):
        sparse_stream_inputs(torch.nn.Linear(2, 2), *args, pixel_values=b["pixel_values"])
    sp = sparse_stream_inputs(model, *args, pixel_values=b["pixel_values"], padding_side="right")
    assert isinstance(sp, SparseInputs)
    right = sparse_stream_inputs(model, *args[:3], [[(0, 0, 0.3, 0.3)], [FULL]], pixel_values=b["pixel_values"],
                                 padding_side="right")
    with pytest.raises(ValueError, match="left-padded"):
        sparse_generate(model, right, max_new_tokens=1)
    with pytest.raises(ValueError, match="inputs_embeds"):
        sparse_generate(model, sp, inputs_embeds=sp.inputs_embeds)
