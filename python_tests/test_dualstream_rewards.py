"""Rewards: each term on hand-made cases, the composites with cross-feedback, verl's
compute_score, and the config they read their weights from."""

from __future__ import annotations

import json
import random

import pytest

from tsparse.dualstream.config import RewardWeights, load_method_config
from tsparse.dualstream.format import format_localization_response, format_sparse_response
from tsparse.dualstream.rewards import (
    GroundTruth,
    accuracy_reward,
    box_iou,
    compute_score,
    cross_feedback_accuracy,
    format_reward,
    iou_reward,
    localization_reward,
    normalize_text,
    parse_choice,
    score_dual_stream,
    sparse_reward,
)

W = RewardWeights(
    localization={"format": 0.5, "iou": 1.0, "accuracy": 1.0, "cross_accuracy": 0.5},
    sparse={"format": 0.5, "accuracy": 1.0, "cross_accuracy": 0.5},
)
OPTS = {"A": "upper left", "B": "upper right", "C": "lower left", "D": "lower right"}


def loc(answer="A", boxes=((0.1, 0.1, 0.3, 0.3),)):
    return format_localization_response("reasoning", [list(b) for b in boxes], answer)


# --------------------------------------------------------------------------------------
def test_format_reward():
    assert format_reward(loc(), "localization") == 1.0
    assert format_reward(loc(), "sparse") == 0.0
    assert format_reward(format_sparse_response("r", "A"), "sparse") == 1.0
    assert format_reward("<answer>A</answer>", "sparse") == 0.0


def test_box_iou_known_values():
    assert box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert box_iou([0, 0, 0.5, 1], [0.5, 0, 1, 1]) == 0.0  # touching edges
    assert box_iou([0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]) == pytest.approx(0.0625 / 0.4375)
    assert box_iou([0, 0, 0.2, 0.2], [0, 0, 0.4, 0.4]) == pytest.approx(0.25)
    assert box_iou([0.5, 0.5, 0.2, 0.9], [0, 0, 1, 1]) == 0.0  # inverted
    assert box_iou([float("nan"), 0, 1, 1], [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="4 coordinates"):
        box_iou([0, 0, 1], [0, 0, 1, 1])


def test_box_iou_matches_a_pixel_count():
    rng = random.Random(1)
    for _ in range(30):
        a = sorted(rng.sample(range(21), 2)), sorted(rng.sample(range(21), 2))
        b = sorted(rng.sample(range(21), 2)), sorted(rng.sample(range(21), 2))
        pa = {(x, y) for x in range(*a[0]) for y in range(*a[1])}
        pb = {(x, y) for x in range(*b[0]) for y in range(*b[1])}
        expect = len(pa & pb) / len(pa | pb)
        got = box_iou([a[0][0] / 20, a[1][0] / 20, a[0][1] / 20, a[1][1] / 20],
                      [b[0][0] / 20, b[1][0] / 20, b[0][1] / 20, b[1][1] / 20])
        assert got == pytest.approx(expect, abs=1e-12)


def test_iou_reward_best_match_per_ground_truth_box_averaged():
    gt = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]
    # pred 0 matches gt 0 exactly; pred 1 is half of gt 1 (IoU 0.5); an extra far box changes nothing.
    preds = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.7], [0.95, 0.0, 1.0, 0.05]]
    assert iou_reward(preds, gt) == pytest.approx((1.0 + 0.5) / 2)
    assert iou_reward(preds[:1], gt) == pytest.approx(0.5)  # gt 1 gets 0
    assert iou_reward([], gt) == 0.0
    assert iou_reward([[0.3, 0.3, 0.3, 0.5]], gt) == 0.0  # no valid box
    assert iou_reward(preds, []) == 0.0


def test_normalize_text():
    assert normalize_text("  The Left  Lung. ") == "left lung"
    assert normalize_text("Yes!") == "yes"
    with pytest.raises(TypeError):
        normalize_text(3)


@pytest.mark.parametrize(
    "answer, expect",
    [
        ("C", "C"), ("c", "C"), ("(C)", "C"), ("C)", "C"), ("C.", "C"), ("[c]", "C"),
        ("C) lower left", "C"), ("C. lower left", "C"), ("c: lower left", "C"), ("(C) something", "C"),
        ("Answer: C", "C"), ("The answer is C", "C"), ("**C**", "C"), ("Option B", "B"),
        ("lower left", "C"), ("Lower-Left.", "C"), ("C lower left", "C"),
        ("Cardiomegaly", None), ("a lesion", None), ("C upper right", None), ("", None),
        ("upper", None), ("K", None),
    ],
)
def test_parse_choice(answer, expect):
    assert parse_choice(answer, OPTS) == expect


