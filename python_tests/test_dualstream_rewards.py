"""Rewards: each term on hand-made cases, the composites with cross-feedback, verl's
compute_score, and the config they read their weights from."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from tsparse.dualstream.config import RewardWeights, load_method_config
from tsparse.dualstream.format import format_localization_response, format_sparse_response
from tsparse.dualstream.rewards import (
    GroundTruth,
    accuracy_reward,
    best_match_iou,
    box_iou,
    compute_score,
    cross_feedback_accuracy,
    disjoint_cells,
    format_reward,
    iou_reward,
    localization_reward,
    normalize_text,
    parse_choice,
    score_dual_stream,
    sparse_reward,
    sparsity_reward,
    union_area,
    union_iou,
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


def test_best_match_iou_per_ground_truth_box_averaged():
    gt = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]
    # pred 0 matches gt 0 exactly; pred 1 is half of gt 1 (IoU 0.5); an extra far box changes nothing.
    preds = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.7], [0.95, 0.0, 1.0, 0.05]]
    assert best_match_iou(preds, gt) == pytest.approx((1.0 + 0.5) / 2)
    assert best_match_iou(preds[:1], gt) == pytest.approx(0.5)  # gt 1 gets 0
    assert best_match_iou([], gt) == 0.0 and best_match_iou(preds, []) == 0.0


def test_union_iou_hand_computed():
    # One box each: the plain IoU.
    assert union_iou([[0, 0, 0.5, 0.5]], [[0.25, 0.25, 0.75, 0.75]]) == pytest.approx(0.0625 / 0.4375)
    # Two disjoint predicted halves of the ground truth: together they are all of it.
    assert union_iou([[0, 0, 0.5, 1], [0.5, 0, 1, 1]], [[0, 0, 1, 1]]) == pytest.approx(1.0)
    # Two quarters of the unit square against it: 0.5; overlapping predictions count once:
    # [0,.5]^2 and [.25,.75]^2 cover .25 + .25 - .0625 = .4375.
    assert union_iou([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], [[0, 0, 1, 1]]) == pytest.approx(0.5)
    assert union_iou([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]], [[0, 0, 0.5, 0.5]]) == pytest.approx(0.25 / 0.4375)
    # Two ground-truth boxes [0,.2]^2 and [.5,.9]^2 (areas .04 + .16): one exact prediction of
    # the first scores .04 / .20; adding a far box (area .0025) only grows the union.
    gt = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]
    assert union_iou([[0.0, 0.0, 0.2, 0.2]], gt) == pytest.approx(0.04 / 0.20)
    assert union_iou([[0.0, 0.0, 0.2, 0.2], [0.95, 0.0, 1.0, 0.05]], gt) == pytest.approx(0.04 / 0.2025)
    assert union_iou(gt[::-1], gt) == pytest.approx(1.0)
    # A duplicated box is the same set.
    assert union_iou([[0.1, 0.1, 0.3, 0.3]] * 4, [[0.1, 0.1, 0.3, 0.4]]) == pytest.approx(0.04 / 0.06)
    # Unusable boxes are ignored; nothing usable gives 0.
    assert union_iou([[0.3, 0.3, 0.3, 0.5], [0, 0, 1, 1]], [[0, 0, 0.5, 1]]) == pytest.approx(0.5)
    assert union_iou([[0.3, 0.3, 0.3, 0.5]], gt) == 0.0 and union_iou([], gt) == 0.0
    assert union_iou([[0, 0, 1, 1]], []) == 0.0
    assert union_iou([[float("nan"), 0, 1, 1]], [[0, 0, 1, 1]]) == 0.0
    with pytest.raises(ValueError, match=r"pred_boxes\[0\]"):
        union_iou([[0, 0, 1]], gt)
    assert iou_reward([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], [[0, 0, 1, 1]]) == pytest.approx(0.5)


def test_union_area_and_disjoint_cells_hand_computed():
    assert union_area([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]) == pytest.approx(0.4375)
    assert union_area([[0.1, 0.1, 0.3, 0.3]] * 3) == pytest.approx(0.04)
    assert union_area([[-0.5, 0.0, 0.5, 1.0]]) == pytest.approx(0.5)  # clipped to the image
    assert union_area([[-0.5, 0.0, 0.5, 1.0]], clip=False) == pytest.approx(1.0)
    assert union_area([]) == 0.0 and union_area([[0.2, 0.2, 0.1, 0.3]]) == 0.0
    cells = disjoint_cells([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]])
    assert sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in cells) == pytest.approx(0.4375)
    for a, b in itertools.combinations(cells, 2):
        assert box_iou(a, b) == 0.0
    assert disjoint_cells([]) == []


def test_union_iou_matches_a_pixel_count():
    rng = random.Random(2)

    def rand_box():
        x, y = sorted(rng.sample(range(21), 2)), sorted(rng.sample(range(21), 2))
        return (x[0], y[0], x[1], y[1])

    for _ in range(40):
        ps = [rand_box() for _ in range(rng.randint(1, 4))]
        gs = [rand_box() for _ in range(rng.randint(1, 3))]
        cover = lambda bs: {(x, y) for b in bs for x in range(b[0], b[2]) for y in range(b[1], b[3])}  # noqa: E731
        pp, pg = cover(ps), cover(gs)
        expect = len(pp & pg) / len(pp | pg)
        got = union_iou([[v / 20 for v in b] for b in ps], [[v / 20 for v in b] for b in gs])
        assert got == pytest.approx(expect, abs=1e-12)
        assert union_area([[v / 20 for v in b] for b in ps]) == pytest.approx(len(pp) / 400, abs=1e-12)
        cells = disjoint_cells([[v / 20 for v in b] for b in gs])
        assert sum((c[2] - c[0]) * (c[3] - c[1]) for c in cells) == pytest.approx(len(pg) / 400, abs=1e-12)


def _synthetic_gt_boxes(n=200):
    from tsparse.dualstream.data import SyntheticScanConfig, render_synthetic_sample

    cfg = SyntheticScanConfig(image_size=112)  # boxes are normalized: the same lesions as at 224 px
    return [render_synthetic_sample(i, cfg, "val")[1]["bbox"] for i in range(n)]


def _mean_iou(fn, pred, gts):
    return sum(fn(pred, g) for g in gts) / len(gts)


def test_a_correct_single_box_beats_every_fixed_multi_box_strategy():
    """The IoU reward cannot be gamed by boxes that ignore the image: on synthetic scans, every
    fixed strategy we enumerate - the best single box on a 0.05 grid, every set of k = 1..4
    cells of n x n grids (n = 1..4; n = 1 is the whole image), k = 1..4 boxes centred in the
    quadrants at several sizes, random sets of 2-4 boxes - scores far below a correct box that
    is off by a third of its size; adding boxes to a correct box only lowers its reward. The
    earlier best-match IoU rewarded spreading 4 fixed boxes (checked as well)."""
    from tsparse.train.evaluate import fixed_box_search

    gts = _synthetic_gt_boxes()
    best_single, _ = fixed_box_search(gts, step=0.05)
    fixed = {}
    g = np.array([b[0] for b in gts])
    g_area = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    for n in (1, 2, 3, 4):  # grid cells are disjoint: inter(set, G) = sum of inter(cell, G)
        c = np.array([(i / n, j / n, (i + 1) / n, (j + 1) / n) for i in range(n) for j in range(n)])
        iw = np.clip(np.minimum(c[:, None, 2], g[None, :, 2]) - np.maximum(c[:, None, 0], g[None, :, 0]), 0, None)
        ih = np.clip(np.minimum(c[:, None, 3], g[None, :, 3]) - np.maximum(c[:, None, 1], g[None, :, 1]), 0, None)
        inter = iw * ih
        for k in range(1, min(4, n * n) + 1):
            for sub in itertools.combinations(range(n * n), k):
                i = inter[list(sub)].sum(0)
                fixed[f"grid {n}x{n} cells {sub}"] = float((i / (k / n / n + g_area - i)).mean())
    # Spot-check the vectorized grid scores against the reward itself.
    cells4 = [(i / 4, j / 4, (i + 1) / 4, (j + 1) / 4) for i in range(4) for j in range(4)]
    assert fixed["grid 4x4 cells (0, 5, 10)"] == pytest.approx(
        _mean_iou(iou_reward, [cells4[0], cells4[5], cells4[10]], gts), abs=1e-9)
    quads = {}
    for side in (0.1, 0.2, 0.3, 0.4):
        boxes = [(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2) for cx in (0.3, 0.7) for cy in (0.3, 0.7)]
        quads[side] = boxes
        for k in range(1, 5):
            fixed[f"quadrant boxes {side} x{k}"] = _mean_iou(iou_reward, boxes[:k], gts)
    rng = random.Random(0)
    grid = [i / 10 for i in range(11)]
    for t in range(150):
        boxes = []
        for _ in range(rng.randint(2, 4)):
            x, y = sorted(rng.sample(grid, 2)), sorted(rng.sample(grid, 2))
            boxes.append((x[0], y[0], x[1], y[1]))
        fixed[f"random set {t}"] = _mean_iou(iou_reward, boxes, gts[:80])

    best_fixed = max(fixed.values())
    assert best_single < 0.15 and best_fixed <= best_single + 1e-9, sorted(fixed.items(), key=lambda kv: -kv[1])[:3]

    # A correct box off by a quarter of its width and height (IoU 0.5625 / 1.4375 = 0.39).
    def shifted(b):
        w, h = b[2] - b[0], b[3] - b[1]
        return (b[0] + w / 4, b[1] + h / 4, b[2] + w / 4, b[3] + h / 4)

    correct = sum(iou_reward([shifted(b[0])], b) for b in gts) / len(gts)
    assert correct > 0.3 > 2 * best_fixed
    # Spam never helps a correct box: each sample's reward drops when fixed boxes are added.
    for b in gts[:50]:
        alone = iou_reward([shifted(b[0])], b)
        assert iou_reward([shifted(b[0])] + quads[0.2][:3], b) < alone
    # The earlier best-match IoU: 4 fixed quadrant boxes beat the best single fixed box 2x.
    assert _mean_iou(best_match_iou, quads[0.2], gts) > 2 * best_single


def test_sparsity_reward():
    assert sparsity_reward([[0, 0, 0.5, 0.5]], 1.0) == pytest.approx(0.75)
    assert sparsity_reward([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]], 0.5) == pytest.approx(0.5 * (1 - 0.4375))
    assert sparsity_reward([[0, 0, 0.5, 0.5]], 0.0) == 0.0  # wrong answer: smaller boxes earn nothing
    assert sparsity_reward([], 1.0) == 0.0 and sparsity_reward([[0.3, 0.3, 0.3, 0.5]], 1.0) == 0.0
    assert sparsity_reward([[0, 0, 1, 1]], 1.0) == 0.0
    with pytest.raises(ValueError, match="answer_accuracy"):
        sparsity_reward([[0, 0, 1, 1]], 1.5)


def test_cross_feedback_accuracy_validation():
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
    # Sparsity: 1 - area of the boxes, gated by the answer from the kept tokens (the sparse
    # rollouts' mean accuracy when given, else the response's own accuracy).
    r = localization_reward(loc("A"), gt, weights=W)
    assert r.sparsity == pytest.approx(1 - 0.04)
    r = localization_reward(loc("A"), gt, cross_accuracy=[1.0, 0.0], weights=W)
    assert r.sparsity == pytest.approx(0.5 * (1 - 0.04))
    sw = {"localization": {"iou": 1.0, "sparsity": 2.0}}
    assert localization_reward(loc("A"), gt, weights=sw).score == pytest.approx(1.0 + 2 * 0.96)
    assert localization_reward(loc("B"), gt, weights=sw).score == pytest.approx(1.0)
    assert sparse_reward(format_sparse_response("r", "A"), gt, weights=W).sparsity is None
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
    assert set(out) == {"score", "format", "iou", "accuracy", "cross_accuracy", "sparsity"}
    assert out["score"] == pytest.approx(2.5) and all(isinstance(v, float) for v in out.values())
    out = compute_score("x", format_sparse_response("r", "B"), "A", {"stream": "sparse", "cross_accuracy": 1.0},
                        weights=W.__dict__)
    assert out["accuracy"] == 0.0 and out["score"] == pytest.approx(0.5 + 0.5)
    # Defaults come from configs/dualstream.yaml.
    cfg = load_method_config()
    default = compute_score("x", loc("A"), gt)
    w = cfg.rewards.localization
    assert default["sparsity"] == pytest.approx(1 - 0.04)
    assert default["score"] == pytest.approx(w["format"] + w["iou"] + w["accuracy"] + w["sparsity"] * 0.96)
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
    assert RewardWeights(localization={"sparsity": 0.25}).localization["sparsity"] == 0.25
    with pytest.raises(ValueError, match=r"rewards.sparse.*unknown"):
        RewardWeights(sparse={"sparsity": 1.0})  # the sparse stream's keep ratio is its parent's
