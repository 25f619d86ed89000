"""Publish: track decisions -> public JSON events on a ZeroMQ PUB socket and a JSONL log.

Each event is one single-frame JSON message (`stages.messages.event_json`; subscribe to b"").
The log gets every event as one line written with a single write() on an O_APPEND descriptor,
so a crash never leaves half a line and concurrent readers (tail -f) see whole events.
"""
from __future__ import annotations

import base64
import os
import time
import uuid
from pathlib import Path

import cv2

from stages.messages import EVENT_SCHEMA, Message, TrackDecision, event_json
from stages.stage import Stage
from stages.transport import CurveServer


class EventLog:
    """Append-only JSONL file: whole lines, one write each, fsync on close.

    Events name people and carry face snapshots: the file is created 0600 and the folders this
    creates 0700 (an existing file or folder keeps the mode its owner gave it)."""

    def __init__(self, path):
        self.path = Path(path)
        for folder in reversed([p for p in self.path.absolute().parents if not p.exists()]):
            folder.mkdir(mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, line: bytes) -> None:
        data = line + b"\n"
        written = os.write(self.fd, data)
        if written != len(data):   # regular files do not short-write short of a full disk
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


class PublishStage(Stage):
    kind = "publish"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pcfg = ctx.config.publish
        self.pub = None
        self.log_file: EventLog | None = None
        self.seq = 0

    def setup(self) -> None:
        curve = None
        if self.pcfg.curve_secret_key_file is not None:
            curve = CurveServer.load(self.pcfg.curve_secret_key_file, self.pcfg.curve_clients_dir)
        self.pub = self.ctx.transport.publisher(self.pcfg.endpoint, hwm=self.pcfg.hwm, curve=curve)
        if self.pcfg.event_log is not None:
            self.log_file = EventLog(self.pcfg.event_log)
        self.log.info("publishing events on %s%s%s", self.pcfg.endpoint,
                      f" (CURVE, server key {curve.public_key.decode()})" if curve else "",
                      f", log {self.pcfg.event_log}" if self.log_file else "")

    def event(self, msg: TrackDecision) -> dict:
        now = time.time()
        event = {
            "schema": EVENT_SCHEMA, "type": msg.type, "seq": self.seq,
            "event_id": str(uuid.uuid4()), "camera": msg.camera, "track_id": msg.track_id,
            "name": msg.name, "person_id": msg.person_id, "similarity": msg.similarity,
            "threshold": msg.threshold, "votes": msg.votes, "bbox": msg.bbox,
            "frame_pts": round(msg.frame_pts, 4), "ts": now, "capture_ts": msg.capture_ts,
            "latency_ms": round((now - msg.capture_ts) * 1000, 1),
        }
        if self.pcfg.snapshots and len(msg.snapshot):
            ok, jpeg = cv2.imencode(".jpg", msg.snapshot[0],
                                    [cv2.IMWRITE_JPEG_QUALITY, self.pcfg.snapshot_quality])
            if ok:
                event["snapshot_jpeg"] = base64.b64encode(jpeg.tobytes()).decode("ascii")
        return event

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, TrackDecision):
            self.log.warning("ignored unexpected %s", msg.KIND)
            return []
        event = self.event(msg)
        data = event_json(event)
        self.pub.send(data)   # PUB never blocks: a slow subscriber loses events at its HWM
        if self.log_file is not None:
            self.log_file.write(data)
        self.seq += 1
        self.metrics.events_published.labels(msg.type).inc()
        if msg.type != "track_ended":
            self.metrics.end_to_end_latency.labels(msg.camera).observe(event["latency_ms"] / 1000)
        self.log.info("%s camera=%s track=%d name=%s similarity=%s latency=%.0f ms", msg.type,
                      msg.camera, msg.track_id, msg.name, msg.similarity, event["latency_ms"])
        return []

    def teardown(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
