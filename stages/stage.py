"""The stage base class and the run loop every pipeline stage shares.

A stage is a small class with `setup / process / teardown` (plus `poll` for timers such as batch
deadlines, and `end_of_stream` to flush one camera). `process` returns the messages to send
downstream, so a stage can be driven in-process by tests without any socket.

The run loop (`Stage.run`) owns the sockets: it reports `ready` and heartbeats to the supervisor,
receives, dispatches, forwards EndOfStream after the stage has flushed that camera, and exits 0
once every camera has ended ("finished") or on SIGTERM after flushing what it holds.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import ClassVar

from facewatch.stages.messages import EndOfStream, Message
from facewatch.stages.metrics import Metrics
from facewatch.stages.transport import ControlClient, Defaults, Endpoints, Receiver, Sender, Transport

IDLE_POLL_S = 0.2   # longest the loop sleeps in recv when no timer is due


class Backoff:
    """Capped exponential backoff with jitter (so restarting peers do not retry in lockstep)."""

    def __init__(self, initial_s: float, max_s: float, factor: float = 2.0, jitter: float = 0.1):
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        self.initial_s, self.max_s, self.factor, self.jitter = initial_s, max_s, factor, jitter
        self.attempts = 0

    def next_delay(self) -> float:
        delay = min(self.max_s, self.initial_s * self.factor ** self.attempts)
        self.attempts += 1
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class StageContext:
    """Everything a stage gets from the worker: config, sockets, metrics, stop signal."""
    name: str                        # e.g. "capture:lobby", "detect"
    kind: str                        # one of daemon.config.STAGE_KINDS
    config: object                   # daemon.config.FacewatchConfig
    transport: Transport
    endpoints: Endpoints
    metrics: Metrics
    control: ControlClient | None = None
    camera: str | None = None        # capture stages only
    ended_cameras: set[str] = field(default_factory=set)   # ended before this process started
    stop: threading.Event = field(default_factory=threading.Event)
    reload: threading.Event = field(default_factory=threading.Event)   # SIGHUP


_libc_trim = None


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim; elsewhere a no-op).

    Frames (6 MB at 1080p), batches and onnxruntime's per-run buffers are freed after each
    batch, but glibc keeps the freed pages for reuse, so a stage's RSS stays at its busiest
    moment (the detect stage: ~30 MB more). Called once per heartbeat (1 s): cheap, and the
    pages a later batch needs are simply faulted in again."""
    global _libc_trim
    if _libc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _libc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):   # not glibc
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)


