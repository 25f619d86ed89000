"""AP / recall math of evaluate-detector on cases worked out by hand, and the WIDER GT reader."""
from __future__ import annotations

import numpy as np
import pytest

from facewatch.training.detection_metrics import (average_precision, evaluate, iou_matrix,
                                                  recall_by_attribute)
from facewatch.training.wider_gt import ATTRIBUTES, read_wider_gt

B = np.array


def test_iou_matrix():
    a = B([[0, 0, 10, 10]], np.float32)
    b = B([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    assert np.allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0]])


def test_perfect_detector_scores_one():
    gt = B([[0, 0, 40, 40], [100, 100, 150, 150]], np.float32)
    result = evaluate([(gt.copy(), B([0.9, 0.8], np.float32), gt, np.zeros(2, bool))])
    assert result["ap50"] == pytest.approx(1.0) and result["recall_at_p90"] == pytest.approx(1.0)


def test_false_positive_ranked_first_halves_precision_at_first_hit():
    gt = B([[0, 0, 40, 40]], np.float32)
    dets = B([[200, 200, 240, 240], [0, 0, 40, 40]], np.float32)
    result = evaluate([(dets, B([0.9, 0.8], np.float32), gt, np.zeros(1, bool))])
    # precision 0 at rank 1, 0.5 at rank 2 where recall reaches 1 -> AP 0.5; never >= 0.9
    assert result["ap50"] == pytest.approx(0.5)
    assert result["recall_at_p90"] == 0.0


def test_small_and_invalid_faces_count_neither_way():
    gt = B([[0, 0, 40, 40], [100, 100, 110, 110], [200, 200, 260, 260]], np.float32)
    invalid = B([False, False, True])
    dets = B([[100, 100, 110, 110], [200, 200, 260, 260]], np.float32)  # only the ignorable ones
    scores = B([0.9, 0.8], np.float32)
    large = evaluate([(dets, scores, gt, invalid)], min_height=32)
    assert large["faces"] == 1 and large["ap50"] == 0.0  # the one counted face was missed
    everything = evaluate([(dets, scores, gt, invalid)])
    assert everything["faces"] == 2 and everything["ap50"] == pytest.approx(0.5)


def test_duplicate_detection_is_a_false_positive():
    gt = B([[0, 0, 40, 40]], np.float32)
    dets = B([[0, 0, 40, 40], [1, 1, 40, 40]], np.float32)
    result = evaluate([(dets, B([0.9, 0.8], np.float32), gt, np.zeros(1, bool))])
    assert result["ap50"] == pytest.approx(1.0) and result["recall_at_p90"] == pytest.approx(1.0)


def test_average_precision_all_point_interpolation():
    # hits at ranks 1 and 3 of 3, two faces: envelope 1.0 up to r=0.5, 2/3 up to r=1.0
    assert average_precision(B([1.0, 0.5, 2 / 3]), B([0.5, 0.5, 1.0])) == pytest.approx(0.5 + 1 / 3)


def test_wider_gt_reader(tmp_path):
    gt = tmp_path / "gt.txt"
    gt.write_text("a/x.jpg\n2\n10 20 30 40 2 1 0 0 1 0\n1 1 5 5 0 0 1 1 2 1\nb/y.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    records = read_wider_gt(gt)
    assert [r.image for r in records] == ["a/x.jpg", "b/y.jpg"]
    assert np.allclose(records[0].boxes[0], [10, 20, 40, 60]) and records[0].invalid.tolist() == [False, True]
    # blur, expression, illumination, occlusion, pose (the invalid flag is not an attribute)
    assert records[0].attributes.tolist() == [[2, 1, 0, 1, 0], [0, 0, 1, 2, 1]]
    assert len(records[1].boxes) == 0


def test_wider_gt_reader_names_the_bad_line(tmp_path):
    gt = tmp_path / "gt.txt"
    gt.write_text("a/x.jpg\ntwo\n")
    with pytest.raises(ValueError, match="WIDER FACE ground-truth format near line 1"):
        read_wider_gt(gt)


def test_recall_by_attribute_counts_covered_faces_per_value():
    gt = B([[0, 0, 40, 40], [100, 100, 150, 150], [200, 200, 250, 250], [300, 300, 310, 310]],
           np.float32)
    invalid = B([False, False, True, False])
    # blur, expression, illumination, occlusion, pose: face 0 clear, face 1 heavily occluded
    attrs = B([[0, 0, 0, 0, 0], [0, 0, 0, 2, 0], [0, 0, 0, 2, 0], [2, 0, 0, 0, 0]], np.int8)
    dets = B([[0, 0, 40, 40], [100, 100, 150, 150]], np.float32)
    scores = B([0.9, 0.1], np.float32)
    image = [(dets, scores, gt, invalid, attrs)]
    low = recall_by_attribute(image, ATTRIBUTES, 0.05, min_height=32)
    high = recall_by_attribute(image, ATTRIBUTES, 0.25, min_height=32)
    # the invalid face and the 10 px one are not counted
    assert low["occlusion"]["none"] == {"faces": 1, "recall": 1.0}
    assert low["occlusion"]["heavy"] == {"faces": 1, "recall": 1.0}
    assert high["occlusion"]["heavy"] == {"faces": 1, "recall": 0.0}   # its box scored 0.1
    assert high["blur"]["clear"] == {"faces": 2, "recall": 0.5}
    assert high["blur"]["heavy"] == {"faces": 0, "recall": None}
