"""ville.metrics on hand-computed fixtures (the expected numbers are worked out in the comments)."""
import itertools
import math

import numpy as np
import pytest
import torch

from ville import metrics as M

# ------------------------------------------------------------------------------------------------------- retrieval


def test_ranks_and_ties():
    scores = torch.tensor([[0.9, 0.1, 0.5],   # positive 0 is the best -> rank 1
                           [0.2, 0.3, 0.3],   # positive 1 ties with negative 2: pessimistic 2, optimistic 1
                           [0.8, 0.7, 0.6]])  # positive 2 is the worst -> rank 3
    pos = torch.eye(3, dtype=torch.bool)
    assert M.retrieval_ranks(scores, pos).tolist() == [1, 2, 3]
    assert M.retrieval_ranks(scores, pos, ties="optimistic").tolist() == [1, 1, 3]
    r = M.recall_metrics([1, 2, 3], ks=(1, 2))
    assert r["R@1"] == pytest.approx(100 / 3) and r["R@2"] == pytest.approx(200 / 3)
    assert r["MdR"] == 2 and r["MnR"] == 2 and r["n"] == 3


def test_constant_scores_give_no_free_hits():
    ranks = M.retrieval_ranks(torch.zeros(4, 4), torch.eye(4, dtype=torch.bool))
    assert ranks.tolist() == [4, 4, 4, 4]
    assert M.recall_metrics(ranks)["R@1"] == 0.0


def test_multi_positive_rank_is_best_positive():
    # V2T with two correct captions (0, 1): the best positive scores 0.6; only caption 2 (0.7) is ahead -> rank 2.
    scores = torch.tensor([[0.1, 0.6, 0.7, 0.2]])
    pos = torch.tensor([[True, True, False, False]])
    assert M.retrieval_ranks(scores, pos).tolist() == [2]
    # A positive tying with another positive does not count against the query.
    assert M.retrieval_ranks(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([[True, True, False]])).tolist() == [1]


def test_rank_input_checks():
    with pytest.raises(ValueError, match="at least one positive"):
        M.retrieval_ranks(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="ties"):
        M.retrieval_ranks(torch.zeros(1, 2), torch.tensor([[True, False]]), ties="random")


def test_v2t_multi_caption_protocols():
    """The issue's case: video A has one caption, video B five, all five scoring higher for A than A's own. Ranked
    among all texts A's caption comes 6th; among CLIP4Clip's per-video maxima (A's max vs B's max) 2nd."""
    owner = [0, 1, 1, 1, 1, 1]
    scores = torch.tensor([[0.1, 0.0],  # text 0, A's caption: 0.1 with A
                           [0.5, 0.9], [0.4, 0.8], [0.3, 0.7], [0.2, 0.6], [0.15, 0.5]])  # B's captions
    pos = torch.nn.functional.one_hot(torch.tensor(owner), 2).bool()
    assert M.retrieval_ranks(scores.T, pos.T).tolist() == [6, 1]
    maxima = M.per_video_max(scores, owner, 2)  # [i, j]: best caption of video j for video i
    torch.testing.assert_close(maxima, torch.tensor([[0.1, 0.5], [0.0, 0.9]], dtype=torch.float64))
    assert M.retrieval_ranks(maxima, torch.eye(2, dtype=torch.bool)).tolist() == [2, 1]
    # A video without captions is -inf in every column it owns.
    assert M.per_video_max(scores, owner, 3)[:, 2].tolist() == [-math.inf] * 2
    # Medians of 1, 2, 6, 7: numpy 4 (mean of the middle two), torch.median / lower_median 2.
    assert M.recall_metrics([7, 1, 6, 2])["MdR"] == 4.0 and M.lower_median([7, 1, 6, 2]) == 2.0
    assert M.lower_median([3, 1, 2]) == 2.0 == float(torch.median(torch.tensor([7, 1, 6, 2])))


def test_chance_recall_exact():
    # G = 4: one positive -> k/G; two positives -> 1 - C(2, k) / C(4, k): k=1: 1/2, k=2: 1 - 1/6.
    assert M.chance_recall(4, [1], ks=(1, 2))["R@1"] == pytest.approx(25.0)
    two = M.chance_recall(4, [2], ks=(1, 2))
    assert two["R@1"] == pytest.approx(50.0) and two["R@2"] == pytest.approx(100 * 5 / 6)
    assert M.chance_recall(4, [1, 2], ks=(1,))["R@1"] == pytest.approx(37.5)
    assert M.chance_recall(3, [1], ks=(10,))["R@10"] == pytest.approx(100.0)  # k beyond the gallery


