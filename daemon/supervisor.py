"""The supervisor: one process per stage, restarts with backoff, orderly drain, sd_notify.

- Starts every stage as `python -m daemon.worker --stage KIND ...` (one capture per camera),
  each in its own session so a terminal's Ctrl-C reaches only the supervisor.
- Stages report on the control socket (one JSON shape, stages.messages.Control): ready,
  heartbeat, eos, finished, error. READY=1 goes to systemd once every stage reported ready;
  WATCHDOG=1 while the loop runs and no core stage has been down for `unhealthy_after_s`.
- A stage that exits without having finished is restarted after a capped exponential backoff
  (reset once it ran `restart_reset_s`), counted in facewatch_stage_restarts_total. A stage
  that stops heartbeating, or never gets ready, is killed and restarted the same way. One
  failing camera only ever restarts its own capture process.
- SIGHUP is forwarded to every ready stage, which reloads what it can (match: the gallery;
  publish: reopens the event log for logrotate); it never stops the daemon.
- SIGTERM/SIGINT: STOPPING=1, captures get SIGTERM and send EndOfStream down the pipeline, so
  every frame already captured is processed and its events flushed; each stage exits when
  every camera's EndOfStream has passed it. Stages still running at `shutdown_timeout_s` get
  SIGTERM (flush and exit), then SIGKILL. Exit status 0.
- When every source is a file that does not loop, the stages finish by themselves after the
  last EndOfStream and the supervisor exits 0, or 69 (EXIT_CAMERAS_FAILED) when every camera
  ended with an error (a file that cannot be read at all).
- A stage that cannot start and that a restart would not fix (exit status 78, EXIT_SETUP: a
  missing, corrupt or wrong model file, an unreadable key) is not restarted: its reason is
  logged, the other stages are drained as on SIGTERM, and the supervisor exits 78.
- <runtime>/status.json: the stage pids and states, rewritten atomically on every change.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from facewatch.daemon.config import FacewatchConfig
from facewatch.daemon.sdnotify import Notifier
from facewatch.daemon.worker import SUPERVISOR_PID_ENV
from facewatch.stages.errors import EXIT_CAMERAS_FAILED, EXIT_SETUP, SetupError
from facewatch.stages.messages import EndOfStream
from facewatch.stages import run_state
from facewatch.stages.metrics import Metrics, mark_process_dead, serve
from facewatch.stages.stage import Backoff
from facewatch.stages.transport import Endpoints, Transport, tcp_bind_problem

log = logging.getLogger("facewatch.supervisor")

LOOP_S = 0.05          # main loop period: signals, control messages, child exits
KILL_GRACE_S = 0.8     # after the drain deadline: SIGTERM, then SIGKILL this much later
UPSTREAM = {"detect": "capture", "embed": "detect", "match": "embed", "publish": "match"}
START_ORDER = ("publish", "match", "embed", "detect", "capture")   # binders before connectors


@dataclass
class StageProc:
    name: str
    kind: str
    camera: str | None
    backoff: Backoff
    proc: subprocess.Popen | None = None
    state: str = "pending"        # pending, starting, running, backoff, finished, stopped, failed
    ready: bool = False
    ever_ready: bool = False
    finished: bool = False        # reported "finished" (every camera ended) before exiting
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    next_start: float = 0.0
    down_since: float | None = None
    restarts: int = 0
    last_exit: int | None = None
    last_error: str | None = None
    eos_forwarded: set[str] = field(default_factory=set)
    end_reasons: dict[str, str] = field(default_factory=dict)   # camera -> EndOfStream reason
    killed_for: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Supervisor:
    def __init__(self, cfg: FacewatchConfig, effective_config: Path, runtime_dir: Path,
                 notifier: Notifier | None = None, metrics: Metrics | None = None,
                 verbose: bool = False):
        self.cfg, self.config_path, self.runtime_dir = cfg, Path(effective_config), Path(runtime_dir)
        self.scfg = cfg.supervisor
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        self.verbose = verbose
        self.endpoints = Endpoints.from_config(cfg)
        self.transport = Transport()
        self.status_path = self.runtime_dir / "status.json"
        local = set(self.scfg.stages or ("capture", "detect", "embed", "match", "publish"))
        self.stages: dict[str, StageProc] = {}
        for kind in START_ORDER:
            if kind not in local:
                continue
            for camera in ([c.name for c in cfg.cameras] if kind == "capture" else [None]):
                name = f"capture:{camera}" if kind == "capture" else kind
                self.stages[name] = StageProc(name, kind, camera,
                                              Backoff(self.scfg.restart_initial_s,
                                                      self.scfg.restart_max_s))
        self.signal_received: int | None = None
        self.fatal: str | None = None   # why the daemon stops with EXIT_SETUP
        self.signal_count = 0
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.term_sent = False
        self.ready_sent = False
        self.next_watchdog = 0.0
        self.injected_eos: dict[str, set[str]] = {}     # endpoint -> cameras ended by us
        self._injectors: dict = {}
        self._status_dirty = True
        self.metrics_server = None

    # --- processes ----------------------------------------------------------------------
    def _env(self) -> dict:
        env = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(key, None)             # only the supervisor talks to systemd
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        root = str(Path(__file__).resolve().parent.parent)   # works from a source checkout too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def _ended_inputs(self, st: StageProc) -> set[str]:
        """Cameras whose EndOfStream already went into this stage's input (it may have been
        lost with a crashed process: the restarted one must not wait for it)."""
        if st.kind == "capture":
            return set()
        ended = set(self.injected_eos.get(self.endpoints.input_of(st.kind), set()))
        for other in self.stages.values():
            if other.kind == UPSTREAM[st.kind]:
                ended |= other.eos_forwarded
        return ended

    def start(self, st: StageProc) -> None:
        cmd = [sys.executable, "-m", "facewatch.daemon.worker", "--stage", st.kind,
               "--config", str(self.config_path)]
        if st.camera:
            cmd += ["--camera", st.camera]
        ended = self._ended_inputs(st)
        if ended:
            cmd += ["--ended-cameras", ",".join(sorted(ended))]
        if self.verbose:
            cmd.append("--verbose")
        st.proc = subprocess.Popen(cmd, env=self._env(), start_new_session=True,
                                   stdin=subprocess.DEVNULL)
        now = time.monotonic()
        st.state, st.ready, st.finished, st.killed_for = "starting", False, False, None
        st.started_at = st.last_heartbeat = now
        log.info("started %s (pid %d)", st.name, st.proc.pid)
        self._status_dirty = True

    def _exit_text(self, rc: int) -> str:
        return f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"

    def on_exit(self, st: StageProc, rc: int, now: float) -> None:
        pid = st.proc.pid
        mark_process_dead(pid)
        self.metrics.stage_up.labels(st.name).set(0)
        st.last_exit, st.ready, st.proc = rc, False, None
        self._status_dirty = True
        ran = now - st.started_at
        if st.finished:
            st.state = "finished"
            if rc == 0:
                log.info("%s finished (pid %d)", st.name, pid)
            else:
                # Its streams had ended and been reported; a crash on the way out (seen: FFmpeg
                # aborting in teardown after a truncated file) must not replay a finished file.
                log.warning("%s finished, then exited with status %d while shutting down (pid %d); "
                            "not restarting it", st.name, rc, pid)
            return
        if rc == EXIT_SETUP:   # a restart would fail the same way: stop the daemon instead
            st.state = "failed"
            why = st.last_error or "setup failed"
            self.fatal = self.fatal or f"{st.name}: {why}"
            log.error("%s (pid %d) %s; not restarting it", st.name, pid, why)
            return
        if self.shutting_down:
            st.state = "stopped"
            log.info("%s stopped (pid %d, %s)", st.name, pid, self._exit_text(rc))
            return
        if ran >= self.scfg.restart_reset_s:
            st.backoff.reset()
        delay = st.backoff.next_delay()
        st.state, st.next_start = "backoff", now + delay
        st.down_since = st.down_since or now
        st.restarts += 1
        self.metrics.stage_restarts.labels(st.name).inc()
        why = f" ({st.killed_for})" if st.killed_for else ""
        log.warning("%s (pid %d) exited with %s after %.1f s%s; restart #%d in %.1f s", st.name,
                    pid, self._exit_text(rc), ran, why, st.restarts, delay)

    def kill(self, st: StageProc, sig: int, reason: str) -> None:
        if st.proc is None or st.proc.poll() is not None:
            return
        st.killed_for = reason
        log.warning("sending %s to %s (pid %d): %s", signal.Signals(sig).name, st.name,
                    st.proc.pid, reason)
        try:
            st.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    # --- control messages ---------------------------------------------------------------
    def on_control(self, msg, now: float) -> None:
        st = self.stages.get(msg.stage)
        if st is None or st.proc is None or msg.pid != st.proc.pid:
            return                      # another host's stage, or a message from a dead process
        st.last_heartbeat = now
        if msg.type == "ready":
            st.ready = st.ever_ready = True
            st.state, st.down_since = "running", None
            self.metrics.stage_up.labels(st.name).set(1)
            log.info("%s ready (pid %d)", st.name, msg.pid)
            self._status_dirty = True
        elif msg.type == "eos" and msg.camera:
            st.eos_forwarded.add(msg.camera)
            if st.kind == "capture" and msg.reason:
                st.end_reasons[msg.camera] = msg.reason
        elif msg.type == "finished":
            st.finished = True
        elif msg.type == "error":
            st.last_error = msg.reason
            log.error("%s reports: %s", st.name, msg.reason)
            self._status_dirty = True

    # --- EndOfStream on behalf of stages that cannot send it ----------------------------
    def inject_eos(self, endpoint: str, cameras: list[str]) -> None:
        sent = self.injected_eos.setdefault(endpoint, set())
        todo = [c for c in cameras if c not in sent]
        if not todo:
            return
        if endpoint not in self._injectors:
            self._injectors[endpoint] = self.transport.sender(endpoint, "supervisor")
        for camera in todo:
            self._injectors[endpoint].send(EndOfStream(camera=camera, reason="shutdown"),
                                           timeout_s=0.5)
            sent.add(camera)
        log.info("sent EndOfStream for %s to %s on behalf of a stopped stage", todo, endpoint)

    # --- shutdown -----------------------------------------------------------------------
    def begin_shutdown(self, now: float, why: str) -> None:
        self.shutting_down = True
        self.shutdown_deadline = now + self.scfg.shutdown_timeout_s
        log.info("shutting down (%s): draining", why)
        self.notifier.stopping(f"draining ({why})")
        cameras = [c.name for c in self.cfg.cameras]
        for st in self.stages.values():
            if st.state in ("backoff", "pending"):
                st.state = "stopped"
        for st in self.stages.values():
            if st.kind == "capture" and st.proc is not None:
                self.kill(st, signal.SIGTERM, "shutdown")
        self._inject_for_stopped(cameras)
        # cameras captured on other hosts keep sending: this host's detect must not wait for them
        local = {st.camera for st in self.stages.values() if st.kind == "capture"}
        remote = [c for c in cameras if c not in local]
        if remote and "detect" in self.stages:
            self.inject_eos(self.endpoints.frames, remote)
        # likewise a stage whose upstream runs on another host (e.g. only publish runs here)
        kinds = {st.kind for st in self.stages.values()}
        for kind in ("embed", "match", "publish"):
            if kind in kinds and UPSTREAM[kind] not in kinds:
                self.inject_eos(self.endpoints.input_of(kind), cameras)
        self._status_dirty = True

    def _inject_for_stopped(self, cameras: list[str]) -> None:
        """A stage that is down cannot pass EndOfStream on: send it to its output ourselves."""
        for st in self.stages.values():
            if st.state in ("stopped", "failed") and st.kind != "publish":
                out = self.endpoints.output_of(st.kind)
                cams = [st.camera] if st.kind == "capture" else cameras
                if st.kind == "capture" and st.eos_forwarded:
                    continue
                self.inject_eos(out, [c for c in cams if c not in st.eos_forwarded])

    def _drain_step(self, now: float) -> bool:
        """During shutdown; True when every process is gone."""
        self._inject_for_stopped([c.name for c in self.cfg.cameras])
        alive = [st for st in self.stages.values() if st.proc is not None]
        if not alive:
            return True
        if now >= self.shutdown_deadline and not self.term_sent:
            self.term_sent = True
            for st in alive:
                self.kill(st, signal.SIGTERM, "drain deadline passed")
        if now >= self.shutdown_deadline + KILL_GRACE_S:
            for st in alive:
                self.kill(st, signal.SIGKILL, "did not exit after SIGTERM")
        return False

    # --- health, readiness, status ------------------------------------------------------
    def check_health(self, now: float) -> bool:
        healthy = True
        for st in self.stages.values():
            if st.proc is None:
                if st.kind != "capture" and st.down_since is not None and \
                        now - st.down_since > self.scfg.unhealthy_after_s:
                    healthy = False
                continue
            if self.shutting_down:
                continue
            if st.ready and now - st.last_heartbeat > self.scfg.heartbeat_timeout_s:
                self.kill(st, signal.SIGKILL, f"no heartbeat for {now - st.last_heartbeat:.0f} s")
            elif not st.ready and now - st.started_at > self.scfg.ready_timeout_s:
                self.kill(st, signal.SIGKILL, f"not ready after {self.scfg.ready_timeout_s:.0f} s")
        return healthy

    def consumers_ready(self) -> bool:
        """Every local non-capture stage has been ready once (true on a capture-only host)."""
        return all(st.ever_ready or st.state in ("finished", "failed", "stopped")
                   for st in self.stages.values() if st.kind != "capture")

    def all_ready(self) -> bool:
        return all(st.ever_ready or st.state == "finished" for st in self.stages.values())

    def write_status(self) -> None:
        status = {
            "supervisor_pid": os.getpid(), "ready": self.ready_sent,
            "shutting_down": self.shutting_down, "runtime_dir": str(self.runtime_dir),
            "events": self.cfg.publish.endpoint,
            "metrics": (f"http://{self.cfg.metrics.host}:{self.cfg.metrics.port}/metrics"
                        if self.cfg.metrics.enabled else None),
            "stages": {st.name: {"pid": st.pid, "kind": st.kind, "camera": st.camera,
                                 "state": st.state, "ready": st.ready, "restarts": st.restarts,
                                 "last_exit": st.last_exit, "last_error": st.last_error}
                       for st in self.stages.values()},
        }
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, self.status_path)
        self._status_dirty = False

    def summary(self) -> str:
        running = sum(st.ready for st in self.stages.values())
        return f"{running}/{len(self.stages)} stages ready"

    def end_status(self) -> int:
        """When every stream ended by itself: 0, unless every camera of this host ended with an
        error (a file that cannot be read): EXIT_CAMERAS_FAILED, so a service manager sees a
        failure. Some cameras in error: 0, with the failed ones named."""
        reasons = {cam: reason for st in self.stages.values() if st.kind == "capture"
                   for cam, reason in st.end_reasons.items()}
        failed = sorted(cam for cam, reason in reasons.items() if reason == "error")
        captures = [st for st in self.stages.values() if st.kind == "capture"]
        if captures and len(failed) == len(captures):
            log.error("every camera ended with an error (%s): exit status %d", ", ".join(failed),
                      EXIT_CAMERAS_FAILED)
            return EXIT_CAMERAS_FAILED
        if failed:
            log.warning("camera(s) that ended with an error: %s", ", ".join(failed))
        return 0

    # --- main loop ----------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self.signal_received = signum     # handled by the main loop, never in the handler
        self.signal_count += 1

    def _check_ports(self) -> None:
        """tcp endpoints this host's stages bind, checked before any stage starts: a taken port
        is one line naming it, not a stage restarting forever."""
        kinds = {st.kind for st in self.stages.values()}
        wanted = []
        if "publish" in kinds:
            wanted.append(("publish.endpoint", self.cfg.publish.endpoint))
        for kind in ("detect", "embed", "match", "publish"):
            if kind in kinds and self.cfg.runtime.transport == "tcp":
                wanted.append((f"runtime.base_port ({kind} input)",
                               self.endpoints.input_of(kind)))
        for key, endpoint in wanted:
            problem = tcp_bind_problem(endpoint)
            if problem:
                raise SetupError(f"cannot start: {key} {endpoint}: {problem}")

    def _on_hup(self, _signum, _frame) -> None:
        self.hup_received = True

    def forward_reload(self) -> None:
        """SIGHUP: every ready stage reloads what it can (match: the gallery; publish: reopens
        the event log, for logrotate). Nothing stops. A stage still starting reads everything
        afresh anyway (and might not have its handler yet), so it is skipped."""
        self.hup_received = False
        targets = [st for st in self.stages.values() if st.ready and st.proc is not None]
        log.info("SIGHUP: reloading the gallery and reopening the event log (%s)",
                 ", ".join(st.name for st in targets) or "no stage ready")
        for st in targets:
            try:
                st.proc.send_signal(signal.SIGHUP)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        self.hup_received = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:   # a taken port: one clear line naming it, before any stage starts
            control = self.transport.control_server(self.endpoints.control)
            if self.cfg.metrics.enabled:
                try:
                    self.metrics_server = serve(self.cfg.metrics.host, self.cfg.metrics.port)
                except OSError as exc:
                    raise SetupError(f"cannot start: metrics.port {self.cfg.metrics.port} on "
                                     f"{self.cfg.metrics.host}: {exc.strerror or exc}") from None
            self._check_ports()
        except (OSError, SetupError):
            self.transport.close(linger_ms=0)
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()
            raise
        if self.metrics_server is not None:
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.cfg.metrics.port)
        # event seq and track ids continue across stage restarts from here (stages.run_state)
        self.run_id = run_state.create(self.runtime_dir)
        log.info("run %s", self.run_id)
        # Every configured camera and stage is exported from the start, as 0 until it is up
        # (livemax: a capture's 1 wins while it runs), so an alert on camera_up == 0 fires for a
        # camera that never connected too.
        for st in self.stages.values():
            self.metrics.stage_up.labels(st.name).set(0)
            if st.kind == "capture":
                self.metrics.camera_up.labels(st.camera).set(0)
        # Captures start once the stages they feed are ready: a camera opened while the models
        # still load would only fill queues with frames that are dropped or arrive late.
        for st in self.stages.values():
            if st.kind != "capture":
                self.start(st)
        self.captures_started = False
        self.notifier.status("starting stages")
        try:
            return self._loop(control)
        finally:
            for st in self.stages.values():   # only reached with processes left on an error
                if st.proc is not None and st.proc.poll() is None:
                    st.proc.kill()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()
            self.write_status()
            self.transport.close(linger_ms=0)
            self.notifier.close()

    def _loop(self, control) -> int:
        while True:
            now = time.monotonic()
            if self.signal_received is not None and not self.shutting_down:
                self.begin_shutdown(now, signal.Signals(self.signal_received).name)
            elif self.signal_count > 1 and self.shutdown_deadline > now:
                log.warning("second signal: not waiting for the drain")
                self.shutdown_deadline = now
            if self.hup_received:
                self.forward_reload()
            msg = control.recv(LOOP_S)
            while msg is not None:
                self.on_control(msg, time.monotonic())
                msg = control.recv(0)
            exited = [(st, st.proc.poll()) for st in self.stages.values() if st.proc is not None]
            exited = [(st, rc) for st, rc in exited if rc is not None]
            if exited:
                # a stage sends "finished" just before it exits: read it before judging the exit
                msg = control.recv(0.1)
                while msg is not None:
                    self.on_control(msg, time.monotonic())
                    msg = control.recv(0)
            now = time.monotonic()
            for st, rc in exited:
                self.on_exit(st, rc, now)
            if self.fatal and not self.shutting_down:
                self.begin_shutdown(now, "a stage cannot start")
            for st in self.stages.values():
                if st.state == "backoff" and now >= st.next_start and not self.shutting_down:
                    self.start(st)
            if not self.captures_started and not self.shutting_down and self.consumers_ready():
                self.captures_started = True
                for st in self.stages.values():
                    if st.kind == "capture" and st.state == "pending":
                        self.start(st)
            healthy = self.check_health(now)
            if not self.ready_sent and not self.shutting_down and self.all_ready():
                self.ready_sent = True
                self.write_status()     # before READY=1: whoever it wakes reads a ready status
                self.notifier.ready(self.summary())
                log.info("all %d stages ready", len(self.stages))
            interval = self.notifier.watchdog_interval()
            if interval and healthy and now >= self.next_watchdog:
                self.notifier.watchdog()
                self.next_watchdog = now + interval
            if self._status_dirty:
                self.write_status()
                if self.ready_sent:
                    self.notifier.status(self.summary())
            if self.shutting_down:
                if self._drain_step(now):
                    if self.fatal:
                        log.error("stopped because %s", self.fatal)
                        return EXIT_SETUP
                    log.info("every stage stopped; exiting")
                    return 0
            elif all(st.state == "finished" for st in self.stages.values()):
                log.info("every stream ended and every stage finished; exiting")
                self.notifier.stopping("every stream ended")
                return self.end_status()
