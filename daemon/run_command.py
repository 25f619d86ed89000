"""`facewatch run --config config.yaml`: validate the config, prepare the runtime directory, and
hand over to the supervisor (which starts every stage as its own process).

The runtime directory holds the ipc sockets, the effective config the stages read
(config.json, 0600), status.json and the Prometheus multiprocess files. It is
`runtime.dir`, else systemd's $RUNTIME_DIRECTORY, else a new temporary directory removed at exit.

Files the stages of this host cannot start without (the models, the CURVE key) are checked
first: a missing one is an error naming its config key, before any process starts. A file that
is there but corrupt or of the wrong kind is found by the stage loading it, which exits 78;
the supervisor then stops everything and exits 78 (see daemon.supervisor).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from facewatch.daemon.config import (STAGE_KINDS, ConfigError, FacewatchConfig, config_to_json,
                           load_config, parse_camera_arg, problems, with_runtime_dir)
from facewatch.daemon.runtime_lock import lock_runtime_dir

log = logging.getLogger("facewatch.run")


def _camera(text: str) -> tuple[str, str]:
    try:
        return parse_camera_arg(text)
    except ValueError as exc:   # argparse prints this message instead of "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.yaml", help="config file (default: config.yaml)")
    p.add_argument("--camera", action="append", type=_camera, metavar="NAME=URI",
                   help="a camera (repeatable); replaces the config's cameras")
    p.add_argument("--gallery", help="gallery file; overrides gallery.path")
    p.add_argument("--event-log", help="JSONL event log; overrides publish.event_log")


def required_files(cfg: FacewatchConfig) -> list[tuple[str, Path, str]]:
    """(config key, path, what it must be) for every file a stage run on this host reads at
    start-up."""
    local = set(cfg.supervisor.stages or STAGE_KINDS)
    m, d = cfg.models, cfg.detect
    out = []
    if "detect" in local:
        out.append(("models.detector", m.detector,
                    "the face detector ONNX model (`facewatch export-detector`)"))
    if local & {"embed", "match", "detect"}:   # detect crops as the embedder was trained
        out.append(("models.embedder", m.embedder,
                    "the face embedder ONNX model (`facewatch export-embedder`)"))
    if "detect" in local and m.landmarks is not None and _aligns_on_landmarks(m.embedder):
        out.append(("models.landmarks", m.landmarks,
                    "the five-point landmark ONNX model (`facewatch export-landmarks`), which "
                    "this embedder's crops need; null in the config: none (box fallback)"))
    for key, path, what in list(out):   # int8 copies the config names (models.precision)
        kind = key.partition(".")[2]
        explicit = getattr(m, f"{kind}_int8", None) if key.startswith("models.") else None
        if explicit is not None:   # named: must be there, whatever provider this host has
            out.append((f"models.{kind}_int8", explicit,
                        f"the int8 copy of {Path(path).name} (`facewatch quantize-model --kind "
                        f"{kind}`), run at models.precision int8"))
    if "publish" in local and cfg.publish.curve_secret_key_file is not None:
        out.append(("publish.curve_secret_key_file", cfg.publish.curve_secret_key_file,
                    "the event socket's CURVE secret key (`facewatch keys`)"))
    return out


def _aligns_on_landmarks(embedder: Path) -> bool:
    from facewatch.stages.embedder_info import read_embedder_info
    from facewatch.stages.errors import SetupError

    # every alignment but "box" is on landmarks (stages.face_crop.ALIGNMENTS); face_crop is not
    # imported here: OpenCV would add ~17 MB to the supervisor, which runs these checks
    try:
        return Path(embedder).is_file() and read_embedder_info(embedder).crop_alignment != "box"
    except SetupError:   # an unusable embedder file: reported on its own
        return False


def preflight_errors(cfg: FacewatchConfig, load_models: bool = False) -> list[str]:
    """What the daemon would refuse at start-up, one line each: a missing file (always), and
    with `load_models` a model file its stage could not load (as the stage loads it, on the
    CPU), the error naming the config key, the file and what was expected."""
    from facewatch.stages.model_files import where_text

    errors = []
    for key, path, what in required_files(cfg):
        if not Path(path).is_file():
            hint = (f"; with no {key} in the config the shipped model is used, looked for in "
                    f"{where_text()}" if key.startswith("models.") else "")
            errors.append(f"{key}: file not found: {path} (expected {what}{hint})")
    if errors or not load_models:
        return errors
    from facewatch.stages.errors import SetupError
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.face_landmarks import LandmarkModel

    cpu = ("CPUExecutionProvider",)
    loaders = {"models.detector": lambda p: FaceDetector(p, cpu),
               "models.embedder": lambda p: FaceEmbedder(p, cpu),
               "models.landmarks": lambda p: LandmarkModel(p, cpu)}
    loaders.update({f"{k}_int8": f for k, f in list(loaders.items())})
    for key, path, _ in required_files(cfg):
        if key in loaders:
            try:
                loaders[key](path)
            except SetupError as exc:
                errors.append(f"{key}: {exc}")
    if not errors:   # the file each stage will load at its precision (a stale int8 copy, ...)
        from facewatch.stages.precision import choose

        for key, _, _ in required_files(cfg):
            kind = key.partition(".")[2]
            if key.startswith("models.") and kind in ("detector", "landmarks", "embedder"):
                try:
                    choose(cfg.models, kind)
                except SetupError as exc:
                    errors.append(str(exc))
    return errors


def check_required_files(cfg: FacewatchConfig) -> None:
    errors = preflight_errors(cfg)
    if errors:
        raise ConfigError("\n".join(errors))


def _stop_while_starting(signum, _frame) -> None:
    # Until the supervisor installs its own handlers: SIGTERM/SIGINT end the start cleanly
    # (runtime lock released, temporary runtime directory removed) instead of killing it.
    log.info("%s while starting: not starting", signal.Signals(signum).name)
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_while_starting)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # nothing to reload yet
    cfg = load_config(args.config, cameras=args.camera, gallery=args.gallery,
                      event_log=args.event_log)
    check_required_files(cfg)
    for warning in problems(cfg):
        log.warning("%s", warning)
    temp_dir = None
    if cfg.runtime.dir is None and not os.environ.get("RUNTIME_DIRECTORY"):
        temp_dir = Path(tempfile.mkdtemp(prefix="facewatch-"))
    cfg = with_runtime_dir(cfg, temp_dir)
    runtime = Path(cfg.runtime.dir)
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_runtime_dir(runtime)   # before touching anything a running daemon uses
    try:
        effective = runtime / "config.json"
        fd = os.open(effective, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(config_to_json(cfg))

        # Before prometheus_client is first imported (here: by the supervisor's imports; in the
        # stages: inherited): it picks multiprocess mode at import time.
        metrics_dir = runtime / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)   # no values from an earlier run
        metrics_dir.mkdir(mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

        from facewatch.daemon.supervisor import Supervisor

        log.info("runtime directory %s; %d camera(s): %s", runtime, len(cfg.cameras),
                 ", ".join(f"{c.name}={c.safe_uri}" for c in cfg.cameras))
        return Supervisor(cfg, effective, runtime, verbose=getattr(args, "verbose", False)).run()
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
