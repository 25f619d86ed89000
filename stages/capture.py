"""Capture: one process per camera. Reads frames, stamps them, and hands the newest ones on.

- Sources: rtsp:// (any FFmpeg URL), /dev/videoN (V4L2), video files (looped or not).
- A reader thread decodes continuously (a live stream must be drained or it lags), stamps the
  media timestamp (pts, seconds) and the wall clock, applies the fps cap and region of interest,
  and puts frames in a small `DropOldestQueue`. The stage's main thread sends from that queue
  with non-blocking sends; when downstream is slow the queue overflows and the *oldest* frame is
  dropped and counted, so detection always works on recent frames.
- A lost or unopenable source is retried with capped exponential backoff; the camera_up gauge
  and reconnect counter tell the operator. A non-looping file ends with EndOfStream.
- A source that stays connected but sends nothing (a stalled RTSP camera) is noticed by the
  main thread when a read has not returned for `read_timeout_s`: camera_up goes to 0, the
  blocked reader thread is abandoned (what it reads later is thrown away, never counted) and a
  new one reconnects after the backoff.
- `realtime: false` (files only) never drops: the reader blocks until the pipeline takes frames.
- Behind (live sources): a frame must still be decoded (H.264 frames depend on each other), but
  while the queue is full, converting (YUV to BGR), copying and sending newer ones is wasted
  when they will be dropped anyway; then only about two frames per interval at which the
  pipeline takes frames are converted, the others only decoded (`grab`) and counted in
  frames_dropped{reason="behind"} (issue 14, item 3: with 8 live 1080p cameras on 2 cores the
  captures used 1.6 cores, starving the detector).
- Damaged files: a frame that does not decode is skipped (counted as dropped, reason
  "corrupt") and reading goes on; a file that is there but cannot be opened at all (not a
  video, or cut short before its index) and does not change between two attempts ends its
  camera with EndOfStream(reason="error") instead of being retried forever.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time

import cv2
import numpy as np

from facewatch.daemon.config import ConfigError
from facewatch.stages.messages import EndOfStream, VideoFrame
from facewatch.stages.stage import Backoff, Stage
from facewatch.stages.transport import Defaults

log = logging.getLogger("facewatch.capture")
MAX_FILE_READ_ERRORS = 30   # undecodable frames in a row before a file counts as ended
FFMPEG_READ_TIMEOUT_EXTRA_S = 2.0   # FFmpeg's read timeout: read_timeout_s plus this


class _End:
    """Queue sentinel: the source ended for good (a non-looping file, or an unreadable one)."""

    def __init__(self, reason: str):
        self.reason = reason


class DropOldestQueue:
    """A bounded FIFO shared by one producer and one consumer thread.

    Full: `put` drops the oldest item (counted) - or, with block_when_full, waits for room."""

    def __init__(self, maxlen: int, block_when_full: bool = False):
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen, self.block_when_full = maxlen, block_when_full
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item, stop: threading.Event | None = None) -> int:
        """Append; return how many items were dropped to make room (0 or 1)."""
        with self._cond:
            while self.block_when_full and len(self._items) >= self.maxlen:
                if stop is not None and stop.is_set():
                    return 0
                self._cond.wait(0.1)
            dropped = 0
            if len(self._items) >= self.maxlen:
                self._items.popleft()
                dropped = 1
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def get(self, timeout_s: float):
        """Remove and return the oldest item, or None after timeout_s."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def requeue(self, item) -> bool:
        """Put an item that could not be sent back at the front. If newer items filled the
        queue meanwhile, it is the oldest: drop it (counted) and return False."""
        with self._cond:
            if len(self._items) >= self.maxlen and not self.block_when_full:
                return False   # the caller counts it
            self._items.appendleft(item)
            self._cond.notify_all()
            return True


NOT_CONVERTED = np.zeros((0, 0, 3), np.uint8)   # VideoSource.read(convert=False): decoded only


