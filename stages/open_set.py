"""The open-set operating point: a threshold for a target false-accept rate per decision,
whatever the gallery's size.

A stranger's face is compared with every gallery embedding and named when the best similarity
reaches the threshold, so with N embeddings the chance that a stranger is named is about
1 - (1 - p)^N, p being the chance that one impostor pair reaches it. For a target rate F per
decision the pair rate must be p = 1 - (1 - F)^(1/N), and the threshold is where the impostor
similarity distribution of the embedder has that tail.

That distribution is measured once per model, through the runtime path (`facewatch
evaluate-embedder --write-metadata`, and `facewatch export-embedder` for new models), on every
cross-identity pair of the validation pairs' images, and stored in the embedder's ONNX metadata
as `impostor_far_table`: pair FARs from 0.1 down to the smallest measured with at least
MIN_TAIL impostor pairs above it, each with its threshold. Between entries the threshold is
interpolated in log(FAR); below the smallest measured FAR it is extrapolated from the last two
entries (said in the log), since a large gallery needs pair rates smaller than any validation
set can measure.

The vote across a track's frames (stages.matcher) makes a decision stricter than one frame, so
the rate per decision is at most the target when frames are as alike as one frame.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

METADATA_KEY = "impostor_far_table"
MIN_TAIL = 20            # impostor pairs at or above a threshold for its FAR to count as measured
FAR_GRID = tuple(float(f"{f}e-{e}") for e in range(1, 9) for f in ("1", "0.5", "0.2"))


@dataclass(frozen=True)
class FarTable:
    """Pair FAR (descending) -> cosine threshold (ascending), from one embedder's impostors."""
    far: tuple[float, ...]
    threshold: tuple[float, ...]
    pairs: int = 0           # impostor pairs measured
    images: int = 0
    source: str = ""

    def __post_init__(self):
        if len(self.far) != len(self.threshold) or len(self.far) < 2:
            raise ValueError(f"a FAR table needs >= 2 (far, threshold) entries of equal count, "
                             f"got {len(self.far)} and {len(self.threshold)}")
        if any(b >= a for a, b in zip(self.far, self.far[1:])) or \
                any(b < a for a, b in zip(self.threshold, self.threshold[1:])):
            raise ValueError("FAR must decrease and thresholds must not decrease along the table")

    @classmethod
    def from_scores(cls, impostor_scores: np.ndarray, images: int = 0, source: str = "") -> "FarTable":
        """The table of measured impostor similarities (every cross-identity pair)."""
        scores = np.sort(np.asarray(impostor_scores, np.float64))[::-1]
        n = len(scores)
        far, thr = [], []
        for f in FAR_GRID:
            k = int(math.floor(f * n))   # at most k impostors at or above the threshold
            if k < MIN_TAIL:
                break
            t = float(np.nextafter(scores[k], np.inf))  # strictly above the (k+1)-th largest
            if thr and t < thr[-1]:
                t = thr[-1]
            far.append(f)
            thr.append(round(t, 6))
        return cls(tuple(far), tuple(thr), n, images, source)

    def to_json(self) -> str:
        return json.dumps({"far": list(self.far), "threshold": list(self.threshold),
                           "pairs": self.pairs, "images": self.images, "source": self.source})

    @classmethod
    def from_metadata(cls, value) -> "FarTable":
        data = json.loads(value) if isinstance(value, str) else value
        return cls(tuple(float(x) for x in data["far"]), tuple(float(x) for x in data["threshold"]),
                   int(data.get("pairs", 0)), int(data.get("images", 0)), str(data.get("source", "")))

    def threshold_at(self, pair_far: float) -> tuple[float, bool]:
        """(threshold for this pair FAR, whether it lies beyond the measured range)."""
        if not 0 < pair_far < 1:
            raise ValueError(f"pair FAR must be in (0, 1), got {pair_far}")
        logs = [math.log10(f) for f in self.far]
        x = math.log10(pair_far)
        if x >= logs[0]:
            return self.threshold[0], False
        for i in range(len(logs) - 1):
            if logs[i] >= x >= logs[i + 1]:
                w = (logs[i] - x) / (logs[i] - logs[i + 1])
                return self.threshold[i] + w * (self.threshold[i + 1] - self.threshold[i]), False
        slope = (self.threshold[-1] - self.threshold[-2]) / (logs[-2] - logs[-1])
        return min(1.0, self.threshold[-1] + slope * (logs[-1] - x)), True


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    target_far: float        # per decision
    pair_far: float          # per comparison, for this gallery size
    gallery_size: int        # embeddings compared with
    extrapolated: bool

    def describe(self) -> str:
        return (f"threshold {self.threshold:.3f} for a false-accept rate of {self.target_far:g} "
                f"per decision against {self.gallery_size} gallery embedding"
                f"{'s' if self.gallery_size != 1 else ''} (pair FAR {self.pair_far:.2g}"
                f"{', extrapolated beyond the measured impostors' if self.extrapolated else ''})")


def pair_far_for(target_far: float, gallery_size: int) -> float:
    if not 0 < target_far < 1:
        raise ValueError(f"target FAR must be in (0, 1), got {target_far}")
    n = max(int(gallery_size), 1)
    return -math.expm1(math.log1p(-target_far) / n)   # 1 - (1 - F)^(1/N), precise for small F


def operating_point(table: FarTable, target_far: float, gallery_size: int) -> OperatingPoint:
    pair = pair_far_for(target_far, gallery_size)
    threshold, beyond = table.threshold_at(pair)
    return OperatingPoint(float(threshold), target_far, pair, max(int(gallery_size), 1), beyond)
