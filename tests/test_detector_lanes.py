"""Detector lanes (issue 14): the plan per host, the same faces as one session, and the detect
stage streaming a real video over lanes with the same tracks, in order, as batched calls."""
from __future__ import annotations

import numpy as np
import pytest

from bench.bench_detector_lanes import clip_frames

from facewatch.daemon.config import parse_config
from facewatch.stages.detect_stage import DetectStage
from facewatch.stages.detector_lanes import DetectorLanes, lane_plan
from facewatch.stages.face_detector import FaceDetector
from facewatch.stages.messages import FaceCrops, VideoFrame
from facewatch.stages.metrics import Metrics
from facewatch.stages.stage import StageContext
from facewatch.stages.transport import Endpoints, Transport

CPU = "CPUExecutionProvider"


@pytest.mark.parametrize("lanes, threads, provider, cores, expected", [
    (0, 0, CPU, 2, (2, 1)),          # auto on 2 cores: two single-thread lanes
    (0, 0, CPU, 16, (4, 4)),         # auto on 16 cores: at most 4 lanes, the cores shared
    (0, 4, CPU, 16, (4, 1)),         # models.threads is the budget
    (3, 0, CPU, 8, (3, 2)),
    (1, 0, CPU, 8, (0, 0)),          # one lane: batched calls as before
    (0, 0, CPU, 1, (0, 0)),          # one core: nothing to run side by side
    (0, 0, "CUDAExecutionProvider", 8, (0, 0)),   # a GPU gains from batches
])
def test_lane_plan(lanes, threads, provider, cores, expected):
    assert lane_plan(lanes, threads, provider, cores) == expected


def video_frames(video, count: int) -> list[np.ndarray]:
    return clip_frames(video.path, count)


def test_lanes_find_what_one_session_finds_in_the_frames_order(models, face_video):
    detector, _ = models
    frames = video_frames(face_video, 24)
    single = FaceDetector(detector, [CPU], 0.25, 0.5)
    expected = [single.detect([f])[0] for f in frames]
    lanes = DetectorLanes(single, 2,
                          lambda: FaceDetector(detector, [CPU], 0.25, 0.5, threads=1))
    try:
        got = [f.result() for f in [lanes.submit(frame) for frame in frames]]
        assert len(lanes.submit(frames[0], wide=True).result()) == len(expected[0])
    finally:
        lanes.close()
    assert sum(len(d) for d in expected) >= 10, "too few faces to compare: is the model trained?"
    for want, have in zip(expected, got):
        assert len(have) == len(want)
        np.testing.assert_allclose(have.boxes, want.boxes, atol=0.5)
        np.testing.assert_allclose(have.scores, want.scores, atol=1e-3)


def test_a_lane_error_reaches_the_caller(models):
    detector, _ = models
    lanes = DetectorLanes(FaceDetector(detector, [CPU], threads=1), 2,
                          lambda: FaceDetector(detector, [CPU], threads=1))
    try:
        with pytest.raises(ValueError, match="uint8"):
            lanes.submit(np.zeros((64, 64, 3), np.float32)).result()
        assert len(lanes.submit(np.zeros((64, 64, 3), np.uint8)).result()) == 0  # lane freed
    finally:
        lanes.close()


def test_a_finished_frame_wakes_the_receive_wait_and_a_message_still_arrives(tmp_path, models,
                                                                            face_video):
    """The detect loop sleeps in its socket wait while frames are at the lanes: a finished frame
    must end that wait at once (not at its timeout), and messages must still come through it."""
    import time

    from facewatch.stages.messages import EndOfStream

    detector, _ = models
    frame = video_frames(face_video, 1)[0]
    lanes = DetectorLanes(FaceDetector(detector, [CPU], threads=1), 2,
                          lambda: FaceDetector(detector, [CPU], threads=1))
    rx_transport, tx_transport = Transport(), Transport()
    endpoint = f"ipc://{tmp_path}/wake.sock"
    try:
        rx = rx_transport.receiver(endpoint)
        lanes.bell.clear()
        assert rx.recv(0.05, lanes.bell) is None          # nothing rang: the full timeout
        started = time.monotonic()
        future = lanes.submit(frame)
        assert rx.recv(30.0, lanes.bell) is None          # woken by the frame, no message
        assert future.done() and time.monotonic() - started < 10.0
        lanes.bell.clear()
        tx = tx_transport.sender(endpoint, "test")
        assert tx.send(EndOfStream(camera="cam", reason="test"))
        msg = rx.recv(10.0, lanes.bell)
        assert isinstance(msg, EndOfStream) and msg.camera == "cam"
    finally:
        lanes.close()
        tx_transport.close()
        rx_transport.close()


