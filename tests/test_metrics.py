"""Segmentation metrics against values worked out by hand on small arrays.

Probabilities used here (0.25, 0.5, 0.75, 1.0) are exact in float32 and float64, so a pixel at
0.75 is predicted at threshold 0.75 whatever the precision of the comparison.
"""

import numpy as np
import pytest

from training.metrics import (
    SWEEP,
    Evaluator,
    SetEvaluator,
    disk,
    f1_from_counts,
    match_counts,
    sweep_match_counts,
)


def line_mask(row: int, shape=(11, 20), cols=(2, 18)) -> np.ndarray:
    """A 1-px horizontal line: ``row``, columns cols[0] .. cols[1]-1 (16 px by default)."""
    mask = np.zeros(shape, bool)
    mask[row, cols[0]:cols[1]] = True
    return mask


def evaluate(pred_masks, truth_masks, tolerance: float, sweep: bool = False) -> dict:
    evaluator = Evaluator(tolerance=tolerance, threshold=0.5, sweep=sweep)
    for pred, truth in zip(pred_masks, truth_masks, strict=True):
        evaluator.add(np.asarray(pred, np.float32), truth)
    return evaluator.summary()


def test_one_pixel_shift_fails_strict_matching_and_passes_tolerance_two():
    truth, pred = line_mask(5), line_mask(6)  # every predicted pixel 1 px from the truth line
    strict = evaluate([pred], [truth], tolerance=0)
    # no pixel in common: precision = recall = F1 = 0; IoU 0 / 32, Dice 0 / 32
    assert (strict["precision"], strict["recall"], strict["f1"]) == (0.0, 0.0, 0.0)
    assert strict["iou"] == 0.0 and strict["dice"] == 0.0
    tolerant = evaluate([pred], [truth], tolerance=2)
    # each of the 16 predicted pixels has a truth pixel at distance 1 <= 2, and vice versa
    assert (tolerant["precision"], tolerant["recall"], tolerant["f1"]) == (1.0, 1.0, 1.0)
    # IoU and Dice stay strict whatever the tolerance
    assert tolerant["iou"] == 0.0 and tolerant["dice"] == 0.0


def test_extra_far_pixels_lower_precision_only():
    truth = line_mask(5)
    pred = truth.copy()
    pred[0, 0:4] = True  # 4 extra pixels, >= 5 px from the truth line (row 5)
    for tolerance in (0, 2):
        summary = evaluate([pred], [truth], tolerance)
        # precision = 16 matched / 20 predicted = 0.8; recall = 16 / 16 = 1
        # F1 = 2 * 0.8 * 1 / 1.8 = 8 / 9
        assert summary["precision"] == pytest.approx(0.8)
        assert summary["recall"] == pytest.approx(1.0)
        assert summary["f1"] == pytest.approx(8 / 9)
    # IoU = 16 / 20 = 0.8; Dice = 2 * 16 / (20 + 16) = 8 / 9
    assert summary["iou"] == pytest.approx(0.8)
    assert summary["dice"] == pytest.approx(8 / 9)


def test_partial_overlap_iou_dice_and_strict_f1():
    truth = np.zeros((6, 10), bool)
    truth[2:4, 1:5] = True  # 2 x 4 = 8 px
    pred = np.zeros((6, 10), bool)
    pred[2:4, 3:7] = True  # the same block 2 px to the right: 2 x 2 = 4 px in common
    summary = evaluate([pred], [truth], tolerance=0)
    assert summary["precision"] == pytest.approx(4 / 8)
    assert summary["recall"] == pytest.approx(4 / 8)
    assert summary["f1"] == pytest.approx(0.5)
    assert summary["iou"] == pytest.approx(4 / 12)  # union 8 + 8 - 4 = 12
    assert summary["dice"] == pytest.approx(2 * 4 / 16)


def test_tolerance_is_euclidean_and_inclusive():
    truth = np.zeros((9, 9), bool)
    truth[4, 4] = True
    pred = np.zeros((9, 9), bool)
    pred[5, 5] = True  # sqrt(2) = 1.414 away
    pred[4, 6] = True  # exactly 2 away
    pred[5, 6] = True  # sqrt(5) = 2.236 away
    # [matched predicted, predicted, matched truth, truth]
    assert match_counts(pred, truth, 0).tolist() == [0, 3, 0, 1]
    assert match_counts(pred, truth, 1).tolist() == [0, 3, 0, 1]
    assert match_counts(pred, truth, 1.5).tolist() == [1, 3, 1, 1]
    assert match_counts(pred, truth, 2).tolist() == [2, 3, 1, 1]
    assert match_counts(pred, truth, 2.5).tolist() == [3, 3, 1, 1]