def test_parse_choice_without_options_needs_the_letter():
    assert parse_choice("lower left") is None
    assert parse_choice("d") == "D"


def test_accuracy_reward_multiple_choice_and_short_answer():
    assert accuracy_reward("<think>t</think><answer>c</answer>", "C", OPTS) == 1.0
    assert accuracy_reward("<answer>lower left</answer>", "C", OPTS) == 1.0
    assert accuracy_reward("<answer>B</answer>", "C", OPTS) == 0.0
    assert accuracy_reward("C", "C", OPTS) == 0.0  # no <answer> block
    assert accuracy_reward("<answer>Cardiomegaly</answer>", "C") == 0.0
    assert accuracy_reward("<answer> Yes. </answer>", "yes") == 1.0
    assert accuracy_reward("<answer>the right lung</answer>", "Right lung") == 1.0
    assert accuracy_reward("<answer>no</answer>", "yes") == 0.0
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward("<answer>A</answer>", " ")


def test_cross_feedback_accuracy():
    assert cross_feedback_accuracy(1.0) == 1.0
    assert cross_feedback_accuracy([1.0, 0.0, 0.0, 1.0]) == 0.5
    with pytest.raises(ValueError, match="empty"):
        cross_feedback_accuracy([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cross_feedback_accuracy([2.0])


# --------------------------------------------------------------------------------------
def test_localization_and_sparse_composites():
    gt = GroundTruth("A", ((0.1, 0.1, 0.3, 0.3),), OPTS)
    r = localization_reward(loc("A"), gt, weights=W)
    assert (r.format, r.iou, r.accuracy, r.cross_accuracy) == (1.0, pytest.approx(1.0), 1.0, None)
    assert r.score == pytest.approx(0.5 + 1.0 + 1.0)
    assert r.boxes == ((0.1, 0.1, 0.3, 0.3),) and r.box_reason is None
    r = localization_reward(loc("B", [(0.1, 0.1, 0.3, 0.2)]), gt, cross_accuracy=[1.0, 0.0], weights=W)
    assert r.iou == pytest.approx(0.5) and r.accuracy == 0.0 and r.cross_accuracy == 0.5
    assert r.score == pytest.approx(0.5 + 0.5 + 0.0 + 0.25)
    bad = localization_reward("<answer>A</answer>", gt, weights=W)
    assert bad.format == 0.0 and bad.iou == 0.0 and bad.accuracy == 1.0 and "no <box>" in bad.box_reason
    s = sparse_reward(format_sparse_response("r", "A"), gt, cross_accuracy=0.0, weights=W)
    assert (s.format, s.accuracy, s.iou, s.cross_accuracy) == (1.0, 1.0, None, 0.0)
    assert s.score == pytest.approx(1.5)
    custom = {"localization": {"iou": 3.0}, "sparse": {"accuracy": 2.0}}
    assert localization_reward(loc("A"), gt, weights=custom).score == pytest.approx(3.0)
    assert sparse_reward(format_sparse_response("r", "A"), gt, weights=custom).score == pytest.approx(2.0)


def test_score_dual_stream_cross_feedback_wiring():
    gts = [{"answer": "A", "bbox": [[0.1, 0.1, 0.3, 0.3]]}, {"answer": "B", "bbox": [[0.5, 0.5, 0.9, 0.9]]}]
    sp = lambda a: format_sparse_response("r", a)  # noqa: E731
    loc_texts = [[loc("A"), loc("C")], [loc("B", [(0.5, 0.5, 0.9, 0.9)]), "garbage"]]
    sparse_texts = [
        [[sp("A"), sp("A"), sp("D")], [sp("C"), sp("A"), sp("A")]],
        [[sp("B"), "junk", sp("B")], [sp("A"), sp("A"), sp("A")]],
    ]
    out = score_dual_stream(loc_texts, gts, sparse_texts, weights=W)
    # Localization O_i: cross = mean accuracy of its sparse children.
    assert [r.cross_accuracy for r in out.localization[0]] == pytest.approx([2 / 3, 2 / 3])
    assert [r.cross_accuracy for r in out.localization[1]] == pytest.approx([2 / 3, 0.0])
    # Sparse O'_{i,j}: cross = accuracy of the parent O_i.
    assert [r.cross_accuracy for r in out.sparse[0][0]] == [1.0, 1.0, 1.0]
    assert [r.cross_accuracy for r in out.sparse[0][1]] == [0.0, 0.0, 0.0]
    assert [r.cross_accuracy for r in out.sparse[1][1]] == [0.0, 0.0, 0.0]
    assert out.sparse[1][0][1].format == 0.0 and out.sparse[1][0][1].accuracy == 0.0
    # Scores recompute from the terms.
    r = out.localization[0][1]
    assert r.score == pytest.approx(0.5 * r.format + r.iou + r.accuracy + 0.5 * r.cross_accuracy)
    assert out.localization_scores()[1][1] == pytest.approx(0.5 * (2 / 3) * 0 + 0.0)
    assert len(out.sparse_scores()[0][1]) == 3
    means = out.mean_terms("sparse")
    assert means["accuracy"] == pytest.approx(sum(r.accuracy for row in out.sparse for k in row for r in k) / 12)
    # Stage 1: no sparse stream, no cross term.
    only = score_dual_stream(loc_texts, gts, weights=W)
    assert only.sparse == [] and only.localization[0][0].cross_accuracy is None
    assert only.localization[0][0].score == pytest.approx(2.5)


def test_score_dual_stream_shape_errors():
    with pytest.raises(ValueError, match="ground_truths"):
        score_dual_stream([["x"]], ["A", "B"], weights=W)
    with pytest.raises(ValueError, match=r"sparse_texts\[0\]"):
        score_dual_stream([["x", "y"]], ["A"], [[["a"]]], weights=W)
    with pytest.raises(ValueError, match=r"sparse_texts\[0\]\[1\]"):
        score_dual_stream([["x", "y"]], ["A"], [[["a", "b"], ["c"]]], weights=W)


def test_ground_truth_coercion():
    g = GroundTruth.coerce(json.dumps({"answer": "B", "bbox": [0.1, 0.2, 0.3, 0.4], "options": ["x", "y"]}))
    assert g.answer == "B" and g.boxes == ((0.1, 0.2, 0.3, 0.4),) and g.options == {"A": "x", "B": "y"}
    g = GroundTruth.coerce("C", {"bbox": [[0, 0, 1, 1]]})
    assert g.boxes == ((0.0, 0.0, 1.0, 1.0),)
    with pytest.raises(ValueError, match="answer"):
        GroundTruth.coerce({"bbox": []})
    with pytest.raises(ValueError, match="JSON"):
        GroundTruth.coerce("{broken")
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        GroundTruth("A", ((0.1, 0.2),))


def test_compute_score_verl_signature():
    gt = {"answer": "A", "bbox": [[0.1, 0.1, 0.3, 0.3]]}
    out = compute_score("synthetic_scans", loc("A"), gt, {"stream": "localization"}, weights=W.__dict__)
    assert set(out) == {"score", "format", "iou", "accuracy", "cross_accuracy"}
    assert out["score"] == pytest.approx(2.5) and all(isinstance(v, float) for v in out.values())
    out = compute_score("x", format_sparse_response("r", "B"), "A", {"stream": "sparse", "cross_accuracy": 1.0},
                        weights=W.__dict__)
    assert out["accuracy"] == 0.0 and out["score"] == pytest.approx(0.5 + 0.5)
    # Defaults come from configs/dualstream.yaml.
    cfg = load_method_config()
    default = compute_score("x", loc("A"), gt)
    w = cfg.rewards.localization
    assert default["score"] == pytest.approx(w["format"] + w["iou"] + w["accuracy"])
    with pytest.raises(ValueError, match="stream"):
        compute_score("x", "", "A", {"stream": "both"})


def test_compute_score_loads_by_path_like_verl():
    # verl's load_module: spec_from_file_location + exec_module, NOT registered in sys.modules.
    import importlib.util

    import tsparse.dualstream.reward_fn as mod

    spec = importlib.util.spec_from_file_location("custom_module_123", mod.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.compute_score("d", loc("A"), "A", None, weights=W.__dict__)["accuracy"] == 1.0


def test_reward_weights_validation():
    with pytest.raises(ValueError, match=r"rewards.localization.*unknown"):
        RewardWeights(localization={"precision": 1.0})
    with pytest.raises(ValueError, match="rewards.sparse.format"):
        RewardWeights(sparse={"format": -1.0})
    assert RewardWeights(sparse={"accuracy": 2}).sparse == {"format": 0.0, "accuracy": 2.0, "cross_accuracy": 0.0}
