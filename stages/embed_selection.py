"""Which tracked faces are embedded: the first `embed.votes` good crops of a track (so match can
vote), then one per `embed.recheck_interval_s` of media time (so a wrong or changed identity is
caught without paying for every frame).

Decided in detect, before landmarks, crops and the blur gate run: a face that will not be
embedded costs only its detection and tracking. On the shared 1080p clip (5.8 faces a frame)
about one face in thirteen is embedded, and the landmark model and the crops had taken half of
the detect loop's own time (issue 14). A track's vote counts only crops that passed the blur
gate, as before: a blurred crop leaves the track wanting one on the next frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class _Track:
    embedded: int = 0
    last_pts: float = float("-inf")


class EmbedSelection:
    def __init__(self, votes: int, recheck_interval_s: float, first_votes: int):
        self.votes, self.recheck_interval_s = votes, recheck_interval_s
        self.first_votes = min(first_votes, votes)
        self._tracks: dict[tuple[str, int], _Track] = {}

    def wanted(self, camera: str, track_ids: np.ndarray, pts: float) -> np.ndarray:
        """Mask of the faces (by tracker id) a crop is wanted from at this frame."""
        out = np.zeros(len(track_ids), bool)
        for i, tid in enumerate(track_ids.tolist()):
            st = self._tracks.get((camera, tid))
            out[i] = (st is None or st.embedded < self.votes
                      or pts - st.last_pts >= self.recheck_interval_s)
        return out

    def take(self, camera: str, track_id: int, pts: float) -> bool:
        """Count a good crop of this track at `pts`; True if the track's first decision waits
        for it (embed runs it at once instead of waiting for company)."""
        st = self._tracks.setdefault((camera, track_id), _Track())
        st.embedded += 1
        st.last_pts = pts
        return st.embedded <= self.first_votes

    def forget(self, camera: str, track_ids) -> None:
        for tid in track_ids:
            self._tracks.pop((camera, int(tid)), None)

    def forget_camera(self, camera: str) -> None:
        self._tracks = {k: v for k, v in self._tracks.items() if k[0] != camera}

    def __len__(self) -> int:
        return len(self._tracks)
