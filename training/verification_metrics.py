"""Face-verification metrics on pair scores, numpy only.

A pair is predicted "same person" when its score (cosine similarity) is >= the threshold.
`labels` are 1 for same-person pairs and 0 otherwise.
"""
from __future__ import annotations

import numpy as np


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.shape} "
                         f"and {labels.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return scores, labels


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for thresholds at each distinct score, high to low.

    The first point is (0, 0) with threshold +inf, the last (1, 1) when both classes exist.
    """
    scores, labels = _check(scores, labels)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # Last index of each run of equal scores: tied pairs switch together.
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def tar_at_far(scores, labels, far: float = 1e-3) -> tuple[float, float]:
    """Highest true-accept rate whose false-accept rate is <= `far`, and its threshold."""
    fpr, tpr, thresholds = roc_curve(scores, labels)
    ok = np.nonzero(fpr <= far)[0]
    best = ok[np.argmax(tpr[ok])]
    return float(tpr[best]), float(thresholds[best])


def best_threshold(scores, labels) -> tuple[float, float]:
    """Threshold with the highest accuracy (midway between neighbouring scores) and that accuracy."""
    scores, labels = _check(scores, labels)
    s = np.unique(scores)
    candidates = np.r_[s[0] - 1e-6, (s[:-1] + s[1:]) / 2.0, s[-1] + 1e-6]
    # For each candidate t: correct = positives with score >= t + negatives with score < t.
    pos_sorted = np.sort(scores[labels])
    neg_sorted = np.sort(scores[~labels])
    pos_ok = len(pos_sorted) - np.searchsorted(pos_sorted, candidates, side="left")
    neg_ok = np.searchsorted(neg_sorted, candidates, side="left")
    accuracy = (pos_ok + neg_ok) / len(scores)
    i = int(np.argmax(accuracy))
    return float(candidates[i]), float(accuracy[i])


def accuracy_at(scores, labels, threshold: float) -> float:
    scores, labels = _check(scores, labels)
    return float(np.mean((scores >= threshold) == labels))


def kfold_accuracy(scores, labels, folds) -> tuple[float, float, list[float]]:
    """LFW protocol: each fold is scored with the threshold that is best on the other folds.

    Returns mean accuracy, its standard deviation, and the thresholds used per fold.
    """
    scores, labels = _check(scores, labels)
    folds = np.asarray(folds).reshape(-1)
    if folds.shape != scores.shape:
        raise ValueError(f"folds must give one fold id per pair, got {folds.shape} for {scores.shape}")
    accuracies, thresholds = [], []
    for k in np.unique(folds):
        test = folds == k
        if test.all():
            raise ValueError("k-fold accuracy needs at least two folds")
        threshold, _ = best_threshold(scores[~test], labels[~test])
        accuracies.append(accuracy_at(scores[test], labels[test], threshold))
        thresholds.append(threshold)
    return float(np.mean(accuracies)), float(np.std(accuracies)), thresholds


def verification_report(scores, labels, folds) -> dict[str, float]:
    """Every number the training log, summary.json and `evaluate-embedder` report."""
    accuracy, accuracy_std, _ = kfold_accuracy(scores, labels, folds)
    threshold, best_accuracy = best_threshold(scores, labels)
    tar, tar_threshold = tar_at_far(scores, labels, 1e-3)
    return {
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "auc": roc_auc(scores, labels),
        "tar_at_far_1e-3": tar,
        "threshold": threshold,
        "accuracy_at_threshold": best_accuracy,
        "threshold_at_far_1e-3": tar_threshold,
        "pairs": int(len(np.asarray(scores).reshape(-1))),
    }


def save_roc_png(scores, labels, path, title: str = "ROC") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(scores, labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc(scores, labels):.4f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# verification_report's names -> the names a training run's per-epoch history keeps them under
HISTORY_NAMES = {"accuracy": "val_accuracy", "auc": "val_auc", "tar_at_far_1e-3": "val_tar_at_far_1e3",
                 "threshold": "val_threshold"}


def from_history(record: dict, pairs: int | None = None) -> dict:
    """One validated epoch of a run's history as verification_report's figures (the history
    keeps no FAR 1e-3 threshold), with its epoch and the number of pairs."""
    return {**{name: record[key] for name, key in HISTORY_NAMES.items()},
            "epoch": record["epoch"], "pairs": pairs}