def test_recall_counts_truth_pixels_not_predicted_ones():
    # one predicted pixel next to a 3-px truth line: within tolerance 1 of the middle pixel only
    truth = np.zeros((5, 9), bool)
    truth[2, 2:7:2] = True  # pixels at x = 2, 4, 6
    pred = np.zeros((5, 9), bool)
    pred[3, 4] = True
    counts = match_counts(pred, truth, 1)
    assert counts.tolist() == [1, 1, 1, 3]
    precision, recall, f1 = f1_from_counts(counts)
    assert (precision, recall) == (1.0, pytest.approx(1 / 3))
    assert f1 == pytest.approx(2 * (1 / 3) / (4 / 3))  # = 0.5


def test_empty_cases():
    assert f1_from_counts(np.array([0, 0, 0, 0])) == (1.0, 1.0, 1.0)  # nothing to find, none found
    assert f1_from_counts(np.array([0, 0, 0, 5])) == (0.0, 0.0, 0.0)  # all missed
    assert f1_from_counts(np.array([0, 5, 0, 0])) == (0.0, 0.0, 0.0)  # all false alarms
    empty = np.zeros((4, 4), bool)
    summary = evaluate([empty], [empty], tolerance=2)
    assert summary["f1"] == 1.0 and summary["iou"] == 1.0 and summary["dice"] == 1.0


def test_ods_and_ois_differ_when_images_want_different_thresholds():
    shape = (10, 10)
    # image 1: truth A (2 px) scored 0.75, two far non-crack pixels scored 0.25.
    # Best threshold anywhere in (0.25, 0.75]: prediction = A exactly, F1 = 1.
    truth_1 = np.zeros(shape, bool)
    truth_1[1, 1:3] = True
    prob_1 = np.zeros(shape, np.float32)
    prob_1[truth_1] = 0.75
    prob_1[8, 7:9] = 0.25  # >= 7 px from A, outside tolerance 2
    # image 2: truth B (2 px) and one far non-crack pixel, all scored 0.25. Best threshold in
    # (0, 0.25]: precision 2/3, recall 1, F1 = 0.8; above 0.25 nothing is predicted, F1 = 0.
    truth_2 = np.zeros(shape, bool)
    truth_2[5, 5:7] = True
    prob_2 = np.where(truth_2, 0.25, 0.0).astype(np.float32)
    prob_2[0, 0] = 0.25  # 7 px from B

    evaluator = Evaluator(tolerance=2, threshold=0.5, sweep=True)
    evaluator.add(prob_1, truth_1)
    evaluator.add(prob_2, truth_2)
    summary = evaluator.summary()

    # OIS: mean of each image's own best F1 = (1 + 0.8) / 2.
    assert summary["ois"] == pytest.approx(0.9)
    # ODS, pooled counts per threshold t:
    #   t in (0, 0.25]:   predicted 4 + 3 = 7, matched 2 + 2 = 4 -> P = 4/7; recall 4/4 = 1
    #                     F1 = 2 * (4/7) / (11/7) = 8/11 = 0.727
    #   t in (0.25, 0.75]: predicted 2, matched 2 -> P = 1; recall 2/4 -> F1 = 2/3
    #   t = 0 (everything predicted) or t > 0.75 (nothing) are worse.
    assert summary["ods"] == pytest.approx(8 / 11)
    assert summary["ods_threshold"] == pytest.approx(0.01)  # the first of the best thresholds
    assert summary["ods"] < summary["ois"]
    assert summary["pixel_error"] == pytest.approx(3 / 11)
    # at the fixed threshold 0.5: image 1 predicts A, image 2 nothing -> P = 1, R = 2/4
    assert summary["precision"] == pytest.approx(1.0)
    assert summary["recall"] == pytest.approx(0.5)
    assert summary["f1"] == pytest.approx(2 / 3)
    # IoU / Dice at 0.5, pooled: intersection 2, union 2 + 4 - 2 = 4, pred + truth = 2 + 4
    assert summary["iou"] == pytest.approx(0.5)
    assert summary["dice"] == pytest.approx(4 / 6)
    assert summary["images"] == 2


def test_sweep_covers_zero_to_one_in_hundredths():
    assert len(SWEEP) == 101 and SWEEP[0] == 0.0 and SWEEP[-1] == 1.0
    assert SWEEP[50] == 0.5


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        Evaluator().add(np.zeros((4, 4), np.float32), np.zeros((4, 5), bool))


