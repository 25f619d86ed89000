"""Each stage's work alone, as a ceiling for the pipeline: how well does the daemon overlap them?

    python -m bench.bench_stages [--models DIR] [--rounds 3] [--seconds 5] [--quick]

Standalone, in this process, one after the other in alternating rounds (bench.timing.compare):
- decode: cv2 read of the clip, looping (frames/s: the ceiling of any pipeline on this clip);
- detector: FaceDetector.detect on 1080p frames of the clip at --imgsz (640), batch 1 and 8
  (images/s), and at the daemon's own input size when that differs;
- detect stage: the daemon's DetectStage (no sockets) on 16 consecutive frames: batches of
  detect.batch_max through the detector, then ByteTrack, quality gate and crops (frames/s);
- embedder: FaceEmbedder.embed of 32 face crops from the clip (faces/s; includes the mirror pass
  when the model's metadata asks for it, as the daemon does);
- matcher: stages.matcher.Matcher against --gallery-people (10,000) random unit vectors of the
  embedder's dimension: one query per call (best_matches), and `observe` (what match does per
  embedding: a vote over the track's window) (queries/s);
- transport: a VideoFrame holding a 1080p frame (and a FaceCrops of 8 crops) sent through
  stages.transport over ipc:// to an echo process and back (round trip, ms and MB/s).
Then the real daemon (1 camera, `realtime: false`) runs a window after each round: frames/s,
resident memory (RSS, psutil, pids from status.json) and CPU of every process.

Every stage rate is turned into frames/s of the pipeline (embedder and matcher: divided by the
faces the daemon embedded per frame). Pipelining efficiency = daemon frames/s / slowest stage's
frames/s (1.0: the pipeline runs as fast as its slowest stage alone); `serial_fps` is what
running the stages one after the other per frame would give (1 / sum of 1/fps).
"""
from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (LoopingReader, add_common_arguments, apply_quick, bench_config,
                          clip_path, emit, environment, log, make_gallery, median, model_paths, ratio, read_frames,
                          rnd, run_daemon_window, synthetic_embeddings)
from bench.timing import compare


# --- transport: an echo process -----------------------------------------------------------

def _echo(inbound: str, outbound: str) -> None:
    """Receive messages and send them straight back, until EndOfStream."""
    from facewatch.stages.messages import EndOfStream
    from facewatch.stages.transport import Transport

    t = Transport()
    try:
        rx = t.receiver(inbound)
        tx = t.sender(outbound, "echo")
        while True:
            msg = rx.recv(1.0)
            if msg is None:
                continue
            tx.send(msg)
            if isinstance(msg, EndOfStream):
                return
    finally:
        t.close(linger_ms=500)


class EchoLink:
    """This process <-> an echo process over two ipc:// links of the daemon's own layout."""

    def __init__(self):
        from facewatch.stages.transport import Endpoints, Transport

        self.dir = Path(tempfile.mkdtemp(prefix="fwbt-"))
        ep = Endpoints.for_runtime("ipc", self.dir)
        self.transport = Transport()
        self.rx = self.transport.receiver(ep.faces)               # we bind the way back
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=_echo, args=(ep.frames, ep.faces), daemon=True)
        self.proc.start()
        self.tx = self.transport.sender(ep.frames, "bench")       # it binds the way out

    def round_trip(self, msg) -> None:
        if not self.tx.send(msg, timeout_s=30):
            raise RuntimeError("echo process not accepting messages")
        back = self.rx.recv(30)
        if back is None or back.KIND != msg.KIND:
            raise RuntimeError(f"echo returned {back!r}")

    def close(self) -> None:
        from facewatch.stages.messages import EndOfStream

        try:
            self.tx.send(EndOfStream(camera="bench"), timeout_s=2)
            self.rx.recv(5)
        finally:
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
            self.transport.close(linger_ms=0)
            shutil.rmtree(self.dir, ignore_errors=True)