class VideoSource:
    """cv2.VideoCapture around one camera config: open with timeouts, read with timestamps."""

    def __init__(self, camera, capture_cfg):
        self.camera, self.cfg = camera, capture_cfg
        self.cap: cv2.VideoCapture | None = None
        self.fps = 0.0
        self.loop_offset = 0.0     # media time of previous loops, so pts stays monotonic
        self.last_pts = -1.0
        self.opened_at = 0.0
        self.skipped = 0           # undecodable frames skipped in files (taken by the caller)
        self.unreadable_since: tuple | None = None   # (size, mtime) of a file that won't open

    def _continue_timeline(self) -> None:
        """After a reopen or a loop, pts restarts at 0 in the source: keep ours monotonic."""
        if self.last_pts >= 0:
            self.loop_offset = self.last_pts + 1.0 / (self.fps or 25.0)

    def open(self) -> bool:
        self.close()
        self._continue_timeline()
        try:
            uri = self.camera.open_uri()
        except ConfigError as exc:   # e.g. ${CAM_PASSWORD} missing from the service environment
            log.error("camera %s: %s", self.camera.name, exc)
            return False
        if self.camera.kind == "device":
            cap = cv2.VideoCapture(int(uri[len("/dev/video"):]), cv2.CAP_V4L2)
        else:
            if self.camera.kind == "file" and not os.path.isfile(uri):
                return False
            # FFmpeg's own read timeout is set later than ours: when it fires, OpenCV returns
            # the last frame again (twice, before it fails), which would count as captured.
            # CaptureStage.check_stall notices the stall at read_timeout_s instead.
            read_ms = int((self.cfg.read_timeout_s + FFMPEG_READ_TIMEOUT_EXTRA_S) * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_ms]
            if self.cfg.decode_threads:   # 0: OpenCV's default (capture.decode_threads)
                params += [cv2.CAP_PROP_N_THREADS, self.cfg.decode_threads]
            cap = cv2.VideoCapture(uri, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            return False
        self.unreadable_since = None
        self.cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else 25.0
        self.opened_at = time.monotonic()
        return True

    def unreadable_file(self) -> bool:
        """After a failed open: True when the file is there, not empty, and unchanged since the
        previous failed open, so it is damaged rather than still being written."""
        if self.camera.kind != "file":
            return False
        try:
            st = os.stat(self.camera.open_uri())
        except (OSError, ConfigError):
            self.unreadable_since = None
            return False
        now = (st.st_size, st.st_mtime_ns)
        before, self.unreadable_since = self.unreadable_since, now
        return st.st_size > 0 and before == now

    def _read_one(self) -> tuple[bool, np.ndarray | None]:
        ok, frame = self.cap.read() if self.cap is not None else (False, None)
        if ok and frame is not None or self.camera.kind != "file" or self.cap is None:
            return ok, frame
        # A file: one undecodable frame (damaged data) must not end it; the real end fails
        # every time, which costs only these few extra reads once per file.
        for skipped in range(1, MAX_FILE_READ_ERRORS + 1):
            ok, frame = self.cap.read()
            if ok and frame is not None:
                self.skipped += skipped
                return ok, frame
        return False, None

    def read(self, convert: bool = True) -> tuple[np.ndarray | None, float]:
        """(frame, pts seconds), or (None, 0) at the end of the stream or on an error. With
        `convert` False the frame is only decoded (grab) and NOT_CONVERTED comes back instead
        of pixels (a failing grab falls back to a normal read, which knows errors and ends)."""
        if not convert and self.cap is not None and self.cap.grab():
            return NOT_CONVERTED, self._pts()
        ok, frame = self._read_one()
        if not ok or frame is None:
            return None, 0.0
        return frame, self._pts()

    def _pts(self) -> float:
        pts = self.loop_offset + self.cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
        if pts <= self.last_pts:   # some streams report no or repeated timestamps
            pts = self.last_pts + 1.0 / self.fps
        self.last_pts = pts
        return pts

    def rewind(self) -> bool:
        """Start a file again (loop: true); pts continues from where it was."""
        if self.cap is not None and self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            self._continue_timeline()
            return True
        return self.open()

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class CaptureStage(Stage):
    kind = "capture"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.camera = ctx.config.camera(ctx.camera)
        self.ccfg = ctx.config.capture
        self.queue = DropOldestQueue(self.ccfg.queue_size, block_when_full=not self.camera.realtime)
        self.source = VideoSource(self.camera, self.ccfg)
        self.backoff = Backoff(self.ccfg.reconnect_initial_s, self.ccfg.reconnect_max_s)
        self.frame_index = 0
        self.frames_read = 0
        self.reconnects = 0
        self.up = False
        self._reader: threading.Thread | None = None
        self._generation = 0              # bumped when a stalled reader is abandoned
        self._read_started: tuple[int, float] | None = None   # (generation, monotonic) of a read
        self._labels = (self.camera.name,)
        self.take_interval = 0.0          # EMA of the interval between frames sent (main thread)
        self._last_taken = None
        self._last_converted = 0.0

    def output_hwm(self) -> int:
        return Defaults.FRAME_SNDHWM

    def setup(self) -> None:
        self.metrics.camera_up.labels(*self._labels).set(0)   # exported before it connects
        if self.camera.kind == "stream":
            # read by OpenCV when a capture is opened; one camera per process, so per-process env
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS",
                                  f"rtsp_transport;{self.ccfg.rtsp_transport}")
        self._start_reader(self.source, delay=0.0)

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self.metrics.camera_up.labels(*self._labels).set(1 if up else 0)

    # --- reader thread ------------------------------------------------------------------
    def _start_reader(self, source: VideoSource, delay: float) -> None:
        """A reader thread of a new generation; an older one still blocked in a read is left to
        end by itself (it is never joined, and what it reads later is thrown away)."""
        self._generation += 1
        self._read_started = None
        self._reader = threading.Thread(target=self._read_loop, args=(self._generation, source,
                                                                      delay),
                                        name=f"read-{self.camera.name}-{self._generation}",
                                        daemon=True)
        self._reader.start()

    def _current(self, gen: int) -> bool:
        return gen == self._generation and not self.ctx.stop.is_set()

    def _read_loop(self, gen: int, source: VideoSource, delay: float) -> None:
        stop = self.ctx.stop
        name, safe = self.camera.name, self.camera.safe_uri
        try:
            if delay and stop.wait(delay):
                return
            while self._current(gen):
                opened = source.open()
                if not self._current(gen):
                    return
                if not opened:
                    self._set_up(False)
                    if source.unreadable_file():
                        self.log.error("cannot read video file %s (not a video, or cut short "
                                       "before its index); camera %s ends", safe, name)
                        self.queue.put(_End("error"), stop)
                        return
                    delay = self.backoff.next_delay()
                    self.reconnects += 1
                    self.metrics.camera_reconnects.labels(name).inc()
                    self.log.warning("cannot open %s; retrying in %.1f s", safe, delay)
                    stop.wait(delay)
                    continue
                self.log.info("opened %s (%.1f fps)", safe, source.fps)
                ended = self._read_frames(gen, source)
                if not self._current(gen):
                    return
                if ended:
                    self.log.info("end of file %s after %d frames", safe, self.frames_read)
                    self.queue.put(_End("eof"), stop)
                    return
                self._set_up(False)
                delay = self.backoff.next_delay()
                self.reconnects += 1
                self.metrics.camera_reconnects.labels(name).inc()
                self.log.warning("lost %s; reconnecting in %.1f s", safe, delay)
                stop.wait(delay)
        except Exception:   # the main thread notices the dead reader and exits non-zero
            if gen == self._generation:
                self.log.exception("reader thread failed")
        finally:
            source.close()

    def _read_frames(self, gen: int, source: VideoSource) -> bool:
        """Read until the source fails (False) or a non-looping file ends (True)."""
        stop, cam = self.ctx.stop, self.camera
        pace = cam.kind == "file" and cam.realtime
        min_gap = 1.0 / cam.fps_cap if cam.fps_cap else 0.0
        last_sent_pts = None
        start_wall = start_pts = None
        while not stop.is_set():
            started = time.monotonic()
            self._read_started = (gen, started)   # watched by the main thread (check_stall)
            convert = self._convert_next(started)
            frame, pts = source.read(convert)
            if gen != self._generation:   # declared stalled meanwhile: this frame is stale
                return False
            self._read_started = None
            took = time.monotonic() - started
            if frame is not None and cam.kind != "file" and took > self.ccfg.read_timeout_s:
                # the main thread was late: a frame after a timed-out read is the old one again
                self.log.warning("a read of %s took %.1f s (capture.read_timeout_s %.1f): "
                                 "stalled", cam.safe_uri, took, self.ccfg.read_timeout_s)
                return False
            if frame is None:
                if cam.kind != "file":
                    return False
                if not cam.loop:
                    return True
                if not source.rewind():
                    return False
                continue
            if source.skipped:
                self.log.warning("skipped %d undecodable frame(s) of %s", source.skipped,
                                 cam.safe_uri)
                self.metrics.frames_dropped.labels(cam.name, "corrupt").inc(source.skipped)
                source.skipped = 0
            wall = time.time()
            self.frames_read += 1
            self.metrics.frames_captured.labels(cam.name).inc()
            if self.frames_read == 1 or not self.up:
                self._set_up(True)
                self.backoff.reset()
            if pace:   # a file played like a camera: no faster than its own timestamps
                if start_wall is None:
                    start_wall, start_pts = time.monotonic(), pts
                delay = start_wall + (pts - start_pts) - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return False
                wall = time.time()
            if frame is NOT_CONVERTED:   # behind: decoded, not converted nor sent
                self.metrics.frames_dropped.labels(cam.name, "behind").inc()
                self.frame_index += 1   # frame_index counts frames read, sent or not
                continue
            self._last_converted = time.monotonic()
            if min_gap and last_sent_pts is not None and pts - last_sent_pts < min_gap * 0.999:
                continue   # fps cap: skip, not a drop
            last_sent_pts = pts
            self.queue.put(self._message(frame, pts, wall), stop)
            if self.queue.dropped:
                self.metrics.frames_dropped.labels(cam.name, "queue_full").inc(self.queue.dropped)
                self.queue.dropped = 0
        return False

    def _convert_next(self, now: float) -> bool:
        """Whether the reader converts the next frame: always, unless the source is live, its
        queue is full (the frame would push an older one out unsent) and one was converted
        within half the interval at which the pipeline takes frames (so the one it takes next
        is at most that much older)."""
        if not self.camera.realtime or len(self.queue) < self.queue.maxlen or \
                self._last_taken is None:
            return True
        return now - self._last_converted >= self.take_interval / 2

    def _taken(self) -> None:
        """The main thread sent a frame: the interval at which the pipeline takes them."""
        now = time.monotonic()
        if self._last_taken is not None:
            gap = now - self._last_taken
            self.take_interval = gap if not self.take_interval else \
                0.7 * self.take_interval + 0.3 * gap
        self._last_taken = now

    def check_stall(self, now: float) -> None:
        """A read that has not returned for read_timeout_s (a stream that stays connected but
        sends nothing; FFmpeg's own timeout fires only after several times that): the camera is
        down, the blocked reader is abandoned and a new one reconnects after the usual backoff."""
        reading = self._read_started
        if reading is None or reading[0] != self._generation:
            return
        waited = now - reading[1]
        if waited <= self.ccfg.read_timeout_s:
            return
        self._set_up(False)
        delay = self.backoff.next_delay()
        self.reconnects += 1
        self.metrics.camera_reconnects.labels(self.camera.name).inc()
        self.log.warning("no frame from %s for %.1f s (capture.read_timeout_s %.1f): stalled; "
                         "reconnecting in %.1f s", self.camera.safe_uri, waited,
                         self.ccfg.read_timeout_s, delay)
        stalled, self.source = self.source, VideoSource(self.camera, self.ccfg)
        self.source.last_pts, self.source.fps = stalled.last_pts, stalled.fps   # pts go on
        self.source.loop_offset = stalled.loop_offset
        self._start_reader(self.source, delay)

    def _message(self, frame: np.ndarray, pts: float, wall: float) -> VideoFrame:
        h, w = frame.shape[:2]
        x1 = y1 = 0
        if self.camera.roi is not None:
            x1, y1, x2, y2 = self.camera.roi
            x1, y1, x2, y2 = min(x1, w - 1), min(y1, h - 1), min(x2, w), min(y2, h)
            frame = np.ascontiguousarray(frame[y1:y2, x1:x2])
        msg = VideoFrame(camera=self.camera.name, frame_index=self.frame_index, pts=pts,
                         wall_ts=wall, frame_width=w, frame_height=h, roi_x=x1, roi_y=y1,
                         image=frame)
        self.frame_index += 1
        return msg

    def heartbeat_detail(self) -> dict:
        return {"up": self.up, "frames": self.frames_read, "reconnects": self.reconnects}

    # --- main thread: send ------------------------------------------------------------
    def run(self) -> int:
        _, sender = self.open_sockets()
        self.setup()
        try:
            self.control("ready")
            next_beat = 0.0
            while not self.ctx.stop.is_set():
                self.check_reload()
                now = time.monotonic()
                self.check_stall(now)
                if now >= next_beat:
                    self.control("heartbeat", detail=self.heartbeat_detail())
                    next_beat = now + self.cfg.supervisor.heartbeat_s
                if not self._reader.is_alive() and not len(self.queue):
                    self.log.error("reader thread died")
                    return 1
                item = self.queue.get(timeout_s=0.1)
                if item is None:
                    continue
                if isinstance(item, _End):
                    sender.send(EndOfStream(camera=self.camera.name, reason=item.reason))
                    self.control("eos", camera=self.camera.name, reason=item.reason)
                    self.control("finished")
                    return 0
                if not self.camera.realtime:   # lossless file: backpressure instead of drops
                    while not sender.try_send(item):
                        if self.ctx.stop.is_set():
                            break
                        sender.wait_writable(0.1)
                    continue
                if not sender.try_send(item):
                    # downstream busy: keep the frame unless newer ones already filled the queue
                    if not self.queue.requeue(item):
                        self.metrics.frames_dropped.labels(self.camera.name, "queue_full").inc()
                    sender.wait_writable(0.02)
                else:
                    self._taken()
            # SIGTERM: frames already sent will be processed; tell downstream this camera ended
            sender.send(EndOfStream(camera=self.camera.name, reason="shutdown"), timeout_s=2.0)
            self.control("eos", camera=self.camera.name, reason="shutdown")
            return 0
        finally:
            self.ctx.stop.set()
            self._set_up(False)
            self.teardown()
