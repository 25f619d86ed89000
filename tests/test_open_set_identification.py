"""training.open_set_identification: TPIR at a stranger rate over random one-photo galleries."""
import numpy as np
import pytest

from facewatch.training.open_set_identification import open_set_identification


def people_photos(people: int, photos: int, noise: float, seed: int = 0):
    """Each person a random direction in 64-d; each photo that direction plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 64))
    names, rows = [], []
    for p in range(people):
        for _ in range(photos):
            rows.append(centres[p] / np.linalg.norm(centres[p]) + rng.normal(scale=noise, size=64))
            names.append(f"person{p}")
    emb = np.array(rows)
    return names, emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_separable_people_are_all_named():
    names, emb = people_photos(90, 3, noise=0.02)
    out = open_set_identification(names, emb, trials=20)
    assert out["rank1"] == 1.0 and out["tpir_at_fpir"]["0.01"] == 1.0
    assert out["people"] == 90 and out["probes"] == 20 * 60 * 2 and out["strangers"] == 20 * 30 * 3


def test_photos_without_identity_are_not_named_at_a_low_stranger_rate():
    names, emb = people_photos(90, 3, noise=50.0)       # the noise drowns each person's direction
    out = open_set_identification(names, emb, trials=20)
    assert out["rank1"] < 0.1 and out["tpir_at_fpir"]["0.01"] < 0.03


def test_noisier_photos_score_lower_and_the_stranger_rate_sets_the_threshold():
    names, clean = people_photos(90, 4, noise=0.08)
    _, noisy = people_photos(90, 4, noise=0.16)
    a, b = (open_set_identification(names, e, trials=30) for e in (clean, noisy))
    assert a["tpir_at_fpir"]["0.01"] > b["tpir_at_fpir"]["0.01"]
    for out in (a, b):   # a stricter stranger rate: a higher threshold, fewer named
        assert out["threshold_at_fpir"]["0.001"] >= out["threshold_at_fpir"]["0.01"]
        assert out["tpir_at_fpir"]["0.001"] <= out["tpir_at_fpir"]["0.01"]


def test_too_few_people_for_a_gallery_and_strangers_is_refused():
    names, emb = people_photos(60, 2, noise=0.1)
    with pytest.raises(ValueError, match="more than 60 people"):
        open_set_identification(names, emb)
    with pytest.raises(ValueError, match="one embedding per name"):
        open_set_identification(names[:-1], emb)
