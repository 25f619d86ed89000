"""Detector lanes: frames detected side by side on the CPU, one per lane (issue 14).

On the CPU one onnxruntime session does not keep the cores busy: YOLOv8n's convolutions are
small, so its intra-op threads wait on each other, batch or not. Sessions of one thread each,
one frame per call, do: on 2 cores, 1080p clip frames at 640 (`python -m
bench.bench_detector_lanes`, `bench/results/issue14_detector_lanes.json`), int8 ran 27.5
frames/s on one session a frame at a time, 30.6 in batches of 4, 36.3 on two lanes (fp32:
23.0, 24.2, 28.4).

A lane is loaded as the detector is (`detector_from_config`: same file, precision, thresholds
and size) with fewer threads; ~10 MB each. `submit` hands a frame to the next free lane and returns a future, so the detect
stage keeps every lane busy while it tracks and crops the frames already detected, in order.
Lanes are for the CPU execution provider only: a GPU gains from one batched call.
onnxruntime releases the GIL while it runs, so threads suffice.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from facewatch.stages.detections import Detections

log = logging.getLogger("facewatch.detector")
MAX_AUTO_LANES = 4


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return os.cpu_count() or 1


def lane_plan(lanes: int, threads: int, provider: str, cores: int | None = None
              ) -> tuple[int, int]:
    """(lanes, intra-op threads per lane) for `detect.lanes` and `models.threads` (0: auto).
    Auto: one lane per core (at most MAX_AUTO_LANES) on the CPU, the threads shared out
    between them; (0, 0), i.e. batched calls, on other providers or for a single lane."""
    if provider != "CPUExecutionProvider":
        return 0, 0
    budget = threads or cores or usable_cores()
    n = lanes or min(budget, MAX_AUTO_LANES)
    if n <= 1:
        return 0, 0
    return n, max(1, budget // n)


class Doorbell:
    """A pipe that turns readable when a lane finishes a frame: the detect loop sleeps in its
    socket poll until a message or this, instead of checking the lanes on a timer (a 2 ms
    timer cost ~500 idle loop turns a second and up to 2 ms a frame)."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def ring(self, *_) -> None:
        try:
            os.write(self._write, b"\0")
        except (BlockingIOError, OSError):   # full: readable already; closed: shutting down
            pass

    def clear(self) -> None:
        """Empty it before looking at the lanes, so a frame finishing after the look rings anew."""
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class DetectorLanes:
    """`wide`: the stage's own detector, with all its threads; `make_lane()` loads each lane.
    `submit(frame)` runs on the first free lane; `submit(frame, wide=True)` on `wide`. The
    caller never runs both kinds at once: a wide run beside the lanes oversubscribes the cores
    (measured on 2 cores: 7% fewer frames/s, and a live camera's detect step 123 ms against
    85 ms p50)."""

    def __init__(self, wide, lanes: int, make_lane):
        if lanes < 2:
            raise ValueError(f"lanes must be >= 2, got {lanes}")
        self.size = lanes
        self.wide = wide
        self._lanes = [make_lane() for _ in range(lanes)]
        self._free = list(range(lanes))
        self._changed = threading.Condition()
        self._pool = ThreadPoolExecutor(lanes, thread_name_prefix="detect-lane")
        self.bell = Doorbell()

    def submit(self, frame: np.ndarray, wide: bool = False) -> Future:
        """The faces of one frame, detected on a free lane (or the next to free up); `bell`
        rings when it is done."""
        future = self._pool.submit(self._detect_wide if wide else self._detect, frame)
        future.add_done_callback(self.bell.ring)
        return future

    def _detect_wide(self, frame: np.ndarray) -> Detections:
        return self.wide.detect([frame])[0]

    def _detect(self, frame: np.ndarray) -> Detections:
        with self._changed:
            while not self._free:
                self._changed.wait()
            lane = min(self._free)
            self._free.remove(lane)
        try:
            return self._lanes[lane].detect([frame])[0]
        finally:
            with self._changed:
                self._free.append(lane)
                self._changed.notify()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.bell.close()


def detector_and_lanes(models, lanes: int):
    """(detector, lanes or None) for the `models` section and `detect.lanes` (0: auto): the
    detector as `stages.face_detector.detector_from_config` loads it (the wide session), and
    the lanes with `lane_plan`'s threads each."""
    from facewatch.stages.face_detector import detector_from_config
    from facewatch.stages.precision import provider_in_use

    n, threads = lane_plan(lanes, models.threads, provider_in_use(models.providers))
    detector = detector_from_config(models)
    if not n or detector.provider != "CPUExecutionProvider":
        return detector, None
    log.info("detector: %d lanes of %d thread%s", n, threads, "" if threads == 1 else "s")
    return detector, DetectorLanes(detector, n,
                                   lambda: detector_from_config(models, threads=threads))
