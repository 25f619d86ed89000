"""What the pipeline benchmarks share: arguments, the clip, a synthetic gallery, the real daemon
as a subprocess with its /metrics scraped, percentiles, and the JSON output.

Every benchmark prints one JSON object on stdout (logs go to stderr) and states its numbers as
ratios against a baseline measured in the same run, side by side, because this kind of machine
is noisy: a number from another run is not comparable.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:   # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(REPO))

from facewatch.training.paths import shared_data_dir  # noqa: E402

CLIP = Path("videos") / "facenet_pytorch_video.mp4"   # 1080p, 25 fps, 105 frames, 4-8 faces
DECISION_TYPES = ("recognized", "unknown")             # events that carry a latency worth timing


# --- arguments ----------------------------------------------------------------------------

def default_models_dir() -> Path:
    """The repository's models/ (or $FACEWATCH_MODELS, as the tests use it)."""
    return Path(os.environ.get("FACEWATCH_MODELS", REPO / "models"))


def add_daemon_arguments(p: argparse.ArgumentParser) -> None:
    """What configures the daemon and a baseline alike: models, clip, threads, providers, the
    synthetic gallery's size, config overrides."""
    p.add_argument("--models", type=Path, default=default_models_dir(),
                   help="folder with face_detector.onnx and face_embedder.onnx (default: models/)")
    p.add_argument("--video", type=Path, default=None,
                   help=f"the clip (default: <shared data>/{CLIP})")
    p.add_argument("--threads", type=int, default=0,
                   help="onnxruntime intra-op threads per model, daemon and baseline alike "
                        "(0: onnxruntime's choice, the config default)")
    p.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                   help="onnxruntime execution providers, daemon and baseline alike")
    p.add_argument("--gallery-size", type=int, default=100,
                   help="synthetic people enrolled for the daemon and the baseline alike")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for the daemon and the baseline alike (repeatable), "
                        "e.g. models.detector_imgsz=640 or detect.new_track_thresh=0.3")


def add_common_arguments(p: argparse.ArgumentParser, seconds: float, warmup: float,
                         rounds: int) -> None:
    add_daemon_arguments(p)
    p.add_argument("--seconds", type=float, default=seconds, help="timed window per measurement")
    p.add_argument("--warmup", type=float, default=warmup,
                   help="seconds of processing before a window starts")
    p.add_argument("--rounds", type=int, default=rounds,
                   help="alternating rounds (candidate and baseline in turn); medians reported")
    p.add_argument("--quick", action="store_true",
                   help="short windows and one round: checks that it runs, numbers are rough")


def apply_quick(args: argparse.Namespace, seconds: float, warmup: float) -> argparse.Namespace:
    if args.quick:
        args.seconds, args.warmup, args.rounds = min(args.seconds, seconds), \
            min(args.warmup, warmup), 1
    return args


def config_sections(args, detector: Path, embedder: Path) -> dict[str, dict]:
    """Config sections the daemon and the baseline share: the models, threads and providers,
    and every --set override (values parsed as YAML scalars)."""
    sections: dict[str, dict] = {"models": {
        "detector": str(detector), "embedder": str(embedder),
        # beside the embedder; run only for an embedder that aligns on five points
        "landmarks": str(Path(embedder).parent / "face_landmarks.onnx"),
        "providers": list(args.providers), "threads": args.threads}}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise SystemExit(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def bench_config(args, detector: Path, embedder: Path):
    """The FacewatchConfig the daemon would run with (defaults + the shared sections), for code
    that runs stages in this process (the baseline, standalone stage timings)."""
    from facewatch.daemon.config import parse_config

    return parse_config({"cameras": [{"name": "bench", "uri": "/dev/null"}],
                         **config_sections(args, detector, embedder)}, Path("."), "benchmark")


def model_paths(models_dir: Path) -> tuple[Path, Path]:
    det, emb = Path(models_dir) / "face_detector.onnx", Path(models_dir) / "face_embedder.onnx"
    missing = [str(p) for p in (det, emb) if not p.is_file()]
    if missing:
        raise SystemExit(f"models not found: {', '.join(missing)} (train and export them, or "
                         f"pass --models DIR)")
    return det.resolve(), emb.resolve()


def clip_path(video: Path | None) -> Path:
    path = Path(video) if video else shared_data_dir() / CLIP
    if not path.is_file():
        raise SystemExit(f"clip not found: {path} (set FACEWATCH_DATA or pass --video)")
    return path.resolve()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- numbers ------------------------------------------------------------------------------

def percentile(values, q: float) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.percentile(values, q)) if values else None


