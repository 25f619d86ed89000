"""The one crop: five-point alignment lands landmarks on the template; bad landmarks fall back."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from facewatch.stages.face_crop import (FIVE_POINT_TEMPLATE, CropSpec, box_landmarks, crop_faces,
                              landmarks_plausible)


def dots_frame(points: np.ndarray, shape=(480, 640)) -> np.ndarray:
    """A grey frame with a distinct coloured dot at each landmark."""
    frame = np.full(shape + (3,), 90, np.uint8)
    for i, (x, y) in enumerate(points):
        colour = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)][i]
        cv2.circle(frame, (int(round(x)), int(round(y))), 3, colour, -1)
    return frame


def dot_centre(crop: np.ndarray, colour) -> np.ndarray:
    mask = np.all(np.abs(crop.astype(int) - colour) < 60, axis=2)
    ys, xs = np.nonzero(mask)
    assert len(xs), f"dot {colour} not in the crop"
    return np.array([xs.mean(), ys.mean()])


def rotated_face(angle_deg: float, scale: float, centre=(300.0, 220.0)) -> tuple[np.ndarray, np.ndarray]:
    """Template landmarks rotated, scaled and moved into a frame, and a box around them."""
    t = FIVE_POINT_TEMPLATE - 56.0
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    points = (t @ rot.T) * scale + centre
    half = 60 * scale
    box = np.array([centre[0] - half, centre[1] - half * 1.2, centre[0] + half, centre[1] + half * 1.2],
                   np.float32)
    return points.astype(np.float32), box


@pytest.mark.parametrize("angle, scale", [(0, 1.0), (25, 1.6), (-30, 0.7)])
def test_alignment_puts_each_landmark_on_its_template_position(angle, scale):
    points, box = rotated_face(angle, scale)
    frame = dots_frame(points)
    crops, aligned = crop_faces(frame, box[None], CropSpec(), points[None])
    assert aligned.tolist() == [True]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    for i, colour in enumerate(colours):
        assert np.abs(dot_centre(crops[0], colour) - FIVE_POINT_TEMPLATE[i]).max() < 1.5, i


def test_template_scales_with_the_crop_size():
    points, box = rotated_face(10, 1.2)
    crops, _ = crop_faces(dots_frame(points), box[None], CropSpec(size=224), points[None])
    assert crops.shape == (1, 224, 224, 3)
    assert np.abs(dot_centre(crops[0], (0, 255, 255)) - FIVE_POINT_TEMPLATE[4] * 2).max() < 2.5


@pytest.mark.parametrize("damage", ["swap_eyes", "nan", "outside_box", "nose_above_eyes",
                                    "eyes_collapsed"])
def test_implausible_landmarks_fall_back_to_the_box(damage):
    points, box = rotated_face(0, 1.0)
    bad = points.copy()
    if damage == "swap_eyes":
        bad[[0, 1, 2, 3]] = bad[[2, 3, 0, 1]]
    elif damage == "nan":
        bad[4, 0] = np.nan
    elif damage == "outside_box":
        bad[4] += 300
    elif damage == "nose_above_eyes":
        bad[4, 1] = points[0, 1] - 40
    else:
        bad[:4] = bad[:4].mean(axis=0)
    assert landmarks_plausible(points, box) and not landmarks_plausible(bad, box)
    frame = dots_frame(points)
    crops, aligned = crop_faces(frame, np.stack([box, box]), CropSpec(), np.stack([points, bad]))
    assert aligned.tolist() == [True, False]
    fallback, _ = crop_faces(frame, box[None], CropSpec(), None)
    assert np.array_equal(crops[1], fallback[0])   # the fallback is the box crop, whatever was given


def test_box_fallback_frames_the_face_like_the_template():
    box = np.array([100, 50, 200, 190], np.float32)
    points = box_landmarks(box)
    assert landmarks_plausible(points, box)
    crops, aligned = crop_faces(dots_frame(points), box[None], CropSpec(), points[None])
    # Fractions measured on real faces map close to the template (no rotation needed).
    assert np.abs(dot_centre(crops[0], (0, 0, 255)) - FIVE_POINT_TEMPLATE[2]).max() < 4


def test_box_alignment_ignores_landmarks_and_keeps_the_old_crop():
    frame = np.random.default_rng(0).integers(0, 255, (240, 320, 3), np.uint8)
    box = np.array([100, 60, 180, 160], np.float32)
    crops, aligned = crop_faces(frame, box[None], CropSpec(alignment="box", scale=1.3),
                                box_landmarks(box)[None])
    side = 100 * 1.3
    k = 112 / side
    matrix = np.float32([[k, 0, 56 - k * 140], [0, k, 56 - k * 110]])
    want = cv2.warpAffine(frame, matrix, (112, 112), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    assert aligned.tolist() == [False] and np.array_equal(crops[0], want)


def test_bad_arguments_are_named():
    frame = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(ValueError, match="crop alignment must be one of"):
        CropSpec(alignment="affine")
    with pytest.raises(ValueError, match="2 landmark sets for 1 boxes"):
        crop_faces(frame, np.array([[10, 10, 50, 50]], np.float32), CropSpec(),
                   np.zeros((2, 5, 2), np.float32))
    with pytest.raises(ValueError, match="x2 > x1"):
        crop_faces(frame, np.array([[50, 10, 10, 50]], np.float32), CropSpec())
    empty, flags = crop_faces(frame, np.zeros((0, 4), np.float32), CropSpec())
    assert empty.shape == (0, 112, 112, 3) and flags.shape == (0,)
