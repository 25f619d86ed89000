"""The daemon's memory (issue 13: RSS of all processes, one camera, <= 600 MB; measured by
bench/bench_footprint.py, bench/results/footprint_issue13_lean_levers.json). What each stage process loads
and how it opens its camera, checked in processes of their own: a lever that is lost shows here,
not only in a benchmark."""
from __future__ import annotations

import os
import subprocess
import sys

import cv2

from conftest import REPO
from facewatch.daemon.config import CameraConfig, CaptureConfig
from facewatch.stages.capture import VideoSource


def modules_after(script: str) -> list[str]:
    """What `script`, run in a fresh interpreter on this checkout, prints."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**env, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_embed_stage_does_not_load_opencv():
    """The embed stage takes crops made by detect; OpenCV (~17 MB of RSS) stays out of it. What
    the worker imports for it: its stage module, the embedder and the shared stage plumbing."""
    out = modules_after(
        "import sys\n"
        "import facewatch.daemon.worker, facewatch.stages.metrics, facewatch.stages.stage\n"
        "import facewatch.stages.embed_stage, facewatch.stages.face_embedder\n"
        "import facewatch.stages.precision, facewatch.stages.embedder_info\n"
        "from facewatch.stages.face_crop import CropSpec\n"
        "CropSpec()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'cv2', 'supervision'}))\n")
    assert out == "[]", out


def test_capture_opens_files_and_streams_with_the_configured_decoder_threads(short_video):
    """capture.decode_threads reaches FFmpeg: 1 by default (each frame thread holds decoded
    frames: ~8 MB per 1080p camera), any other count when configured."""
    camera = CameraConfig(name="a", uri=str(short_video.path))
    for cfg, expected in ((CaptureConfig(), 1), (CaptureConfig(decode_threads=3), 3)):
        source = VideoSource(camera, cfg)
        assert source.open()
        try:
            assert source.cap.get(cv2.CAP_PROP_N_THREADS) == expected
            frame, _ = source.read()
            assert frame is not None and frame.shape[2] == 3
        finally:
            source.close()
