"""Keep LFW's validation people out of the extra training photos, by face.

Unlabelled folders are scraped photos of whoever: UTKFace takes part of its photos from
celebrity collections, and 88 of its 23,695 faces (4 of CelebA's 9,990) are within
`PHOTO_THRESHOLD` of one of the 178 LFW validation people (SFace, 2026-11-30). Distilled, they
would teach the student those people's other photos and flatter the validation pairs. A photo
is left out when its SFace vector (centred with LFW's mean) is this close to a validation
person's mean vector.
"""
from __future__ import annotations

import numpy as np

# One photo against a person's mean: the same person scores ~0.6-0.8, the nearest of 178
# strangers rarely 0.4; 0.45 errs towards leaving a photo out.
PHOTO_THRESHOLD = 0.45


def person_means(vectors: np.ndarray, people: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(names, unit mean vector of each person's rows)."""
    names, inverse = np.unique(people, return_inverse=True)
    means = np.zeros((len(names), vectors.shape[1]), np.float64)
    np.add.at(means, inverse, vectors)
    means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-12
    return names, means.astype(np.float32)


def near_people(vectors: np.ndarray, means: np.ndarray, threshold: float = PHOTO_THRESHOLD
                ) -> np.ndarray:
    """Rows of `vectors` (unit) within `threshold` cosine of any of `means`."""
    if not len(means) or not len(vectors):
        return np.zeros(len(vectors), bool)
    return (vectors @ means.T).max(axis=1) >= threshold
