"""Visual-token pruning baselines behind one interface (tsparse.vtp): exact kept counts per image,
original M-RoPE positions of the kept tokens, and each method's selection rule against an
independent reference (FastV against the model's own eager attention weights, DivPrune against a
literal greedy max-min loop, pooling against 2 x 2 average pooling)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tsparse import vtp  # noqa: E402
from tsparse.dualstream.config import PruningConfig, load_method_config  # noqa: E402
from tsparse.dualstream.data import build_messages, load_images  # noqa: E402
from tsparse.dualstream.pruning import image_features, sparse_stream_inputs  # noqa: E402


@pytest.fixture(scope="module")
def batch(tiny_vl, synthetic_samples):
    """Two single-image 224-px samples (64 tokens each) and one two-view 112-px sample (16 + 16),
    left-padded (rows of different lengths), with their visual tokens and dense positions."""
    model, proc = tiny_vl
    samples = synthetic_samples["one"][:2] + synthetic_samples["two"][:1]
    prompt = load_method_config().prompts.sparse
    texts = [proc.apply_chat_template(build_messages(s, prompt)) for s in samples]
    texts[1] += " and a longer tail"
    b = proc(texts, [load_images(s) for s in samples], padding_side="left")
    with torch.no_grad():
        emb = image_features(model, b["pixel_values"], b["image_grid_thw"])
    mm = (b["input_ids"] == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(b["input_ids"], mm, image_grid_thw=b["image_grid_thw"],
                                        attention_mask=b["attention_mask"])
    assert not b["attention_mask"].all()
    return dict(b=b, emb=emb, pos=pos, counts=[64, 64, 16, 16])


def _prune(model, batch, **kw):
    b = batch["b"]
    with torch.no_grad():
        return vtp.prune_visual_tokens(model, b["input_ids"], b["attention_mask"], b["image_grid_thw"],
                                       image_embeds=batch["emb"], **kw)


def _check_positions(model, batch, sp):
    """Every kept column carries the dense sequence's positions and id at its source column;
    rope deltas are the dense sequence's."""
    b, pos = batch["b"], batch["pos"]
    for row in range(b["input_ids"].shape[0]):
        real = sp.attention_mask[row].bool()
        src = sp.source_index[row, real]
        assert bool((src[1:] > src[:-1]).all())
        assert torch.equal(sp.position_ids[:, row, real], pos[:, row, src])
        assert torch.equal(sp.input_ids[row, real], b["input_ids"][row, src])
        dense_real = b["attention_mask"][row].bool()
        assert int(sp.rope_deltas[row, 0]) == int(pos[:, row, dense_real].max()) + 1 - int(real.sum())
        # every text token survives
        text = dense_real & (b["input_ids"][row] != model.config.image_token_id)
        assert set(text.nonzero()[:, 0].tolist()) <= set(src.tolist())


@pytest.mark.parametrize("method", vtp.BASELINES)
@pytest.mark.parametrize("keep_ratio", [0.77, 0.5, 0.25])
def test_baselines_keep_exact_counts_at_dense_positions(tiny_vl, batch, method, keep_ratio):
    model, _ = tiny_vl
    sp = _prune(model, batch, method=method, keep_ratio=keep_ratio)
    want = [round(keep_ratio * n) for n in batch["counts"]]
    assert sp.kept_counts.tolist() == want and sp.total_counts.tolist() == batch["counts"]
    assert int(sp.visual_keep.sum()) == sum(want)
    img = (sp.input_ids == model.config.image_token_id) & sp.attention_mask.bool()
    assert int(img.sum()) == sum(want)
    assert not sp.fallback.any()
    _check_positions(model, batch, sp)
    # the kept image columns are exactly the selected dense visual tokens, in order
    b = batch["b"]
    dense_img = ((b["input_ids"] == model.config.image_token_id) & b["attention_mask"].bool())
    dense_cols = [dense_img[r].nonzero()[:, 0] for r in range(3)]
    kept_cols = torch.cat([sp.source_index[r][img[r]] for r in range(3)])
    all_cols = torch.cat(dense_cols)
    rows = torch.cat([torch.full_like(c, r) for r, c in enumerate(dense_cols)])
    sel = sp.visual_keep.cpu()
    assert torch.equal(kept_cols, all_cols[sel])
    assert torch.equal(torch.cat([torch.full((int(img[r].sum()),), r) for r in range(3)]), rows[sel])


@pytest.mark.parametrize("method", vtp.BASELINES)
def test_explicit_counts_per_image(tiny_vl, batch, method):
    model, _ = tiny_vl
    counts = [1, 64, 3, 16]
    sp = _prune(model, batch, method=method, keep_counts=counts)
    assert sp.kept_counts.tolist() == counts
    _check_positions(model, batch, sp)


