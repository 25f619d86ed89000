"""One stage process: `python -m daemon.worker --stage detect --config CONFIG`.

The supervisor starts one of these per stage (CONFIG is then the effective config it wrote as
JSON into the runtime directory). It can also be started by hand, e.g. on another host with
`runtime.transport: tcp`, with the YAML config. Exit status: 0 after a normal finish or SIGTERM,
1 when the stage failed (the supervisor restarts it), 78 (stages.errors.EXIT_SETUP) when it
cannot start and a restart would not help, e.g. a corrupt model file (the supervisor stops).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import signal
import sys

from facewatch.daemon.config import STAGE_KINDS, ConfigError, config_from_json, load_config, with_runtime_dir
from facewatch.stages.errors import EXIT_SETUP, SetupError

# stage kind -> (module, class); imported only for the stage this process runs
STAGE_CLASSES = {
    "capture": ("facewatch.stages.capture", "CaptureStage"),
    "detect": ("facewatch.stages.detect_stage", "DetectStage"),
    "embed": ("facewatch.stages.embed_stage", "EmbedStage"),
    "match": ("facewatch.stages.match_stage", "MatchStage"),
    "publish": ("facewatch.stages.publish_stage", "PublishStage"),
}
SUPERVISOR_PID_ENV = "FACEWATCH_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


def stage_name(kind: str, camera: str | None) -> str:
    return f"capture:{camera}" if kind == "capture" else kind


def die_with_supervisor() -> None:
    """Get SIGTERM when the supervisor dies (even by SIGKILL), so no stage is left orphaned."""
    parent = os.environ.get(SUPERVISOR_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):   # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def lower_priority(increment: int, log: logging.Logger) -> None:
    """supervisor.nice for this stage: added to the niceness it was started with."""
    if increment:
        try:
            log.info("nice %d (supervisor.nice)", os.nice(increment))
        except OSError as exc:   # a sandbox may forbid it; the stage works either way
            log.warning("cannot lower the CPU priority (supervisor.nice %d): %s", increment, exc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m daemon.worker", description=__doc__.splitlines()[0])
    p.add_argument("--stage", required=True, choices=STAGE_KINDS)
    p.add_argument("--config", required=True, help="YAML config, or the supervisor's JSON")
    p.add_argument("--camera", help="camera name (capture stages)")
    p.add_argument("--ended-cameras", default="",
                   help="comma-separated cameras whose EndOfStream already passed this stage's "
                        "input (set by the supervisor when it restarts a stage)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load(path: str):
    if path.endswith(".json"):
        with open(path) as f:
            return config_from_json(f.read(), path)
    return load_config(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = stage_name(args.stage, args.camera)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    log = logging.getLogger(f"facewatch.worker.{name}")
    if args.stage == "capture" and not args.camera:
        log.error("--camera is required for the capture stage")
        return 2
    try:
        cfg = with_runtime_dir(load(args.config))
        if args.camera:
            cfg.camera(args.camera)
    except (ConfigError, KeyError) as exc:
        log.error("%s", exc)
        return 2

    # imported after the config check so PROMETHEUS_MULTIPROC_DIR (from the supervisor) is set
    from facewatch.stages.metrics import Metrics
    from facewatch.stages.stage import StageContext
    from facewatch.stages.transport import Endpoints, Transport

    transport = Transport()
    ctx = StageContext(name=name, kind=args.stage, config=cfg, transport=transport,
                       endpoints=Endpoints.from_config(cfg), metrics=Metrics(), camera=args.camera,
                       ended_cameras={c for c in args.ended_cameras.split(",") if c})

    def on_signal(signum, _frame):   # only set a flag; the stage loop notices it
        log.info("got %s", signal.Signals(signum).name)
        ctx.stop.set()

    def on_hup(_signum, _frame):   # forwarded by the supervisor: reload, never stop
        ctx.reload.set()

    lower_priority(cfg.supervisor.nice.get(args.stage, 0), log)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    # A file size limit (LimitFSIZE=, ulimit -f) must fail a write with EFBIG, which the event
    # log handles, instead of killing the process with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    die_with_supervisor()
    if ctx.endpoints.control is not None:
        ctx.control = transport.control_client(ctx.endpoints.control, name)
    module, cls = STAGE_CLASSES[args.stage]
    code = 1
    try:
        stage = getattr(importlib.import_module(module), cls)(ctx)
        code = stage.run()
    except SetupError as exc:  # a bad model or key file: one line, no traceback, no restart
        log.error("cannot start: %s", exc)
        if ctx.control is not None:
            ctx.control.send("error", reason=f"cannot start: {exc}"[:500], detail={"fatal": True})
        code = EXIT_SETUP
    except Exception as exc:   # a crash: tell the supervisor why, exit non-zero to be restarted
        log.exception("stage failed")
        if ctx.control is not None:
            ctx.control.send("error", reason=f"{type(exc).__name__}: {exc}"[:500])
        code = 1
    finally:
        transport.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
