"""The processor is transformers' own (``Qwen2_5_VLProcessor`` / ``AutoProcessor``), and it
encodes the synthetic scans exactly as tsparse's former hand-written processor did.

The former path is kept here as the reference (``_former_encode``): transformers' PIL image
processor (``Qwen2VLImageProcessorPil``) with the tiny config's settings, each
``<|image_pad|>`` repeated ``t*h*w / merge_size**2`` times by hand, then the tokenizer.

Measured (transformers 5.10.4, torchvision 0.29.1): with the tiny config's PIL backend every
output (input ids, attention mask, ``mm_token_type_ids``, ``image_grid_thw``, ``pixel_values``)
is bit-identical to the former path. ``AutoProcessor`` gives a checkpoint that records no
backend (every upstream Qwen2.5-VL checkpoint) the torchvision backend when torchvision is
installed: ids and grids are the same, ``pixel_values`` differ by at most 2.4e-7 where no
resize happens (float rounding of the fused rescale + normalize) and by up to ~0.03 where
``smart_resize`` resizes (torchvision's bicubic against PIL's). Small as they are, such
differences change the tiny model's sampled trajectories, so a tsparse checkpoint records its
backend and loads back with it.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchvision")

from tsparse.dualstream.config import load_method_config, load_yaml  # noqa: E402
from tsparse.dualstream.data import (  # noqa: E402
    SyntheticScanConfig,
    build_messages,
    ensure_synthetic_scans,
    load_images,
    load_vitar_json,
)
from tsparse.dualstream.models import VLProcessor, build_tiny, load_model_and_processor  # noqa: E402


def _former_encode(proc: VLProcessor, texts, images):
    """tsparse's former processor (before transformers' own was used), as the reference."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(**_ip_settings())
    flat = [im.convert("RGB") for ims in images for im in ims]
    vis = ip(images=flat, return_tensors="pt")
    grid = vis["image_grid_thw"].to(torch.int64)
    counts = (grid.prod(-1) // ip.merge_size**2).tolist()
    expanded, k = [], 0
    for t in texts:
        parts = t.split("<|image_pad|>")
        s = parts[0]
        for p in parts[1:]:
            s += "<|image_pad|>" * counts[k] + p
            k += 1
        expanded.append(s)
    enc = proc.tokenizer(expanded, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"].to(torch.int64)
    return {"pixel_values": vis["pixel_values"], "image_grid_thw": grid, "input_ids": ids,
            "attention_mask": enc["attention_mask"].to(torch.int64),
            "mm_token_type_ids": (ids == proc.image_token_id).to(torch.int32)}


def _ip_settings() -> dict:
    cfg = dict(load_yaml("models/tiny_qwen2_5_vl")["image_processor"])
    cfg.pop("backend", None)
    return cfg


def _scans(tmp_path_factory, size: int, views: int):
    root = tmp_path_factory.mktemp(f"scans{size}")
    cfg = SyntheticScanConfig(image_size=size, images_per_sample=views, splits={"train": 4})
    return load_vitar_json(ensure_synthetic_scans(root, cfg)["train"])


def _batch(proc, samples):
    prompt = load_method_config().prompts.sparse
    texts = [proc.apply_chat_template(build_messages(s, prompt)) for s in samples]
    return texts, [load_images(s) for s in samples]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def test_the_tiny_processor_is_transformers_own(tiny):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    model, proc = tiny
    assert isinstance(proc.hf, Qwen2_5_VLProcessor) and isinstance(proc.image_processor, Qwen2VLImageProcessorPil)
    ip_cfg = load_yaml("models/tiny_qwen2_5_vl")["image_processor"]
    assert proc.image_backend == ip_cfg.get("backend", "pil") == "pil"
    assert proc.merge_size == ip_cfg["merge_size"] == model.config.vision_config.spatial_merge_size
    assert proc.image_processor.patch_size == ip_cfg["patch_size"]
    assert proc.image_processor.size.shortest_edge == ip_cfg["min_pixels"]
    assert proc.image_processor.size.longest_edge == ip_cfg["max_pixels"]
    assert proc.image_token_id == proc.hf.image_token_id == model.config.image_token_id


@pytest.mark.parametrize("size,views", [(224, 1), (112, 2), (200, 1)])
def test_synthetic_scans_encode_as_the_former_processor_did(tiny, tmp_path_factory, size, views):
    _, proc = tiny
    texts, images = _batch(proc, _scans(tmp_path_factory, size, views))
    new, old = proc(texts, images), _former_encode(proc, texts, images)
    assert set(new) == set(old)
    for key in old:  # 200 px: smart_resize resizes to 196; still bit-identical
        assert new[key].dtype == old[key].dtype and torch.equal(new[key], old[key]), key


def test_the_torchvision_backend_differs_only_in_pixel_rounding(tiny, tmp_path_factory):
    """What AutoProcessor gives an upstream checkpoint here: the same ids and grids; pixel values
    within 1e-6 without a resize, within 0.1 (measured 0.015) where smart_resize resizes."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    _, proc = tiny
    tv = VLProcessor(Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**_ip_settings()),
                                         tokenizer=proc.tokenizer, video_processor=proc.hf.video_processor,
                                         chat_template=proc.chat_template))
    assert tv.image_backend == "torchvision"
    for size in (224, 200):
        texts, images = _batch(proc, _scans(tmp_path_factory, size, 1))
        a, b = proc(texts, images), tv(texts, images)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
            assert torch.equal(a[key], b[key]), (size, key)
        diff = float((a["pixel_values"] - b["pixel_values"]).abs().max())
        assert diff <= (1e-6 if size % 28 == 0 else 0.1), (size, diff)
        if size % 28:
            assert diff > 1e-4  # a real resize happened, and the backends' bicubics differ


def test_a_saved_checkpoint_loads_back_through_auto_processor(tiny, tmp_path, tmp_path_factory):
    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tsparse_processor.json").read_text()) == {"image_backend": "pil"}
    m2, p2 = load_model_and_processor(str(tmp_path))
    assert type(p2.hf) is type(proc.hf) and type(p2.image_processor) is type(proc.image_processor)
    assert p2.chat_template == proc.chat_template and p2.merge_size == proc.merge_size
    texts, images = _batch(proc, _scans(tmp_path_factory, 112, 2))
    a, b = proc(texts, images), p2(texts, images)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(**a).logits, m2(**b).logits, rtol=0, atol=0)
    # Without the record, transformers' own choice (torchvision, when installed) applies.
    (tmp_path / "tsparse_processor.json").unlink()
    _, p3 = load_model_and_processor(str(tmp_path))
    assert p3.image_backend == "torchvision" and torch.equal(p3(texts, images)["input_ids"], a["input_ids"])


def test_a_checkpoint_written_by_the_former_processor_still_loads(tiny, tmp_path, tmp_path_factory):
    """Checkpoints of earlier tsparse.train runs hold the tokenizer, a PIL image processor config,
    chat_template.json (the former save_pretrained) and the trainer's tsparse_method.yaml:
    AutoProcessor reads them, with the PIL backend they were trained with."""
    from tsparse.dualstream.config import save_method_config
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.tokenizer.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil(**_ip_settings()).save_pretrained(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": proc.chat_template}))
    _, p_upstream = load_model_and_processor(str(tmp_path))
    assert p_upstream.image_backend == "torchvision"  # no tsparse record: transformers' choice
    save_method_config(load_method_config(), tmp_path)
    _, p2 = load_model_and_processor(str(tmp_path))
    assert p2.chat_template == proc.chat_template and p2.image_backend == "pil"
    texts, images = _batch(proc, _scans(tmp_path_factory, 224, 1))
    a, b = proc(texts, images), p2(texts, images)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_wrapping_something_else_is_refused(tiny):
    _, proc = tiny
    with pytest.raises(ValueError, match="processor"):
        VLProcessor(proc.tokenizer)
