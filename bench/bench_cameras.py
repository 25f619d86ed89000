"""Pipeline throughput against the number of cameras, with the naive loop as the baseline.

    python -m bench.bench_cameras [--models DIR] [--cameras 1 2 4 8] [--rounds 2] [--quick]

For each camera count N: the real daemon with N looped file sources of the clip (`realtime:
false`, every frame as fast as the pipeline takes them), total and per-camera frames/s from
/metrics over a window after warm-up. Baseline: the naive single-process loop (bench.naive_loop,
1 camera, same models and settings) over a window of the same length. Ceiling: decode only, N
processes each reading the clip with cv2 (what N capture processes could deliver at most on
this machine). The measurements alternate in rounds (the order reversed every other round);
medians are reported.

`--realtime`: the N cameras are live instead (`realtime: true`: each file played at its 25 fps
like a camera, frames dropped when the pipeline is behind), the question of issue 14 item 3:
is H.264 1080p decoding a ceiling with 4+ cameras? Reported per N: frames decoded per second
in total (25 x N when decoding keeps up), the CPU cores the capture processes (decoding) and
detect use, processed frames/s and the drops by reason.
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import (add_common_arguments, apply_quick, clip_path, emit, environment,
                          latency_fields, log, make_gallery, median, model_paths, ratio, rnd,
                          run_daemon_window)
from bench.naive_loop import naive_from_args


def _decode_worker(video: str, seconds: float, start, out) -> None:
    from bench.common import LoopingReader

    reader = LoopingReader(Path(video))
    for _ in range(5):      # warm: the decoder's first frames are slower
        reader.read()
    start.wait()
    frames, t0 = 0, time.monotonic()
    end = t0 + seconds
    while True:
        reader.read()
        frames += 1
        now = time.monotonic()
        if now >= end:
            break
    reader.close()
    out.put(frames / (now - t0))


def decode_only(video: Path, processes: int, seconds: float) -> dict:
    """N processes decoding the clip at once: total and per-process frames/s."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_decode_worker, args=(str(video), seconds, start, out), daemon=True)
             for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    rates = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    return {"fps": round(sum(rates), 2), "fps_per_process": round(sum(rates) / len(rates), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, seconds=20, warmup=8, rounds=2)
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--realtime", action="store_true",
                   help="live cameras (each played at 25 fps, dropping when behind)")
    args = apply_quick(p.parse_args(), seconds=5, warmup=3)
    if args.quick and not args.realtime:
        args.cameras = [n for n in args.cameras if n <= 2] or [1]
    detector, embedder = model_paths(args.models)
    video = clip_path(args.video)
    env = environment()
    workdir = Path(tempfile.mkdtemp(prefix="fwbc-"))
    try:
        gallery_db = workdir / "gallery.db"
        matrix = make_gallery(gallery_db, embedder, args.gallery_size)
        naive = naive_from_args(args, detector, embedder, matrix)
        steps = [("naive", 1)] + [("daemon", n) for n in args.cameras] + \
                [("decode", n) for n in args.cameras]
        samples: dict[tuple, list[dict]] = {s: [] for s in steps}
        for r in range(args.rounds):
            for who, n in (steps if r % 2 == 0 else list(reversed(steps))):
                log(f"round {r + 1}/{args.rounds}: {who} x{n}")
                if who == "naive":
                    samples[(who, n)].append(naive.run(video, args.seconds, args.warmup))
                elif who == "decode":
                    samples[(who, n)].append(decode_only(video, n, args.seconds))
                else:
                    cams = [{"name": f"cam{i}", "uri": str(video), "loop": True,
                             "realtime": args.realtime} for i in range(n)]
                    samples[(who, n)].append(run_daemon_window(
                        cams, args, detector, embedder, gallery_db, args.warmup, args.seconds))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    naive_fps = median([s["fps"] for s in samples[("naive", 1)]])
    rows = []
    for n in args.cameras:
        d = samples[("daemon", n)]
        dec = samples[("decode", n)]
        total = median([s["fps"] for s in d])
        per_cam = [v for s in d for v in s["fps_per_camera"].values()]
        ceiling = median([s["fps"] for s in dec])
        rows.append({
            "cameras": n,
            "fps_total": rnd(total, 3),
            "fps_per_camera": rnd(total / n, 3),
            "fps_per_camera_min": rnd(min(per_cam), 3) if per_cam else None,
            "fps_per_camera_max": rnd(max(per_cam), 3) if per_cam else None,
            "ratio_vs_naive_1cam": ratio(total, naive_fps),
            "decode_ceiling_fps": rnd(ceiling),
            "fraction_of_decode_ceiling": ratio(total, ceiling),
            **latency_fields(d),
            "detect_batch_mean": rnd(median([s["detect_batch_mean"] for s in d]), 2),
            "frames_dropped": int(sum(s["frames_dropped"] for s in d)),
            "frames_dropped_by_reason": {r: int(sum(s["frames_dropped_by_reason"][r] for s in d))
                                         for r in d[0]["frames_dropped_by_reason"]},
            "decoded_fps_total": rnd(median([s["frames_captured"] / s["seconds"] for s in d]), 2),
            "capture_cores_total": rnd(median([sum(v for k, v in s["cpu_cores_used"].items()
                                                   if k.startswith("capture")) for s in d]), 3),
            "detect_cores": rnd(median([s["cpu_cores_used"].get("detect") for s in d]), 3),
            "rss_mb_total": rnd(median([s["rss_mb_total"] for s in d]), 1),
            "runs": d,
            "decode_runs": dec,
        })
    emit({"benchmark": "cameras", "video": str(video), "models": str(args.models),
          "cameras_realtime": args.realtime,
          "threads": args.threads, "providers": args.providers, "config_overrides": args.set,
          "gallery_size": args.gallery_size, "seconds": args.seconds, "warmup": args.warmup,
          "rounds": args.rounds,
          "baseline": "naive single-process loop, 1 camera (bench.naive_loop)",
          "naive_fps": rnd(naive_fps, 3), "naive_runs": samples[("naive", 1)],
          "by_cameras": rows, "environment": env})


if __name__ == "__main__":
    main()
