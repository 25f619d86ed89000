"""Embed: face crops -> unit embeddings, batched across cameras and tracks.

Not every frame of a track is embedded: the first `embed.votes` quality frames are (so match can
vote), then one frame per `recheck_interval_s` of media time (so a wrong or changed identity is
caught without paying for every frame). A crop that a track's first decision waits for (its
first `embed.first_votes`) runs at once instead of waiting `batch_wait_ms` for company. The model runs on CUDA when available; the fallback to
CPU is logged once (stages.onnx_session) and shown by the execution_provider metric.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from facewatch.stages.messages import FaceCrops, FaceEmbeddings, Message
from facewatch.stages.embedder_info import EmbedderInfo, read_embedder_info  # noqa: F401  (re-exported)
from facewatch.stages.stage import BatchingStage


@dataclass
class _TrackState:
    embedded: int = 0
    last_pts: float = float("-inf")


class EmbedStage(BatchingStage):
    """Pending items are (message, indices of its faces to embed); units are faces."""
    kind = "embed"

    def __init__(self, ctx):
        self.ecfg = ctx.config.embed
        super().__init__(ctx, self.ecfg.batch_max, self.ecfg.batch_wait_ms / 1000)
        self.snapshots = ctx.config.publish.snapshots
        self.embedder = None
        self.tracks: dict[tuple[str, int], _TrackState] = {}
        self.epochs: dict[str, int] = {}
        self.first_crops = False   # the last chosen faces include a track's first-decision crop

    def setup(self) -> None:
        from facewatch.stages.face_embedder import embedder_from_config
        from facewatch.stages.precision import record

        m = self.cfg.models
        self.embedder = embedder_from_config(m)
        self.metrics.execution_provider.labels("embed", self.embedder.provider).set(1)
        record(self.metrics, "embed", self.embedder.choice)
        self.log.info("embedder %s on %s at %s (input %d px, %d-d)", self.embedder.choice.path,
                      self.embedder.provider, self.embedder.choice.precision,
                      self.embedder.input_size, self.embedder.embedding_size)

    def choose(self, msg: FaceCrops) -> np.ndarray:
        """Indices of the faces of this frame to embed, updating per-track state."""
        if self.epochs.get(msg.camera) != msg.epoch:   # detect restarted: its old tracks are gone
            self.tracks = {k: v for k, v in self.tracks.items() if k[0] != msg.camera}
            self.epochs[msg.camera] = msg.epoch
        chosen = []
        self.first_crops = False
        for i, tid in enumerate(msg.track_ids.tolist()):
            st = self.tracks.setdefault((msg.camera, tid), _TrackState())
            if st.embedded < self.ecfg.votes or msg.pts - st.last_pts >= self.ecfg.recheck_interval_s:
                st.embedded += 1
                st.last_pts = msg.pts
                chosen.append(i)
                # a track's first decision waits for this crop: no batch wait for it
                self.first_crops |= st.embedded <= self.ecfg.first_votes
        for tid in msg.ended_tracks.tolist():
            self.tracks.pop((msg.camera, tid), None)
        return np.asarray(chosen, np.int64)

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, FaceCrops):
            self.log.warning("ignored unexpected %s", msg.KIND)
            return []
        chosen = self.choose(msg)
        if len(chosen) == 0 and len(msg.ended_tracks) == 0:
            return []
        return self.enqueue((msg, chosen, time.time()), len(chosen), urgent=self.first_crops)

    def run_batch(self, pending: list[tuple[FaceCrops, np.ndarray, float]]) -> list[Message]:
        crops = [msg.crops[idx] for msg, idx, _ in pending if len(idx)]
        size = self.embedder.input_size
        started = time.time()
        if crops:
            batch = np.concatenate(crops)
            start = time.perf_counter()
            parts = [self.embedder.embed(batch[i:i + self.ecfg.batch_max])
                     for i in range(0, len(batch), self.ecfg.batch_max)]
            embeddings = np.concatenate(parts)
            self.metrics.stage_latency.labels("embed").observe(time.perf_counter() - start)
            self.metrics.batch_size.labels("embed").observe(len(batch))
        else:
            embeddings = np.zeros((0, self.embedder.embedding_size), np.float32)
        done = time.time()
        out, at = [], 0
        for msg, idx, received in pending:
            n = len(idx)
            self.metrics.faces_embedded.labels(msg.camera).inc(n)
            out.append(FaceEmbeddings(
                camera=msg.camera, frame_index=msg.frame_index, pts=msg.pts, wall_ts=msg.wall_ts,
                epoch=msg.epoch, track_ids=msg.track_ids[idx], boxes=msg.boxes[idx],
                embeddings=embeddings[at:at + n],
                crops=msg.crops[idx] if self.snapshots else np.zeros((0, size, size, 3), np.uint8),
                ended_tracks=msg.ended_tracks,
                stamps={**msg.stamps, "embed_recv": received, "embed_start": started,
                        "embed_done": done}))
            at += n
        return out

    def end_of_stream(self, camera: str) -> list[Message]:
        out = self.flush()
        self.tracks = {k: v for k, v in self.tracks.items() if k[0] != camera}
        return out

    def heartbeat_detail(self) -> dict:
        return {"tracks": len(self.tracks)}
