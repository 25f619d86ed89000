"""Speed of the exported face embedder in onnxruntime: embeddings/s and ms per face.

    python bench/bench_embedder.py [--model models/face_embedder.onnx] [--cuda] [--threads 2]

Times the bare ONNX session (one forward pass per face) at batch 1 and 32, and the daemon's
`FaceEmbedder.embed` (which adds the mirror-image pass when the model's flip_average is on).
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from facewatch.stages.face_embedder import FaceEmbedder  # noqa: E402


def time_call(fn, min_seconds: float, min_runs: int = 5) -> float:
    """Median seconds per call after a warm-up call."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(model: Path, providers: tuple[str, ...], threads: int, batches: list[int],
          seconds: float) -> dict:
    embedder = FaceEmbedder(model, providers=providers, threads=threads)
    size = embedder.input_size
    rng = np.random.default_rng(0)
    results: dict = {"model": str(model), "provider": embedder.provider, "threads": threads or "default",
                     "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                     "flip_average": embedder.flip_average, "batches": {}}
    for batch in batches:
        crops = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        x = np.ascontiguousarray(crops[..., ::-1], dtype=np.float32)
        forward = time_call(lambda: embedder._run(x), seconds)
        full = time_call(lambda: embedder.embed(crops), seconds)
        results["batches"][str(batch)] = {
            "forward_ms_per_face": round(1000 * forward / batch, 3),
            "forward_embeddings_per_s": round(batch / forward, 1),
            "embed_ms_per_face": round(1000 * full / batch, 3),
            "embed_faces_per_s": round(batch / full, 1),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/face_embedder.onnx"))
    parser.add_argument("--cuda", action="store_true", help="also time CUDAExecutionProvider if available")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    args = parser.parse_args()
    if not args.model.is_file():
        print(f"model not found: {args.model} (export one with `facewatch export-embedder`)",
              file=sys.stderr)
        return 2
    out = {"cpu": bench(args.model, ("CPUExecutionProvider",), args.threads, args.batch, args.seconds)}
    if args.cuda:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            out["cuda"] = bench(args.model, ("CUDAExecutionProvider",), args.threads, args.batch,
                                args.seconds)
        else:
            out["cuda"] = {"skipped": f"CUDAExecutionProvider not in onnxruntime {ort.__version__}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