def summary(values, digits: int = 1) -> dict:
    """n, p50, p90, p99, max (None when there are no values)."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    out = {"n": len(values)}
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        p = percentile(values, q)
        out[name] = None if p is None else round(p, digits)
    out["max"] = round(max(values), digits) if values else None
    return out


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def rnd(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(float(x), digits)


def environment() -> dict:
    import onnxruntime

    return {"cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "nice": os.nice(0), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def emit(result: dict) -> None:
    """The one JSON object a benchmark prints."""
    print(json.dumps(result, allow_nan=False), flush=True)


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


# --- clip ---------------------------------------------------------------------------------

def read_frames(path: Path, count: int | None = None, step: int = 1) -> list[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames, i = [], 0
    while count is None or len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        if i % step == 0:
            frames.append(frame)
        i += 1
    cap.release()
    if not frames:
        raise SystemExit(f"no frames could be read from {path}")
    return frames


class LoopingReader:
    """cv2 read of a file, starting again at its end (what `loop: true` does in capture)."""

    def __init__(self, path: Path):
        import cv2

        self.cv2, self.path = cv2, str(path)
        self.cap = cv2.VideoCapture(self.path)
        if not self.cap.isOpened():
            raise SystemExit(f"cannot open {path}")

    def read(self) -> np.ndarray:
        ok, frame = self.cap.read()
        if not ok:
            if not self.cap.set(self.cv2.CAP_PROP_POS_FRAMES, 0):
                self.cap.release()
                self.cap = self.cv2.VideoCapture(self.path)
            ok, frame = self.cap.read()
            if not ok:
                raise RuntimeError(f"cannot read {self.path} after rewinding")
        return frame

    def close(self) -> None:
        self.cap.release()


# --- gallery ------------------------------------------------------------------------------

def synthetic_embeddings(people: int, dim: int, seed: int = 0) -> np.ndarray:
    """Random unit vectors: a stand-in gallery of the right size and shape."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((people, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_gallery(path: Path, embedder: Path, people: int, seed: int = 0) -> np.ndarray:
    """Enroll `people` synthetic people (one random embedding each, tagged with the embedder's
    model id so the daemon accepts them) into a new SQLite gallery; returns the matrix."""
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.gallery import Gallery, file_model_id

    dim = FaceEmbedder(embedder, ["CPUExecutionProvider"], threads=1).embedding_size
    matrix = synthetic_embeddings(people, dim, seed)
    model_id = file_model_id(embedder)
    with Gallery(path) as g:
        for i, row in enumerate(matrix):
            g.enroll(f"synthetic_{i:05d}", row[None], model_id, ["synthetic"])
    return matrix