def run_detect_stage(tmp_path, models, video, frames, lanes: int, live: bool = False,
                     poll_every: int = 3, cameras: int = 1, every_face: bool = True,
                     inspect=None) -> tuple[list[FaceCrops], Metrics]:
    """The detect stage in this process (no sockets), fed the video's frames as a lossless file
    camera; what it sends, in order, until it is flushed. `every_face`: every tracked face is
    cropped on every frame (embed.recheck_interval_s 0), else the shipped selection.
    `inspect(stage, sent)` runs once the frames are in, before the stage is torn down."""
    from facewatch.stages import run_state

    detector, embedder = models
    runtime = tmp_path / f"run{lanes}{live}{every_face}"
    runtime.mkdir()
    run_state.create(runtime)   # as the supervisor does before starting stages
    cfg = parse_config({"cameras": [{"name": f"cam{c}" if c else "cam", "uri": str(video.path),
                                     "realtime": live} for c in range(cameras)],
                        "runtime": {"dir": str(runtime)},
                        "models": {"detector": str(detector), "embedder": str(embedder),
                                   "providers": [CPU]},
                        "detect": {"lanes": lanes, "batch_max": 4},
                        "embed": {"recheck_interval_s": 0} if every_face else {}}, tmp_path)
    ctx = StageContext(name="detect", kind="detect", config=cfg, transport=Transport(),
                       endpoints=Endpoints.from_config(cfg), metrics=Metrics())
    stage = DetectStage(ctx)
    stage.setup()
    try:
        assert (stage.lanes is not None) == (lanes > 1)
        out = []
        for i, image in enumerate(frames):
            h, w = image.shape[:2]
            for c in range(cameras):
                out += stage.process(VideoFrame(camera=f"cam{c}" if c else "cam", frame_index=i,
                                                pts=i / 25, wall_ts=1000.0 + i / 25,
                                                frame_width=w, frame_height=h, roi_x=0, roi_y=0,
                                                image=image))
            if i % poll_every == 0:
                out += stage.poll(float("inf"))   # as the loop does between messages
        out += stage.flush()
        assert not stage.pending and not stage.inflight
        if inspect is not None:
            inspect(stage, out)
        return out, ctx.metrics
    finally:
        stage.teardown()
        ctx.transport.close()


def test_detect_stage_streams_over_lanes_with_the_tracks_of_batched_calls(tmp_path, models,
                                                                           face_video):
    frames = video_frames(face_video, 60)
    batched, _ = run_detect_stage(tmp_path, models, face_video, frames, lanes=1)
    streamed, _ = run_detect_stage(tmp_path, models, face_video, frames, lanes=2)
    assert len(batched) >= 20, "too few frames with faces: is the model trained?"
    assert [m.frame_index for m in streamed] == [m.frame_index for m in batched]
    assert all(a < b for a, b in zip([m.frame_index for m in streamed],
                                     [m.frame_index for m in streamed][1:]))
    for s, b in zip(streamed, batched):
        # batches pad frames to a shared shape: boxes move by a pixel at most
        assert s.track_ids.tolist() == b.track_ids.tolist()
        np.testing.assert_allclose(s.boxes, b.boxes, atol=1.5)
        assert set(s.stamps) == {"detect_recv", "detect_start", "detect_done"}
        assert s.stamps["detect_recv"] <= s.stamps["detect_start"] <= s.stamps["detect_done"]


def stale_frames(metrics) -> float:
    return sum(s.value for family in metrics.frames_dropped.collect() for s in family.samples
               if s.name.endswith("_total") and s.labels.get("reason") == "stale")


def test_a_live_camera_newest_frame_replaces_the_waiting_one(tmp_path, models, face_video):
    """Frames of a live camera arriving faster than the detector: the ones it had no time for
    are dropped as stale (counted), never queued, and what is sent stays in order."""
    frames = video_frames(face_video, 40)
    sent, metrics = run_detect_stage(tmp_path, models, face_video, frames, lanes=2, live=True,
                                     poll_every=10**6)   # a burst: no loop turn in between
    indices = [m.frame_index for m in sent]
    assert indices == sorted(set(indices)) and indices[-1] == len(frames) - 1
    stale = stale_frames(metrics)
    # every frame was either detected (sent if it had faces) or dropped as stale
    assert stale >= len(frames) - 1 - 2 * 2 and len(sent) <= len(frames) - stale