def test_chance_recall_matches_simulation():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(20000):
        hits += rng.permutation(10)[:3].min() < 2  # positives are items 0, 1; is one in the top 3?
    assert M.chance_recall(10, [2], ks=(3,))["R@3"] == pytest.approx(100 * hits / 20000, abs=1.5)


def test_dual_softmax_formula():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = math.e
    expected = torch.tensor([[e / (e + 1), 0.0], [0.0, e / (e + 1)]], dtype=torch.float64)
    assert torch.allclose(M.dual_softmax(s, 1.0), expected)
    # It can change a ranking: video 0 is everyone's best match, but it prefers query 0, so query 1 moves to video 1.
    s = torch.tensor([[0.9, 0.2], [0.8, 0.7]])
    assert M.retrieval_ranks(s, torch.eye(2, dtype=torch.bool)).tolist() == [1, 2]
    assert M.retrieval_ranks(M.dual_softmax(s, 100.0), torch.eye(2, dtype=torch.bool)).tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------ moment retrieval


def test_temporal_iou():
    iou = M.temporal_iou(np.array([[0, 2], [0, 1], [0, 4], [1, 1]]), np.array([[1, 3], [2, 3], [1, 2], [1, 1]]))
    assert iou[0, 0] == pytest.approx(1 / 3)  # [0,2] vs [1,3]: 1 / 3
    assert iou[1, 1] == 0.0  # disjoint
    assert iou[2, 2] == pytest.approx(0.25)  # [1,2] inside [0,4]
    assert iou[3, 3] == 0.0  # empty union -> 0, not NaN


def test_nms():
    windows = np.array([[0, 4], [0, 3], [2, 6], [5, 8]])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # [5,8] first; [0,4] overlaps nothing kept; [0,3] has IoU 0.75 with [0,4] -> dropped; [2,6] has IoU 1/3 -> kept.
    assert M.temporal_nms(windows, scores, 0.5).tolist() == [3, 0, 2]
    assert M.temporal_nms(windows, scores, 0.5, max_keep=2).tolist() == [3, 0]
    # IoU exactly at the threshold is not suppressed (strict >), and equal scores keep the input order.
    assert M.temporal_nms(np.array([[0, 2], [0, 4]]), np.array([0.5, 0.5]), 0.5).tolist() == [0, 1]
    assert M.temporal_nms(windows, scores, 1.0).tolist() == [3, 0, 1, 2]


def test_zscore_by_length_by_hand():
    """Three 1-s windows scored 1, 2, 3: mean 2, population std sqrt(2/3) -> -1.2247, 0, 1.2247; two 2-s windows with
    equal scores and the single 3-s window -> 0; window order does not matter."""
    windows = np.array([[0, 1], [1, 2], [2, 3], [0, 2], [1, 3], [0, 3]], dtype=float)
    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 9.0])
    z = M.zscore_by_length(windows, scores)
    np.testing.assert_allclose(z, [-1.224744871, 0, 1.224744871, 0, 0, 0], atol=1e-9)
    perm = np.array([5, 2, 0, 4, 1, 3])
    np.testing.assert_allclose(M.zscore_by_length(windows[perm], scores[perm]), z[perm], atol=1e-12)
    # lengths equal to 1e-6 are one group (windows flush with the end are computed, not typed)
    w2 = np.array([[0.0, 0.1], [0.1, 0.2000000001], [0.5, 1.0]])
    np.testing.assert_allclose(M.zscore_by_length(w2, np.array([0.0, 2.0, 7.0])), [-1, 1, 0], atol=1e-9)


def test_r1_and_miou_multi_window():
    top1 = np.array([[0, 2], [0, 4], [5, 6], [0, 1]])
    gts = [np.array([[1, 3]]),               # IoU 1/3
           np.array([[0, 2], [0, 3.5]]),     # best of 0.5 and 0.875 -> 0.875
           np.array([[0, 1]]),               # 0
           np.array([[0, 2]])]               # exactly 0.5: counts at R1@0.5 (>=)
    r = M.moment_r1(top1, gts)
    assert r["R1@0.3"] == pytest.approx(75.0)
    assert r["R1@0.5"] == pytest.approx(50.0)
    assert r["R1@0.7"] == pytest.approx(25.0)
    assert r["mIoU"] == pytest.approx(100 * (1 / 3 + 0.875 + 0 + 0.5) / 4)