def message_bytes(msg) -> int:
    from facewatch.stages.messages import encode

    return sum(memoryview(f).nbytes for f in encode(msg))


# --- the candidates -----------------------------------------------------------------------

def detect_stage(cfg, frames: list[np.ndarray]):
    """The daemon's DetectStage in this process (no sockets): batches of `detect.batch_max`
    frames through the detector, then tracking, quality gate and crops per frame."""
    from facewatch.stages.detect_stage import DetectStage
    from facewatch.stages.messages import VideoFrame
    from facewatch.stages.metrics import Metrics
    from facewatch.stages.stage import StageContext
    from facewatch.stages.transport import Endpoints, Transport

    tmp = Path(tempfile.mkdtemp(prefix="fwbd-"))
    ctx = StageContext(name="detect", kind="detect", config=cfg, transport=Transport(),
                       endpoints=Endpoints.for_runtime("ipc", tmp), metrics=Metrics())
    stage = DetectStage(ctx)
    stage.setup()
    shutil.rmtree(tmp, ignore_errors=True)
    h, w = frames[0].shape[:2]
    msgs = [VideoFrame(camera="bench", frame_index=i, pts=i / 25, wall_ts=0.0, frame_width=w,
                       frame_height=h, image=f) for i, f in enumerate(frames)]

    def run():
        for msg in msgs:
            stage.process(msg)
        stage.flush()
    return run, stage


