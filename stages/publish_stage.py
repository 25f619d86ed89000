"""Publish: track decisions -> public JSON events on a ZeroMQ PUB socket and a JSONL log.

Each event is one single-frame JSON message (`stages.messages.event_json`; subscribe to b"").
The log gets every event as one line written with a single write() on an O_APPEND descriptor,
so a crash never leaves half a line and concurrent readers (tail -f) see whole events. Events go
to subscribers first: a log that cannot be written (full disk) never holds them back (EventLog).
"""
from __future__ import annotations

import base64
import collections
import errno
import logging
import os
import time
import uuid
from pathlib import Path

from facewatch.stages.messages import EVENT_SCHEMA, Message, TrackDecision, event_json, timing_ms
from facewatch.stages.run_state import RunCounters
from facewatch.stages.stage import Stage
from facewatch.stages.errors import SetupError
from facewatch.stages.transport import AddressInUse, CurveServer


class EventLog:
    """Append-only JSONL file: whole lines, one write each, fsync on close.

    Events name people and carry face snapshots: the file is created 0600 and the folders this
    creates 0700 (an existing file or folder keeps the mode its owner gave it).

    The log never stops publishing: a write that fails (disk full, file size limit, I/O error,
    a folder that went away) is undone to the last whole line, the line is kept in a bounded
    backlog (oldest dropped first, counted) and the write is retried every `RETRY_S` (on the
    next event or the stage's timer) until it succeeds; the change of state is logged once each
    way and exported (facewatch_event_log_up, _write_errors_total, _lost_total). `reopen()`
    (SIGHUP: logrotate's postrotate) and `check()` (a renamed or deleted file, noticed by its
    inode) continue in a new file at the configured path.
    """
    RETRY_S = 1.0                   # a failing log is retried this often, not on every event
    BACKLOG_BYTES = 8 * 2**20       # lines kept in memory while the log cannot be written
    CHECK_S = 1.0                   # how often the path's identity is compared with the fd's

    def __init__(self, path, metrics=None, log: logging.Logger | None = None):
        self.path = Path(path)
        self.metrics, self.log = metrics, log or logging.getLogger("facewatch.publish")
        self.fd: int | None = None
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_bytes = 0
        self.lost = 0                # lines dropped from the backlog in this failing period
        self.error: str | None = None   # why the log is failing; None while it is writable
        self.next_retry = 0.0
        self.next_check = 0.0
        self._set_up(True)
        try:
            self._open()
        except OSError as exc:
            self._failed(exc)

    # --- state --------------------------------------------------------------------------
    def _set_up(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.event_log_up.set(1 if up else 0)

    def _failed(self, exc: OSError) -> None:
        self.next_retry = time.monotonic() + self.RETRY_S
        name = errno.errorcode.get(exc.errno or 0, "error")
        if self.metrics is not None:
            self.metrics.event_log_write_errors.labels(name).inc()
        text = exc.strerror or str(exc)
        if self.error is None:
            self.log.error("event log %s: cannot write (%s); events are still published to "
                           "subscribers; keeping up to %d MiB of lines and retrying every "
                           "%.0f s", self.path, text, self.BACKLOG_BYTES >> 20, self.RETRY_S)
            self._set_up(False)
        self.error = text

    def _recovered(self) -> None:
        self.log.warning("event log %s: writing again%s", self.path,
                         f"; {self.lost} line(s) were dropped meanwhile (backlog full)"
                         if self.lost else "; no line lost")
        self.error, self.lost = None, 0
        self._set_up(True)

    # --- file ---------------------------------------------------------------------------
    def _open(self) -> None:
        for folder in reversed([p for p in self.path.absolute().parents if not p.exists()]):
            folder.mkdir(mode=0o700, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.next_check = time.monotonic() + self.CHECK_S

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            self.log.warning("event log %s: fsync failed: %s", self.path, exc.strerror)
        os.close(fd)

    def _write_line(self, data: bytes) -> None:
        """One whole line or nothing: a short write is cut back to where the line started."""
        if self.fd is None:
            self._open()
        start = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, data)
        except OSError:
            self._truncate(start)
            raise
        if written != len(data):   # regular files short-write only at a full disk or size limit
            self._truncate(start)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: short write, {written} "
                                        f"of {len(data)} bytes")

    def _truncate(self, size: int) -> None:
        try:
            if os.fstat(self.fd).st_size > size:
                os.ftruncate(self.fd, size)
        except OSError as exc:   # leave it to the next attempt, which starts by cutting again
            self.log.warning("event log %s: cannot remove a partial line: %s", self.path,
                             exc.strerror)

    def _flush(self) -> None:
        while self.backlog:
            self._write_line(self.backlog[0])
            self.backlog_bytes -= len(self.backlog.popleft())

    # --- API ----------------------------------------------------------------------------
    def write(self, line: bytes) -> bool:
        """Log one event line; False when it is held in the backlog (or was dropped)."""
        data = line + b"\n"
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        while self.backlog_bytes > self.BACKLOG_BYTES and len(self.backlog) > 1:
            self.backlog_bytes -= len(self.backlog.popleft())
            self.lost += 1
            if self.metrics is not None:
                self.metrics.event_log_lost.inc()
        if self.error is not None and time.monotonic() < self.next_retry:
            return False
        return self.retry()

    def retry(self) -> bool:
        """Write what is held; True when nothing is left."""
        try:
            if self.fd is None:
                self._open()
            else:
                self.check()
            self._flush()
        except OSError as exc:
            self._failed(exc)
            return False
        if self.error is not None:
            self._recovered()
        return True

    def poll(self, now: float) -> None:
        """The stage's timer: retry a failing log, follow a rotated one."""
        if self.error is not None and now >= self.next_retry:
            self.retry()
        elif self.error is None and now >= self.next_check:
            self.retry()

    def next_deadline(self) -> float:
        return self.next_retry if self.error is not None else self.next_check

    def check(self) -> None:
        """Reopen when the path no longer names the open file (renamed by logrotate, deleted)."""
        if self.fd is None or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + self.CHECK_S
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        ours = os.fstat(self.fd)
        if now is None or (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
            self.log.info("event log %s was %s; continuing in a new file", self.path,
                          "removed" if now is None else "replaced")
            self._close_fd()
            self._open()

    def reopen(self) -> None:
        """Close and open the configured path again (SIGHUP, after logrotate)."""
        self._close_fd()
        self.next_check = 0.0
        self.log.info("event log %s reopened", self.path)
        self.retry()

    def close(self) -> None:
        self.retry()
        if self.backlog:
            self.log.error("event log %s: %d line(s) could not be written before exit (%s)",
                           self.path, len(self.backlog), self.error)
        self._close_fd()


class PublishStage(Stage):
    kind = "publish"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.pcfg = ctx.config.publish
        self.pub = None
        self.log_file: EventLog | None = None
        self.counters: RunCounters | None = None
        self.seq = -1

    def setup(self) -> None:
        self.counters = RunCounters(self.cfg.runtime.dir)
        curve = None
        if self.pcfg.curve_secret_key_file is not None:
            curve = CurveServer.load(self.pcfg.curve_secret_key_file, self.pcfg.curve_clients_dir)
        try:
            self.pub = self.ctx.transport.publisher(self.pcfg.endpoint, hwm=self.pcfg.hwm,
                                                    curve=curve)
        except AddressInUse:   # stop the daemon naming the key, instead of restarting forever
            raise SetupError(f"publish.endpoint {self.pcfg.endpoint} is already in use by "
                             f"another process; stop it or choose another port") from None
        if self.pcfg.event_log is not None:
            self.log_file = EventLog(self.pcfg.event_log, self.metrics, self.log)
        self.log.info("publishing events on %s%s%s", self.pcfg.endpoint,
                      f" (CURVE, server key {curve.public_key.decode()})" if curve else "",
                      f", log {self.pcfg.event_log}" if self.log_file else "")

    def event(self, msg: TrackDecision) -> dict:
        now = time.time()
        event = {
            "schema": EVENT_SCHEMA, "type": msg.type, "seq": self.seq,
            "run_id": self.counters.run_id,
            "event_id": str(uuid.uuid4()), "camera": msg.camera, "track_id": msg.track_id,
            "name": msg.name, "person_id": msg.person_id, "similarity": msg.similarity,
            "threshold": msg.threshold, "votes": msg.votes, "bbox": msg.bbox,
            "frame_pts": round(msg.frame_pts, 4), "ts": now, "capture_ts": msg.capture_ts,
            "latency_ms": round((now - msg.capture_ts) * 1000, 1),
            "revision": msg.revision,
        }
        if msg.first_pts is not None:
            event["first_pts"] = round(msg.first_pts, 4)
        if msg.stamps:
            event["timing_ms"] = timing_ms(msg.capture_ts, msg.stamps, now)
        if self.pcfg.snapshots and len(msg.snapshot):
            import cv2   # only with snapshots: OpenCV is ~17 MB of RSS this stage otherwise skips

            ok, jpeg = cv2.imencode(".jpg", msg.snapshot[0],
                                    [cv2.IMWRITE_JPEG_QUALITY, self.pcfg.snapshot_quality])
            if ok:
                event["snapshot_jpeg"] = base64.b64encode(jpeg.tobytes()).decode("ascii")
        return event

    def process(self, msg: Message) -> list[Message]:
        if not isinstance(msg, TrackDecision):
            self.log.warning("ignored unexpected %s", msg.KIND)
            return []
        # Taken before sending: a crash may leave a gap in seq (an event possibly lost), never
        # a repeated number, and a restarted publish goes on from here (stages.run_state).
        self.seq = self.counters.take("event_seq")
        event = self.event(msg)
        data = event_json(event)
        self.pub.send(data)   # PUB never blocks: a slow subscriber loses events at its HWM
        if self.log_file is not None:
            self.log_file.write(data)
        self.metrics.events_published.labels(msg.type).inc()
        if msg.type != "track_ended":
            self.metrics.end_to_end_latency.labels(msg.camera).observe(event["latency_ms"] / 1000)
        self.log.info("%s camera=%s track=%d name=%s similarity=%s latency=%.0f ms", msg.type,
                      msg.camera, msg.track_id, msg.name, msg.similarity, event["latency_ms"])
        return []

    def poll(self, now: float) -> list[Message]:
        if self.log_file is not None:
            self.log_file.poll(now)
        return []

    def next_deadline(self) -> float | None:
        return None if self.log_file is None else self.log_file.next_deadline()

    def reload(self) -> None:
        """SIGHUP: continue the event log in the file now at its path (logrotate)."""
        if self.log_file is not None:
            self.log_file.reopen()

    def teardown(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        if self.counters is not None:
            self.counters.close()
