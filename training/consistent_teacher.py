"""Consistent teaching: SFace's vector of the very augmented crop the student sees.

Cached teacher vectors describe the clean crop, while the student sees it blurred, tinted,
rotated or shifted: every epoch repeats the same (face, target) pairs and the student ends up
fitting its training faces rather than the teacher's function (stop 24: training loss falling,
validation level). Running the teacher on the augmented crop makes each batch a new question
("function matching", Beyer et al., 2022). SFace costs ~36 ms a crop on one core, ~6x the
student's share of a training step, so only `share` of each batch gets a fresh target; the rest
keep the cached one, which also teaches invariance to the augmentation.

Training time only; `--consistent-share` of `facewatch train-embedder --teacher sface`.
"""
from __future__ import annotations

import numpy as np

from facewatch.training.teacher_cache import centred


class ConsistentTeacher:
    """Replaces part of a batch's cached SFace targets with SFace's vectors of its augmented crops.

    `mean` is the one the cached targets were centred with, so both kinds live in one space.
    Thread-safe: the batch workers share one onnxruntime session (its `run` may be called
    concurrently), each call on `threads` cores.
    """

    def __init__(self, mean: np.ndarray, share: float, threads: int = 1, embedder=None):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"consistent teaching share must be in (0, 1], got {share}")
        if embedder is None:
            from facewatch.training.sface_teacher import SFaceEmbedder

            embedder = SFaceEmbedder(threads=threads)   # scales the student's crops to SFace's 112
        self.embedder, self.mean, self.share = embedder, np.asarray(mean, np.float32), share

    def refresh(self, targets: np.ndarray, augmented_bgr: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
        """A copy of (B, D) `targets` with `share` of its rows, chosen at random, taken from the
        teacher's vectors of the matching (B, H, W, 3) BGR float 0..255 augmented crops."""
        count = min(len(targets), max(1, int(round(self.share * len(targets)))))
        rows = rng.choice(len(targets), count, replace=False)
        fresh = targets.astype(np.float32, copy=True)   # the float crops, exactly as the student gets them
        fresh[rows] = centred(self.embedder.embed(augmented_bgr[rows]), self.mean)
        return fresh