def test_default_threshold_is_the_best_interior_one_never_the_sweep_ends():
    # Truth covers the whole image, so predicting everything (threshold 0.0) is a perfect F1.
    # Probabilities 0.3 on the left half and 0.8 on the right: any threshold in (0, 0.3] also
    # predicts everything, so the best interior threshold is the lowest one allowed, 0.05;
    # thresholds in (0.3, 0.8] keep only the right half (F1 = 2/3).
    prob = np.full((4, 4), 0.3, np.float32)
    prob[:, 2:] = 0.8
    truth = np.ones((4, 4), bool)
    evaluator = Evaluator(tolerance=0, threshold=0.5)
    evaluator.add(prob, truth)
    assert evaluator.summary()["ods_threshold"] == 0.0
    assert evaluator.best_threshold() == 0.05
    assert evaluator.best_threshold(low=0.4, high=0.9) == 0.4


def test_disk_holds_the_offsets_within_the_tolerance():
    assert disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(1.5).tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    # radius 2: (2, 0) at distance 2 is in, (2, 1) at sqrt(5) is out
    assert disk(2)[0].tolist() == [0, 0, 1, 0, 0] and disk(2)[1].tolist() == [0, 1, 1, 1, 0]


@pytest.mark.parametrize("tolerance", [0, 1, 1.5, 2, 2.5, 3])
def test_one_pass_sweep_equals_thresholding_and_matching_at_every_threshold(tolerance):
    # thin random "cracks" and speckle, probabilities at arbitrary float32 values (many exactly
    # on a threshold), at the image border too; the reference thresholds and matches per t
    rng = np.random.default_rng(int(tolerance * 10))
    for _ in range(5):
        truth = np.zeros((37, 53), bool)
        for _ in range(3):
            row = rng.integers(0, 37)
            truth[row, rng.integers(0, 20):rng.integers(25, 53)] = True
        truth |= rng.random(truth.shape) < 0.01
        prob = np.clip(rng.normal(0.2, 0.25, truth.shape) + 0.5 * truth, 0, 1)
        prob = np.where(rng.random(truth.shape) < 0.1, rng.choice(SWEEP, truth.shape), prob)
        prob = prob.astype(np.float32)
        thresholds = np.append(SWEEP, [0.33, 0.505])
        expected = np.stack([match_counts(prob >= t, truth, tolerance) for t in thresholds])
        assert sweep_match_counts(prob, truth, tolerance, thresholds).tolist() == expected.tolist()


def test_one_pass_sweep_of_an_image_without_cracks():
    prob = np.array([[0.0, 0.6], [0.2, 1.0]], np.float32)
    counts = sweep_match_counts(prob, np.zeros((2, 2), bool), 2, np.array([0.0, 0.5, 1.0]))
    assert counts.tolist() == [[0, 4, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0]]


def test_balanced_ods_lets_a_small_set_count_as_much_as_a_large_one():
    # strict matching. Set "wide": 200 crack pixels at 0.75 and 200 background pixels at 0.25.
    # Set "hairline": 10 crack pixels at 0.25. Per threshold t:
    #   t in (0, 0.25]:    wide P 200/400, R 1, F1 2/3; hairline F1 1
    #   t in (0.25, 0.75]: wide F1 1; hairline predicts nothing, F1 0
    # Pooled, (0.25, 0.75] wins: P 1, R 200/210, F1 400/410 (vs 420/620 below 0.25).
    # Balanced, (0, 0.25] wins: (2/3 + 1) / 2 = 5/6 (vs (1 + 0) / 2 above 0.25).
    wide_truth = np.zeros((40, 20), bool)
    wide_truth[:10] = True
    wide_prob = np.where(wide_truth, 0.75, 0.0).astype(np.float32)
    wide_prob[20:30] = 0.25
    hairline_truth = np.zeros((40, 20), bool)
    hairline_truth[5, :10] = True
    hairline_prob = np.where(hairline_truth, 0.25, 0.0).astype(np.float32)

    evaluator = SetEvaluator(tolerance=0, threshold=0.5)
    evaluator.add("wide", wide_prob, wide_truth)
    evaluator.add("hairline", hairline_prob, hairline_truth)
    summary = evaluator.summary()

    assert summary["images"] == 2
    assert summary["ods"] == pytest.approx(400 / 410) and summary["ods_threshold"] == 0.26
    assert summary["balanced_ods"] == pytest.approx(5 / 6)
    assert summary["balanced_ods_threshold"] == 0.01
    assert evaluator.best_balanced_threshold() == 0.05  # the lowest allowed in (0, 0.25]
    assert evaluator.pooled().best_threshold() == 0.26
    assert summary["sets"]["wide"]["f1_at_balanced"] == pytest.approx(2 / 3)
    assert summary["sets"]["hairline"]["f1_at_balanced"] == 1.0
    # at the fixed threshold 0.5 each set scores as it would alone
    assert summary["sets"]["wide"]["f1"] == 1.0 and summary["sets"]["hairline"]["f1"] == 0.0
    assert summary["f1"] == pytest.approx(400 / 410)


def test_a_set_evaluator_without_images_says_so():
    with pytest.raises(ValueError, match="no images"):
        SetEvaluator().summary()