def build_candidates(args, cfg, video: Path, echo: EchoLink) -> tuple[dict, dict]:
    """name -> (fn, items per call), and facts about them (sizes, batch, dims)."""
    from facewatch.stages.face_crop import crop_faces
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.face_landmarks import LandmarkModel, landmarks_to_run
    from facewatch.stages.detections import Detections
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.matcher import Matcher
    from facewatch.stages.messages import FaceCrops, VideoFrame

    mc = cfg.models
    frames = read_frames(video, 8, step=13)    # 8 frames spread over the clip
    cands, facts = {}, {}

    reader = LoopingReader(video)
    cands["decode"] = (reader.read, 1)

    daemon_det = FaceDetector(mc.detector, mc.providers, mc.detector_conf, mc.detector_iou,
                              mc.detector_imgsz, mc.threads)
    sizes = [args.imgsz] + ([daemon_det.imgsz] if daemon_det.imgsz != args.imgsz else [])
    for size in sizes:
        det = FaceDetector(mc.detector, mc.providers, mc.detector_conf, mc.detector_iou, size,
                           mc.threads)
        for batch in (1, 8):
            def run(d=det, b=batch):
                for i in range(0, len(frames), b):
                    d.detect(frames[i:i + b])
            cands[f"detector_{size}_batch{batch}"] = (run, len(frames))
        facts[f"detector_{size}_input_hw"] = list(det.preprocess(frames[:1])[0].shape[2:])
    facts["daemon_detector_imgsz"] = daemon_det.imgsz

    consecutive = read_frames(video, 16)
    run, _ = detect_stage(cfg, consecutive)
    cands["detect_stage"] = (run, len(consecutive))
    facts["detect_stage_batch_max"] = cfg.detect.batch_max

    emb = FaceEmbedder(mc.embedder, mc.providers, mc.threads)
    found = daemon_det.detect(frames)
    landmarks_file = landmarks_to_run(emb.crop_spec.alignment, mc.landmarks)
    if landmarks_file is not None:   # its cost is part of detect in the daemon; timed alone here
        marker = LandmarkModel(landmarks_file, mc.providers, mc.threads)
        found = [Detections(d.boxes, d.scores, marker.predict(f, d.boxes)) for f, d in zip(frames, found)]
        cands["landmarks_per_face"] = (lambda: [marker.predict(f, d.boxes) for f, d in zip(frames, found)],
                                       max(1, sum(len(d) for d in found)))
    crops = np.concatenate([crop_faces(f, d.boxes, emb.crop_spec, d.landmarks)[0]
                            for f, d in zip(frames, found)])
    if not len(crops):   # no faces found: random crops time the same
        crops = np.random.default_rng(0).integers(0, 256, (32, emb.input_size, emb.input_size, 3),
                                                  dtype=np.uint8)
        facts["embedder_crops"] = "random (the detector found no face)"
    else:
        facts["embedder_crops"] = f"{len(crops)} faces of the clip, repeated"
    batch32 = np.ascontiguousarray(np.resize(crops, (32,) + crops.shape[1:]))
    cands["embedder_batch32"] = (lambda: emb.embed(batch32), 32)
    facts.update(embedding_size=emb.embedding_size, embedder_input=emb.input_size,
                 flip_average=emb.flip_average)

    gallery = synthetic_embeddings(args.gallery_people, emb.embedding_size, seed=1)
    matcher = Matcher(emb.threshold, votes_needed=3, window=7)
    matcher.set_gallery(np.arange(len(gallery), dtype=np.int64),
                        [f"p{i}" for i in range(len(gallery))], gallery)
    queries = synthetic_embeddings(64, emb.embedding_size, seed=2)
    qi = [0]

    def one_query():
        matcher.best_matches(queries[qi[0] % 64][None])
        qi[0] += 1

    def observe():
        matcher.observe(("bench", 0, 1), queries[qi[0] % 64])
        qi[0] += 1
    cands["matcher_query"] = (one_query, 1)
    cands["matcher_observe"] = (observe, 1)
    cands["matcher_batch32"] = (lambda: matcher.best_matches(queries[:32]), 32)
    facts["gallery_people"] = len(gallery)

    frame = frames[0]
    vf = VideoFrame(camera="bench", frame_index=0, pts=0.0, wall_ts=time.time(),
                    frame_width=frame.shape[1], frame_height=frame.shape[0], image=frame)
    n = 8
    fc = FaceCrops(camera="bench", frame_index=0, pts=0.0, wall_ts=time.time(), epoch=1,
                   track_ids=np.arange(n, dtype=np.int64), boxes=np.zeros((n, 4), np.float32),
                   scores=np.ones(n, np.float32), blur=np.ones(n, np.float32),
                   crops=np.ascontiguousarray(np.resize(crops, (n,) + crops.shape[1:])),
                   ended_tracks=np.zeros(0, np.int64))
    cands["transport_videoframe_roundtrip"] = (lambda: echo.round_trip(vf), 1)
    cands["transport_facecrops8_roundtrip"] = (lambda: echo.round_trip(fc), 1)
    facts["videoframe_bytes"] = message_bytes(vf)
    facts["facecrops8_bytes"] = message_bytes(fc)
    facts["frame_size"] = [frame.shape[1], frame.shape[0]]
    return cands, facts


