"""Data: ViTAR-format loader, the synthetic scan generator, chat messages."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tsparse.dualstream.config import StreamPrompt, load_method_config
from tsparse.dualstream.data import (
    SyntheticScanConfig,
    VQASample,
    build_messages,
    ensure_synthetic_scans,
    generate_synthetic_scans,
    load_images,
    load_vitar_json,
    parse_options,
    render_synthetic_sample,
    warmup_response,
)
from tsparse.dualstream.format import check_localization_format, check_sparse_format, parse_boxes

SMALL = SyntheticScanConfig(image_size=112, splits={"train": 6, "val": 2})


def _png(path, size=(32, 24)):
    from PIL import Image

    Image.new("RGB", size, (10, 20, 30)).save(path)


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "question, expect",
    [
        ("<image>\nWhere?\nA) left\nB) right", {"A": "left", "B": "right"}),
        ("Where?\n(A) left lung\n(B) right lung\n(C) both", {"A": "left lung", "B": "right lung", "C": "both"}),
        ("Which? A. yes B. no", {"A": "yes", "B": "no"}),
        ("Which? A: small B: large C: none", {"A": "small", "B": "large", "C": "none"}),
        ("Is there a fracture?", {}),
        ("Options:\nA) one\nC) three", {}),  # a gap: not options
        ("A) only one", {}),
    ],
)
def test_parse_options(question, expect):
    assert parse_options(question) == expect


def test_load_vitar_json_fields_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    absolute = tmp_path / "abs.png"
    _png(absolute)
    records = [
        {"image_path": ["imgs/a.png"], "question": "<image>\nWhere?\nA) left\nB) right", "answer": "B",
         "bbox": [[0.1, 0.2, 0.5, 0.6]]},
        {"image_path": "imgs/b.png", "question": "Q?", "answer": "yes", "bbox": [0.0, 0.0, 1.0, 1.0],
         "dataset": "VQA-RAD", "subset": "open", "id": "r1"},
        {"image": ["imgs/a.png", str(absolute)], "question": "<image><image>Compare.", "answer": 3,
         "options": ["x", "y", "z"]},
    ]
    f = tmp_path / "data.json"
    f.write_text(json.dumps(records))
    s = load_vitar_json(f)
    assert [x.id for x in s] == ["data_0", "r1", "data_2"]
    assert s[0].images == (str(tmp_path / "imgs" / "a.png"),) and s[0].boxes == ((0.1, 0.2, 0.5, 0.6),)
    assert s[0].options == {"A": "left", "B": "right"} and s[0].answer == "B"
    assert s[1].boxes == ((0.0, 0.0, 1.0, 1.0),) and s[1].meta == {"dataset": "VQA-RAD", "subset": "open"}
    assert s[2].images[1] == str(absolute) and s[2].answer == "3" and s[2].options == {"A": "x", "B": "y", "C": "z"}
    assert s[2].boxes == ()
    assert [im.size for im in load_images(s[2])] == [(32, 24), (32, 24)]
    # JSON Lines and limit.
    jl = tmp_path / "data.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records))
    assert [x.answer for x in load_vitar_json(jl, limit=2)] == ["B", "yes"]


@pytest.mark.parametrize(
    "record, error, match",
    [
        ({"image_path": ["missing.png"], "question": "q", "answer": "A"}, FileNotFoundError, "record 0: image"),
        ({"question": "q", "answer": "A"}, ValueError, "no image field"),
        ({"image_path": ["ok.png"], "question": " ", "answer": "A"}, ValueError, "question"),
        ({"image_path": ["ok.png"], "question": "q"}, ValueError, "answer"),
        ({"image_path": ["ok.png"], "question": "q", "answer": "A", "bbox": [[10, 20, 300, 400]]}, ValueError,
         r"bbox\[0\].*normalized"),
        ({"image_path": ["ok.png"], "question": "q", "answer": "A", "bbox": [[0.5, 0.5, 0.2, 0.9]]}, ValueError,
         "inverted"),
        ({"image_path": [], "question": "q", "answer": "A"}, ValueError, "image_path"),
    ],
)
def test_load_vitar_json_errors_name_the_record(tmp_path, record, error, match):
    _png(tmp_path / "ok.png")
    f = tmp_path / "d.json"
    f.write_text(json.dumps([record]))
    with pytest.raises(error, match=match):
        load_vitar_json(f)


def test_load_vitar_json_drop_invalid_boxes_and_file_errors(tmp_path):
    _png(tmp_path / "ok.png")
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"image_path": ["ok.png"], "question": "q", "answer": "A",
                              "bbox": [[10, 20, 300, 400], [0.1, 0.1, 0.2, 0.2]]}]))
    with pytest.warns(UserWarning, match=r"dropped 1 invalid box\(es\) in 1 of 1 records: 'd_0' \(bbox\[0\]"):
        assert load_vitar_json(f, invalid_boxes="drop")[0].boxes == ((0.1, 0.1, 0.2, 0.2),)
    with pytest.raises(FileNotFoundError, match="path"):
        load_vitar_json(tmp_path / "nope.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        load_vitar_json(tmp_path / "obj.json")
    with pytest.raises(ValueError, match="invalid_boxes"):
        load_vitar_json(f, invalid_boxes="keep")


# --------------------------------------------------------------------------------------
def test_synthetic_samples_are_deterministic_and_distinct():
    a_imgs, a = render_synthetic_sample(3, SMALL)
    b_imgs, b = render_synthetic_sample(3, SMALL)
    assert a == b and np.array_equal(np.asarray(a_imgs[0]), np.asarray(b_imgs[0]))
    c_imgs, _ = render_synthetic_sample(4, SMALL)
    d_imgs, _ = render_synthetic_sample(3, SMALL, "val")
    e_imgs, _ = render_synthetic_sample(3, dataclasses.replace(SMALL, seed=1))
    for other in (c_imgs, d_imgs, e_imgs):
        assert not np.array_equal(np.asarray(a_imgs[0]), np.asarray(other[0]))


def test_synthetic_answers_and_boxes_agree_with_the_rendered_lesion():
    cfg = SyntheticScanConfig(image_size=224)
    seen_types, letters = set(), set()
    for i in range(40):
        imgs, rec = render_synthetic_sample(i, cfg)
        attrs, (box,) = rec["attributes"], rec["bbox"]
        img = np.asarray(imgs[0], dtype=np.float32) / 255.0
        assert img.shape == (224, 224)
        options = parse_options(rec["question"])
        correct = options[rec["answer"]]
        seen_types.add(rec["question_type"])
        letters.add(rec["answer"])
        expect = {
            "location": attrs["quadrant"],
            "intensity": f"{attrs['intensity']} than the surrounding tissue",
            "shape": attrs["shape"],
            "size": attrs["size"],
        }[rec["question_type"]]
        assert correct == expect
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        # The box lies in its quadrant.
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        assert (cx < 0.5) == attrs["quadrant"].endswith("left") and (cy < 0.5) == attrs["quadrant"].startswith("upper")
        assert (x2 <= 0.5 or x1 >= 0.5) and (y2 <= 0.5 or y1 >= 0.5)
        # The lesion is in the box: its centre differs from the tissue around the box the
        # way the intensity attribute says.
        px = lambda v: int(v * 224)  # noqa: E731
        centre = img[px(cy) - 2 : px(cy) + 3, px(cx) - 2 : px(cx) + 3].mean()
        ring = np.concatenate([
            img[max(px(y1) - 8, 0) : max(px(y1) - 3, 1), px(x1) : px(x2)].ravel(),
            img[px(y2) + 3 : px(y2) + 8, px(x1) : px(x2)].ravel(),
        ])
        if attrs["intensity"] == "brighter":
            assert centre > np.median(ring) + 0.15, (i, centre, np.median(ring))
        else:
            assert centre < np.median(ring) - 0.12, (i, centre, np.median(ring))
        # The size class follows the box area.
        area = (x2 - x1) * (y2 - y1)
        assert {"small": area < 0.02, "medium": 0.015 < area < 0.04, "large": area > 0.04}[attrs["size"]], area
    assert seen_types == {"location", "intensity", "shape", "size"} and letters >= {"A", "B", "C"}


def test_two_views_share_the_box():
    cfg = SyntheticScanConfig(image_size=112, images_per_sample=2)
    imgs, rec = render_synthetic_sample(0, cfg)
    assert len(imgs) == 2 and rec["question"].startswith("<image><image>\n")
    assert not np.array_equal(np.asarray(imgs[0]), np.asarray(imgs[1]))


def test_generate_load_round_trip_and_ensure_is_idempotent(tmp_path):
    paths = ensure_synthetic_scans(tmp_path, SMALL)
    assert set(paths) == {"train", "val"}
    train = load_vitar_json(paths["train"])
    assert len(train) == 6 and len(load_vitar_json(paths["val"])) == 2
    _, rec = render_synthetic_sample(2, SMALL)
    assert train[2].answer == rec["answer"] and train[2].boxes == (tuple(rec["bbox"][0]),)
    assert train[2].options == parse_options(rec["question"]) and train[2].meta["rationale"] == rec["rationale"]
    assert load_images(train[0])[0].size == (112, 112)
    stamp = paths["train"].stat().st_mtime_ns
    again = ensure_synthetic_scans(tmp_path, SMALL)
    assert again == paths and paths["train"].stat().st_mtime_ns == stamp
    other = ensure_synthetic_scans(tmp_path, dataclasses.replace(SMALL, seed=5))
    assert other["train"].parent != paths["train"].parent
    out = generate_synthetic_scans(tmp_path / "plain", SMALL, splits={"test": 1})
    assert set(out) == {"test"} and len(json.loads(out["test"].read_text())) == 1


def test_synthetic_config_validation(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        SyntheticScanConfig(image_size=20)
    with pytest.raises(ValueError, match="question_types"):
        SyntheticScanConfig(question_types=("colour",))
    with pytest.raises(ValueError, match="splits"):
        SyntheticScanConfig(splits={"dev": 3})
    with pytest.raises(ValueError, match="images_per_sample"):
        SyntheticScanConfig(images_per_sample=3)
    cfg = SyntheticScanConfig.load()
    assert cfg.image_size == 224 and cfg.splits["train"] > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: 224\ncolour: red\n")
    with pytest.raises(ValueError, match="colour"):
        SyntheticScanConfig.load(bad)


# --------------------------------------------------------------------------------------
def test_build_messages():
    prompts = load_method_config().prompts
    s = VQASample("x", ("a.png",), "<image>\nWhere?\nA) l\nB) r", "A")
    msgs = build_messages(s, prompts.localization)
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": prompts.localization.system}]}
    assert msgs[1]["content"] == [{"type": "image"}, {"type": "text", "text": "\nWhere?\nA) l\nB) r"}]
    two = VQASample("y", ("a.png", "b.png"), "Compare <image> with <image>.", "B")
    assert build_messages(two, StreamPrompt("", "Q: {question}"))[0]["content"] == [
        {"type": "text", "text": "Q: Compare "}, {"type": "image"}, {"type": "text", "text": " with "},
        {"type": "image"}, {"type": "text", "text": "."},
    ]
    none = VQASample("z", ("a.png", "b.png"), "No placeholder {not a field}", "B")
    c = build_messages(none, StreamPrompt("sys", "{question}"))[1]["content"]
    assert c[:2] == [{"type": "image"}, {"type": "image"}] and c[2]["text"] == "No placeholder {not a field}"
    with pytest.raises(ValueError, match="placeholders"):
        build_messages(VQASample("w", ("a.png",), "<image><image>", "A"), prompts.sparse)
    with pytest.raises(TypeError, match="prompt"):
        build_messages(s, {"system": ""})


def test_warmup_response_targets_pass_the_strict_format(tmp_path):
    paths = ensure_synthetic_scans(tmp_path, SMALL)
    for s in load_vitar_json(paths["train"]):
        loc = warmup_response(s, "localization")
        assert check_localization_format(loc).ok and s.meta["rationale"] in loc
        assert parse_boxes(loc).boxes == tuple(tuple(round(v, 2) for v in b) for b in s.boxes)
        assert loc.endswith(f"<answer>{s.answer}</answer>")
        assert check_sparse_format(warmup_response(s, "sparse")).ok
    plain = VQASample("p", ("a.png",), "q", "B")
    with pytest.raises(ValueError, match="rationale"):
        warmup_response(plain, "sparse")
    with pytest.raises(ValueError, match="no box"):
        warmup_response(plain, "localization", reasoning="r")
    assert warmup_response(plain, "sparse", reasoning="r") == "<think>r</think><answer>B</answer>"
    with pytest.raises(ValueError, match="stream"):
        warmup_response(plain, "dense", reasoning="r")


# --------------------------------------------------------------------------------------
# The embedded demo's simplifications (configs/data/demo_scans.yaml)
def test_demo_options_keep_the_same_lesions():
    """Cue, option order, question style and rationale change how a sample is shown and asked,
    never which lesion it holds: the RNG stream is the same in every mode."""
    base = SyntheticScanConfig(image_size=112)
    demo = dataclasses.replace(base, position_cue="lesion", option_order="fixed", question_style="short",
                               rationale="centre")
    for i in range(12):
        _, a = render_synthetic_sample(i, base)
        _, b = render_synthetic_sample(i, demo)
        assert a["bbox"] == b["bbox"] and a["attributes"] == b["attributes"] and a["question_type"] == b["question_type"]


def test_position_cue_channels():
    s = 112
    for cue in ("image", "lesion"):
        imgs, rec = render_synthetic_sample(3, SyntheticScanConfig(image_size=s, position_cue=cue))
        px = np.asarray(imgs[0]).astype(np.float64)
        assert imgs[0].mode == "RGB" and px.shape == (s, s, 3)
        gray = np.asarray(render_synthetic_sample(3, SyntheticScanConfig(image_size=s))[0][0])
        assert np.array_equal(px[..., 0], gray)  # red: the scan itself
        ramp = (np.arange(s) + 0.5) / s * 255
        x1, y1, x2, y2 = (round(v * s) for v in rec["bbox"][0])
        cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
        if cue == "image":  # green = x, blue = y everywhere
            assert np.abs(px[..., 1] - ramp[None, :]).max() <= 0.5 + 1e-9
            assert np.abs(px[..., 2] - ramp[:, None]).max() <= 0.5 + 1e-9
        else:  # only on the lesion: its centre carries (x, y), far corners are black
            assert abs(px[cy, cx, 1] - ramp[cx]) < 6 and abs(px[cy, cx, 2] - ramp[cy]) < 6
            assert px[0, 0, 1] == px[0, 0, 2] == 0 and px[-1, -1, 1] == px[-1, -1, 2] == 0
            outside = np.ones((s, s), bool)
            outside[max(y1 - 6, 0):y2 + 6, max(x1 - 6, 0):x2 + 6] = False
            assert px[outside][:, 1:].max() <= 2  # nothing away from the lesion


def test_fixed_order_short_questions_and_rationales():
    cfg = SyntheticScanConfig(image_size=112, option_order="fixed", question_style="short", rationale="attribute")
    seen: dict = {}
    for i in range(40):
        _, rec = render_synthetic_sample(i, cfg)
        opts = parse_options(rec["question"])
        text = opts[rec["answer"]]
        assert rec["rationale"] == text  # the think is the answer's own option text
        seen.setdefault(rec["question"], {})[text] = rec["answer"]
        a = rec["attributes"]
        want = {"location": a["quadrant"], "intensity": a["intensity"], "size": a["size"],
                "shape": {"round": "round", "horizontally elongated": "wide", "vertically elongated": "tall"}[a["shape"]]}
        assert text == want[rec["question_type"]]
        assert len(rec["question"]) < 90
    assert len(seen) == 4  # one question text per type, options in a fixed order
    assert seen["<image>\nWhere is the lesion?\nA) upper left\nB) upper right\nC) lower left\nD) lower right"]
    centre = dataclasses.replace(cfg, rationale="centre")
    _, rec = render_synthetic_sample(5, centre)
    b = rec["bbox"][0]
    # the localization stream thinks about WHERE (the centre), the sparse stream about WHAT
    assert rec["rationale_localization"] == f"{(b[0] + b[2]) / 2:.2f}, {(b[1] + b[3]) / 2:.2f}"
    assert rec["rationale"] == parse_options(rec["question"])[rec["answer"]]
    assert "rationale_localization" not in render_synthetic_sample(5, cfg)[1]
    shuffled = SyntheticScanConfig(image_size=112)
    assert len({render_synthetic_sample(i, shuffled)[1]["question"] for i in range(40)}) > 4


def test_lesion_scale_grows_the_boxes():
    small, big = SyntheticScanConfig(image_size=112), SyntheticScanConfig(image_size=112, lesion_scale=1.3)
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    a = [area(render_synthetic_sample(i, small)[1]["bbox"][0]) for i in range(30)]
    b = [area(render_synthetic_sample(i, big)[1]["bbox"][0]) for i in range(30)]
    assert sum(b) / sum(a) > 1.4 and all(y >= x for x, y in zip(a, b))


@pytest.mark.parametrize("key, value", [("position_cue", True), ("option_order", "random"),
                                        ("question_style", "long"), ("rationale", "none"), ("lesion_scale", 3.0)])
def test_demo_option_validation(key, value):
    with pytest.raises(ValueError, match=key):
        SyntheticScanConfig(**{key: value})


def test_demo_scans_config_loads():
    cfg = SyntheticScanConfig.load("data/demo_scans")
    assert cfg.position_cue == "lesion" and cfg.option_order == "fixed" and cfg.splits["val"] >= 64