def test_kept_embeddings_are_the_selected_rows_or_their_fusion(tiny_vl, batch):
    model, _ = tiny_vl
    emb = batch["emb"]
    img_id = model.config.image_token_id
    for fuse in (False, True):
        sp = _prune(model, batch, method="random", keep_ratio=0.5, fuse=fuse)
        img = (sp.input_ids == img_id) & sp.attention_mask.bool()
        rows = sp.inputs_embeds[img]
        if not fuse:
            torch.testing.assert_close(rows, emb[sp.visual_keep], rtol=0, atol=0)
        else:
            assert (rows - emb[sp.visual_keep]).abs().max() > 1e-4  # dropped tokens were merged in
    a = _prune(model, batch, method="random", keep_ratio=0.5)
    assert torch.equal(a.visual_keep, sp.visual_keep)  # fusion does not change the selection


@pytest.mark.parametrize("fuse", ["nearest_kept", "summary"])
def test_baselines_take_named_fusion_methods(tiny_vl, batch, fuse):
    """A baseline's selection through a named fusion method: the rows are fuse_visual_tokens'
    on that selection; summary adds one token per image on top of the requested count."""
    from tsparse.ops import fuse_visual_tokens

    model, _ = tiny_vl
    counts = [1, 60, 3, 16]
    plain = _prune(model, batch, method="divprune", keep_counts=counts)
    sp = _prune(model, batch, method="divprune", keep_counts=counts, fuse=fuse)
    ref = fuse_visual_tokens(batch["emb"], plain.visual_keep, batch["b"]["image_grid_thw"], fuse=fuse)
    img = (sp.input_ids == model.config.image_token_id) & sp.attention_mask.bool()
    torch.testing.assert_close(sp.inputs_embeds[img], ref.embeds, rtol=0, atol=0)
    extra = [1, 1, 1, 0] if fuse == "summary" else [0] * 4  # the last image keeps all its 16 tokens
    assert sp.kept_counts.tolist() == [c + e for c, e in zip(counts, extra)]
    _check_positions(model, batch, sp)


def test_random_is_seeded_per_image(tiny_vl, batch):
    model, _ = tiny_vl
    a = _prune(model, batch, method="random", keep_ratio=0.5, seeds=[1, 2, 3, 4])
    b = _prune(model, batch, method="random", keep_ratio=0.5, seeds=[1, 2, 3, 4])
    c = _prune(model, batch, method="random", keep_ratio=0.5, seeds=[9, 2, 3, 4])
    assert torch.equal(a.visual_keep, b.visual_keep)
    assert not torch.equal(a.visual_keep[:64], c.visual_keep[:64]) and torch.equal(a.visual_keep[64:], c.visual_keep[64:])
    assert vtp.image_seed(0, "x", 0) != vtp.image_seed(0, "x", 1) != vtp.image_seed(1, "x", 1)


def test_fastv_scores_are_the_models_own_attention(tiny_vl, batch):
    """The ranking equals the eager attention weights of the last token at that layer, averaged
    over heads, that the model itself returns with output_attentions."""
    model, _ = tiny_vl
    dense = _prune(model, batch, method="dense")
    img = (dense.input_ids == model.config.image_token_id) & dense.attention_mask.bool()
    for layer in range(model.config.text_config.num_hidden_layers):
        scores = vtp.fastv_scores(model, dense, layer)
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                att = model(**dense.model_inputs(), output_attentions=True).attentions[layer]
        finally:
            model.set_attn_implementation("sdpa")
        ref = att[:, :, -1, :].mean(1)[img]  # left padding: the last column is the last token
        torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-7)
        sp = _prune(model, batch, method="fastv", keep_ratio=0.25, fastv_layer=layer)
        assert torch.equal(sp.visual_keep, vtp.select_top_scores(ref, batch["counts"], [16, 16, 4, 4]))


def test_select_top_scores_ties_lowest_index():
    s = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.5, 0.7, 0.7])
    keep = vtp.select_top_scores(s, [4, 3], [2, 1])
    assert keep.tolist() == [True, True, False, False, False, True, False]


