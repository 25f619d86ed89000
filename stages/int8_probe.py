"""Does int8 pay on this CPU? `models.precision: {CPUExecutionProvider: auto}` (issue 14).

onnxruntime's int8 kernels are fast only where the CPU has integer dot-product instructions
(VNNI and the like); without them an int8 graph can be slower than its float parent (measured on
an AVX2 EPYC: detector 1.13x faster, landmarks 1.04x, embedder 0.78x). CPU flags do not tell
which models gain, so the first start on a host times the float file and its int8 copy side by
side, with the stage's session settings, on an input of the daemon's shape, and keeps the verdict
in a small JSON cache: later starts read it. The key holds both files' hashes, the onnxruntime
version, the CPU model and the thread count, so a new model, upgrade or host measures again.

int8 is chosen only when it is clearly faster (INT8_MARGIN): otherwise the float file, the
reference for accuracy, runs.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("facewatch.int8_probe")

CACHE_FILE = "int8_speed.json"
INT8_MARGIN = 0.95      # int8 must take at most this share of fp32's time
WARMUP, ROUNDS = 2, 7
# A typical call per model: one 1080p frame letterboxed at 640 (16:9 -> 384 x 640), a few faces.
PROBE_BATCH = {"detector": 1, "landmarks": 4, "embedder": 8}
DETECTOR_HW = (384, 640)


@dataclass(frozen=True)
class Verdict:
    fp32_ms: float
    int8_ms: float
    measured: str      # when (UTC, ISO 8601)

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms if self.int8_ms > 0 else 0.0

    @property
    def use_int8(self) -> bool:
        return self.int8_ms <= INT8_MARGIN * self.fp32_ms

    def describe(self) -> str:
        return (f"int8 {self.speedup:.2f}x fp32 on this CPU ({self.int8_ms:.1f} vs "
                f"{self.fp32_ms:.1f} ms a call, measured {self.measured})")


def cache_dir() -> Path:
    """$FACEWATCH_CACHE_DIR, else systemd's CacheDirectory= / StateDirectory=, else
    $XDG_CACHE_HOME/facewatch (~/.cache/facewatch)."""
    for var in ("FACEWATCH_CACHE_DIR", "CACHE_DIRECTORY", "STATE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "facewatch"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key(kind: str, fp32: Path, int8: Path, threads: int) -> str:
    import onnxruntime as ort

    from facewatch.stages.gallery import file_sha256

    return (f"{kind}|{file_sha256(fp32)[:16]}|{file_sha256(int8)[:16]}|ort {ort.__version__}|"
            f"{cpu_name()}|{os.cpu_count()} cpus|threads {threads}")


def _read_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return data
    except (OSError, ValueError) as exc:
        log.warning("int8 speed cache %s is unreadable (%s): measuring again and replacing it",
                    path, exc)
        return {}


def _write_cache(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)    # atomic: stages starting together never read half a file
    except OSError as exc:
        log.warning("int8 speed cache %s not written (%s): the next start measures again", path, exc)


def _probe_input(session, kind: str) -> np.ndarray:
    shape = list(session.get_inputs()[0].shape)
    shape[0] = PROBE_BATCH[kind]
    if kind == "detector":      # NCHW with dynamic height and width
        shape[2:] = [d if isinstance(d, int) else s for d, s in zip(shape[2:], DETECTOR_HW)]
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{kind}: cannot make a probe input for shape {session.get_inputs()[0].shape}")
    return np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)


def measure(kind: str, fp32: Path, int8: Path, threads: int = 0, spin: bool = False) -> Verdict:
    """Median time of one call of each file, alternating them so that load on the host weighs
    on both alike."""
    from facewatch.stages.onnx_session import load_session

    cpu = ("CPUExecutionProvider",)
    sessions = [load_session(p, cpu, threads, what=f"{kind} model", spin=spin) for p in (fp32, int8)]
    feeds = [{s.get_inputs()[0].name: _probe_input(s, kind)} for s in sessions]
    times: list[list[float]] = [[], []]
    for i in range(WARMUP + ROUNDS):
        for j, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            if i >= WARMUP:
                times[j].append((time.perf_counter() - start) * 1000)
    return Verdict(round(statistics.median(times[0]), 2), round(statistics.median(times[1]), 2),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def int8_verdict(kind: str, fp32: Path, int8: Path, threads: int = 0, spin: bool = False,
                 cache: Path | None = None) -> Verdict:
    """The cached verdict for this pair of files on this host, measured first if there is none."""
    path = Path(cache) if cache is not None else cache_dir() / CACHE_FILE
    key = probe_key(kind, fp32, int8, threads)
    entries = _read_cache(path)
    found = entries.get(key)
    if isinstance(found, dict):
        try:
            return Verdict(float(found["fp32_ms"]), float(found["int8_ms"]), str(found["measured"]))
        except (KeyError, TypeError, ValueError):
            log.warning("int8 speed cache %s: entry %r is malformed: measuring again", path, key)
    verdict = measure(kind, fp32, int8, threads, spin)
    log.info("%s: %s (cached in %s)", kind, verdict.describe(), path)
    entries = _read_cache(path)      # another stage may have written meanwhile
    entries[key] = asdict(verdict)
    _write_cache(path, entries)
    return verdict