# Query A: one GT [0,10]. p1 [0,5] (IoU .5), p2 [0,10] (IoU 1), p3 [20,30].
#   t=.5: p1 TP, p2 hits the already-matched GT -> FP, p3 FP: precision 1 at recall 1 -> AP 1.
#   t>.5: p1 FP, p2 TP, p3 FP: interpolated precision at recall 1 is 1/2 -> AP .5.   mean over t = .55
QA_PRED = np.array([[0, 5, 0.9], [0, 10, 0.8], [20, 30, 0.7]])
QA_GT = np.array([[0, 10]])
# Query B: GTs [0,2], [4,6]. p1 [4,6] .9 (IoU 1 with g2), p2 [0,2.5] .8 (IoU .8 with g1), p3 [0,2] .8 (IoU 1 with g1;
# same score as p2, listed later, so ranked after it).
#   t<=.8: TP TP FP -> recall .5 then 1 at precision 1 -> AP 1.
#   t>=.85: TP FP TP -> .5 * 1 + .5 * 2/3 = 5/6.   mean over t = (7 * 1 + 3 * 5/6) / 10 = .95
QB_PRED = np.array([[4, 6, 0.9], [0, 2.5, 0.8], [0, 2, 0.8]])
QB_GT = np.array([[0, 2], [4, 6]])
# Query C: GTs [0,4], [2,6]; p1 [2,4] has IoU .5 with both (a GT tie: the later-listed GT is matched first, as in
# ActivityNet's argsort()[::-1]); p2 [4,6] then only overlaps that same GT -> FP.
#   t=.5: TP FP -> AP .5; t>.5: nothing -> 0.   mean over t = .05
QC_PRED = np.array([[2, 4, 0.9], [4, 6, 0.5]])
QC_GT = np.array([[0, 4], [2, 6]])


def test_average_precision_per_query():
    t = M.IOU_THRESHOLDS_MAP
    assert t[0] == 0.5 and t[5] == 0.75 and t[-1] == 0.95 and len(t) == 10
    np.testing.assert_allclose(M.query_average_precision(QA_PRED, QA_GT), [1.0] + [0.5] * 9)
    np.testing.assert_allclose(M.query_average_precision(QB_PRED, QB_GT), [1.0] * 7 + [5 / 6] * 3)
    np.testing.assert_allclose(M.query_average_precision(QC_PRED, QC_GT), [0.5] + [0.0] * 9)
    # Swapping the tied predictions of B changes the numbers: the given order decides ties.
    np.testing.assert_allclose(M.query_average_precision(QB_PRED[[0, 2, 1]], QB_GT), [1.0] * 10)


def test_average_precision_top10_and_empty():
    # The only hit is the 11th prediction: beyond max_pred_windows, so AP 0; with no cut it counts.
    preds = np.array([[20 + i, 21 + i, 1.0 - i / 100] for i in range(10)] + [[0, 1, 0.5]])
    assert M.query_average_precision(preds, np.array([[0, 1]])).max() == 0.0
    assert M.query_average_precision(preds, np.array([[0, 1]]), max_pred_windows=None)[0] == pytest.approx(1 / 11)
    assert M.query_average_precision(np.zeros((0, 3)), np.array([[0, 1]])).max() == 0.0


