"""Detect: frames from every camera -> batched face detection -> per-camera tracking -> quality
gate -> face crops of the faces to embed (stages.embed_selection: a track's first good crops,
then one per recheck interval). Full frames stop here; only crops (the embedder's input) travel
on.

On the CPU (`detect.lanes`, stages.detector_lanes): a lone frame runs on the detector's own
session with every thread; when frames wait, they are detected side by side, one per lane, and
tracked in arrival order while the lanes go on. Elsewhere (a GPU), batching: frames arriving
within `batch_wait_ms` of the first pending one (up to `batch_max`) run as one detector call,
whichever cameras they come from.

Live cameras (streams, devices, files with `realtime: true`) want the newest frame, not the
oldest: while a batch waits, a newer frame of the same live camera replaces the pending one
(counted in frames_dropped{reason="stale"}), and frames that queued up in the socket while the
detector ran are drained the same way, so a decision is about what the camera sees now (the
first-event latency, issue 14). Lossless files (`realtime: false`) keep every frame.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np

from facewatch.stages.detections import Detections
from facewatch.stages.embed_selection import EmbedSelection
from facewatch.stages.face_crop import LANDMARK_LAYOUTS, crop_faces
from facewatch.stages.messages import FaceCrops, Message, VideoFrame
from facewatch.stages.quality import QualityGate, sharpness
from facewatch.stages.stage import BatchingStage
from facewatch.stages.transport import Defaults



class DetectStage(BatchingStage):
    kind = "detect"

    def __init__(self, ctx):
        self.dcfg = ctx.config.detect
        super().__init__(ctx, self.dcfg.batch_max, self.dcfg.batch_wait_ms / 1000)
        self.detector = None
        self.lanes = None           # CPU: frames stream over detector lanes instead of batches
        self.inflight: deque = deque()   # (frame, received, submitted, future, wide), in order
        self.trackers: dict = {}
        self.gate = QualityGate(self.dcfg.min_face_px, self.dcfg.min_blur)
        e = ctx.config.embed
        self.selection = EmbedSelection(e.votes, e.recheck_interval_s, e.first_votes)
        self.epoch = int(time.time() * 1000)   # new per process: tells downstream tracks restarted
        self.counters = None
        self.run_ids: dict[str, dict[int, int]] = {}   # camera -> tracker's id -> run-wide id
        self.crop_spec = None
        self.landmark_model = None
        self._tracker_args = None
        self.live = {c.name for c in ctx.config.cameras if c.realtime}

    def input_hwm(self) -> int:
        return Defaults.FRAME_RCVHWM

    def setup(self) -> None:
        from facewatch.stages.embedder_info import read_embedder_info
        from facewatch.stages.run_state import RunCounters

        self.counters = RunCounters(self.cfg.runtime.dir)
        from facewatch.stages.detector_lanes import detector_and_lanes
        from facewatch.stages.face_landmarks import landmark_model_from_config
        from facewatch.stages.precision import record
        from facewatch.stages.tracking import tracker_args

        m = self.cfg.models
        info = read_embedder_info(m.embedder)   # crop exactly as the embedder was trained
        self.crop_spec = info.crop_spec(self.dcfg.crop_size, self.dcfg.crop_scale)
        self.detector, self.lanes = detector_and_lanes(m, self.dcfg.lanes)
        self.landmark_model = landmark_model_from_config(m, self.crop_spec.alignment)
        self.metrics.execution_provider.labels("detect", self.detector.provider).set(1)
        record(self.metrics, "detect", self.detector.choice)
        if self.landmark_model is not None:
            record(self.metrics, "detect", self.landmark_model.choice)
        self._tracker_args = tracker_args(self.dcfg.tracker, self.dcfg)
        landmark_model = self.landmark_model
        self.log.info("detector %s on %s at %s (%d px), %s tracking, crops %d px, %s alignment%s",
                      self.detector.choice.path, self.detector.provider,
                      self.detector.choice.precision, self.detector.imgsz,
                      self.dcfg.tracker, self.crop_spec.size, self.crop_spec.alignment,
                      f" on landmarks from {landmark_model.path} at "
                      f"{landmark_model.choice.precision}" if landmark_model else "")

    def on_lost(self, msg: Message, count: int) -> None:
        self.metrics.frames_dropped.labels(msg.camera, "lost").inc(count)

    def on_not_sent(self, msg: Message) -> None:
        """Embed never got these crops (it is down or stuck): the camera's tracks were counted
        as embedded, so let every one of them want crops again, as a fresh embed would."""
        if isinstance(msg, FaceCrops):
            self.selection.forget_camera(msg.camera)

    def tracker(self, camera: str):
        if camera not in self.trackers:
            from facewatch.stages.tracking import CameraTracker
            self.trackers[camera] = CameraTracker(self.dcfg.tracker, self._tracker_args)
        return self.trackers[camera]

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, VideoFrame):
            self.log.warning("ignored unexpected %s", msg.KIND)
            return []
        item = (msg, time.time())
        replaced = False
        if msg.camera in self.live:   # the newest frame of a live camera replaces a pending one
            for i, (pending, _) in enumerate(self.pending):
                if pending.camera == msg.camera:
                    self.pending[i] = item
                    self.metrics.frames_dropped.labels(msg.camera, "stale").inc()
                    replaced = True
                    break
        if not replaced:
            self.pending.append(item)
            self.pending_units += 1
            if self.deadline is None and self.lanes is None:
                self.deadline = time.monotonic() + self.batch_wait_s
        if self.lanes is not None:
            return self._stream()
        return self.flush() if self.pending_units >= self.batch_max or self._nothing_to_wait_for() \
            else []

    # --- streaming over detector lanes (CPU) ---------------------------------------------
    # A lone frame with nothing in flight (one live camera) runs on the detector's own session
    # with every thread: the shortest time to its faces. Two or more waiting (several cameras,
    # a lossless file) go to the lanes, side by side: the most frames per second. The two never
    # run at once (DetectorLanes). Finished frames are tracked and cropped in arrival order (a
    # camera's tracker must see its frames in order) while the lanes detect the next ones.
    # Frames wait in `pending` only while the detector is busy, where a live camera's newer
    # frame still replaces its older one (the loop goes on reading); lossless frames beyond
    # one per lane make this call wait for the oldest frame in flight, which holds the rest in
    # the socket.

    def _stream(self, drain: bool = False) -> list[Message]:
        out: list[Message] = []
        self.lanes.bell.clear()   # before looking: a frame finishing later rings again
        while True:
            while self.inflight and self.inflight[0][3].done():
                out += self._finish(self.inflight.popleft())
            self._start_waiting_frames()
            # only lossless frames hold the loop: a live camera's waiting frame must stay
            # replaceable by the newer ones the loop reads meanwhile
            backlog = sum(f.camera not in self.live for f, _ in self.pending) >= self.lanes.size
            if not self.inflight or not (drain or backlog):
                return out
            self.inflight[0][3].result()   # wait for the oldest frame in flight

    def _start_waiting_frames(self) -> None:
        wide_busy = any(wide for *_, wide in self.inflight)
        if not self.pending or wide_busy:
            return
        if not self.inflight and len(self.pending) == 1:
            self._start(wide=True)
            return
        while self.pending and len(self.inflight) < self.lanes.size:
            self._start(wide=False)

    def _start(self, wide: bool) -> None:
        frame, received = self.pending.pop(0)
        self.pending_units -= 1
        self.inflight.append((frame, received, time.time(),
                              self.lanes.submit(frame.image, wide=wide), wide))

    def _finish(self, entry) -> list[Message]:
        frame, received, submitted, future, _ = entry
        m = self._faces(frame, future.result())
        self.metrics.batch_size.labels("detect").observe(1)
        self.metrics.stage_latency.labels("detect").observe(time.time() - submitted)
        if m is None:
            return []
        m.stamps = {"detect_recv": received, "detect_start": submitted, "detect_done": time.time()}
        return [m]

    def next_deadline(self) -> float | None:
        return None if self.lanes is not None else super().next_deadline()

    def wake(self):
        """With lanes, a finished frame wakes the loop (`poll` then tracks it)."""
        return self.lanes.bell if self.lanes is not None else None

    def poll(self, now: float) -> list[Message]:
        return self._stream() if self.lanes is not None else super().poll(now)

    def flush(self) -> list[Message]:
        return self._stream(drain=True) if self.lanes is not None else super().flush()

    def _nothing_to_wait_for(self) -> bool:
        """Every camera is live and has its frame here, and no newer frame waits in the socket
        (that one would replace it): waiting for more only adds latency."""
        active = self.cameras - self.ended
        return (active <= self.live and active <= {f.camera for f, _ in self.pending}
                and not (self.receiver is not None and self.receiver.waiting()))

    def run_batch(self, items: list[tuple[VideoFrame, float]]) -> list[Message]:
        start = time.perf_counter()
        started = time.time()
        frames = [f for f, _ in items]
        detections = self.detector.detect([f.image for f in frames])
        self.metrics.batch_size.labels("detect").observe(len(frames))
        out = []
        for (f, received), d in zip(items, detections):
            m = self._faces(f, d)
            if m is not None:
                m.stamps = {"detect_recv": received, "detect_start": started,
                            "detect_done": time.time()}
                out.append(m)
        self.metrics.stage_latency.labels("detect").observe(time.perf_counter() - start)
        return out

    def _faces(self, frame: VideoFrame, dets: Detections) -> FaceCrops | None:
        cam = frame.camera
        self.metrics.frames_processed.labels(cam).inc()
        tracks = self.tracker(cam).update(dets, frame.image)
        self.metrics.faces_detected.labels(cam).inc(len(tracks))
        self.selection.forget(cam, tracks.ended)
        keep = ~self.gate.too_small(tracks.boxes)
        if (~keep).any():
            self.metrics.faces_rejected.labels(cam, "small").inc(int((~keep).sum()))
        # landmarks, crops and the blur gate only for the faces embed will take (stages.embed_selection)
        idx = np.flatnonzero(keep & self.selection.wanted(cam, tracks.track_ids, frame.pts))
        boxes = tracks.boxes[idx]
        if self.landmark_model is not None:   # only the faces cropped, from the box cropped
            landmarks = self.landmark_model.predict(frame.image, boxes)
        else:
            landmarks = None if tracks.landmarks is None else tracks.landmarks[idx]
        crops, aligned = crop_faces(frame.image, boxes, self.crop_spec, landmarks)
        if self.crop_spec.alignment in LANDMARK_LAYOUTS and not aligned.all():
            self.metrics.alignment_fallbacks.labels(cam).inc(int((~aligned).sum()))
        blur = sharpness(crops)
        sharp = ~self.gate.too_blurred(blur)
        if (~sharp).any():
            self.metrics.faces_rejected.labels(cam, "blur").inc(int((~sharp).sum()))
        idx = idx[sharp]
        if len(idx) == 0 and not tracks.ended:
            return None
        first = [self.selection.take(cam, tid, frame.pts) for tid in tracks.track_ids[idx].tolist()]
        boxes = tracks.boxes[idx] + np.array([frame.roi_x, frame.roi_y] * 2, np.float32)
        return FaceCrops(camera=cam, frame_index=frame.frame_index, pts=frame.pts,
                         wall_ts=frame.wall_ts, epoch=self.epoch,
                         track_ids=self._run_ids(cam, tracks.track_ids[idx]),
                         boxes=boxes.astype(np.float32),
                         scores=tracks.scores[idx], blur=blur[sharp], crops=crops[sharp],
                         ended_tracks=self._ended(cam, tracks.ended), first_decision=any(first))

    def end_of_stream(self, camera: str) -> list[Message]:
        out = self.flush()
        tracker = self.trackers.pop(camera, None)
        ended = tracker.end_all() if tracker is not None else []
        self.selection.forget_camera(camera)
        if ended:   # every open track of this camera ends with its stream
            out.append(FaceCrops(
                camera=camera, frame_index=-1, pts=0.0, wall_ts=time.time(), epoch=self.epoch,
                track_ids=np.zeros(0, np.int64), boxes=np.zeros((0, 4), np.float32),
                scores=np.zeros(0, np.float32), blur=np.zeros(0, np.float32),
                crops=np.zeros((0, self.crop_spec.size, self.crop_spec.size, 3), np.uint8),
                ended_tracks=self._ended(camera, ended)))
        self.run_ids.pop(camera, None)
        return out

    def _run_ids(self, camera: str, ids: np.ndarray) -> np.ndarray:
        """Tracker ids -> run-wide ids: unique within the daemon run whatever restarts or
        resets the tracker (stages.run_state)."""
        known = self.run_ids.setdefault(camera, {})
        out = []
        for tid in ids.tolist():
            if tid not in known:
                known[tid] = self.counters.take("track_id") + 1
            out.append(known[tid])
        return np.asarray(out, np.int64)

    def _ended(self, camera: str, ended) -> np.ndarray:
        known = self.run_ids.setdefault(camera, {})
        return np.asarray([known.pop(t) for t in ended if t in known], np.int64)

    def teardown(self) -> None:
        if self.lanes is not None:
            self.lanes.close()

    def heartbeat_detail(self) -> dict:
        return {"cameras": len(self.trackers)}
