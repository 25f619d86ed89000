"""Detector lanes vs one session on the CPU, 1080p clip frames at the daemon's size (issue 14).

    python -m bench.bench_detector_lanes [--models models] [--lanes 0] [--rounds 3] [--seconds 4]

Candidates, per precision (fp32 and the int8 copy when it is there), alternating in rounds:
- `session_batch1`: one session with onnxruntime's threads, one frame per call (a lone live
  camera; the baseline);
- `session_batch4`: the same session, four frames per call (the detect stage's batches before
  lanes);
- `lanes`: `stages.detector_lanes.DetectorLanes` as the detect stage builds them
  (`detect.lanes`, 0 = auto), frames submitted as a stream and collected in order.
Prints one JSON object: frames/s, and ratios against the baseline and against the batches.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2

from bench.common import clip_path, emit, environment
from bench.timing import compare
from facewatch.stages.detector_lanes import DetectorLanes, lane_plan
from facewatch.stages.face_detector import FaceDetector
from facewatch.stages.precision import int8_sibling

CPU = "CPUExecutionProvider"


def clip_frames(video: Path, count: int) -> list:
    cap = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise SystemExit(f"no frames could be read from {video}")
    return frames


def candidates_for(model: Path, frames: list, lanes: int, threads: int) -> tuple[dict, list]:
    session = FaceDetector(model, [CPU], 0.25, 0.5, threads=threads)
    n, lane_threads = lane_plan(lanes, threads, CPU)
    if not n:
        raise SystemExit(f"detect.lanes {lanes} with {threads} threads plans no lanes here")
    pool = DetectorLanes(session, n,
                         lambda: FaceDetector(model, [CPU], 0.25, 0.5, threads=lane_threads))

    def batches(size):
        def run():
            for i in range(0, len(frames), size):
                session.detect(frames[i:i + size])
        return run

    def streamed():
        for future in [pool.submit(f) for f in frames]:
            future.result()

    return {"session_batch1": (batches(1), len(frames)),
            "session_batch4": (batches(4), len(frames)),
            f"lanes_{n}x{lane_threads}": (streamed, len(frames))}, [pool]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--video", type=Path, default=None)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--lanes", type=int, default=0, help="detect.lanes (0: auto)")
    p.add_argument("--threads", type=int, default=0, help="models.threads (0: auto)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args()
    video = clip_path(args.video)
    frames = clip_frames(video, args.frames)
    fp32 = args.models / "face_detector.onnx"
    models = {"fp32": fp32}
    if int8_sibling(fp32).is_file():
        models["int8"] = int8_sibling(fp32)
    out = {"benchmark": "detector_lanes", "video": str(video), "frames": len(frames),
           "frame_size": list(frames[0].shape[:2]), "cores": os.cpu_count(),
           "lanes_setting": args.lanes, "threads_setting": args.threads,
           "baseline": "session_batch1 (one session, onnxruntime's threads, one frame a call)",
           "frames_per_s": {}, "ratios": {}}
    for precision, model in models.items():
        candidates, pools = candidates_for(model, frames, args.lanes, args.threads)
        try:
            rates = compare(candidates, rounds=args.rounds, seconds=args.seconds)
        finally:
            for pool in pools:
                pool.close()
        lanes_key = next(k for k in rates if k.startswith("lanes_"))
        out["frames_per_s"][precision] = rates
        out["ratios"][precision] = {
            "lanes_over_batch1": round(rates[lanes_key] / rates["session_batch1"], 3),
            "lanes_over_batch4": round(rates[lanes_key] / rates["session_batch4"], 3),
            "batch4_over_batch1": round(rates["session_batch4"] / rates["session_batch1"], 3)}
    out["environment"] = environment()
    emit(out)


if __name__ == "__main__":
    main()