def test_map_over_queries():
    r = M.moment_average_precision([QA_PRED, QB_PRED, QC_PRED], [QA_GT, QB_GT, QC_GT])
    assert r["mAP@0.5"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert r["mAP@0.75"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert r["mAP"] == pytest.approx(100 * (0.55 + 0.95 + 0.05) / 3)


def test_random_window_baseline():
    cands = np.array([[0, 2], [2, 4], [0, 4]])
    # Query 1 GT [0,2]: IoUs 1, 0, .5.  Query 2 GTs [0,2], [2,4]: best IoUs 1, 1, .5.
    r = M.random_window_baseline([cands, cands], [np.array([[0, 2]]), np.array([[0, 2], [2, 4]])])
    assert r["R1@0.5"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert r["R1@0.7"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert r["mIoU"] == pytest.approx(100 * (0.5 + 2.5 / 3) / 2)


# ---------------------------------------------------------------------------------------------------------- DiDeMo
def _ranking(*first):
    """The 21 DiDeMo segments with `first` on top, the rest in index order."""
    return list(first) + [s for s in M.DIDEMO_SEGMENTS if s not in first]


def test_didemo_segments_and_iou():
    assert len(M.DIDEMO_SEGMENTS) == 21 and M.DIDEMO_SEGMENTS[0] == (0, 0) and M.DIDEMO_SEGMENTS[-1] == (5, 5)
    # Inclusive indices: (0, 1) and (1, 2) share chunk 1 of the 3 they span; that is the seconds IoU of [0,10], [5,15].
    assert M.didemo_iou((0, 1), (1, 2)) == pytest.approx(1 / 3)
    assert M.didemo_iou((0, 1), (1, 2)) == pytest.approx(M.temporal_iou([[0, 10]], [[5, 15]])[0, 0])
    assert M.didemo_iou((0, 0), (2, 2)) == 0 and M.didemo_iou((3, 4), (3, 4)) == 1


def test_didemo_rule_by_hand():
    # The example. times (2,2), (2,3), (4,5), (2,3); top-1 (4,5).
    #   IoUs with the top-1: 0, 0, 1, 0 -> best three 1, 0, 0 -> 1/3.
    #   Ranks in _ranking((4,5)): (4,5) 1; in index order after it (2,2) is 13th, (2,3) 14th -> best three 1, 13, 14
    #   -> mean 28/3 > 5: neither Rank@1 nor Rank@5.
    times = [[2, 2], [2, 3], [4, 5], [2, 3]]
    assert M.didemo_query(_ranking((4, 5)), times) == pytest.approx((28 / 3, 1 / 3))
    r = M.didemo_metrics([_ranking((4, 5))], [times])
    assert (r["Rank@1"], r["Rank@5"], r["mIoU"], r["n"]) == (0.0, 0.0, pytest.approx(100 / 3), 1)
    # The QVHighlights rule on the same windows takes the best one: R1 100, mIoU 100 (what ville reported before).
    seconds = np.array([[5 * s, 5 * (e + 1)] for s, e in times])
    qvh = M.moment_r1(np.array([[20.0, 30.0]]), [seconds])
    assert qvh["R1@0.5"] == 100 and qvh["mIoU"] == 100
    # ... and its AP counts the 4 annotations (alternatives for one moment) as 4 moments to find: a top-1 matching one
    # reaches recall 1/4, AP 25 % (also when all 4 coincide); the reason DiDeMo reports no mAP.
    assert M.query_average_precision(np.array([[20.0, 30.0, 1.0]]), seconds)[0] == pytest.approx(0.25)
    # Same annotations, top three (4,5), (2,3), (2,2): annotator ranks 3, 2, 1, 2 -> best three 1, 2, 2 -> 5/3:
    # Rank@5 but not Rank@1. Three annotators agreeing on the top-1: ranks 1, 1, 1 -> Rank@1; IoUs 1, 1, 1, and
    # (0,1) vs (1,1) 1/2 -> 1. Two agreeing: (0,0) x2 first, (3,3) second -> 1, 1, 2 -> 4/3; IoUs 1, 1, 0 -> 2/3.
    queries = [(_ranking((4, 5), (2, 3), (2, 2)), times),
               (_ranking((1, 1)), [[1, 1], [1, 1], [1, 1], [0, 1]]),
               (_ranking((0, 0), (3, 3)), [[0, 0], [0, 0], [3, 3], [5, 5]])]
    assert [M.didemo_query(*q) for q in queries] == [pytest.approx(x) for x in [(5 / 3, 1 / 3), (1, 1),
                                                                                   (4 / 3, 2 / 3)]]
    r = M.didemo_metrics(*zip(*queries))
    assert r["Rank@1"] == pytest.approx(100 / 3) and r["Rank@5"] == 100
    assert r["mIoU"] == pytest.approx(100 * (1 / 3 + 1 + 2 / 3) / 3)
    # Seven annotators (as in 26 released queries): still the best three.
    assert M.didemo_query(_ranking((4, 4)), [[4, 4], [4, 4], [0, 0], [4, 4], [0, 0], [0, 0], [4, 4]]) == (1, 1)
    with pytest.raises(ValueError, match=r"annotated segment\(s\) \[\(6, 6\)\] not in the ranking"):
        M.didemo_query(_ranking(), [[6, 6]])


def test_didemo_random_ranking_exact_and_simulated():
    # Hand: three annotators on (1,1) and a uniformly random top-1 among 21: Rank@1 = 1/21.
    times = [[1, 1], [1, 1], [1, 1], [0, 1]]
    assert M.didemo_random_ranking([M.DIDEMO_SEGMENTS], [times])["Rank@1"] == pytest.approx(100 / 21)
    # A 12-second video: the 15 segments starting before 12 s are valid; (5,5) lies outside, ranked after them.
    valid = [s for s in M.DIDEMO_SEGMENTS if s[0] <= 2]
    cases = [(valid, [[0, 0], [0, 1], [0, 0], [2, 5]]), (valid, [[1, 1], [1, 1], [5, 5], [2, 2]]),
             (M.DIDEMO_SEGMENTS, [[2, 2], [2, 3], [4, 5], [2, 3]])]
    exact = M.didemo_random_ranking(*zip(*cases))
    # A 5-second video: 6 valid segments (s = 0), so all 720 orders can be scored by the rule itself.
    short, t = [x for x in M.DIDEMO_SEGMENTS if x[0] == 0], [[0, 0], [0, 1], [0, 0], [2, 3]]
    after = [x for x in M.DIDEMO_SEGMENTS if x not in short]
    every = np.array([M.didemo_query(list(p) + after, t) for p in itertools.permutations(short)])
    full = M.didemo_random_ranking([short], [t])
    assert full["Rank@5"] == pytest.approx(100 * np.mean(every[:, 0] <= 5))
    assert full["Rank@1"] == pytest.approx(100 * np.mean(every[:, 0] <= 1)) == 0  # no segment chosen 3 times
    assert full["mIoU"] == pytest.approx(100 * np.mean(every[:, 1]))
    rng = np.random.default_rng(0)
    sims = []
    for v, t in cases:
        out = []
        for _ in range(4000):
            ranking = [v[i] for i in rng.permutation(len(v))] + [s for s in M.DIDEMO_SEGMENTS if s not in v]
            rank, iou = M.didemo_query(ranking, t)
            out.append((rank <= 1, rank <= 5, iou))
        sims.append(np.mean(out, 0))
    sim = 100 * np.mean(sims, 0)
    assert exact["Rank@1"] == pytest.approx(sim[0], abs=1.5)
    assert exact["Rank@5"] == pytest.approx(sim[1], abs=2.5) and exact["mIoU"] == pytest.approx(sim[2], abs=1.5)


# --------------------------------------------------------------------------------------------------------------- QA


def test_answer_normalisation_and_exact_match():
    assert M.normalize_answer("  The Red!! ") == "red"
    assert M.normalize_answer("an apple.") == "apple"
    assert M.normalize_answer("counter-clockwise") == "counter clockwise"
    assert M.normalize_answer("theatre") == "theatre"  # only whole-word articles go
    assert M.exact_match(["Red.", "a circle", "blue"], ["red", "circle", "green"]).tolist() == [True, True, False]


def test_majority_answers_and_question_type():
    pairs = [("colour", "red"), ("colour", "Blue"), ("shape", "circle"), ("shape", "circle"), ("shape", "star")]
    maj = M.majority_answers(pairs)
    assert maj["colour"] == "blue"  # 1-1 tie -> alphabetically first
    assert maj["shape"] == "circle" and maj["*"] == "circle"
    assert M.question_type({"question": "What is it?", "type": "colour"}) == "colour"
    assert M.question_type({"question": "Who is running?"}) == "who"


# ------------------------------------------------------------------------------------------------- adaptive length


def test_spearman_nan_safe():
    assert M.spearman([1, 2, 3], [2, 2, 2]) is None
    assert M.spearman([1], [1]) is None
    assert M.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    # Ranks (1,2,3,4) vs (1.5,1.5,3.5,3.5): 4 / (sqrt(5) * 2).
    assert M.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(4 / (2 * math.sqrt(5)))


def test_histogram_and_group_means():
    assert M.histogram([1, 1, 3], 1, 4) == {"1": 2, "2": 0, "3": 1, "4": 0}
    assert M.mean_by_group([1, 3, 5], [2, 2, 1]) == {"1": 5.0, "2": 2.0}
