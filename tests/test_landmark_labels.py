"""Landmark pseudo-labels (dlib on real WIDER images), their pose-label rows, and the NME math."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from facewatch.training.landmark_metrics import inter_ocular, landmark_nme, match_faces, summarise_nme
from facewatch.training.widerface_landmarks import MIN_FACE_PX, pose_label_rows, visibility

# A frontal face in a 100 px box at (100, 100): dlib's order (image-right eye first), nose below.
FACE_BOX = np.array([100, 100, 200, 200], np.float32)
FACE = np.array([[178, 140], [160, 140], [122, 140], [140, 140], [150, 165]], np.float32)


def test_inter_ocular_is_the_distance_of_the_eye_centres():
    assert inter_ocular(FACE[None]) == pytest.approx([169 - 131])


def test_nme_of_known_offsets():
    iod = 38.0
    shifted = FACE + [3.8, 0.0]                         # every point 0.1 IOD off
    assert landmark_nme(shifted[None], FACE[None]) == pytest.approx([0.1])
    one_point = FACE.copy()
    one_point[4] += [0.0, 19.0]                         # only the nose, by half an IOD
    assert landmark_nme(one_point[None], FACE[None]) == pytest.approx([0.5 / 5])
    both = landmark_nme(np.stack([FACE, shifted]), np.stack([FACE, FACE]))
    assert both == pytest.approx([0.0, 3.8 / iod])
    collapsed = np.repeat(FACE[:1], 5, axis=0)          # coincident eyes: no scale to divide by
    assert np.isinf(landmark_nme(FACE[None], collapsed[None]))[0]
    with pytest.raises(ValueError, match="differ in shape"):
        landmark_nme(np.zeros((2, 5, 2)), np.zeros((1, 5, 2)))


def test_matching_is_one_to_one_highest_score_first():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [21, 0, 31, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.99], np.float32)
    # the 0.9 box takes face 0 first; the 0.5 duplicate gets nothing; the far box matches nothing
    assert sorted(match_faces(boxes, scores, gt)) == [(1, 0), (2, 1)]
    assert match_faces(boxes, scores, np.zeros((0, 4), np.float32)) == []


def test_summary_counts_and_fraction():
    summary = summarise_nme(np.array([0.05, 0.08, 0.2, 0.3]), faces_labelled=10)
    assert summary == {"nme": 0.1575, "nme_median": 0.14, "nme_under_0_1": 0.5,
                       "landmark_faces": 4, "landmark_faces_labelled": 10}
    assert summarise_nme(np.zeros(0), 3)["nme"] is None


def test_small_and_implausible_faces_get_no_landmarks():
    small_box = np.array([10, 10, 20, 10 + MIN_FACE_PX - 1], np.float32)
    small = (FACE - 100) / 10 + 10
    swapped = FACE[[2, 3, 0, 1, 4]]                     # eyes swapped: not a face
    visible, too_small, implausible = visibility(np.stack([FACE, small, swapped]),
                                                 np.stack([FACE_BOX, small_box, FACE_BOX]))
    assert visible.tolist() == [True, False, False]
    assert too_small.tolist() == [False, True, False]
    assert implausible.tolist() == [False, False, True]


def test_pose_label_rows_are_normalised_and_hide_unusable_points():
    near_edge = FACE.copy()
    near_edge[0] = [405, 140]                           # outside a 400 px wide image
    rows = pose_label_rows(np.stack([FACE_BOX, FACE_BOX]), np.stack([FACE, near_edge]),
                           np.array([True, False]), width=400, height=300)
    values = [np.array(r.split(), np.float64) for r in rows]
    assert all(len(v) == 1 + 4 + 15 for v in values) and all(v[0] == 0 for v in values)
    np.testing.assert_allclose(values[0][1:5], [150 / 400, 150 / 300, 100 / 400, 100 / 300], atol=1e-6)
    np.testing.assert_allclose(values[0][5:].reshape(5, 3),
                               np.c_[FACE / [400, 300], np.full(5, 2.0)], atol=1e-6)
    assert np.all(values[1][5:] == 0)                   # not visible: every point 0 0 0
    row = pose_label_rows(FACE_BOX[None], near_edge[None], np.array([True]), 400, 300)[0]
    points = np.array(row.split(), np.float64)[5:].reshape(5, 3)
    assert points[0].tolist() == [0, 0, 0] and np.all(points[1:, 2] == 2)


def test_dlib_pseudo_labels_on_real_images(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("dlib")
    from facewatch.training.widerface_landmarks import load_landmark_labels, write_pose_dataset

    src = data_dir / "widerface"
    root = tmp_path / "wider"
    rels = [f"12--Group/{p.name}" for p in sorted((src / "images/12--Group").glob("*.jpg"))[:3]]
    for rel in rels:
        for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
            dst = (root / kind / rel).with_suffix(suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy((src / kind / rel).with_suffix(suffix), dst)
    split = tmp_path / "split.json"
    split.write_text(f'{{"train": ["{rels[0]}", "{rels[1]}"], "val": ["{rels[2]}"]}}')
    monkeypatch.setenv("FACEWATCH_RUNS", str(tmp_path / "runs"))

    data_yaml, report, labels = write_pose_dataset(root, tmp_path / "dataset", split)
    faces = sum(len(labels.image(r)[0]) for r in rels)
    assert report["landmarks"]["faces"] == faces > 0
    heights = labels.boxes[:, 3] - labels.boxes[:, 1]
    assert not labels.visible[heights < MIN_FACE_PX].any()
    assert labels.visible.sum() >= 3, "dlib found no usable landmarks on group photos"
    # visible points lie in their boxes (grown by a quarter, as landmarks_plausible allows)
    b, p = labels.boxes[labels.visible], labels.points[labels.visible]
    grow = (b[:, 2:] - b[:, :2])[:, None] / 4
    assert np.all((p >= b[:, None, :2] - grow) & (p <= b[:, None, 2:] + grow))

    text = data_yaml.read_text()
    assert "kpt_shape: [5, 3]" in text and "flip_idx: [2, 3, 0, 1, 4]" in text
    label = (tmp_path / "dataset/labels" / rels[2]).with_suffix(".txt").read_text().splitlines()
    assert len(label) == len(labels.image(rels[2])[0]) and all(len(r.split()) == 20 for r in label)
    assert (tmp_path / "dataset/images" / rels[2]).resolve() == (root / "images" / rels[2]).resolve()
    assert report["train"]["images"] == 2 and report["val"]["images"] == 1

    cache = list((tmp_path / "runs/landmarks").glob("*.npz"))
    assert len(cache) == 1
    again = load_landmark_labels(root, rels)           # read from the cache, same numbers
    np.testing.assert_array_equal(again.points, labels.points)
    assert len(list((tmp_path / "runs/landmarks").glob("*.npz"))) == 1
