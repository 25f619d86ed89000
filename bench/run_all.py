"""The benchmark suite (`make bench`): every benchmark, one JSON file, one chart.

    python -m bench.run_all [--quick] [--models DIR] [--only pipeline stages ...] [--set K=V ...]
                            [--soak]

Runs, each in its own process (so one benchmark's models and sessions never load another's
measurements): bench.bench_pipeline (daemon vs the naive loop, latency, real-time first event),
bench.bench_stages (each stage alone, memory, pipelining efficiency), bench.bench_cameras
(throughput against 1-8 cameras), bench.bench_embedder and bench.bench_detector (the model
runtimes against onnxruntime/ultralytics baselines); with `--soak` also bench.soak (10 minutes
of 4 looped cameras, RSS growth of every process; 2 minutes with `--quick`). Writes
bench/results/latest.json and bench/results/latest.png (throughput against cameras; stage
throughputs) and prints the JSON.
A benchmark that fails is recorded with its error and the others still run; the exit status
is then 1. `--quick` runs short windows and one round: for checking that the suite works, not
for numbers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (REPO, default_models_dir, emit, environment, log, model_paths,
                          write_json_atomic)

RESULTS = REPO / "bench" / "results"
SUITE = ("pipeline", "stages", "cameras", "embedder", "detector")
OPT_IN = ("soak",)      # long: run only when asked for (--soak, or --only soak)


def commands(args, detector: Path, embedder: Path) -> dict[str, list[str]]:
    shared = ["--models", str(args.models), "--threads", str(args.threads),
              "--providers", *args.providers]
    if args.video:
        shared += ["--video", str(args.video)]
    for item in args.set:
        shared += ["--set", item]
    quick = ["--quick"] if args.quick else []
    return {
        "pipeline": ["-m", "bench.bench_pipeline", *shared, *quick],
        "stages": ["-m", "bench.bench_stages", *shared, *quick],
        "cameras": ["-m", "bench.bench_cameras", *shared, *quick],
        "embedder": ["-m", "bench.bench_embedder", "--model", str(embedder),
                     "--threads", str(args.threads),
                     *(["--seconds", "0.5"] if args.quick else [])],
        "detector": ["-m", "bench.bench_detector", "--model", str(detector),
                     *(["--images", "4", "--rounds", "1", "--seconds", "1"] if args.quick else [])],
        "soak": ["-m", "bench.soak", *shared,   # beside ours: soak.json is `make soak`'s
                 "--out", str(args.out.with_name(f"{args.out.stem}_soak.json")),
                 "--png", str(args.png.with_name(f"{args.png.stem}_soak.png")),
                 *(["--minutes", "2", "--warmup-minutes", "0.5"] if args.quick else [])],
    }


def run_one(name: str, argv: list[str], timeout: float) -> dict:
    """One benchmark in a child process; its last stdout line is its JSON."""
    log(f"--- {name}: python {' '.join(argv)}")
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {timeout:.0f} s",
                "stderr_tail": (exc.stderr or "")[-2000:] if isinstance(exc.stderr, str) else ""}
    sys.stderr.write(proc.stderr[-4000:])
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    try:
        result = json.loads(lines[-1])
    except ValueError as exc:
        return {"error": f"output is not JSON: {exc}", "stdout_tail": proc.stdout[-2000:]}
    result["_duration_s"] = round(time.monotonic() - started, 1)
    return result


def _get(d: dict, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def summarize(results: dict) -> dict:
    """The headline numbers of every benchmark, each next to its baseline."""
    out: dict = {}
    p = results.get("pipeline", {})
    if "throughput" in p:
        t = p["throughput"]
        out["pipeline"] = {k: t.get(k) for k in (
            "daemon_fps", "naive_fps", "ratio_daemon_over_naive", "latency_ms_p50",
            "latency_ms_p99", "voted_latency_ms_p50", "voted_latency_ms_p99",
            "transit_latency_ms_p50", "transit_latency_ms_p99", "frames_dropped",
            "rss_mb_total")}
    rt = p.get("realtime")
    if rt:
        out["realtime"] = {
            "fps_processed": rt.get("fps_processed"),
            "processed_over_played": rt.get("processed_over_played"),
            "dropped_fraction": rt.get("dropped_fraction"),
            "latency_ms_p50": rt.get("latency_ms_p50"),
            "latency_ms_p99": rt.get("latency_ms_p99"),
            "first_event_delay_s_p50": _get(rt, "first_event", "first_event_delay_s", "p50"),
            "first_event_delay_s_max": _get(rt, "first_event", "first_event_delay_s", "max"),
            "first_event_within_s": _get(rt, "first_event", "within_s"),
            "faces_decided": f"{_get(rt, 'first_event', 'decided')}/"
                             f"{_get(rt, 'first_event', 'appearances')}",
            "naive_fps_processed": _get(rt, "naive", "fps_processed"),
            "naive_first_event_delay_s_p50": _get(rt, "naive", "first_event",
                                                  "first_event_delay_s", "p50"),
            "naive_first_event_within_s": _get(rt, "naive", "first_event", "within_s"),
            "ratio_fps_processed_daemon_over_naive":
                rt.get("ratio_fps_processed_daemon_over_naive"),
            "ratio_first_event_p50_daemon_over_naive":
                rt.get("ratio_first_event_p50_daemon_over_naive")}
    s = results.get("stages", {})
    if "decode_fps" in s:
        out["stages"] = {k: s.get(k) for k in (
            "decode_fps", "detector_images_per_s", "detect_stage_frames_per_s",
            "embedder_faces_per_s_batch32", "matcher_queries_per_s", "daemon_fps",
            "stage_fps_equivalent", "slowest_stage", "pipelining_efficiency", "serial_fps",
            "daemon_over_serial", "rss_mb", "rss_mb_total")}
        out["stages"]["transport_ms_per_1080p_frame"] = _get(s, "transport", "videoframe_1080p",
                                                             "ms_per_frame")
        out["stages"]["transport_mb_per_s"] = _get(s, "transport", "videoframe_1080p", "mb_per_s")
    c = results.get("cameras", {})
    if "by_cameras" in c:
        out["cameras"] = {"naive_fps_1cam": c.get("naive_fps"), "by_cameras": [
            {k: row.get(k) for k in ("cameras", "fps_total", "fps_per_camera",
                                     "ratio_vs_naive_1cam", "decode_ceiling_fps",
                                     "fraction_of_decode_ceiling", "latency_ms_p50",
                                     "latency_ms_p99", "frames_dropped")}
            for row in c["by_cameras"]]}
    e = results.get("embedder", {})
    if "cpu" in e:
        out["embedder"] = {b: v.get("embed_faces_per_s")
                           for b, v in _get(e, "cpu", "batches", default={}).items()}
    k = results.get("soak", {})
    if "rss_growth_ok" in k:
        out["soak"] = {"minutes": k.get("minutes"), "cameras": k.get("cameras"),
                       "rss_growth_ok": k.get("rss_growth_ok"),
                       "rss_growth_pct": k.get("rss_growth_pct"),
                       "stage_restarts_total": k.get("stage_restarts_total"),
                       "frames_processed_after_warmup": _get(k, "post_warmup", "frames_processed"),
                       "cpu_shared": _get(k, "cpu", "shared")}
    d = results.get("detector", {})
    if "images_per_s" in d:
        out["detector"] = {"baseline": d.get("baseline"), "ratio_vs_baseline":
                           d.get("ratio_vs_baseline")}
    return out


def chart(results: dict, path: Path) -> bool:
    """Throughput against cameras (with the naive loop and the decode ceiling), and the stages'
    throughputs in frames/s of the pipeline next to the daemon's. False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cams = _get(results, "cameras", "by_cameras")
    stages = _get(results, "stages", "stage_fps_equivalent")
    if not cams and not stages:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    if cams:
        n = [r["cameras"] for r in cams]
        a.plot(n, [r["fps_total"] for r in cams], "o-", label="daemon, total")
        a.plot(n, [r["fps_per_camera"] for r in cams], "s--", label="daemon, per camera")
        a.plot(n, [r["decode_ceiling_fps"] for r in cams], "^:", color="grey",
               label="decode only (ceiling)")
        naive = _get(results, "cameras", "naive_fps")
        if naive:
            a.axhline(naive, color="red", linestyle="-.", label=f"naive loop, 1 camera ({naive:.1f})")
        a.set_xscale("log", base=2)
        a.set_xticks(n, [str(x) for x in n])
        a.set_yscale("log")
        a.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.set_xlabel("cameras (looped 1080p clip)")
        a.set_ylabel("frames/s")
        a.set_title("Throughput against cameras")
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    else:
        a.set_axis_off()
    if stages:
        names = list(stages)
        b.barh(names, [stages[k] for k in names], color="tab:blue", alpha=0.7)
        daemon = _get(results, "stages", "daemon_fps")
        if daemon:
            b.axvline(daemon, color="tab:green", label=f"daemon ({daemon:.1f})")
        naive = _get(results, "pipeline", "throughput", "naive_fps")
        if naive:
            b.axvline(naive, color="red", linestyle="-.", label=f"naive loop ({naive:.1f})")
        b.set_xscale("log")
        b.set_xlabel("frames/s of the pipeline (embed, match: per embedded faces per frame)")
        eff = _get(results, "stages", "pipelining_efficiency")
        b.set_title("Each stage alone" + (f" (pipelining efficiency {eff:.2f})" if eff else ""))
        b.grid(True, axis="x", which="both", alpha=0.3)
        b.legend(fontsize=8)
    else:
        b.set_axis_off()
    env = results.get("_environment", {})
    fig.suptitle(f"facewatch benchmarks, CPU ({env.get('cpu_count')} cores, "
                 f"{env.get('utc', '')})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short windows, one round each")
    p.add_argument("--models", type=Path, default=default_models_dir())
    p.add_argument("--video", type=Path, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override passed to every pipeline benchmark")
    p.add_argument("--only", nargs="+", choices=SUITE + OPT_IN, default=list(SUITE))
    p.add_argument("--skip", nargs="+", choices=SUITE + OPT_IN, default=[])
    p.add_argument("--soak", action="store_true",
                   help="also run the soak (bench.soak: 10 minutes, 2 with --quick)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--png", type=Path, default=RESULTS / "latest.png")
    p.add_argument("--timeout", type=float, default=3600, help="per benchmark, seconds")
    args = p.parse_args()
    detector, embedder = model_paths(args.models)
    env = environment()
    cmds = commands(args, detector, embedder)
    started = time.monotonic()
    results = {}
    wanted = set(args.only) | ({"soak"} if args.soak else set())
    for name in SUITE + OPT_IN:
        if name in wanted and name not in args.skip:
            results[name] = run_one(name, cmds[name], args.timeout)
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    doc = {"suite": "facewatch benchmarks", "quick": args.quick, "models": str(args.models),
           "command": " ".join([Path(sys.executable).name, "-m", "bench.run_all", *sys.argv[1:]]),
           "duration_s": round(time.monotonic() - started, 1), "environment": env,
           "summary": summarize(results), "errors": errors, "results": results}
    try:
        doc["chart"] = str(args.png) if chart({**results, "_environment": env}, args.png) else None
    except Exception as exc:   # a chart problem must not lose the numbers
        doc["chart"] = None
        doc["errors"]["chart"] = f"{type(exc).__name__}: {exc}"
    write_json_atomic(args.out, doc)
    emit(doc)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
