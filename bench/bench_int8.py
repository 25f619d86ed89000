"""fp32 against int8, per model, side by side on the CPU (issue 14).

    python -m bench.bench_int8 [--models DIR] [--rounds 3] [--seconds 3] [--quick]
                               [--detector-int8 FILE]

Each model runs through its runtime class (stages.face_detector / face_landmarks /
face_embedder), so pre- and post-processing are included, on real inputs from the shared clip:
- detector: one 1080p frame per call at 640 px (batch 1: letterbox, session, decode, NMS);
- landmarks: 32 faces of the clip per call (box crops, session, mapping back);
- embedder: 32 aligned crops per call (flip averaging as the daemon runs it).
The fp32 file and its int8 copy alternate within every round (bench.timing.compare); medians
over rounds, and the speed-up fp32 time / int8 time. int8 copies: `<model>.int8.onnx` beside
each model; a missing detector copy is made in a temporary folder with `facewatch
quantize-model` (static, `--calibration-images`), since none is committed (the lead quantises
the shipped detector). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import REPO, clip_path, emit, environment, log, read_frames, rnd
from bench.timing import compare


def make_int8(kind: str, model: Path, out: Path, images: int) -> Path:
    log(f"quantising {model.name} ({kind}, {images} calibration images) into {out.parent}")
    subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", "quantize-model", "--kind", kind,
                    "--model", str(model), "--out", str(out), "--images", str(images),
                    "--detector", str(model.parent / "face_detector.onnx"),
                    "--landmarks", str(model.parent / "face_landmarks.onnx")],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    from facewatch.export.quantize_onnx import int8_path
    from facewatch.stages.face_crop import crop_faces
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.face_landmarks import LandmarkModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, default=REPO / "models")
    p.add_argument("--video", type=Path, default=None)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per candidate per round")
    p.add_argument("--detector-int8", type=Path, default=None,
                   help="the detector's int8 copy (default: beside it, else made in a temp folder)")
    p.add_argument("--calibration-images", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="1 round of 1.5 s")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 1.5
    cpu = ["CPUExecutionProvider"]
    models = args.models.resolve()
    detector, landmarks, embedder = (models / f"face_{k}.onnx"
                                     for k in ("detector", "landmarks", "embedder"))
    env = environment()
    tmp = Path(tempfile.mkdtemp(prefix="fwint8-"))
    try:
        int8 = {"landmarks": int8_path(landmarks), "embedder": int8_path(embedder),
                "detector": args.detector_int8 or int8_path(detector)}
        made = []
        for kind, model in (("detector", detector), ("landmarks", landmarks),
                            ("embedder", embedder)):
            if not int8[kind].is_file():
                int8[kind] = make_int8(kind, model, tmp / f"{kind}.int8.onnx",
                                       args.calibration_images)
                made.append(kind)

        frames = read_frames(clip_path(args.video), 40, step=2)
        det32 = FaceDetector(detector, cpu, imgsz=640, threads=args.threads)
        det8 = FaceDetector(int8["detector"], cpu, imgsz=640, threads=args.threads)
        found = [(f, d) for f in frames for d in det32.detect([f]) if len(d)]
        if not found:
            raise SystemExit("the detector found no face in the clip")
        boxes = [(f, b) for f, d in found for b in d.boxes]
        boxes32 = [boxes[i % len(boxes)] for i in range(32)]
        lm32 = LandmarkModel(landmarks, cpu, args.threads)
        lm8 = LandmarkModel(int8["landmarks"], cpu, args.threads)
        emb32 = FaceEmbedder(embedder, cpu, args.threads)
        emb8 = FaceEmbedder(int8["embedder"], cpu, args.threads)
        crops = np.concatenate([crop_faces(f, b[None], emb32.crop_spec, lm32.predict(f, b[None]))[0]
                                for f, b in boxes32])

        # one call on 32 boxes (the detect stage runs the model once per frame on its faces)
        busiest, dets = max(found, key=lambda fd: len(fd[1]))
        lm_boxes = np.resize(dets.boxes, (32, 4))

        def landmarks_run(model):
            return lambda: model.predict(busiest, lm_boxes)

        frame = frames[len(frames) // 2]
        candidates = {
            "detector_640_batch1_fp32": (lambda: det32.detect([frame]), 1),
            "detector_640_batch1_int8": (lambda: det8.detect([frame]), 1),
            "landmarks_batch32_fp32": (landmarks_run(lm32), 32),
            "landmarks_batch32_int8": (landmarks_run(lm8), 32),
            "embedder_batch32_fp32": (lambda: emb32.embed(crops), 32),
            "embedder_batch32_int8": (lambda: emb8.embed(crops), 32),
        }
        log(f"{args.rounds} rounds of {len(candidates)} candidates, {args.seconds:g} s each")
        rates = compare(candidates, rounds=args.rounds, seconds=args.seconds)
        per_model = {}
        for name in ("detector_640_batch1", "landmarks_batch32", "embedder_batch32"):
            fp32, i8 = rates[f"{name}_fp32"], rates[f"{name}_int8"]
            per_model[name] = {"fp32_ms_per_item": rnd(1000 / fp32, 3),
                               "int8_ms_per_item": rnd(1000 / i8, 3),
                               "speedup_int8_over_fp32": rnd(i8 / fp32, 3)}
        emit({"benchmark": "int8", "models": str(models), "threads": args.threads,
              "rounds": args.rounds, "seconds": args.seconds,
              "int8_files": {k: str(v) for k, v in int8.items()}, "made_here": made,
              "items_per_s": rates, "per_model": per_model,
              "inputs": {"detector": "one 1080p clip frame, 640 px, pre/post included",
                         "landmarks": "32 boxes of the clip's busiest frame, one call",
                         "embedder": "32 aligned clip crops, flip averaging"},
              "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "environment": env})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