def _divprune_literal(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy max-min selection written out with Python loops."""
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    d = (1 - xn @ xn.T).tolist()
    n = len(d)
    first = max(range(n), key=lambda i: (min(d[i][j] for j in range(n) if j != i), -i))
    picked = [first]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(d[i][j] for j in picked), -i)))
    return sorted(picked)


def test_divprune_matches_the_literal_greedy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30 + 12, 8, generator=g)
    keep = vtp.select_divprune(x, [30, 12], [7, 12])
    assert keep[:30].nonzero()[:, 0].tolist() == _divprune_literal(x[:30], 7)
    assert keep[30:].all()
    # picks spread out: duplicated tokens are never both kept while distinct ones remain
    y = torch.cat([x[:5], x[:5]])
    k = vtp.select_divprune(y, [10], [5])
    assert sorted(set(i % 5 for i in k.nonzero()[:, 0].tolist())) == [0, 1, 2, 3, 4]


def test_pool_is_average_pooling_at_a_quarter(tiny_vl, batch):
    model, _ = tiny_vl
    x = batch["emb"][:64]
    keep, emb = vtp.select_pool(x, torch.tensor([[1, 16, 16]]), [16])
    d = x.shape[1]
    ref = torch.nn.functional.avg_pool2d(x.T.reshape(1, d, 8, 8), 2).reshape(d, 16).T
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-6)
    # each pooled token sits at a cell of its 2x2 block (rows/cols 1, 3, 5, 7)
    cells = keep.nonzero()[:, 0]
    assert sorted(set((cells // 8).tolist())) == [1, 3, 5, 7] and sorted(set((cells % 8).tolist())) == [1, 3, 5, 7]
    # any count is exact and the means cover every token once
    for k in (1, 5, 13, 37, 63, 64):
        keep, emb = vtp.select_pool(x, torch.tensor([[1, 16, 16]]), [k])
        assert int(keep.sum()) == k and emb.shape == (k, d)
    keep, emb = vtp.select_pool(x, torch.tensor([[1, 16, 16]]), [64])
    torch.testing.assert_close(emb, x, rtol=0, atol=1e-6)


def test_grounded_goes_through_sparse_stream_inputs(tiny_vl, batch):
    model, _ = tiny_vl
    b = batch["b"]
    boxes = [[(0.1, 0.1, 0.5, 0.6)], None, [(0.5, 0.5, 1.0, 1.0)]]
    sp = _prune(model, batch, method="grounded", boxes=boxes, config=PruningConfig(fuse=False))
    with torch.no_grad():
        ref = sparse_stream_inputs(model, b["input_ids"], b["attention_mask"], b["image_grid_thw"], boxes,
                                   image_embeds=batch["emb"], fuse=False)
    assert torch.equal(sp.input_ids, ref.input_ids) and torch.equal(sp.position_ids, ref.position_ids)
    torch.testing.assert_close(sp.inputs_embeds, ref.inputs_embeds, rtol=0, atol=0)
    assert sp.fallback.tolist() == [False, True, False, False] and sp.keep_ratio < 1


def test_dense_keeps_everything_and_matches_the_dense_forward(tiny_vl, batch):
    model, _ = tiny_vl
    b = batch["b"]
    sp = _prune(model, batch, method="dense")
    assert torch.equal(sp.input_ids, b["input_ids"]) and sp.keep_ratio == 1.0
    with torch.no_grad():
        ref = model(**b).logits
        got = model(**sp.model_inputs()).logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-6)


def test_bad_arguments_name_the_argument(tiny_vl, batch):
    model, _ = tiny_vl
    with pytest.raises(ValueError, match="`method`"):
        _prune(model, batch, method="sparsevlm", keep_ratio=0.5)
    with pytest.raises(ValueError, match="`keep_ratio`"):
        _prune(model, batch, method="random", keep_ratio=1.5)
    with pytest.raises(ValueError, match="exactly one of `keep_ratio` and `keep_counts`"):
        _prune(model, batch, method="random")
    with pytest.raises(ValueError, match=r"`keep_counts\[1\]`"):
        _prune(model, batch, method="divprune", keep_counts=[1, 65, 1, 1])
    with pytest.raises(ValueError, match="`keep_counts` has 3 entries"):
        _prune(model, batch, method="pool", keep_counts=[1, 1, 1])
    with pytest.raises(ValueError, match="`boxes`"):
        _prune(model, batch, method="random", keep_ratio=0.5, boxes=[None] * 3)
    with pytest.raises(ValueError, match="`keep_ratio`/`keep_counts` do not apply"):
        _prune(model, batch, method="grounded", boxes=[None] * 3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="`fuse` does not apply"):
        _prune(model, batch, method="pool", keep_ratio=0.5, fuse=True)
    with pytest.raises(ValueError, match="`layer`"):
        _prune(model, batch, method="fastv", keep_ratio=0.5, fastv_layer=7)
    with pytest.raises(ValueError, match="`image_embeds`"):
        b = batch["b"]
        vtp.prune_visual_tokens(model, b["input_ids"], b["attention_mask"], b["image_grid_thw"],
                                method="random", image_embeds=batch["emb"][:10], keep_ratio=0.5)
    with pytest.raises(ValueError, match="`keep_ratio`"):
        vtp.keep_counts_for_ratio([4], 0.0)
