"""Footprint of an installed facewatch: install size, `--help` and start-up time, RSS per process.

    python -m bench.bench_footprint --venv /opt/facewatch/.venv [--venv OTHER ...] \
        [--models DIR] [--seconds 20]

For each venv (one made with `pip install '.[cpu]'`, say, and one of an older version), in
turns: the size of the venv folder, whether torch / TensorFlow / ultralytics are importable
there, the wall time of `facewatch --help` and `facewatch run --help`, then `facewatch run` of
that venv (its own installed code, started from an empty folder) on one looped camera (the
shared clip, real time) with a 100-person synthetic gallery: seconds from launch to READY
(every stage reported ready) and to the first processed frame, then the RSS (and PSS, which
shares libraries fairly between processes) of the supervisor and of every stage, sampled once a
second during `--seconds` of processing: the median of each process and of the total, and the
largest total seen. `--models` names the model folder for venvs whose package does not ship
them (older versions). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import (clip_path, emit, environment, free_port, log, make_gallery,
                          metric_sum, scrape)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--venv", type=Path, action="append", required=True,
                   help="a venv with facewatch installed (repeatable)")
    p.add_argument("--models", type=Path, default=None,
                   help="model folder written into the config (default: none, the shipped models)")
    p.add_argument("--video", type=Path, default=None, help="the clip (default: the shared one)")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="processing before RSS is read")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. models.detector_imgsz=640")


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def timed(cmd: list[str], cwd: Path) -> tuple[float, int, str]:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return time.perf_counter() - start, r.returncode, r.stdout + r.stderr


def write_config(workdir: Path, video: Path, models: Path | None, gallery: Path,
                 overrides: list[str]) -> tuple[Path, int]:
    port = free_port()
    cfg = {"cameras": [{"name": "bench", "uri": str(video), "loop": True}],
           "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}",
                       "event_log": str(workdir / "events.jsonl")},
           "metrics": {"enabled": True, "host": "127.0.0.1", "port": port},
           "gallery": {"path": str(gallery)}, "runtime": {"dir": str(workdir / "run")},
           "models": {"providers": ["CPUExecutionProvider"]}}
    if models is not None:
        cfg["models"].update(detector=str(models / "face_detector.onnx"),
                             embedder=str(models / "face_embedder.onnx"),
                             landmarks=str(models / "face_landmarks.onnx"))
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        cfg.setdefault(section, {})[name] = yaml.safe_load(value)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, port


def memory_mb(pid: int) -> tuple[float, float] | None:
    """(RSS, PSS) of a process in MiB, from /proc/PID/smaps_rollup."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("Rss", 0.0), values.get("Pss", 0.0)


def measure_daemon(venv: Path, workdir: Path, config: Path, port: int, seconds: float) -> dict:
    status_path = workdir / "run" / "status.json"
    log_file = open(workdir / "daemon.log", "wb")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FACEWATCH_MODELS")}
    start = time.monotonic()
    proc = subprocess.Popen([str(venv / "bin" / "facewatch"), "run", "--config", str(config)],
                            cwd=workdir, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    out: dict = {}
    try:
        def wait(cond, what, timeout=300.0):
            while time.monotonic() - start < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode}: "
                                       f"{(workdir / 'daemon.log').read_text()[-2000:]}")
                value = cond()
                if value:
                    return value
                time.sleep(0.1)
            raise RuntimeError(f"timed out waiting for {what}")

        def status():
            try:
                return json.loads(status_path.read_text())
            except (OSError, ValueError):
                return {}
        st = wait(lambda: (s := status()).get("ready") and s, "READY")
        out["startup_to_ready_s"] = round(time.monotonic() - start, 2)

        def processed():
            try:
                return metric_sum(scrape(port), "facewatch_frames_processed_total") > 0
            except OSError:
                return False
        wait(processed, "the first processed frame")
        out["startup_to_first_frame_s"] = round(time.monotonic() - start, 2)
        frames0 = metric_sum(scrape(port), "facewatch_frames_processed_total")
        samples: list[dict[str, tuple[float, float]]] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:   # one sample a second through a fixed window
            st = status()
            pids = {name: s["pid"] for name, s in st["stages"].items() if s.get("pid")}
            pids["supervisor"] = st["supervisor_pid"]
            samples.append({n: m for n, pid in pids.items() if (m := memory_mb(pid))})
            time.sleep(1.0)
        names = sorted({n for s in samples for n in s})
        med = lambda xs: round(float(sorted(xs)[len(xs) // 2]), 1)   # noqa: E731
        out["rss_mb"] = {n: med([s[n][0] for s in samples if n in s]) for n in names}
        out["pss_mb"] = {n: med([s[n][1] for s in samples if n in s]) for n in names}
        totals = [sum(m[0] for m in s.values()) for s in samples]
        out["rss_total_mb"] = med(totals)
        out["rss_total_max_mb"] = round(max(totals), 1)
        out["pss_total_mb"] = med([sum(m[1] for m in s.values()) for s in samples])
        out["samples"] = len(samples)
        out["frames_per_s"] = round((metric_sum(scrape(port), "facewatch_frames_processed_total")
                                     - frames0) / seconds, 1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log_file.close()
    out["exit_status"] = proc.returncode
    return out


def measure(venv: Path, args, video: Path) -> dict:
    venv = venv.resolve()
    py = str(venv / "bin" / "python")
    workdir = Path(tempfile.mkdtemp(prefix="fw-footprint-"))
    try:
        probe = subprocess.run([py, "-c", "import importlib.util as u, json; print(json.dumps("
                                "[m for m in ('torch', 'tensorflow', 'ultralytics', 'keras') "
                                "if u.find_spec(m)]))"], capture_output=True, text=True,
                               timeout=120, cwd=workdir)
        result = {"venv": str(venv), "venv_bytes": du_bytes(venv),
                  "heavy_modules_installed": json.loads(probe.stdout or "null")}
        result["venv_mb"] = round(result["venv_bytes"] / 2**20, 1)
        for name, cmd in (("help_s", ["--help"]), ("run_help_s", ["run", "--help"])):
            seconds, rc, _ = timed([str(venv / "bin" / "facewatch"), *cmd], workdir)
            result[name] = round(seconds, 2)
        models = args.models.resolve() if args.models else None
        gallery = workdir / "gallery.db"
        embedder = (models or Path(subprocess.run(
            [py, "-c", "from facewatch.stages.model_files import models_dir; print(models_dir())"],
            capture_output=True, text=True, cwd=workdir, timeout=60).stdout.strip())) / \
            "face_embedder.onnx"
        make_gallery(gallery, embedder, 100)
        config, port = write_config(workdir, video, models, gallery, args.set)
        result |= measure_daemon(venv, workdir, config, port, args.seconds)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    video = clip_path(args.video)
    out = {"benchmark": "footprint", "video": video.name, "seconds": args.seconds,
           "venvs": [], "environment": environment()}
    for venv in args.venv:
        log(f"measuring {venv}")
        out["venvs"].append(measure(venv, args, video))
    emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
