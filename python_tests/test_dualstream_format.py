"""Output formats of the two streams: strict checker, tolerant parser, answer extraction."""

from __future__ import annotations

import random

import pytest

from tsparse.dualstream.format import (
    check_format,
    check_localization_format,
    check_sparse_format,
    extract_answer,
    extract_think,
    format_boxes,
    format_localization_response,
    format_sparse_response,
    parse_boxes,
)

GOOD_LOC = "<think>A bright round lesion sits upper left.</think><box>[[0.1, 0.2, 0.4, 0.5]]</box><answer>A</answer>"


# --------------------------------------------------------------------------------------
# Strict checker
@pytest.mark.parametrize(
    "text",
    [
        GOOD_LOC,
        "  <think>x</think>\n<box>[[0,0,1,1],[0.5,0.5,0.75,0.9]]</box>\n<answer>C) round</answer>\n",
        "<think>multi\nline</think><box>[[0.1,0.1,0.2,0.2],[0.2,0.2,0.3,0.3],[0.3,0.3,0.4,0.4],[0.5,0.5,0.6,0.6]]</box><answer>B</answer>",
    ],
)
def test_strict_localization_accepts(text):
    res = check_localization_format(text)
    assert res.ok and res.reason is None and bool(res)


@pytest.mark.parametrize(
    "text, why",
    [
        ("<think>x</think><answer>A</answer>", "not <think>"),
        ("<think> </think><box>[[0.1,0.2,0.4,0.5]]</box><answer>A</answer>", "empty <think>"),
        ("<think>x</think><box>[[0.1,0.2,0.4,0.5]]</box><answer> </answer>", "empty <answer>"),
        ("<think>x</think><box>[]</box><answer>A</answer>", "non-empty list"),
        ("<think>x</think><box>[[0.1,0.2,0.4]]</box><answer>A</answer>", "4 numbers"),
        ("<think>x</think><box>[[0.1,0.2,0.4,1.5]]</box><answer>A</answer>", "outside [0, 1]"),
        ("<think>x</think><box>[[0.4,0.2,0.1,0.5]]</box><answer>A</answer>", "inverted"),
        ("<think>x</think><box>[[10, 20, 40, 50]]</box><answer>A</answer>", "outside [0, 1]"),
        ("<think>x</think><box>[[0.1,0.2,0.4,0.5],]</box><answer>A</answer>", "not valid JSON"),
        ("<think>x</think><box>[[\"0.1\",0.2,0.4,0.5]]</box><answer>A</answer>", "non-numeric"),
        ("<think>x</think><box>[[0.1,0.2,0.4,0.5]]</box><answer>A</answer> trailing", "not <think>"),
        ("preamble <think>x</think><box>[[0.1,0.2,0.4,0.5]]</box><answer>A</answer>", "not <think>"),
        ("<think>x</think><box>[[0.1,0.2,0.4,0.5]]</box><answer>A</answer><answer>B</answer>", "tag inside the <answer>"),
        ("<think>x<think>y</think><box>[[0.1,0.2,0.4,0.5]]</box><answer>A</answer>", "tag inside the <think>"),
        ("<THINK>x</THINK><box>[[0.1,0.2,0.4,0.5]]</box><answer>A</answer>", "not <think>"),
        ("<think>x</think><box>" + str([[0.1, 0.1, 0.2, 0.2]] * 5) + "</box><answer>A</answer>", "5 boxes"),
    ],
)
def test_strict_localization_rejects_with_reason(text, why):
    res = check_localization_format(text)
    assert not res.ok and not bool(res)
    assert why in res.reason


def test_strict_max_boxes_is_configurable():
    text = "<think>x</think><box>[[0.1,0.1,0.2,0.2],[0.3,0.3,0.4,0.4]]</box><answer>A</answer>"
    assert check_localization_format(text, max_boxes=2).ok
    assert not check_localization_format(text, max_boxes=1).ok
    with pytest.raises(ValueError, match="max_boxes"):
        check_localization_format(text, max_boxes=0)


def test_strict_sparse():
    assert check_sparse_format("<think>looks bright</think> <answer>B</answer>").ok
    assert not check_sparse_format(GOOD_LOC).ok  # a box block is not allowed in the sparse stream
    assert "empty <think>" in check_sparse_format("<think></think><answer>B</answer>").reason
    assert not check_sparse_format("<answer>B</answer>").ok
    assert check_format("<think>a</think><answer>B</answer>", "sparse").ok
    assert check_format(GOOD_LOC, "localization").ok
    with pytest.raises(ValueError, match="stream"):
        check_format(GOOD_LOC, "dense")
    with pytest.raises(TypeError, match="text"):
        check_sparse_format(None)


