"""Embed: face crops -> unit embeddings, batched across cameras and tracks.

Detect sends only the crops worth embedding (stages.embed_selection: a track's first
`embed.votes` good crops, then one per `recheck_interval_s`); every one is embedded. A message
holding a crop that a track's first decision waits for (`first_decision`) runs at once instead
of waiting `batch_wait_ms` for company. The model runs on CUDA when available; the fallback to
CPU is logged once (stages.onnx_session) and shown by the execution_provider metric.
"""
from __future__ import annotations

import time

import numpy as np

from facewatch.stages.messages import FaceCrops, FaceEmbeddings, Message
from facewatch.stages.embedder_info import EmbedderInfo, read_embedder_info  # noqa: F401  (re-exported)
from facewatch.stages.stage import BatchingStage


class EmbedStage(BatchingStage):
    """Pending items are (message, time received); units are faces."""
    kind = "embed"

    def __init__(self, ctx):
        self.ecfg = ctx.config.embed
        super().__init__(ctx, self.ecfg.batch_max, self.ecfg.batch_wait_ms / 1000)
        self.snapshots = ctx.config.publish.snapshots
        self.embedder = None

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

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, FaceCrops):
            self.log.warning("ignored unexpected %s", msg.KIND)
            return []
        n = len(msg.track_ids)
        if n == 0 and len(msg.ended_tracks) == 0:
            return []
        return self.enqueue((msg, time.time()), n, urgent=msg.first_decision)

    def run_batch(self, pending: list[tuple[FaceCrops, float]]) -> list[Message]:
        crops = [msg.crops for msg, _ in pending if len(msg.crops)]
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
        for msg, received in pending:
            n = len(msg.track_ids)
            self.metrics.faces_embedded.labels(msg.camera).inc(n)
            out.append(FaceEmbeddings(
                camera=msg.camera, frame_index=msg.frame_index, pts=msg.pts, wall_ts=msg.wall_ts,
                epoch=msg.epoch, track_ids=msg.track_ids, boxes=msg.boxes,
                embeddings=embeddings[at:at + n],
                crops=msg.crops if self.snapshots else np.zeros((0, size, size, 3), np.uint8),
                ended_tracks=msg.ended_tracks,
                stamps={**msg.stamps, "embed_recv": received, "embed_start": started,
                        "embed_done": done}))
            at += n
        return out

    def end_of_stream(self, camera: str) -> list[Message]:
        return self.flush()

    def heartbeat_detail(self) -> dict:
        return {"pending_faces": self.pending_units}