class Stage:
    """Base of every stage. Subclasses set `kind` and override setup/process/teardown."""
    kind: ClassVar[str] = ""
    # the loop times each process() call into stage_latency; batching stages time their batches
    time_process: ClassVar[bool] = True

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.cfg = ctx.config
        self.metrics = ctx.metrics
        self.log = logging.getLogger(f"facewatch.{ctx.name}")
        self.cameras = {c.name for c in ctx.config.cameras}
        self.ended = set(ctx.ended_cameras) & self.cameras
        self.receiver: Receiver | None = None   # the input socket, once run() opened it

    # --- what a stage implements --------------------------------------------------------
    def setup(self) -> None:
        """Load models, open files. Runs before `ready` is reported."""

    def process(self, msg: Message) -> list[Message]:
        """Handle one input message; return messages for downstream (maybe none yet)."""
        raise NotImplementedError

    def poll(self, now: float) -> list[Message]:
        """Timers: called every loop turn with time.monotonic(); e.g. flush a due batch."""
        return []

    def next_deadline(self) -> float | None:
        """When `poll` next has something to do (time.monotonic()), or None."""
        return None

    def wake(self):
        """An object with `fileno()` that turns readable when `poll` has work that no message
        or deadline announces (work done on another thread), or None."""
        return None

    def flush(self) -> list[Message]:
        """Everything held (pending batches), processed now."""
        return []

    def end_of_stream(self, camera: str) -> list[Message]:
        """A camera ended: flush what is held for it; messages go out before the EndOfStream."""
        return self.flush()

    def teardown(self) -> None:
        """Release resources; called on every exit path."""

    def heartbeat_detail(self) -> dict:
        return {}

    def reload(self) -> None:
        """SIGHUP (forwarded by the supervisor): re-read what can change while running."""
        self.log.debug("SIGHUP: nothing to reload")

    def check_reload(self) -> None:
        if self.ctx.reload.is_set():
            self.ctx.reload.clear()
            self.reload()

    def on_lost(self, msg: Message, count: int) -> None:
        """`count` messages from msg's sender never arrived before `msg` (already counted in
        messages_lost); e.g. detect counts them as dropped frames of that camera."""

    def on_not_sent(self, msg: Message) -> None:
        """`msg` could not be handed downstream (already counted in messages_lost); e.g.
        detect lets its tracks want crops again."""

    # --- the shared loop ----------------------------------------------------------------
    def open_sockets(self) -> tuple[Receiver | None, Sender | None]:
        ep = self.ctx.endpoints
        inp, out = ep.input_of(self.kind), ep.output_of(self.kind)
        receiver = self.ctx.transport.receiver(inp, hwm=self.input_hwm()) if inp else None
        sender = self.ctx.transport.sender(out, self.ctx.name, hwm=self.output_hwm()) if out else None
        return receiver, sender

    def input_hwm(self) -> int:
        return Defaults.DATA_HWM

    def output_hwm(self) -> int:
        return Defaults.DATA_HWM

    def send_all(self, sender: Sender | None, messages: list[Message]) -> None:
        """Send in order. Once one send timed out (downstream down), the rest of this batch is
        only tried without waiting, so a dead neighbour cannot stall this loop (and its
        heartbeats) for one timeout per message."""
        if sender is None:
            return
        blocked = False
        for msg in messages:
            ok = sender.try_send(msg) if blocked else sender.send(msg)
            if not ok:
                blocked = True
                self.metrics.messages_lost.labels(self.kind).inc()
                self.on_not_sent(msg)

    def control(self, type_: str, **fields) -> None:
        if self.ctx.control is not None:
            self.ctx.control.send(type_, **fields)
        if type_ == "heartbeat":
            release_free_memory()

    def run(self) -> int:
        """Receive, process, send until every camera ended or SIGTERM; returns the exit code."""
        receiver, sender = self.open_sockets()
        self.receiver = receiver
        self.setup()
        try:
            self.control("ready")
            self.log.info("ready")
            heartbeat_s = self.cfg.supervisor.heartbeat_s
            next_beat = 0.0
            lost_seen = 0
            while not self.ctx.stop.is_set():
                self.check_reload()
                now = time.monotonic()
                if now >= next_beat:
                    self.control("heartbeat", detail=self.heartbeat_detail())
                    next_beat = now + heartbeat_s
                deadline = self.next_deadline()
                wait = min(IDLE_POLL_S, next_beat - now,
                           IDLE_POLL_S if deadline is None else deadline - now)
                msg = receiver.recv(max(0.0, wait), self.wake()) if receiver else None
                if receiver is not None and receiver.lost != lost_seen:
                    self.metrics.messages_lost.labels(self.kind).inc(receiver.lost - lost_seen)
                    lost_seen = receiver.lost
                out: list[Message] = []
                if isinstance(msg, EndOfStream):
                    out += self.end_of_stream(msg.camera)
                    out.append(EndOfStream(camera=msg.camera, reason=msg.reason))
                elif msg is not None:
                    if receiver.last_gap:
                        self.on_lost(msg, receiver.last_gap)
                    started = time.perf_counter()
                    out += self.process(msg)
                    if self.time_process:
                        self.metrics.stage_latency.labels(self.kind).observe(
                            time.perf_counter() - started)
                out += self.poll(time.monotonic())
                self.send_all(sender, out)
                if isinstance(msg, EndOfStream):
                    self.control("eos", camera=msg.camera, reason=msg.reason)
                    if msg.camera in self.cameras and msg.camera not in self.ended:
                        self.ended.add(msg.camera)
                        self.log.info("camera %s ended (%s); %d of %d ended", msg.camera,
                                      msg.reason, len(self.ended), len(self.cameras))
                if self.ended >= self.cameras:
                    self.send_all(sender, self.flush())
                    self.control("finished")
                    self.log.info("every camera ended; finished")
                    return 0
            # SIGTERM: do not lose what is already here; hand it on and stop
            self.send_all(sender, self.flush())
            self.log.info("stopped on signal")
            return 0
        finally:
            self.teardown()


class BatchingStage(Stage):
    """A stage whose work runs in batches: items gather until `batch_max` units are pending or
    `batch_wait_s` has passed since the first, then `run_batch` gets them all at once."""
    time_process: ClassVar[bool] = False   # batches are timed instead

    def __init__(self, ctx: StageContext, batch_max: int, batch_wait_s: float):
        super().__init__(ctx)
        self.batch_max, self.batch_wait_s = batch_max, batch_wait_s
        self.pending: list = []
        self.pending_units = 0
        self.deadline: float | None = None

    def run_batch(self, items: list) -> list[Message]:
        raise NotImplementedError

    def enqueue(self, item, units: int = 1, urgent: bool = False) -> list[Message]:
        """Add an item; the batch runs now when full, or when `urgent` (nothing is gained by
        waiting, or a first decision waits for it)."""
        self.pending.append(item)
        self.pending_units += units
        if self.deadline is None:
            self.deadline = time.monotonic() + self.batch_wait_s
        return self.flush() if urgent or self.pending_units >= self.batch_max else []

    def next_deadline(self) -> float | None:
        return self.deadline

    def poll(self, now: float) -> list[Message]:
        return self.flush() if self.deadline is not None and now >= self.deadline else []

    def flush(self) -> list[Message]:
        if not self.pending:
            return []
        items, self.pending, self.pending_units, self.deadline = self.pending, [], 0, None
        return self.run_batch(items)