def test_live_cameras_never_hold_the_loop_on_busy_lanes(tmp_path, models, face_video):
    """Four live cameras, a burst of frames and more waiting than lanes: the stage goes on
    reading (each camera's newest frame replaces its waiting one) instead of waiting for the
    lanes, which would leave the frames queued behind it to go stale in the socket."""
    frames = video_frames(face_video, 15)
    sent, metrics = run_detect_stage(tmp_path, models, face_video, frames, lanes=2, live=True,
                                     poll_every=10**6, cameras=4)
    # 60 frames in; detected at most: the first (full session), one waiting per camera at the
    # end and whatever the lanes finished during the burst; a loop held by busy lanes would
    # have detected nearly all of them
    assert stale_frames(metrics) >= 30
    for camera in ("cam", "cam1", "cam2", "cam3"):
        indices = [m.frame_index for m in sent if m.camera == camera]
        assert indices == sorted(set(indices))


def test_only_the_faces_to_embed_are_cropped(tmp_path, models, face_video):
    """With the shipped selection (embed.votes 3, recheck_interval_s 2) a track's first three
    good crops leave detect, then one per 2 s of media time; the other faces cost detection and
    tracking only. The first crop of a track is marked for its first decision."""
    frames = video_frames(face_video, 75)   # 3 s at 25 fps
    sent, metrics = run_detect_stage(tmp_path, models, face_video, frames, lanes=2,
                                     every_face=False)
    every, _ = run_detect_stage(tmp_path, models, face_video, frames, lanes=2)
    crops_of = lambda msgs: sum(len(m.track_ids) for m in msgs)
    assert crops_of(every) >= 60, "too few faces tracked: is the model trained?"
    seen: dict[int, list[float]] = {}
    for m in sent:
        firsts = []
        for tid in m.track_ids.tolist():
            seen.setdefault(tid, []).append(m.pts)
            firsts.append(len(seen[tid]) == 1)
        assert m.first_decision == any(firsts)
    assert seen
    for tid, times in seen.items():
        later = times[3:]
        assert all(b - a >= 2.0 for a, b in zip(times[2:], later)), (tid, times)
        assert len(later) <= 1, (tid, times)   # 3 s of video: at most one recheck
    assert crops_of(sent) <= crops_of(every) / 4
    detected = sum(s.value for fam in metrics.faces_detected.collect() for s in fam.samples
                   if s.name.endswith("_total"))
    assert detected >= crops_of(every)


def test_crops_that_never_reach_embed_are_wanted_again(tmp_path, models, face_video):
    """Embed down: a FaceCrops that cannot be handed on (no peer on the socket, the send
    timeout) makes every track of its camera want crops again, as a fresh embed would, instead
    of waiting for the next recheck with crops counted that nobody embedded."""
    import zmq
    from facewatch.stages.transport import Sender

    seen = {}

    def embed_down(stage, sent):
        tracked = len(stage.selection)
        last = sent[-1]
        ids = np.array(sorted(stage.run_ids["cam"]), np.int64)   # the tracker's ids
        seen["before"] = stage.selection.wanted("cam", ids, last.pts).tolist()
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.bind(f"ipc://{tmp_path}/nobody")
        try:
            stage.send_all(Sender(sock, "detect", "nobody"), [sent[0]])
        finally:
            sock.close(linger=0)
        seen.update(tracked=tracked, after=len(stage.selection),
                    wanted=stage.selection.wanted("cam", ids, last.pts).tolist())

    frames = video_frames(face_video, 20)
    _, metrics = run_detect_stage(tmp_path, models, face_video, frames, lanes=2,
                                  every_face=False, inspect=embed_down)
    assert seen["tracked"] >= 1 and not all(seen["before"]), seen
    assert seen["after"] == 0 and all(seen["wanted"]), seen
    lost = sum(s.value for fam in metrics.messages_lost.collect() for s in fam.samples
               if s.name.endswith("_total"))
    assert lost == 1
