"""Soak: the real daemon with looped cameras for minutes; the memory of every process over time.

    python -m bench.soak [--minutes 10] [--cameras 4] [--warmup-minutes 2] [--interval 10]
                         [--set SECTION.KEY=VALUE ...] [--note TEXT]

Runs `facewatch run` with N looped file cameras of the 1080p clip (`realtime: false`, every frame
as fast as the pipeline takes them, as bench.bench_cameras does) for `--minutes` counted from the
first processed frame, the first `--warmup-minutes` of them warm-up. Every `--interval` seconds:
RSS, USS and CPU time of the supervisor and of every stage (by stage name, pids read afresh from
status.json, so a restarted stage is followed), and the frames, events and restarts /metrics
counts. Per process: RSS at the end of warm-up and at the end, the max, the growth in % between
the two, the least-squares slope (MB/min) over the post-warm-up samples, which one noisy sample
does not move, and `growth_pct_median3` (the median of the last three samples against that of
the first three, for processes whose RSS wobbles, like a decoder's); USS likewise. Verdict
`rss_growth_ok`: every process's RSS grew by at most `--max-growth-pct` (growth_pct).
A process restarted after warm-up is measured on its last pid only, and flagged.

The soak measures memory, not speed: other work on the machine slows it down without spoiling
it, and the JSON says how much of the CPU the daemon had (`cpu`). Writes bench/results/soak.json
and bench/results/soak.png (RSS over time per process) and prints the JSON.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (REPO, Daemon, add_daemon_arguments, clip_path, config_sections,
                          daemon_config, emit, environment, log, make_gallery, metric_by,
                          metric_sum, model_paths, read_events, rnd, scrape, write_json_atomic)

RESULTS = REPO / "bench" / "results"


# --- sampling -----------------------------------------------------------------------------

def _system_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def sample(daemon: Daemon, t0: float, cache: dict) -> dict:
    """Memory and CPU time of every daemon process, and the work counters, now."""
    import psutil

    procs = {}
    for name, pid in daemon.pids().items():
        try:
            proc = cache.get(pid) or cache.setdefault(pid, psutil.Process(pid))
            with proc.oneshot():
                mem = proc.memory_full_info()
                cpu = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        procs[name] = {"pid": pid, "rss_mb": round(mem.rss / 2**20, 2),
                       "uss_mb": round(mem.uss / 2**20, 2),
                       "cpu_s": round(cpu.user + cpu.system, 2)}
    m = scrape(daemon.port)
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "system_busy_s": round(_system_busy_s(), 2),
        "processes": procs,
        "frames_captured": int(metric_sum(m, "facewatch_frames_captured_total")),
        "frames_processed": int(metric_sum(m, "facewatch_frames_processed_total")),
        "frames_dropped": int(metric_sum(m, "facewatch_frames_dropped_total")),
        "faces_embedded": int(metric_sum(m, "facewatch_faces_embedded_total")),
        "events_published": {k: int(v) for k, v in
                             metric_by(m, "facewatch_events_published_total", "type").items()},
        "stage_restarts": {k: int(v) for k, v in
                           metric_by(m, "facewatch_stage_restarts_total", "stage").items()},
    }


def soak(daemon: Daemon, seconds: float, warmup_s: float, interval: float) -> tuple[list, str]:
    """Samples every `interval` s from the first processed frame for `seconds`, one exactly at
    the end of warm-up; (samples, error or "") - a daemon that dies keeps what was sampled."""
    daemon.wait_processing()
    t0, cache, samples = time.monotonic(), {}, []
    due = sorted({*np.arange(0.0, seconds, interval).round(3).tolist(), warmup_s, seconds})
    try:
        for at in due:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            daemon.check_alive()
            s = sample(daemon, t0, cache)
            s["warmup"] = at < warmup_s
            samples.append(s)
            rss = " ".join(f"{n}={p['rss_mb']:.0f}" for n, p in sorted(s["processes"].items()))
            log(f"t={s['t_s']:6.0f}s frames={s['frames_processed']} "
                f"events={sum(s['events_published'].values())} RSS MB: {rss}")
    except (RuntimeError, OSError) as exc:     # it exited, or /metrics stopped answering
        return samples, f"{type(exc).__name__}: {exc}"
    return samples, ""


# --- analysis -----------------------------------------------------------------------------

def memory_summary(samples: list[dict], name: str, key: str) -> dict | None:
    """`key` (rss_mb or uss_mb) of one process: at the end of warm-up, at the end, max, growth %
    and least-squares slope over the post-warm-up samples of its last pid."""
    series = [(s["t_s"], s["processes"][name]["pid"], s["processes"][name][key], s["warmup"])
              for s in samples if name in s["processes"]]
    if not series:
        return None
    last_pid = series[-1][1]
    post = [(t, v) for t, pid, v, warm in series if not warm and pid == last_pid]
    pids = list(dict.fromkeys(pid for _, pid, _, _ in series))
    out = {"max": round(max(v for _, _, v, _ in series), 1), "pids": pids,
           "restarted_after_warmup": any(pid != last_pid for _, pid, _, warm in series
                                         if not warm)}
    if len(post) < 2:
        return {**out, "warmup_end": None, "end": None, "growth_pct": None,
                "slope_mb_per_min": None, "post_warmup_samples": len(post)}
    (t_a, a), (t_b, b) = post[0], post[-1]
    ts, vs = np.array([t for t, _ in post]) / 60.0, np.array([v for _, v in post])
    slope = float(np.polyfit(ts, vs, 1)[0]) if len(post) >= 3 else (b - a) / ((t_b - t_a) / 60)
    return {"warmup_end": round(a, 1), "end": round(b, 1), **out,
            "growth_pct": round(100.0 * (b - a) / a, 2),
            "growth_pct_median3": round(100.0 * (np.median(vs[-3:]) / np.median(vs[:3]) - 1), 2),
            "slope_mb_per_min": round(slope, 3),
            "slope_pct_per_hour": round(100.0 * 60 * slope / a, 2),
            "post_warmup_samples": len(post), "post_warmup_minutes": round((t_b - t_a) / 60, 2)}


def analyse(samples: list[dict], max_growth_pct: float) -> dict:
    names = sorted({n for s in samples for n in s["processes"]},
                   key=lambda n: (n != "supervisor", n))
    processes = {}
    for name in names:
        processes[name] = {"rss_mb": memory_summary(samples, name, "rss_mb"),
                           "uss_mb": memory_summary(samples, name, "uss_mb")}
    growth = {n: p["rss_mb"]["growth_pct"] for n, p in processes.items()
              if p["rss_mb"] and p["rss_mb"]["growth_pct"] is not None}
    post = [s for s in samples if not s["warmup"]]
    a, b = (post[0], post[-1]) if len(post) >= 2 else (None, None)
    out = {
        "processes": processes,
        "rss_growth_pct": growth,
        "rss_growth_pct_max": max(growth.values()) if growth else None,
        "rss_growth_ok": bool(growth) and len(growth) == len(names)
        and all(g <= max_growth_pct for g in growth.values()),
        "rss_mb_total_end": rnd(sum(s["rss_mb"] for s in samples[-1]["processes"].values()), 1)
        if samples else None,
    }
    if a and b:
        minutes = (b["t_s"] - a["t_s"]) / 60
        frames = b["frames_processed"] - a["frames_processed"]
        events = {k: v - a["events_published"].get(k, 0) for k, v in b["events_published"].items()}
        daemon_cpu = sum(p["cpu_s"] - a["processes"][n]["cpu_s"]
                         for n, p in b["processes"].items()
                         if n in a["processes"] and a["processes"][n]["pid"] == p["pid"])
        busy = b["system_busy_s"] - a["system_busy_s"]
        seconds = b["t_s"] - a["t_s"]
        out["post_warmup"] = {
            "minutes": round(minutes, 2),
            "frames_processed": frames,
            "fps": rnd(frames / (60 * minutes), 2) if minutes else None,
            "frames_captured": b["frames_captured"] - a["frames_captured"],
            "frames_dropped": b["frames_dropped"] - a["frames_dropped"],
            "faces_embedded": b["faces_embedded"] - a["faces_embedded"],
            "events_published": events,
            "events_published_total": sum(events.values()),
        }
        out["cpu"] = {"cores": os.cpu_count(),
                      "busy_cores": rnd(busy / seconds, 2) if seconds else None,
                      "daemon_cores": rnd(daemon_cpu / seconds, 2) if seconds else None,
                      "other_cores": rnd((busy - daemon_cpu) / seconds, 2) if seconds else None}
        out["cpu"]["shared"] = bool(seconds) and (busy - daemon_cpu) / seconds > 0.1
    if samples:
        last = samples[-1]
        out["totals"] = {"frames_processed": last["frames_processed"],
                         "frames_captured": last["frames_captured"],
                         "frames_dropped": last["frames_dropped"],
                         "faces_embedded": last["faces_embedded"],
                         "events_published": last["events_published"]}
        out["stage_restarts"] = last["stage_restarts"]
        out["stage_restarts_total"] = sum(last["stage_restarts"].values())
    return out


# --- chart --------------------------------------------------------------------------------

def chart(doc: dict, path: Path) -> bool:
    """RSS over time per process, and its change against the end of warm-up (with the limit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    samples, warm_min = doc["samples"], doc["warmup_minutes"]
    names = list(doc["processes"])
    if not samples or not names:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for name in names:
        pts = [(s["t_s"] / 60, s["processes"][name]["rss_mb"]) for s in samples
               if name in s["processes"]]
        line, = a.plot(*zip(*pts), ".-", markersize=3, label=name)
        ref = doc["processes"][name]["rss_mb"]["warmup_end"]
        post = [(t, 100 * (v - ref) / ref) for t, v in pts if t >= warm_min] if ref else []
        if post:
            b.plot(*zip(*post), ".-", markersize=3, color=line.get_color(), label=name)
    for ax in (a, b):
        ax.axvline(warm_min, color="grey", linestyle=":", label="end of warm-up")
        ax.set_xlabel("minutes since the first processed frame")
        ax.grid(True, alpha=0.3)
    limit = doc["max_growth_pct"]
    b.axhline(limit, color="red", linestyle="--", label=f"limit +{limit:g}%")
    b.axhline(0, color="black", linewidth=0.5)
    a.set_yscale("log")
    a.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    a.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    a.set_ylabel("RSS (MB)")
    a.set_title("RSS per process")
    b.set_ylabel("RSS change since the end of warm-up (%)")
    b.set_title("Growth after warm-up: " + ("ok" if doc["rss_growth_ok"] else "OVER THE LIMIT"))
    a.legend(fontsize=7, ncol=2)
    b.legend(fontsize=7, ncol=2)
    cpu = doc.get("cpu") or {}
    fig.suptitle(f"facewatch soak: {doc['cameras']} looped 1080p cameras, {doc['minutes']:g} min, "
                 f"{doc['post_warmup'].get('frames_processed', 0) if doc.get('post_warmup') else 0}"
                 f" frames after warm-up; CPU {cpu.get('cores')} cores, daemon "
                 f"{cpu.get('daemon_cores')}, others {cpu.get('other_cores')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


# --- main ---------------------------------------------------------------------------------

def source_state() -> dict:
    """The commit the daemon ran from, and the files that differed from it (uncommitted)."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "modified": [line[3:] for line in git("status", "--porcelain",
                                                  "--untracked-files=no").splitlines()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_daemon_arguments(p)
    p.add_argument("--minutes", type=float, default=10.0,
                   help="run time from the first processed frame, warm-up included")
    p.add_argument("--warmup-minutes", type=float, default=2.0,
                   help="minutes before the reference sample (caches, allocator, queues fill)")
    p.add_argument("--cameras", type=int, default=4, help="looped file cameras of the clip")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--realtime", action="store_true",
                   help="play the clip at its frame rate (default: every frame, as fast as "
                        "the pipeline takes them)")
    p.add_argument("--max-growth-pct", type=float, default=5.0,
                   help="RSS growth after warm-up that any process may show")
    p.add_argument("--note", default="", help="free text kept in the JSON (e.g. what else ran)")
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    p.add_argument("--png", type=Path, default=RESULTS / "soak.png")
    args = p.parse_args()
    if not 0 <= args.warmup_minutes < args.minutes:
        raise SystemExit("--warmup-minutes must be at least 0 and less than --minutes")
    if args.interval <= 0 or args.cameras < 1:
        raise SystemExit("--interval must be positive and --cameras at least 1")
    detector, embedder = model_paths(args.models)
    video = clip_path(args.video)
    env, source = environment(), source_state()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fwsoak-"))
    try:
        gallery = workdir / "gallery.db"
        make_gallery(gallery, embedder, args.gallery_size)
        cams = [{"name": f"cam{i}", "uri": str(video), "loop": True, "realtime": args.realtime}
                for i in range(args.cameras)]
        config = daemon_config(workdir, cams, config_sections(args, detector, embedder), gallery)
        with Daemon(config) as daemon:
            daemon.wait_ready()
            ready_s = time.monotonic() - started
            log(f"ready after {ready_s:.0f} s; soaking {args.minutes:g} min "
                f"({args.warmup_minutes:g} warm-up), a sample every {args.interval:g} s")
            samples, error = soak(daemon, 60 * args.minutes, 60 * args.warmup_minutes,
                                  args.interval)
            status = daemon.status()
            event_log_lines = len(read_events(daemon.event_log))
            exit_code = daemon.stop()
            log_tail = daemon.log_tail(2000) if error or exit_code else ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    doc = {"benchmark": "soak", "video": str(video), "models": str(args.models),
           "cameras": args.cameras, "realtime": args.realtime, "minutes": args.minutes,
           "warmup_minutes": args.warmup_minutes, "interval_s": args.interval,
           "threads": args.threads, "providers": args.providers, "config_overrides": args.set,
           "gallery_size": args.gallery_size, "max_growth_pct": args.max_growth_pct,
           "note": args.note, "source": source,
           "command": " ".join([Path(sys.executable).name, "-m", "bench.soak", *sys.argv[1:]]),
           "startup_s": round(ready_s, 1), "exit_code": exit_code,
           **({"error": error} if error else {}),   # run_all: "error" means it failed
           **analyse(samples, args.max_growth_pct),
           "stage_restarts_status": {n: st.get("restarts", 0)
                                     for n, st in status.get("stages", {}).items()},
           "event_log_lines": event_log_lines,
           "duration_s": round(time.monotonic() - started, 1), "environment": env,
           "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
           "samples": samples}
    if log_tail:
        doc["daemon_log_tail"] = log_tail
    try:
        doc["chart"] = str(args.png) if chart(doc, args.png) else None
    except Exception as exc:   # a chart problem must not lose the numbers
        doc["chart"] = None
        doc["chart_error"] = f"{type(exc).__name__}: {exc}"
    write_json_atomic(args.out, doc)
    emit(doc)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