def stage_fps(rates: dict, daemon: dict) -> dict:
    """Every stage as frames/s of the pipeline, from the standalone rates."""
    emb_per_frame = daemon.get("faces_embedded_per_frame") or 0.0
    out = {
        "decode": rates["decode"],
        "detect": rates["detect_stage"],
        "transport_frame": 2 * rates["transport_videoframe_roundtrip"],   # one way
    }
    if emb_per_frame > 0:   # the embedder and matcher only see the faces chosen for embedding
        out["embed"] = rates["embedder_batch32"] / emb_per_frame
        out["match"] = rates["matcher_observe"] / emb_per_frame
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p, seconds=5, warmup=10, rounds=3)
    p.add_argument("--imgsz", type=int, default=640, help="detector input size for the "
                                                           "standalone detector numbers")
    p.add_argument("--gallery-people", type=int, default=10000,
                   help="size of the matcher's synthetic gallery")
    p.add_argument("--pipeline-seconds", type=float, default=20,
                   help="daemon window after each round (0: no daemon run)")
    args = apply_quick(p.parse_args(), seconds=1.5, warmup=3)
    if args.quick:
        args.pipeline_seconds = min(args.pipeline_seconds, 6)
    detector, embedder = model_paths(args.models)
    video = clip_path(args.video)
    env = environment()

    cfg = bench_config(args, detector, embedder)
    workdir = Path(tempfile.mkdtemp(prefix="fwbs-"))
    echo = EchoLink()
    try:
        gallery_db = workdir / "gallery.db"
        make_gallery(gallery_db, embedder, args.gallery_size)
        cands, facts = build_candidates(args, cfg, video, echo)
        per_round, daemons = [], []
        camera = [{"name": "cam0", "uri": str(video), "loop": True, "realtime": False}]
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: {len(cands)} standalone measurements of "
                f"{args.seconds:g} s")
            per_round.append(compare(cands, rounds=1, seconds=args.seconds))
            if args.pipeline_seconds > 0:
                log(f"round {r + 1}/{args.rounds}: daemon, {args.warmup:.0f} s warm-up + "
                    f"{args.pipeline_seconds:.0f} s")
                daemons.append(run_daemon_window(camera, args, detector, embedder, gallery_db,
                                                 args.warmup, args.pipeline_seconds))
    finally:
        echo.close()
        shutil.rmtree(workdir, ignore_errors=True)
    rates = {k: median([r[k] for r in per_round]) for k in cands}
    vf_rtt = 1000 / rates["transport_videoframe_roundtrip"]
    fc_rtt = 1000 / rates["transport_facecrops8_roundtrip"]
    out = {
        "benchmark": "stages", "video": str(video), "models": str(args.models),
        "threads": args.threads, "providers": args.providers, "config_overrides": args.set,
        "rounds": args.rounds, "seconds": args.seconds,
        "decode_fps": rnd(rates["decode"]),
        "detector_images_per_s": {k[len("detector_"):]: rnd(v) for k, v in rates.items()
                                  if k.startswith("detector_")},
        "embedder_faces_per_s_batch32": rnd(rates["embedder_batch32"]),
        "matcher_queries_per_s": {"one_query": rnd(rates["matcher_query"]),
                                  "observe": rnd(rates["matcher_observe"]),
                                  "batch32": rnd(rates["matcher_batch32"])},
        "transport": {
            "videoframe_1080p": {"bytes": facts["videoframe_bytes"],
                                 "round_trip_ms": rnd(vf_rtt, 3),
                                 "ms_per_frame": rnd(vf_rtt / 2, 3),
                                 "mb_per_s": rnd(2 * facts["videoframe_bytes"] / vf_rtt / 1e3, 1)},
            "facecrops_8": {"bytes": facts["facecrops8_bytes"], "round_trip_ms": rnd(fc_rtt, 3),
                            "ms_per_message": rnd(fc_rtt / 2, 3),
                            "mb_per_s": rnd(2 * facts["facecrops8_bytes"] / fc_rtt / 1e3, 1)}},
        "detect_stage_frames_per_s": rnd(rates["detect_stage"]),
        "facts": facts,
        "standalone_rounds": per_round,
    }
    if daemons:
        d = {k: median([x[k] for x in daemons]) for k in ("fps", "faces_embedded_per_frame",
                                                          "rss_mb_total")}
        fps_eq = stage_fps(rates, d)
        slowest = min(fps_eq, key=fps_eq.get)
        serial = 1 / sum(1 / v for v in fps_eq.values())
        out.update({
            "daemon_fps": rnd(d["fps"], 3),
            "stage_fps_equivalent": fps_eq,
            "slowest_stage": slowest,
            "pipelining_efficiency": ratio(d["fps"], fps_eq[slowest]),
            "serial_fps": rnd(serial),
            "daemon_over_serial": ratio(d["fps"], serial),
            "rss_mb": daemons[-1]["rss_mb"],
            "rss_mb_total": rnd(d["rss_mb_total"], 1),
            "cpu_cores_used": daemons[-1]["cpu_cores_used"],
            "daemon_rounds": daemons,
        })
    out["environment"] = env
    emit(out)


if __name__ == "__main__":
    main()
