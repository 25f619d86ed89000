"""Identity decisions for tracks: cosine similarity against every enrolled embedding, and a vote
across the frames of a track.

Each embedding of a track is compared with every gallery row (several rows per person are
allowed); its vote goes to the person of the most similar row if that similarity reaches the
threshold, else to "unknown". A track's decision is the majority over its latest `window`
embeddings (ties with "unknown" go to unknown, ties between people to the higher mean
similarity). Votes are recomputed against the *current* gallery each time, so a person enrolled
while the daemon runs is recognised at the next re-check of an open track.

Decisions per track: the first once `first_votes` embeddings arrived (1 by default: the track's
first good crop, so a name comes while the person is still in view), or when the track ends
with fewer; that early decision stands until `votes_needed` embeddings are in, and from then on
a new decision is made only when the vote over the window changes the outcome (an update, with
`revision` counting the changes). With first_votes == votes_needed the first decision is the
full vote, as before issue 14.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

UNKNOWN = -1


@dataclass(frozen=True)
class Decision:
    person_id: int | None      # None: unknown
    name: str | None
    similarity: float          # mean similarity of the winning votes to their best match
    votes: int                 # embeddings that voted
    best_index: int            # which of the track's window entries is the best example

    @property
    def recognized(self) -> bool:
        return self.person_id is not None


@dataclass
class TrackState:
    embeddings: collections.deque
    extras: collections.deque          # per-embedding payload (bbox, pts, crop...), same order
    decision: Decision | None = None
    seen: int = 0                      # embeddings received in total
    last: dict = field(default_factory=dict)
    revision: int = -1                 # decisions made so far - 1 (0: the first one)
    first_pts: float | None = None     # extra["pts"] of the first embedding, when given

    def extra_for(self, decision: Decision) -> dict:
        """The payload stored with a just-made decision's best embedding (bbox, crop...)."""
        return self.extras[decision.best_index]


class Matcher:
    def __init__(self, threshold: float, votes_needed: int = 3, window: int = 7,
                 first_votes: int | None = None):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
        if votes_needed < 1 or window < votes_needed:
            raise ValueError(f"need 1 <= votes_needed <= window, got {votes_needed}, {window}")
        first_votes = votes_needed if first_votes is None else first_votes
        if not 1 <= first_votes <= votes_needed:
            raise ValueError(f"need 1 <= first_votes <= votes_needed, got {first_votes}, "
                             f"{votes_needed}")
        self.threshold, self.votes_needed, self.window = threshold, votes_needed, window
        self.first_votes = first_votes
        self.person_ids = np.zeros(0, np.int64)
        self.names: list[str] = []
        self.gallery = np.zeros((0, 0), np.float32)
        self.people: dict[int, str] = {}
        self.tracks: dict[tuple, TrackState] = {}

    # --- gallery ------------------------------------------------------------------------
    def set_gallery(self, person_ids: np.ndarray, names: list[str], embeddings: np.ndarray) -> None:
        embeddings = np.asarray(embeddings, np.float32)
        if len(person_ids) != len(names) or len(names) != len(embeddings):
            raise ValueError(f"gallery arrays disagree: {len(person_ids)} ids, {len(names)} "
                             f"names, {len(embeddings)} embeddings")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True) if len(embeddings) else 1.0
        self.gallery = embeddings / np.maximum(norms, 1e-12)
        self.person_ids = np.asarray(person_ids, np.int64)
        self.names = list(names)
        self.people = dict(zip(self.person_ids.tolist(), self.names))

    def best_matches(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) -> person id of the most similar gallery row (UNKNOWN when below threshold or
        the gallery is empty) and that similarity (NaN with an empty gallery)."""
        n = len(embeddings)
        if len(self.gallery) == 0 or n == 0:
            return np.full(n, UNKNOWN, np.int64), np.full(n, np.nan, np.float32)
        if embeddings.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"embedding size {embeddings.shape[1]} does not match the gallery's "
                             f"{self.gallery.shape[1]}")
        sims = embeddings @ self.gallery.T                 # cosine: both sides are unit vectors
        best = sims.argmax(axis=1)
        best_sim = sims[np.arange(n), best].astype(np.float32)
        persons = np.where(best_sim >= self.threshold, self.person_ids[best], UNKNOWN)
        return persons.astype(np.int64), best_sim

    # --- voting -------------------------------------------------------------------------
    def vote(self, embeddings: np.ndarray) -> Decision:
        persons, sims = self.best_matches(embeddings)
        counts = collections.Counter(persons.tolist())
        top = max(counts.values())
        tied = [p for p, c in counts.items() if c == top]
        if UNKNOWN in tied:
            winner = UNKNOWN            # no majority for anyone: do not claim an identity
        else:
            winner = max(tied, key=lambda p: float(np.mean(sims[persons == p])))
        mask = persons == winner
        winner_sims = sims[mask]
        sim = float(np.mean(winner_sims)) if not np.all(np.isnan(winner_sims)) else float("nan")
        best_index = int(np.flatnonzero(mask)[np.nanargmax(winner_sims)]) \
            if not np.all(np.isnan(winner_sims)) else int(np.flatnonzero(mask)[-1])
        if winner == UNKNOWN:
            return Decision(None, None, sim, len(persons), best_index)
        return Decision(winner, self.people.get(winner), sim, len(persons), best_index)

    def observe(self, key: tuple, embedding: np.ndarray, extra: dict | None = None) -> Decision | None:
        """Add one embedding of a track; return a Decision when one is due (first decision, or
        a change), else None."""
        st = self.tracks.get(key)
        if st is None:
            st = self.tracks[key] = TrackState(collections.deque(maxlen=self.window),
                                               collections.deque(maxlen=self.window))
        st.embeddings.append(np.asarray(embedding, np.float32))
        st.extras.append(extra or {})
        st.seen += 1
        st.last = extra or {}
        if st.first_pts is None:
            st.first_pts = st.last.get("pts")
        if st.decision is None:
            if len(st.embeddings) < min(self.first_votes, self.votes_needed):
                return None
        elif st.seen < self.votes_needed:   # the early decision stands until the full vote
            return None
        return self._decide(st)

    def _decide(self, st: TrackState) -> Decision | None:
        """Vote over the window; a decision only when it is the first or differs."""
        decision = self.vote(np.stack(st.embeddings))
        if st.decision is not None and st.decision.person_id == decision.person_id:
            return None
        st.decision = decision
        st.revision += 1
        return decision

    def state(self, key: tuple) -> TrackState | None:
        return self.tracks.get(key)

    def end(self, key: tuple) -> tuple[Decision | None, TrackState | None]:
        """A track ended: forget it. Returns (a late decision when it ended before reaching
        votes_needed, else None; its state, or None if it never voted)."""
        st = self.tracks.pop(key, None)
        if st is None:
            return None, None
        late = None
        if st.decision is None and st.embeddings:
            late = st.decision = self.vote(np.stack(st.embeddings))
            st.revision += 1
        return late, st

    def forget(self, key: tuple) -> None:
        self.tracks.pop(key, None)

    def keys(self, camera: str) -> list[tuple]:
        return [k for k in self.tracks if k[0] == camera]
