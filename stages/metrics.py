"""Prometheus metrics of every process, in prometheus_client's multiprocess mode.

The supervisor sets PROMETHEUS_MULTIPROC_DIR (a fresh directory) for itself and every stage
before prometheus_client is imported; each process writes its values there, and the supervisor
serves /metrics by merging them with MultiProcessCollector. Metrics are created per process
with registry=None (no global registry, nothing at import time). Labels carry camera *names*
only, never URIs.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger("facewatch.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the daemon exports. One instance per process; stages use what they need."""

    def __init__(self) -> None:
        c, g, h = Counter, Gauge, Histogram
        kw = {"registry": None}
        self.frames_captured = c("facewatch_frames_captured", "Frames read from a camera",
                                 ["camera"], **kw)
        self.frames_dropped = c("facewatch_frames_dropped", "Frames dropped before detection "
                                "(queue_full: capture's queue overflowed, oldest dropped; "
                                "lost: missing from the sequence at detect; corrupt: "
                                "undecodable frames of a video file, skipped; stale: a newer "
                                "frame of a live camera replaced it at detect; behind: decoded "
                                "but not converted, the pipeline was behind)",
                                ["camera", "reason"], **kw)
        self.frames_processed = c("facewatch_frames_processed", "Frames run through the detector",
                                  ["camera"], **kw)
        self.faces_detected = c("facewatch_faces_detected", "Tracked faces found by the detector",
                                ["camera"], **kw)
        self.faces_rejected = c("facewatch_faces_rejected", "Tracked faces failing the quality "
                                "gate (small: every face; blur: faces chosen to embed)",
                                ["camera", "reason"], **kw)
        self.alignment_fallbacks = c("facewatch_alignment_fallbacks", "Faces cropped from their box "
                                     "because landmarks were missing or implausible", ["camera"], **kw)
        self.faces_embedded = c("facewatch_faces_embedded", "Face crops embedded", ["camera"], **kw)
        self.recognitions = c("facewatch_recognitions", "Track decisions by result",
                              ["camera", "result"], **kw)
        self.events_published = c("facewatch_events_published", "Events published", ["type"], **kw)
        self.event_log_up = g("facewatch_event_log_up", "1 while the event log is written; 0 "
                              "while writes fail (e.g. a full disk) and lines wait in memory",
                              multiprocess_mode="livemax", **kw)
        self.event_log_write_errors = c("facewatch_event_log_write_errors", "Failed attempts to "
                                        "write the event log, by errno name", ["error"], **kw)
        self.event_log_lost = c("facewatch_event_log_lost", "Event lines never written to the "
                                "log (its backlog overflowed while writes failed); subscribers "
                                "got them", **kw)
        self.messages_lost = c("facewatch_messages_lost", "Messages missing from per-sender "
                               "sequences (a stage restarted or a queue overflowed)",
                               ["stage"], **kw)
        self.stage_latency = h("facewatch_stage_latency_seconds", "Processing time of one "
                               "message or batch in a stage", ["stage"],
                               buckets=LATENCY_BUCKETS, **kw)
        self.end_to_end_latency = h("facewatch_end_to_end_latency_seconds", "Capture to publish",
                                    ["camera"], buckets=LATENCY_BUCKETS, **kw)
        self.batch_size = h("facewatch_batch_size", "Items per inference batch", ["stage"],
                            buckets=BATCH_BUCKETS, **kw)
        self.camera_up = g("facewatch_camera_up", "1 while the camera delivers frames",
                           ["camera"], multiprocess_mode="livemax", **kw)
        self.camera_reconnects = c("facewatch_camera_reconnects", "Reconnection attempts",
                                   ["camera"], **kw)
        self.stage_restarts = c("facewatch_stage_restarts", "Stage processes restarted by the "
                                "supervisor", ["stage"], **kw)
        self.stage_up = g("facewatch_stage_up", "1 while the stage process runs and is ready",
                          ["stage"], multiprocess_mode="livemax", **kw)
        self.gallery_people = g("facewatch_gallery_people", "Enrolled people in the gallery "
                                "snapshot in use", multiprocess_mode="livemax", **kw)
        self.gallery_ok = g("facewatch_gallery_ok", "1 while the file at gallery.path is the "
                            "gallery in use; 0 while it is missing or unusable (matching goes "
                            "on with the last good snapshot)", multiprocess_mode="livemax", **kw)
        self.gallery_reloads = c("facewatch_gallery_reloads", "Gallery reloads (changed: new "
                                 "enrollments; replaced: another file at the path; sighup)",
                                 ["reason"], **kw)
        self.gallery_embeddings = g("facewatch_gallery_embeddings", "Enrolled embeddings in the "
                                    "gallery snapshot in use", multiprocess_mode="livemax", **kw)
        self.execution_provider = g("facewatch_execution_provider", "1 for the onnxruntime "
                                    "execution provider a stage runs its model on",
                                    ["stage", "provider"], multiprocess_mode="livemax", **kw)
        self.model_precision = g("facewatch_model_precision", "1 for the precision (fp32, int8) "
                                 "each model of a stage runs at (models.precision)",
                                 ["stage", "model", "precision"], multiprocess_mode="livemax", **kw)


def multiproc_dir_ready() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV)) and Path(os.environ[MULTIPROC_ENV]).is_dir()


def mark_process_dead(pid: int) -> None:
    """Drop a dead process's live gauges (camera_up, stage_up, ...) from the merged view."""
    if multiproc_dir_ready():
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def serve(host: str, port: int):
    """Serve the merged multiprocess metrics at http://host:port/metrics; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