# --------------------------------------------------------------------------------------
# Tolerant parser
def test_parse_boxes_from_the_box_tag():
    res = parse_boxes(GOOD_LOC)
    assert res.boxes == ((0.1, 0.2, 0.4, 0.5),) and res.reason is None and res.source == "box_tag"


def test_parse_boxes_repairs_and_drops():
    text = "<think>x</think><Box>[[0.4, 0.5, 0.1, 0.2], (1.02, 0.1, 0.6, 0.3), [0.1,0.1,0.1,0.3], [30, 40, 90, 120]]</box>"
    res = parse_boxes(text)
    assert res.boxes == ((0.1, 0.2, 0.4, 0.5), (0.6, 0.1, 1.0, 0.3))  # swapped corners; clipped 1.02
    whys = [w for _, w in res.dropped]
    assert any("zero area" in w for w in whys) and any("outside [0, 1]" in w for w in whys)


def test_parse_boxes_unclosed_tag_and_max_boxes():
    res = parse_boxes("<think>t</think><box>[[0.1,0.1,0.3,0.3],[0.5,0.5,0.9,0.9]] <answer>A</answer>", max_boxes=1)
    assert res.boxes == ((0.1, 0.1, 0.3, 0.3),)
    assert res.dropped and "max_boxes" in res.dropped[0][1]


def test_parse_boxes_uses_the_last_box_tag():
    text = "<think>first guess <box>[[0,0,0.2,0.2]]</box></think><box>[[0.5,0.5,0.7,0.8]]</box>"
    assert parse_boxes(text).boxes == ((0.5, 0.5, 0.7, 0.8),)


def test_parse_boxes_without_tag_reads_after_the_reasoning():
    text = "<think>maybe [0.0, 0.0, 0.1, 0.1]</think> The region is [[0.2, 0.3, 0.6, 0.7]]. <answer>B</answer>"
    res = parse_boxes(text)
    assert res.boxes == ((0.2, 0.3, 0.6, 0.7),) and res.source == "text"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<think>nothing here</think><answer>A</answer>", "no <box> tag"),
        ("<think>t</think><box>  </box><answer>A</answer>", "empty <box> tag"),
        ("<think>t</think><box>upper left</box><answer>A</answer>", "no [x1, y1, x2, y2] box"),
        ("<think>t</think><box>[[120, 30, 300, 200]]</box>", "no usable box: coordinate outside [0, 1]"),
        ("<think>t</think><box>[[0.3, 0.3, 0.3, 0.6]]</box>", "no usable box: zero area"),
        ("<think>t</think><box>[[nan, 0.3, 0.5, 0.6]]</box>", "no [x1, y1, x2, y2] box"),
        ("", "no <box> tag"),
    ],
)
def test_parse_boxes_says_why_none(text, reason):
    res = parse_boxes(text)
    assert res.boxes == () and not res
    assert reason in res.reason


def test_parse_boxes_bad_arguments():
    with pytest.raises(TypeError, match="text"):
        parse_boxes(b"<box>")
    with pytest.raises(ValueError, match="max_boxes"):
        parse_boxes("", max_boxes=-1)
    with pytest.raises(ValueError, match="tolerance"):
        parse_boxes("", tolerance=float("nan"))


def test_writers_round_trip_through_checker_and_parser():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 4)
        boxes = []
        for _ in range(n):
            x1, x2 = sorted(rng.sample(range(0, 101), 2))
            y1, y2 = sorted(rng.sample(range(0, 101), 2))
            boxes.append([x1 / 100, y1 / 100, x2 / 100, y2 / 100])
        text = format_localization_response("reasoning here", boxes, rng.choice("ABCD"))
        assert check_localization_format(text).ok, text
        parsed = parse_boxes(text)
        assert [v for b in parsed.boxes for v in b] == pytest.approx([v for b in boxes for v in b])
    assert check_sparse_format(format_sparse_response("r", "C")).ok


def test_writers_reject_bad_input():
    with pytest.raises(ValueError, match="boxes"):
        format_boxes([])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        format_boxes([[0.5, 0.5, 0.501, 0.9]])  # collapses at 2 decimals
    with pytest.raises(ValueError, match="reasoning"):
        format_localization_response("<think>", [[0, 0, 1, 1]], "A")
    with pytest.raises(ValueError, match="answer"):
        format_sparse_response("r", "  ")
    assert format_boxes([[0.123, 0.2, 0.5, 0.75]], decimals=3) == "[[0.123, 0.200, 0.500, 0.750]]"


def test_extract_answer_and_think():
    assert extract_answer(GOOD_LOC) == "A"
    assert extract_answer("<answer> B </answer> then <ANSWER>c</Answer>") == "c"  # the last block
    assert extract_answer("<answer>B") is None
    assert extract_think(GOOD_LOC) == "A bright round lesion sits upper left."
    assert extract_think("no tags") is None
