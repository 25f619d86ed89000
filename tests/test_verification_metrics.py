"""Verification metrics on synthetic scores whose answers are known by hand."""
from __future__ import annotations

import numpy as np
import pytest

from facewatch.training.verification_metrics import (accuracy_at, best_threshold, kfold_accuracy, roc_auc,
                                           roc_curve, tar_at_far, verification_report)


def test_perfect_separation():
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    assert roc_auc(scores, labels) == pytest.approx(1.0)
    threshold, accuracy = best_threshold(scores, labels)
    assert accuracy == 1.0
    assert 0.3 < threshold <= 0.7
    tar, _ = tar_at_far(scores, labels, 1e-3)
    assert tar == 1.0


def test_reversed_scores_have_zero_auc():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    labels = np.array([1, 1, 0, 0])
    assert roc_auc(scores, labels) == pytest.approx(0.0)


def test_auc_counts_correctly_ordered_pairs():
    # Positives 0.9, 0.4; negatives 0.5, 0.1: 3 of the 4 (pos, neg) pairs are ordered -> 0.75.
    scores = np.array([0.9, 0.4, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0])
    assert roc_auc(scores, labels) == pytest.approx(0.75)


def test_ties_count_half_in_auc():
    scores = np.array([0.5, 0.5])
    labels = np.array([1, 0])
    assert roc_auc(scores, labels) == pytest.approx(0.5)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert list(fpr) == [0.0, 1.0] and list(tpr) == [0.0, 1.0]
    assert thresholds[0] == np.inf


def test_auc_matches_rank_statistic_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(labels * 1.0, 1.0).round(1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    expected = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_best_threshold_and_accuracy():
    scores = np.array([0.9, 0.6, 0.4, 0.55, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    threshold, accuracy = best_threshold(scores, labels)
    # One mistake is unavoidable: either 0.4 (pos) below or 0.55 (neg) above the threshold.
    assert accuracy == pytest.approx(5 / 6)
    assert accuracy_at(scores, labels, threshold) == pytest.approx(5 / 6)


def test_tar_at_far():
    negatives = np.arange(1000) / 1000.0          # 0.000 .. 0.999
    positives = np.array([0.9995, 0.9985, 0.5])
    scores = np.r_[positives, negatives]
    labels = np.r_[np.ones(3), np.zeros(1000)]
    # FAR <= 1e-3 allows one false accept of 1000: threshold 0.9985 accepts the negative 0.999
    # and two positives; going lower to 0.998 would add a second false accept.
    tar, threshold = tar_at_far(scores, labels, 1e-3)
    assert tar == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.9985)
    tar0, threshold0 = tar_at_far(scores, labels, 0.0)  # no false accept at all
    assert tar0 == pytest.approx(1 / 3) and threshold0 == pytest.approx(0.9995)


def test_kfold_uses_threshold_from_other_folds():
    # Fold 0's own best threshold would be perfect, but the other folds put it elsewhere.
    scores = np.array([0.9, 0.1, 0.9, 0.1, 0.45, 0.4])
    labels = np.array([1, 0, 1, 0, 1, 0])
    folds = np.array([1, 1, 2, 2, 0, 0])
    mean, _, thresholds = kfold_accuracy(scores, labels, folds)
    # Folds 1 and 2 train on {0.9,0.1,0.45,0.4}: best threshold 0.425 -> folds 1, 2 perfect.
    # Fold 0 trains on {0.9,0.1,0.9,0.1}: threshold midway 0.5 -> 0.45 rejected: accuracy 1/2.
    assert thresholds[0] == pytest.approx(0.5)
    assert mean == pytest.approx((0.5 + 1 + 1) / 3)


def test_report_keys_and_input_checks():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(100), np.zeros(100)]
    scores = rng.normal(labels, 0.5)
    report = verification_report(scores, labels, np.arange(200) % 10)
    for key in ("accuracy", "auc", "tar_at_far_1e-3", "threshold"):
        assert 0.0 <= report[key] <= 1.0 or key == "threshold"
    assert report["accuracy"] > 0.8
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0.1, 0.2], [1])
