"""Match: embeddings of tracks -> identity decisions (stages.matcher) against the gallery.

The gallery snapshot is reloaded whenever `Gallery.data_version()` changes (polled every
`gallery.poll_interval_s`), so `facewatch enroll` takes effect in a running daemon. A gallery
enrolled with another embedder file is refused (logged; everyone is unknown) because
embeddings of different models cannot be compared.

The file is also followed by identity (device and inode), not only by content: a gallery that
was deleted, or replaced by another file (a restore, configuration management, `rm` and
`facewatch enroll`), is noticed at the next poll. The connection to the old file is closed at
once (its WAL files are the old file's and must not pair with a new one), and the new file is
opened when it is a usable gallery. Until then matching continues with the last good snapshot;
`facewatch_gallery_ok` is 0 and the reason is logged once per change. SIGHUP reopens the file
and reloads it whatever its version.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from facewatch.stages.matcher import Decision, Matcher, TrackState
from facewatch.stages.messages import FaceEmbeddings, Message, TrackDecision
from facewatch.stages.stage import Stage


class MatchStage(Stage):
    kind = "match"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.matcher: Matcher | None = None
        self.gallery = None
        self.version = None
        self.model_id = None
        self.threshold = None
        self.epochs: dict[str, int] = {}
        self.next_check = 0.0
        self.identity: tuple[int, int] | None = None   # (st_dev, st_ino) of the open file
        self.problem: str | None = None                # why the gallery file is not in use
        self._why = ""

    def setup(self) -> None:
        from facewatch.stages.embedder_info import read_embedder_info
        from facewatch.stages.errors import SetupError
        from facewatch.stages.gallery import Gallery, GalleryError, file_model_id

        embedder = self.cfg.models.embedder
        info = read_embedder_info(embedder)
        self.far_table = info.far_table
        self.model_id = file_model_id(embedder)
        configured = self.cfg.match.threshold
        if configured is not None:
            self.threshold, how = configured, "configured match.threshold"
        elif self.far_table is not None:   # follows the gallery's size: set on every reload
            self.threshold, how = self._operating_point(0).threshold, \
                f"match.target_far {self.cfg.match.target_far:g}, follows the gallery's size"
        else:
            self.threshold = info.threshold
            how = ("the embedder's metadata threshold: this model has no impostor_far_table, so "
                   "match.target_far cannot be applied (`facewatch evaluate-embedder "
                   "--write-metadata`)")
        votes = self.cfg.embed.votes
        self.matcher = Matcher(self.threshold, votes, max(votes, self.cfg.match.vote_window),
                               first_votes=min(self.cfg.embed.first_votes, votes))
        try:
            self.gallery = Gallery(self.cfg.gallery.path)
        except GalleryError as exc:   # read-only, not a gallery, too new: a restart cannot help
            if "locked" in str(exc):
                raise
            raise SetupError(f"gallery.path: {exc}") from None
        self.identity = self._file_identity()
        self.metrics.gallery_ok.set(1)
        self.log.info("threshold %.3f (%s), model %s, gallery %s", self.threshold, how,
                      self.model_id, self.cfg.gallery.path)
        self.reload_gallery()

    def _operating_point(self, gallery_size: int):
        from facewatch.stages.open_set import operating_point

        return operating_point(self.far_table, self.cfg.match.target_far, gallery_size)

    def _follow_gallery_size(self) -> None:
        """The open-set threshold for the gallery now loaded (match.target_far per decision)."""
        if self.cfg.match.threshold is not None or self.far_table is None:
            return
        point = self._operating_point(len(self.matcher.names))
        if point.threshold != self.threshold:
            self.threshold = self.matcher.threshold = point.threshold
            self.log.info("%s", point.describe())

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.cfg.gallery.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _set_problem(self, problem: str | None) -> None:
        """Log once per change: a new reason, or back to normal."""
        if problem == self.problem:
            return
        if problem is not None:
            people = len(set(self.matcher.names))
            self.log.error("%s; matching continues with the last good gallery (%d people)",
                           problem, people)
        else:
            self.log.warning("gallery %s is in use again", self.cfg.gallery.path)
        self.problem = problem
        self.metrics.gallery_ok.set(0 if problem else 1)

    def _reopen(self, identity: tuple[int, int] | None, why: str) -> bool:
        """Close the open file (if any) and open the one at the path now; False if unusable."""
        from facewatch.stages.gallery import Gallery, GalleryError

        path = self.cfg.gallery.path
        if self.gallery is not None:
            self.gallery.close()
            self.gallery, self.version = None, None
        self.identity = identity
        if identity is None:
            self._set_problem(f"gallery {path} is missing ({why})")
            return False
        try:
            gallery = Gallery(path, create=False)
        except (GalleryError, OSError) as exc:
            self._set_problem(f"gallery {path} cannot be used ({why}): {exc}")
            return False
        if self._file_identity() != identity:   # replaced again while opening: next poll
            gallery.close()
            return False
        self.gallery = gallery
        self.log.info("gallery %s opened (%s)", path, why)
        return True

    def reload_gallery(self, force: bool = False) -> None:
        from facewatch.stages.gallery import GalleryError

        identity = self._file_identity()
        if force or identity != self.identity or self.gallery is None:
            if force:
                why = "SIGHUP"
            elif identity == self.identity:   # still the file that could not be used
                why = self._why
            elif identity is None:
                why = "deleted"
            elif self.identity is None:
                why = "the file appeared"
            else:
                why = (f"replaced: device/inode {self.identity[0]}/{self.identity[1]} -> "
                       f"{identity[0]}/{identity[1]}")
            self._why = why
            if not self._reopen(identity, why):
                return
            self.metrics.gallery_reloads.labels("sighup" if force else "replaced").inc()
        try:
            version = self.gallery.data_version()
            if version == self.version:
                return
            snap = self.gallery.snapshot()
        except GalleryError as exc:   # e.g. locked for longer than the busy timeout: keep the old
            self._set_problem(f"gallery not reloaded: {exc}")
            return
        if self.version is not None:
            self.metrics.gallery_reloads.labels("changed").inc()
        self.version = version
        self._set_problem(None)
        if snap.model_id is not None and snap.model_id != self.model_id:
            self.log.error("gallery %s was enrolled with embedder %s but this daemon runs %s: "
                           "nobody can be recognised; re-enroll with the current model",
                           self.cfg.gallery.path, snap.model_id, self.model_id)
            self.matcher.set_gallery(np.zeros(0, np.int64), [], np.zeros((0, 0), np.float32))
            people = 0
        else:
            self.matcher.set_gallery(snap.person_ids, snap.names, snap.embeddings)
            people = len(set(snap.names))
        self._follow_gallery_size()
        self.metrics.gallery_people.set(people)
        self.metrics.gallery_embeddings.set(len(self.matcher.names))
        self.log.info("gallery loaded: %d people, %d embeddings", people, len(self.matcher.names))

    def next_deadline(self) -> float | None:
        return self.next_check

    def poll(self, now: float) -> list[Message]:
        if now >= self.next_check:
            self.next_check = now + self.cfg.gallery.poll_interval_s
            self.reload_gallery()
        return []

    # --- decisions ----------------------------------------------------------------------
    def _message(self, type_: str, camera: str, track_id: int, decision: Decision | None,
                 latest: dict, best: dict | None = None, st: TrackState | None = None
                 ) -> TrackDecision:
        sim = None if decision is None or math.isnan(decision.similarity) else decision.similarity
        snapshot = (best or {}).get("crop")
        return TrackDecision(
            camera=camera, type=type_, track_id=int(track_id),
            name=decision.name if decision else None,
            person_id=decision.person_id if decision else None,
            similarity=None if sim is None else round(float(sim), 4),
            threshold=float(self.threshold), votes=decision.votes if decision else 0,
            bbox=[round(float(v), 1) for v in latest["bbox"]], frame_pts=float(latest["pts"]),
            capture_ts=float(latest["wall_ts"]),
            snapshot=snapshot[None] if snapshot is not None else np.zeros((0, 0, 0, 3), np.uint8),
            revision=max(0, st.revision) if st is not None else 0,
            first_pts=None if st is None or st.first_pts is None else float(st.first_pts),
            stamps={**latest.get("stamps", {}), "match_done": time.time()})

    def _decision(self, camera: str, track_id: int, decision: Decision, st: TrackState) -> TrackDecision:
        result = "recognized" if decision.recognized else "unknown"
        self.metrics.recognitions.labels(camera, result).inc()
        return self._message(result, camera, track_id, decision, st.last, st.extra_for(decision), st)

    def _end(self, key: tuple, at: FaceEmbeddings | None = None) -> list[Message]:
        """Track ended (at the frame of `at`, when known): a late decision if it never got
        enough votes, then track_ended with the last box seen and the time it ended."""
        late, st = self.matcher.end(key)
        if st is None:
            return []       # never embedded (never passed the quality gate): nothing to report
        camera, _, track_id = key
        out = [self._decision(camera, track_id, late, st)] if late is not None else []
        last = dict(st.last)
        if at is not None:
            last.update(pts=at.pts, wall_ts=at.wall_ts)
        last.pop("stamps", None)   # the end is not about the last embedded frame's journey
        out.append(self._message("track_ended", camera, track_id, st.decision, last, st=st))
        return out

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, FaceEmbeddings):
            self.log.warning("ignored unexpected %s", msg.KIND)
            return []
        out: list[Message] = []
        cam = msg.camera
        if self.epochs.get(cam) != msg.epoch:
            # detect restarted: its trackers (and their ids) are new, so every older track ended
            for key in [k for k in self.matcher.keys(cam) if k[1] != msg.epoch]:
                out += self._end(key)
            self.epochs[cam] = msg.epoch
        crops = msg.crops if len(msg.crops) else None
        for i, tid in enumerate(msg.track_ids.tolist()):
            key = (cam, msg.epoch, tid)
            extra = {"bbox": msg.boxes[i].tolist(), "pts": msg.pts, "wall_ts": msg.wall_ts,
                     "crop": None if crops is None else np.array(crops[i]), "stamps": msg.stamps}
            decision = self.matcher.observe(key, msg.embeddings[i], extra)
            if decision is not None:
                out.append(self._decision(cam, tid, decision, self.matcher.state(key)))
        for tid in msg.ended_tracks.tolist():
            out += self._end((cam, msg.epoch, tid), at=msg if msg.frame_index >= 0 else None)
        return out

    def end_of_stream(self, camera: str) -> list[Message]:
        out: list[Message] = []
        for key in self.matcher.keys(camera):
            out += self._end(key)
        return out

    def reload(self) -> None:
        """SIGHUP: reopen the gallery file and reload it."""
        self.reload_gallery(force=True)

    def teardown(self) -> None:
        if self.gallery is not None:
            self.gallery.close()

    def heartbeat_detail(self) -> dict:
        return {"tracks": len(self.matcher.tracks) if self.matcher else 0,
                "gallery_version": self.version, "checked": time.time()}
