"""One-shot open-set identification, scored on embeddings already computed: the figure that
`evaluate-oneshot` measures on 116 appearances, here over hundreds of random galleries.

Each trial draws `gallery_size` of the people at random and enrols each from one random photo of
theirs; every other photo of an enrolled person is a probe, and every photo of the people left
out is a stranger. A probe is named correctly when its most similar gallery photo is its own
person's and that similarity reaches the threshold; a stranger is named when its best
similarity reaches it. The threshold for a stranger rate (FPIR, false-positive identification
rate: strangers named per decision) is read off the strangers' best similarities pooled over the
trials, and TPIR is the share of probes named correctly at it (the open-set ROC of Grother and
Ngan, NIST FRVT part 2).

Pair accuracy and TAR at FAR 1e-3 rest on single comparisons; one-shot recognition with 60
people enrolled lives further out in the tail (a stranger meets 60 gallery photos), so this is
the figure that tracks whether `evaluate-oneshot` will name >= 85% of enrolled appearances.
"""
from __future__ import annotations

import numpy as np

GALLERY_SIZE = 60          # as evaluate-oneshot enrols
TRIALS = 300
FPIRS = (0.01, 0.001)


def eligible_people(names: list[str]) -> list[str]:
    """People with at least two photos: one to enrol, one to probe with."""
    unique, counts = np.unique(np.asarray(names), return_counts=True)
    return [str(p) for p, c in zip(unique, counts) if c >= 2]


def open_set_identification(names: list[str], embeddings: np.ndarray,
                            gallery_size: int = GALLERY_SIZE, trials: int = TRIALS,
                            fpirs: tuple[float, ...] = FPIRS, seed: int = 0) -> dict:
    """TPIR at each FPIR, and rank-1 (closed-set) accuracy, over random one-photo galleries.
    `embeddings` (N, D) are unit vectors, `names[i]` the person of row i."""
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2 or len(emb) != len(names):
        raise ValueError(f"need one embedding per name: {emb.shape} for {len(names)} names")
    people = eligible_people(names)
    if len(people) <= gallery_size:
        raise ValueError(f"open-set identification needs more than {gallery_size} people with "
                         f">= 2 photos (some left out as strangers), got {len(people)}")
    rows = {p: np.flatnonzero(np.asarray(names) == p) for p in people}
    rng = np.random.default_rng(seed)
    sims = emb @ emb.T
    named_right, strangers_best = [], []
    for _ in range(trials):
        order = rng.permutation(len(people))
        enrolled = [people[i] for i in order[:gallery_size]]
        gallery = np.array([rng.choice(rows[p]) for p in enrolled])
        probes = np.concatenate([rows[p][rows[p] != g] for p, g in zip(enrolled, gallery)])
        truth = np.concatenate([np.full(len(rows[p]) - 1, j) for j, p in enumerate(enrolled)])
        strangers = np.concatenate([rows[people[i]] for i in order[gallery_size:]])
        probe_sims = sims[np.ix_(probes, gallery)]
        best = probe_sims.argmax(axis=1)
        named_right.append(np.where(best == truth, probe_sims.max(axis=1), -np.inf))
        strangers_best.append(sims[np.ix_(strangers, gallery)].max(axis=1))
    right, stranger = np.concatenate(named_right), np.concatenate(strangers_best)
    out = {"gallery_size": gallery_size, "trials": trials, "people": len(people),
           "probes": len(right), "strangers": len(stranger),
           "rank1": round(float(np.mean(np.isfinite(right))), 4), "tpir_at_fpir": {},
           "threshold_at_fpir": {}}
    for fpir in fpirs:
        threshold = float(np.quantile(stranger, 1.0 - fpir))
        out["tpir_at_fpir"][f"{fpir:g}"] = round(float(np.mean(right > threshold)), 4)
        out["threshold_at_fpir"][f"{fpir:g}"] = round(threshold, 4)
    return out