# --- the real daemon ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_config(workdir: Path, cameras: list[dict], shared: dict[str, dict], gallery: Path,
                  **sections) -> Path:
    """A config.yaml for one benchmark run: the shipped defaults, except the cameras, the models,
    free ports and files in `workdir`."""
    cfg = {
        "cameras": cameras,
        "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}",
                    "event_log": str(workdir / "events.jsonl")},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
        "gallery": {"path": str(gallery)},
        "runtime": {"dir": str(workdir / "run")},
    }
    for key, value in [*shared.items(), *sections.items()]:
        cfg.setdefault(key, {}).update(value)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def scrape(port: int) -> dict[tuple, float]:
    """GET /metrics; {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric_sum(samples: dict, name: str, **labels) -> float:
    """Sum of every sample called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def metric_by(samples: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        if n == name:
            key = dict(lab).get(label)
            out[key] = out.get(key, 0.0) + v
    return out


@dataclass
class Snapshot:
    t: float            # time.monotonic() in the middle of the scrape
    wall: float         # time.time() likewise
    samples: dict


class Daemon:
    """`facewatch run` as a subprocess (log in a file), its status.json, /metrics and processes.

    A context manager: leaving it stops the daemon (SIGTERM, then SIGKILL) and any stage it left
    behind, by pid."""

    def __init__(self, config: Path):
        cfg = yaml.safe_load(Path(config).read_text())
        self.config = Path(config)
        self.port = cfg["metrics"]["port"]
        self.runtime_dir = Path(cfg["runtime"]["dir"])
        self.event_log = Path(cfg["publish"]["event_log"])
        self.log_path = self.config.parent / "daemon.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "facewatch.daemon.cli", "run", "--config",
                                      str(self.config)], cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._stage_pids: dict[str, int] = {}

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def status(self) -> dict:
        try:
            return json.loads((self.runtime_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def check_alive(self) -> None:
        """Raises RuntimeError (with the log tail) if the daemon has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")

    def wait_for(self, condition, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                                   f"{self.log_tail()}")
            time.sleep(interval)

    def wait_ready(self, timeout: float = 300) -> dict:
        status = self.wait_for(lambda: (s := self.status()).get("ready") and s, timeout,
                               "every stage to be ready")
        self._stage_pids = self.pids(status)
        return status

    def pids(self, status: dict | None = None) -> dict[str, int]:
        """Stage name (and "supervisor") -> pid, from `status` or status.json read afresh: a
        restarted stage has a new pid, one waiting to restart none (left out)."""
        status = self.status() if status is None else status
        out = {name: st["pid"] for name, st in status.get("stages", {}).items() if st.get("pid")}
        if status.get("supervisor_pid"):
            out["supervisor"] = status["supervisor_pid"]
        return out

    def snapshot(self) -> Snapshot:
        t0, w0 = time.monotonic(), time.time()
        samples = scrape(self.port)
        t1, w1 = time.monotonic(), time.time()
        return Snapshot((t0 + t1) / 2, (w0 + w1) / 2, samples)

    def wait_processing(self, timeout: float = 300) -> None:
        """Until the detector has processed a frame (the models are warm)."""
        self.wait_for(lambda: metric_sum(scrape(self.port), "facewatch_frames_processed_total") > 0,
                      timeout, "the first processed frame", interval=0.5)

    def processes(self) -> dict:
        """name -> psutil.Process of the supervisor and every stage (from status.json)."""
        import psutil

        out = {}
        for name, pid in self._stage_pids.items():
            try:
                out[name] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def _kill_leftovers(self) -> None:
        """A stage the supervisor did not stop (it was killed itself): ours, by pid, checked to
        still be one of our stage processes."""
        import psutil

        for st in self.status().get("stages", {}).values():
            pid = st.get("pid")
            if not pid:
                continue
            try:
                proc = psutil.Process(pid)
                if "facewatch.daemon.worker" in " ".join(proc.cmdline()) and \
                        str(self.config.parent) in " ".join(proc.cmdline()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._kill_leftovers()
        self._log.close()
        return self.proc.returncode


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:   # a line being written when the file was read
            pass
    return out


def measure_window(daemon: Daemon, warmup: float, seconds: float, votes: int = 3,
                   rss_interval: float = 1.0) -> dict:
    """After `warmup` seconds of processing: frames/s over a `seconds` window from two /metrics
    scrapes, per camera, drops, faces embedded, detector batch size, end-to-end latency of the
    events published in the window, and memory and CPU of every process.

    Latency (publish time - capture wall time of the frame the event is about), three ways:
    `latency_ms`: every recognized/unknown event, as facewatch_end_to_end_latency_seconds
    counts them; `latency_ms_voted`: decisions made when the track's `votes` embeddings came in
    (the others are late decisions of tracks that ended with fewer votes: they refer to the
    last embedded frame, which can be long before the track ended); `latency_ms_track_ended`:
    track_ended events, whose frame is the one where the tracker dropped the track, i.e. the
    pure transit time of a frame through the pipeline."""
    import psutil

    daemon.wait_processing()
    time.sleep(warmup)
    procs = daemon.processes()
    cpu0 = {n: _cpu_s(p) for n, p in procs.items()}
    a = daemon.snapshot()
    rss_max: dict[str, float] = {}
    end = a.t + seconds
    while True:
        for name, p in procs.items():
            try:
                rss_max[name] = max(rss_max.get(name, 0.0), p.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                pass
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(rss_interval, left))
    b = daemon.snapshot()
    cpu1 = {n: _cpu_s(p) for n, p in procs.items()}
    elapsed = b.t - a.t

    def delta(name: str, **labels) -> float:
        return metric_sum(b.samples, name, **labels) - metric_sum(a.samples, name, **labels)

    frames = delta("facewatch_frames_processed_total")
    per_cam_a = metric_by(a.samples, "facewatch_frames_processed_total", "camera")
    per_cam_b = metric_by(b.samples, "facewatch_frames_processed_total", "camera")
    per_camera = {c: round((v - per_cam_a.get(c, 0.0)) / elapsed, 3) for c, v in per_cam_b.items()}
    captured = delta("facewatch_frames_captured_total")
    dropped = delta("facewatch_frames_dropped_total")
    batches = delta("facewatch_batch_size_count", stage="detect")
    events = [e for e in read_events(daemon.event_log) if a.wall <= e["ts"] <= b.wall]
    decisions = [e for e in events if e["type"] in DECISION_TYPES]
    hist_n = delta("facewatch_end_to_end_latency_seconds_count")
    hist_sum = delta("facewatch_end_to_end_latency_seconds_sum")
    restarts = metric_sum(b.samples, "facewatch_stage_restarts_total")
    return {
        "seconds": round(elapsed, 2),
        "frames_processed": int(frames),
        "fps": round(frames / elapsed, 3),
        "fps_per_camera": per_camera,
        "frames_captured": int(captured),
        "frames_dropped": int(dropped),
        "frames_dropped_by_reason": {
            r: int(metric_sum(b.samples, "facewatch_frames_dropped_total", reason=r)
                   - metric_sum(a.samples, "facewatch_frames_dropped_total", reason=r))
            for r in ("queue_full", "lost", "stale", "behind")},
        "messages_lost": int(delta("facewatch_messages_lost_total")),
        "faces_detected_per_frame": rnd(delta("facewatch_faces_detected_total") / frames, 3)
        if frames else None,
        "faces_embedded_per_frame": rnd(delta("facewatch_faces_embedded_total") / frames, 3)
        if frames else None,
        "detect_batch_mean": rnd(frames / batches, 2) if batches else None,
        "events": len(events),
        "decisions": len(decisions),
        "latency_ms": summary([e["latency_ms"] for e in decisions]),
        "latency_ms_voted": summary([e["latency_ms"] for e in decisions if e["votes"] >= votes]),
        "latency_ms_track_ended": summary([e["latency_ms"] for e in events
                                           if e["type"] == "track_ended" and e["votes"] > 0]),
        "late_decisions": sum(e["votes"] < votes for e in decisions),
        "latency_hist_mean_ms": rnd(1000 * hist_sum / hist_n, 1) if hist_n else None,
        "rss_mb": {n: round(v, 1) for n, v in sorted(rss_max.items())},
        "rss_mb_total": round(sum(rss_max.values()), 1),
        "cpu_cores_used": {n: round((cpu1[n] - cpu0[n]) / elapsed, 3)
                           for n in sorted(cpu0) if cpu0[n] is not None and cpu1.get(n) is not None},
        "stage_restarts": int(restarts),
        "window_wall": [a.wall, b.wall],
    }


def latency_fields(windows: list[dict]) -> dict:
    """Medians over windows of the p50/p99 of each latency kind (see common.measure_window)."""
    out = {}
    for key, name in (("latency_ms", "latency_ms"), ("latency_ms_voted", "voted_latency_ms"),
                      ("latency_ms_track_ended", "transit_latency_ms")):
        for q in ("p50", "p99"):
            out[f"{name}_{q}"] = rnd(median([w[key][q] for w in windows]), 1)
    out["late_decisions"] = int(sum(w["late_decisions"] for w in windows))
    return out


def _cpu_s(proc) -> float | None:
    import psutil

    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return None


def run_daemon_window(cameras: list[dict], args, detector: Path, embedder: Path, gallery: Path,
                      warmup: float, seconds: float, keep_events: bool = False,
                      **sections) -> dict:
    """Start a fresh daemon with these cameras, measure one window, stop it."""
    workdir = Path(tempfile.mkdtemp(prefix="fwb-"))
    try:
        config = daemon_config(workdir, cameras, config_sections(args, detector, embedder),
                               gallery, **sections)
        with Daemon(config) as daemon:
            started = time.monotonic()
            daemon.wait_ready()
            ready_s = time.monotonic() - started
            votes = bench_config(args, detector, embedder).embed.votes
            result = measure_window(daemon, warmup, seconds, votes)
            result["startup_s"] = round(ready_s, 1)
            if keep_events:
                result["_events"] = read_events(daemon.event_log)
            code = daemon.stop()
            result["exit_code"] = code
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
