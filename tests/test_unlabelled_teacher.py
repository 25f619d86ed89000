"""Faces without identity in embedder training: the masked ArcFace loss, the epoch mix, the
unlabelled teacher cache built on real WIDER images and clip frames, and a real short run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facewatch.training.embedder_data import DEFAULT_DETECTOR as DETECTOR
from facewatch.training.embedder_losses import ArcMarginHead, arcface_loss, distillation_loss
from facewatch.training.lfw import default_images_dir
from facewatch.training.paths import shared_data_dir
from facewatch.training.unlabelled_teacher import default_video, default_widerface_dir

LFW, WIDER, VIDEO = default_images_dir(), default_widerface_dir(), default_video()
needs_data = pytest.mark.skipif(
    not (LFW.is_dir() and WIDER.is_dir() and VIDEO.is_file()),
    reason=f"shared data not found under {shared_data_dir()} (set FACEWATCH_DATA)")
needs_detector = pytest.mark.skipif(not DETECTOR.is_file(),
                                    reason=f"face detector not trained yet: {DETECTOR}")
# Small enough for seconds, large enough to hold faces on both sides of the 48 px threshold.
MAX_IMAGES, MAX_FRAMES = 8, 6


def unit(rng, n, d):
    e = rng.normal(size=(n, d)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- the loss
def test_arcface_ignores_rows_labelled_minus_one():
    rng = np.random.default_rng(0)
    head = ArcMarginHead(5, scale=30.0, margin=0.5)
    head.build((None, 8))
    e = unit(rng, 10, 8)
    labels = np.array([0, -1, 1, 2, -1, -1, 4, 3, -1, 1])
    labelled = labels >= 0
    alone = float(arcface_loss(head(e[labelled], labels[labelled]), labels[labelled]))
    mixed = float(arcface_loss(head(e, labels), labels))
    assert np.isfinite(mixed) and mixed == pytest.approx(alone, rel=1e-5)
    # Whatever the unlabelled rows hold, the identity loss does not move.
    e2 = e.copy()
    e2[~labelled] = unit(rng, int((~labelled).sum()), 8)
    assert float(arcface_loss(head(e2, labels), labels)) == pytest.approx(alone, rel=1e-5)
    # A batch of unlabelled faces only has no identity loss at all.
    none = np.full(4, -1)
    assert float(arcface_loss(head(e[:4], none), none)) == 0.0


def test_trainer_loss_is_arcface_on_labelled_rows_plus_distillation_on_all():
    from facewatch.training.embedder_model import EmbedderTrainer, build_embedder

    rng = np.random.default_rng(1)
    trainer = EmbedderTrainer(build_embedder("micro", 16), "arcface", 4, distill_weight=2.0,
                              relation_weight=3.0)
    e, teacher = unit(rng, 8, 16), unit(rng, 8, 16)
    labels = np.array([0, 1, -1, 2, -1, 3, 0, -1])
    labelled = labels >= 0
    got = float(trainer.compute_loss(y=(labels, teacher), y_pred=e))
    identity = float(arcface_loss(trainer.head(e[labelled], labels[labelled]), labels[labelled]))
    distill = float(distillation_loss(e, teacher, 2.0, 3.0))
    assert got == pytest.approx(identity + distill, rel=1e-5)
    # --identity-weight scales the identity loss; 0 leaves the distillation alone
    for weight in (0.5, 0.0):
        trainer.identity_weight = weight
        got = float(trainer.compute_loss(y=(labels, teacher), y_pred=e))
        assert got == pytest.approx(weight * identity + distill, rel=1e-5)


@pytest.mark.parametrize(("argv", "message"), [
    (["--identity-weight", "0"], "--identity-weight 0 leaves no loss without a --teacher"),
    (["--identity-weight", "-1", "--teacher", "sface"], "--identity-weight must be >= 0"),
])
def test_identity_weight_is_checked_before_any_data_is_prepared(runs, argv, message):
    import argparse

    from facewatch.training import train_embedder

    parser = argparse.ArgumentParser()
    train_embedder.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        train_embedder._check_labelled(parser.parse_args(argv))


def test_epochs_cap_the_share_of_unlabelled_faces():
    from facewatch.training.embedder_data import ShuffledBatches

    labels = np.concatenate([np.repeat(np.arange(30), 4), np.full(200, -1)])
    crops = np.zeros((len(labels), 8, 8, 3), np.uint8)
    batches = ShuffledBatches(crops, labels, batch_size=10, augment=False,
                              max_unlabelled_share=0.25)
    assert batches.unlabelled_per_epoch == 40 and len(batches) == 16   # 120 labelled + 40
    for _ in range(2):
        order = batches.order
        assert len(order) == 160 and len(set(order.tolist())) == 160
        assert (labels[order] >= 0).sum() == 120   # every labelled image, every epoch
        batches.on_epoch_end()
    # Without a cap, everything is shown.
    assert len(ShuffledBatches(crops, labels, batch_size=10, augment=False)) == 32
    with pytest.raises(ValueError, match="max_unlabelled_share"):
        ShuffledBatches(crops, labels, batch_size=10, max_unlabelled_share=1.0)


# ---------------------------------------------------------------------------- the cache
@pytest.fixture(scope="module")
def faces(runs):
    pytest.importorskip("dlib", reason="the teacher extra (dlib-bin) is not installed")
    if not (WIDER.is_dir() and VIDEO.is_file()):
        pytest.skip(f"shared data not found under {shared_data_dir()} (set FACEWATCH_DATA)")
    if not DETECTOR.is_file():
        pytest.skip(f"face detector not trained yet: {DETECTOR}")
    from facewatch.training.unlabelled_teacher import load_unlabelled_faces

    # The same settings as the training test below, so the run reuses this cache.
    return load_unlabelled_faces(max_images=MAX_IMAGES, max_frames=MAX_FRAMES,
                                 cache_root=runs / "teacher_cache")


def test_cache_holds_every_wider_face_at_least_48_px_tall_and_only_those(faces):
    from PIL import Image

    from facewatch.training.unlabelled_teacher import widerface_images
    from facewatch.training.widerface_landmarks import read_yolo_boxes

    expected, small = {}, 0
    for rel in widerface_images(WIDER, MAX_IMAGES):
        with Image.open(WIDER / "images" / rel) as im:
            boxes = read_yolo_boxes((WIDER / "labels" / rel).with_suffix(".txt"), *im.size)
        tall = (boxes[:, 3] - boxes[:, 1]) >= 48
        small += int((~tall).sum())
        if tall.any():
            expected[rel] = boxes[tall]
    assert small > 0 and expected, "the test images must hold faces on both sides of 48 px"
    kinds = faces.kinds()
    wider = np.flatnonzero(kinds == "widerface")
    got = {}
    for row in wider:
        got.setdefault(faces.sources[faces.source[row]].path, []).append(faces.boxes[row])
    assert set(got) == set(expected)
    for rel, boxes in expected.items():
        np.testing.assert_allclose(np.array(got[rel]), boxes, atol=1e-3)
    assert faces.report["widerface_faces"] == len(wider) == sum(len(b) for b in expected.values())
    assert faces.report["widerface"]["under_min_px"] == small
    assert (faces.track_ids[wider] == -1).all()


def test_cache_holds_the_clips_tracked_faces(faces):
    clip = np.flatnonzero(faces.kinds() == "clip")
    assert len(clip) >= 4   # 4 to 8 faces a frame, several of them large
    frames = {faces.sources[faces.source[r]].frame for r in clip}
    assert frames <= set(range(0, MAX_FRAMES, 2))
    heights = faces.boxes[clip, 3] - faces.boxes[clip, 1]
    assert (heights >= 48).all() and (faces.track_ids[clip] > 0).all()
    # A face tracked across the kept frames keeps its id.
    assert len(set(faces.track_ids[clip].tolist())) < len(clip)


def test_cache_rows_are_dlibs_own_vectors_and_reload(faces):
    from facewatch.training.dlib_teacher import DlibTeacher
    from facewatch.training.unlabelled_teacher import load_unlabelled_faces

    assert faces.embeddings.shape == (len(faces), 128) and faces.landmarks.shape == (len(faces), 5, 2)
    np.testing.assert_allclose(np.linalg.norm(faces.embeddings, axis=1), 1.0, atol=1e-4)
    assert faces.plausible.mean() > 0.5
    # One face of each kind, recomputed directly: the rows belong to their sources.
    teacher = DlibTeacher()
    wanted = {int(faces.source[np.flatnonzero(faces.kinds() == k)[-1]]) for k in ("widerface", "clip")}
    for source, frame in faces.frames():
        if source not in wanted:
            continue
        rows = np.flatnonzero(faces.source == source)
        points, vectors = teacher.describe(frame[..., ::-1], faces.boxes[rows])
        np.testing.assert_allclose(vectors, faces.embeddings[rows], atol=1e-4)
        np.testing.assert_allclose(points, faces.landmarks[rows], atol=1e-3)
    again = load_unlabelled_faces(max_images=MAX_IMAGES, max_frames=MAX_FRAMES,
                                  cache_root=faces.folder.parent)
    assert again.folder == faces.folder and again.sources == faces.sources
    np.testing.assert_array_equal(again.embeddings, faces.embeddings)


def test_unlabelled_crops_are_crop_faces_on_dlibs_landmarks(faces):
    from facewatch.stages.face_crop import CropSpec, crop_faces
    from facewatch.training.embedder_data import load_unlabelled_crops

    spec = CropSpec(alignment="five_point")
    crops, aligned = load_unlabelled_crops(faces, spec)
    assert crops.shape == (len(faces), 112, 112, 3) and aligned == int(faces.plausible.sum())
    source, frame = next(faces.frames())
    rows = np.flatnonzero(faces.source == source)
    expected, _ = crop_faces(frame, faces.boxes[rows], spec, faces.landmarks[rows])
    np.testing.assert_array_equal(crops[rows], expected)


# ---------------------------------------------------------------------------- training
def train(*extra: str):
    from facewatch.daemon.cli import build_parser
    from facewatch.training.train_embedder import train as train_run

    argv = ["train-embedder", "--backbone", "micro", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch", "16", "--max-people", "12", "--val-pairs", "100", "--embedding-size", "128",
            *extra]
    return train_run(build_parser("train-embedder").parse_args(argv))


@pytest.mark.parametrize("extra, message", [
    ((), "--teacher dlib"),
    (("--teacher", "dlib", "--loss", "triplet"), "arcface only"),
    (("--teacher", "dlib", "--landmarks", "detector"), "--landmarks dlib"),
])
def test_unlabelled_teacher_refuses_what_cannot_work(runs, extra, message):
    with pytest.raises(ValueError, match=message):
        train("--unlabelled-teacher", "--out", "refused", *extra)
    assert not (runs / "embedder" / "refused").exists()


@needs_data
@needs_detector
def test_short_run_mixes_unlabelled_faces_into_distillation(runs, faces):
    run_dir = train("--loss", "arcface", "--teacher", "dlib", "--unlabelled-teacher",
                    "--unlabelled-max-images", str(MAX_IMAGES),
                    "--unlabelled-max-frames", str(MAX_FRAMES), "--out", "run-unlabelled")
    summary = json.loads((run_dir / "summary.json").read_text())
    unlabelled = summary["data"]["unlabelled"]
    assert unlabelled["cache"] == faces.key   # the cache built above, not a second one
    kinds = faces.kinds()[faces.plausible]
    assert unlabelled["widerface"] == int((kinds == "widerface").sum()) > 0
    assert unlabelled["clip"] == int((kinds == "clip").sum()) > 0
    assert 0 < unlabelled["per_epoch"] <= unlabelled["widerface"] + unlabelled["clip"]
    assert summary["args"]["unlabelled_teacher"] is True
    assert np.isfinite(summary["history"][0]["loss"])
