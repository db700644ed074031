"""The tiny offline Qwen2.5-VL, its byte-level tokenizer and the processor."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from tsparse.dualstream.config import load_method_config  # noqa: E402
from tsparse.dualstream.data import build_messages, load_images  # noqa: E402
from tsparse.dualstream.models import (  # noqa: E402
    QWEN_SPECIAL_TOKEN_BASE_ID,
    QWEN_SPECIAL_TOKENS,
    VLProcessor,
    build_tiny,
    build_tiny_tokenizer,
    load_model_and_processor,
)


def _image(w, h, value=128):
    from PIL import Image

    return Image.new("L", (w, h), value)


def test_tokenizer_special_ids_are_qwens_remapped(tiny_vl):
    _, proc = tiny_vl
    tok = proc.tokenizer
    real = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
    for t, rid in real.items():
        assert tok.convert_tokens_to_ids(t) == rid - QWEN_SPECIAL_TOKEN_BASE_ID + 256
    assert len(QWEN_SPECIAL_TOKENS) == 22
    for tag in ("<think>", "</think>", "<box>", "</box>", "<answer>", "</answer>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_tokenizer_round_trips_any_text(tiny_vl):
    tok = tiny_vl[1].tokenizer
    for text in ["<think>Läsion ∅ 0.25</think><box>[[0.1, 0.2, 0.3, 0.4]]</box><answer>C</answer>",
                 "  spaces\tand\nnewlines  ", "emoji 🩻 and 中文", ""]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    ids = tok("<|im_start|>a<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [257, ord("a"), 258]
    assert tiny_vl[1].decode(ids) == "a"


def test_chat_template_renders_qwens_layout(tiny_vl):
    _, proc = tiny_vl
    msgs = [{"role": "system", "content": [{"type": "text", "text": "S"}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}, {"type": "image"}]}]
    assert proc.apply_chat_template(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?"
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    no_sys = proc.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert no_sys == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def _smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=200704):
    """The resize rule of shared/notes/qwen2_5_vl.md, written independently."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def test_processor_expands_image_tokens_and_resizes(tiny_vl):
    _, proc = tiny_vl
    sizes = [(224, 224), (130, 100), (40, 30), (900, 700)]  # (w, h): exact, rounded, upscaled, downscaled
    imgs = [_image(w, h) for w, h in sizes]
    text = "<|vision_start|><|image_pad|><|vision_end|>"
    out = proc([text * 3, "plain " + text], [imgs[:3], imgs[3:]], padding_side="right")
    grid = out["image_grid_thw"]
    for (w, h), g in zip(sizes, grid.tolist()):
        hb, wb = _smart_resize(h, w)
        assert g == [1, hb // 14, wb // 14]
    assert out["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    n_tok = (grid.prod(-1) // 4).tolist()
    ids, mask = out["input_ids"], out["attention_mask"]
    image_id = proc.image_token_id
    assert (ids[0] == image_id).sum() == sum(n_tok[:3]) and (ids[1] == image_id).sum() == n_tok[3]
    assert torch.equal(out["mm_token_type_ids"], (ids == image_id).int())
    assert mask.sum(1).tolist() != [mask.shape[1]] * 2  # the rows differ in length
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())  # right padding: real tokens first
    left = proc([text * 3, "plain " + text], [imgs[:3], imgs[3:]])["attention_mask"]
    assert bool((left[:, 1:] >= left[:, :-1]).all()) and torch.equal(left.sum(1), mask.sum(1))


def test_processor_errors(tiny_vl):
    _, proc = tiny_vl
    with pytest.raises(ValueError, match=r"texts\[0\].*1 <\|image_pad\|> placeholders for 2 images"):
        proc(["<|image_pad|>"], [[_image(56, 56), _image(56, 56)]])
    with pytest.raises(ValueError, match="images"):
        proc(["a", "b"], [[]])
    with pytest.raises(TypeError, match="texts"):
        proc("a")
    with pytest.raises(ValueError, match="padding_side"):
        proc(["a"], padding_side="middle")
    assert "pixel_values" not in proc(["text only"])


def test_tiny_model_config_and_forward(tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    cfg = model.config
    assert cfg.image_token_id == proc.image_token_id == 268
    assert cfg.vision_start_token_id == 265 and cfg.vision_end_token_id == 266
    assert cfg.text_config.vocab_size % 64 == 0 and cfg.text_config.vocab_size >= len(proc.tokenizer)
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    prompts = load_method_config().prompts
    s = synthetic_samples["one"][0]
    batch = proc([proc.apply_chat_template(build_messages(s, prompts.localization))], [load_images(s)])
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]  # 224 px: 8 x 8 merged tokens
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_encode_samples_is_messages_template_and_processor(tiny_vl, synthetic_samples):
    _, proc = tiny_vl
    prompt = load_method_config().prompts.localization
    samples = synthetic_samples["two"][:2]
    enc = proc.encode_samples(samples, prompt, padding_side="right")
    texts = [proc.apply_chat_template(build_messages(s, prompt)) for s in samples]
    ref = proc(texts, [load_images(s) for s in samples], padding_side="right")
    assert enc["texts"] == texts and set(enc) == set(ref) | {"texts"}
    for k, v in ref.items():
        assert torch.equal(enc[k], v), k
    assert enc["image_grid_thw"].shape[0] == 4  # two views per sample


def test_tiny_build_is_deterministic_and_seeded():
    state = torch.get_rng_state()
    a, _ = build_tiny()
    b, _ = build_tiny()
    c, _ = build_tiny(seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    diff = [not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values())]
    assert any(diff)


def test_save_and_load_by_path(tmp_path, tiny_vl, synthetic_samples):
    model, proc = tiny_vl
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    m2, p2 = load_model_and_processor(str(tmp_path))
    assert isinstance(p2, VLProcessor) and p2.image_token_id == proc.image_token_id
    s = synthetic_samples["one"][1]
    text = proc.apply_chat_template(build_messages(s, load_method_config().prompts.sparse))
    assert p2.apply_chat_template(build_messages(s, load_method_config().prompts.sparse)) == text
    a, b = proc([text], [load_images(s)]), p2([text], [load_images(s)])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**a).logits, m2(**b).logits, rtol=0, atol=0)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model"):
        load_model_and_processor(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        load_model_and_processor(str(tmp_path))
    with pytest.raises(ValueError, match="format_tags"):
        cfg = dict(__import__("tsparse.dualstream.config", fromlist=["x"]).load_yaml("models/tiny_qwen2_5_vl"))
        cfg["tokenizer"] = {"format_tags": ["<a>", "<a>"]}
        build_tiny_tokenizer(cfg)


# --------------------------------------------------------------------------------------
def test_demo_model_coordinate_tokens_and_number_sense():
    """configs/models/tiny_qwen2_5_vl_demo.yaml: "0.00".."1.00" are single tokens whose LM-head
    rows point at a value written linearly into the last hidden state (logit 2 v h0 - v^2 h1)."""
    from tsparse.dualstream.format import format_boxes
    from tsparse.dualstream.models import coordinate_token_values

    model, proc = build_tiny("models/tiny_qwen2_5_vl_demo")
    tok = proc.tokenizer
    values = coordinate_token_values(tok)
    assert len(values) == 101 and sorted(values.values()) == [k / 100 for k in range(101)]
    text = "<box>" + format_boxes([[0.05, 0.4, 0.37, 1.0]]) + "</box>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [values[i] for i in ids if i in values] == [0.05, 0.4, 0.37, 1.0]
    assert tok.decode(ids) == text
    assert coordinate_token_values(build_tiny_tokenizer()) == {}  # the default tiny model has none
    head = model.get_output_embeddings().weight.detach()
    order = torch.tensor(sorted(values, key=values.get))
    for x in (0.0, 0.137, 0.5, 0.861, 1.0):
        h = torch.zeros(head.shape[1])
        h[0], h[1] = x, 1.0
        logits = head[order] @ h
        assert abs(int(logits.argmax()) / 100 - x) <= 0.005 + 1e-9
    emb = model.get_input_embeddings().weight.detach()
    assert torch.allclose(emb[order, 0], 0.05 * (2 * torch.arange(101) / 100 - 1), atol=1e-7)
    cfg = dict(__import__("tsparse.dualstream.config", fromlist=["x"]).load_yaml("models/tiny_qwen2_5_vl"))
    with pytest.raises(ValueError, match="coordinate_tokens"):
        build_tiny_tokenizer({**cfg, "tokenizer": {**cfg["tokenizer"], "coordinate_tokens": 5}})
    with pytest.raises(ValueError, match="coordinate_init"):
        build_tiny({**cfg, "tokenizer": {**cfg["tokenizer"], "coordinate_init": "sorted"}})
    with pytest.raises(ValueError, match="coordinate_tokens"):
        build_tiny({**cfg, "tokenizer": {**cfg["tokenizer"], "coordinate_init": "ordinal"}})
