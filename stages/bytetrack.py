"""ByteTrack as supervision 0.30 implements it (MIT licence, Roboflow), without its imports.

Why a copy: `supervision.tracker.byte_tracker` can only be imported through `supervision`'s
package, which loads all of supervision (PIL, requests, tqdm, ...) and `scipy.optimize`: 73 MB
of RSS in the detect stage for a tracker that needs a 4x4 linear solve and one small C function
(issue 13: the daemon's RSS, 659 -> see bench/results/footprint_issue13.json). The algorithm is
supervision's line for line (`supervision/tracker/byte_tracker/{core,matching,kalman_filter,
single_object_track}.py`), with two substitutions that give the same results:
- the Kalman gain solves with `numpy.linalg.solve` instead of scipy's Cholesky (both exact
  solutions of the same 4x4 symmetric positive definite system);
- `linear_sum_assignment` is scipy's own C function, loaded from its extension module file
  (`scipy/optimize/_lsap*.so`, which needs only numpy) instead of through `scipy.optimize`.
tests/test_bytetrack.py runs it beside supervision's ByteTrack and requires the same track ids
frame by frame.
"""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
from enum import Enum

import numpy as np

NO_ID = -1


def _load_lsap():
    """scipy's linear_sum_assignment (C), without importing scipy.optimize (~51 MB of RSS)."""
    spec = importlib.util.find_spec("scipy")
    paths = glob.glob(os.path.join(os.path.dirname(spec.origin), "optimize", "_lsap*.so")) \
        if spec is not None and spec.origin else []
    if paths:
        loader = importlib.machinery.ExtensionFileLoader("_lsap", paths[0])
        module = importlib.util.module_from_spec(
            importlib.util.spec_from_file_location("_lsap", paths[0], loader=loader))
        loader.exec_module(module)
        return module.linear_sum_assignment
    from scipy.optimize import linear_sum_assignment   # another layout: the public one
    return linear_sum_assignment


linear_sum_assignment = _load_lsap()


class IdCounter:
    def __init__(self, start_id: int = 0):
        if start_id <= NO_ID:
            raise ValueError(f"start_id must be greater than {NO_ID}, got {start_id}")
        self.start_id = start_id
        self.reset()

    def reset(self) -> None:
        self._id = self.start_id

    def new_id(self) -> int:
        returned, self._id = self._id, self._id + 1
        return returned


def box_iou_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N, 4) with every box of `b` (M, 4), xyxy; float32 (N, M)."""
    if len(a) == 0 or len(b) == 0:
        return np.empty((len(a), len(b)), dtype=np.float32)
    ax1, ay1, ax2, ay2 = a.T.astype(np.float64)
    bx1, by1, bx2, by2 = b.T.astype(np.float64)
    w = np.clip(np.minimum(ax2[:, None], bx2[None, :]) - np.maximum(ax1[:, None], bx1[None, :]),
                0.0, None)
    h = np.clip(np.minimum(ay2[:, None], by2[None, :]) - np.maximum(ay1[:, None], by1[None, :]),
                0.0, None)
    inter = w * h
    norm = ((ax2 - ax1) * (ay2 - ay1))[:, None] + ((bx2 - bx1) * (by2 - by1))[None, :] - inter
    out = np.zeros_like(inter, dtype=np.float32)
    np.divide(inter, norm, out=out, where=norm > 0)
    return out


class KalmanFilter:
    """Constant-velocity model of (cx, cy, aspect, height) and their velocities."""

    def __init__(self):
        ndim, dt = 4, 1.0
        self._motion_mat = np.eye(2 * ndim, 2 * ndim)
        for i in range(ndim):
            self._motion_mat[i, ndim + i] = dt
        self._update_mat = np.eye(ndim, 2 * ndim)
        self._std_weight_position = 1.0 / 20
        self._std_weight_velocity = 1.0 / 160

    def initiate(self, measurement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = np.r_[measurement, np.zeros_like(measurement)]
        p, v, h = self._std_weight_position, self._std_weight_velocity, measurement[3]
        std = [2 * p * h, 2 * p * h, 0.01, 2 * p * h, 10 * v * h, 10 * v * h, 1e-05, 10 * v * h]
        return mean, np.diag(np.square(std))

    def project(self, mean: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self._std_weight_position
        std = [p * mean[3], p * mean[3], 0.1, p * mean[3]]
        mean = np.dot(self._update_mat, mean)
        covariance = np.linalg.multi_dot((self._update_mat, covariance, self._update_mat.T))
        return mean, covariance + np.diag(np.square(std))

    def multi_predict(self, mean: np.ndarray, covariance: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        p, v, h = self._std_weight_position, self._std_weight_velocity, mean[:, 3]
        std_pos = [p * h, p * h, 0.01 * np.ones_like(h), p * h]
        std_vel = [v * h, v * h, 1e-05 * np.ones_like(h), v * h]
        sqr = np.square(np.r_[std_pos, std_vel]).T
        motion_cov = np.asarray([np.diag(sqr[i]) for i in range(len(mean))])
        mean = np.dot(mean, self._motion_mat.T)
        left = np.dot(self._motion_mat, covariance).transpose((1, 0, 2))
        return mean, np.dot(left, self._motion_mat.T) + motion_cov

    def update(self, mean: np.ndarray, covariance: np.ndarray, measurement: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        projected_mean, projected_cov = self.project(mean, covariance)
        kalman_gain = np.linalg.solve(projected_cov, np.dot(covariance, self._update_mat.T).T).T
        new_mean = mean + np.dot(measurement - projected_mean, kalman_gain.T)
        new_covariance = covariance - np.linalg.multi_dot((kalman_gain, projected_cov,
                                                           kalman_gain.T))
        return new_mean, new_covariance


class TrackState(Enum):
    New = 0
    Tracked = 1
    Lost = 2
    Removed = 3


class STrack:
    def __init__(self, tlwh: np.ndarray, score: float, minimum_consecutive_frames: int,
                 shared_kalman: KalmanFilter, internal_id_counter: IdCounter,
                 external_id_counter: IdCounter):
        self.state = TrackState.New
        self.is_activated = False
        self.start_frame = 0
        self.frame_id = 0
        self._tlwh = np.asarray(tlwh, dtype=np.float32)
        self.kalman_filter: KalmanFilter | None = None
        self.shared_kalman = shared_kalman
        self.mean: np.ndarray | None = None
        self.covariance: np.ndarray | None = None
        self.score = score
        self.tracklet_len = 0
        self.minimum_consecutive_frames = minimum_consecutive_frames
        self.internal_id_counter = internal_id_counter
        self.external_id_counter = external_id_counter
        self.internal_track_id = NO_ID
        self.external_track_id = NO_ID

    @staticmethod
    def multi_predict(stracks: list[STrack], shared_kalman: KalmanFilter) -> None:
        if not stracks:
            return
        means = []
        for st in stracks:
            means.append(st.mean.copy())
            if st.state != TrackState.Tracked:
                means[-1][7] = 0
        mean, cov = shared_kalman.multi_predict(np.asarray(means),
                                                np.asarray([st.covariance for st in stracks]))
        for st, m, c in zip(stracks, mean, cov):
            st.mean, st.covariance = m, c

    def activate(self, kalman_filter: KalmanFilter, frame_id: int) -> None:
        self.kalman_filter = kalman_filter
        self.internal_track_id = self.internal_id_counter.new_id()
        self.mean, self.covariance = kalman_filter.initiate(self.tlwh_to_xyah(self._tlwh))
        self.tracklet_len = 1
        self.state = TrackState.Tracked
        if frame_id == 1 and self.tracklet_len >= self.minimum_consecutive_frames:
            self.is_activated = True
            self.external_track_id = self.external_id_counter.new_id()
        self.frame_id = frame_id
        self.start_frame = frame_id

    def re_activate(self, new_track: STrack, frame_id: int) -> None:
        self.mean, self.covariance = self.kalman_filter.update(
            self.mean, self.covariance, self.tlwh_to_xyah(new_track.tlwh))
        self.tracklet_len = 0
        self.state = TrackState.Tracked
        self.frame_id = frame_id
        self.score = new_track.score

    def update(self, new_track: STrack, frame_id: int) -> None:
        self.frame_id = frame_id
        self.tracklet_len += 1
        self.mean, self.covariance = self.kalman_filter.update(
            self.mean, self.covariance, self.tlwh_to_xyah(new_track.tlwh))
        self.state = TrackState.Tracked
        if self.tracklet_len >= self.minimum_consecutive_frames:
            self.is_activated = True
            if self.external_track_id == NO_ID:
                self.external_track_id = self.external_id_counter.new_id()
        self.score = new_track.score

    @property
    def tlwh(self) -> np.ndarray:
        if self.mean is None:
            return self._tlwh.copy()
        ret = self.mean[:4].copy()
        ret[2] *= ret[3]
        ret[:2] -= ret[2:] / 2
        return ret

    @property
    def tlbr(self) -> np.ndarray:
        ret = self.tlwh.copy()
        ret[2:] += ret[:2]
        return ret

    @staticmethod
    def tlwh_to_xyah(tlwh: np.ndarray) -> np.ndarray:
        ret = np.asarray(tlwh).copy()
        ret[:2] += ret[2:] / 2
        ret[2] /= ret[3]
        return ret

    @staticmethod
    def tlbr_to_tlwh(tlbr: np.ndarray) -> np.ndarray:
        ret = np.asarray(tlbr).copy()
        ret[2:] -= ret[:2]
        return ret


def linear_assignment(cost_matrix: np.ndarray, thresh: float
                      ) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    if cost_matrix.size == 0:
        return (np.empty((0, 2), dtype=int), tuple(range(cost_matrix.shape[0])),
                tuple(range(cost_matrix.shape[1])))
    clamped = cost_matrix.copy()
    clamped[clamped > thresh] = thresh + 1e-4
    indices = np.column_stack(linear_sum_assignment(clamped))
    matches = indices[cost_matrix[tuple(zip(*indices))] <= thresh]
    return (matches, tuple(set(range(cost_matrix.shape[0])) - set(matches[:, 0])),
            tuple(set(range(cost_matrix.shape[1])) - set(matches[:, 1])))


def iou_distance(atracks: list, btracks: list) -> np.ndarray:
    if (atracks and isinstance(atracks[0], np.ndarray)) or \
            (btracks and isinstance(btracks[0], np.ndarray)):
        a, b = atracks, btracks
    else:
        a, b = [t.tlbr for t in atracks], [t.tlbr for t in btracks]
    if not len(a) or not len(b):
        return np.empty((len(a), len(b)), dtype=np.float32)
    ious = box_iou_batch(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
    return np.asarray(1 - ious, dtype=np.float32)


def fuse_score(cost_matrix: np.ndarray, stracks: list[STrack]) -> np.ndarray:
    if cost_matrix.size == 0:
        return cost_matrix
    scores = np.array([t.score for t in stracks], dtype=np.float32)
    scores = np.expand_dims(scores, axis=0).repeat(cost_matrix.shape[0], axis=0)
    return np.asarray(1 - (1 - cost_matrix) * scores, dtype=np.float32)


def joint_tracks(a: list[STrack], b: list[STrack]) -> list[STrack]:
    seen, result = set(), []
    for track in a + b:
        if track.internal_track_id not in seen:
            seen.add(track.internal_track_id)
            result.append(track)
    return result


def sub_tracks(a: list[STrack], b: list[STrack]) -> list[STrack]:
    tracks = {t.internal_track_id: t for t in a}
    for t in b:
        tracks.pop(t.internal_track_id, None)
    return list(tracks.values())


def remove_duplicate_tracks(a: list[STrack], b: list[STrack]
                            ) -> tuple[list[STrack], list[STrack]]:
    dup_a, dup_b = set(), set()
    for ia, ib in zip(*np.where(iou_distance(a, b) < 0.05)):
        if a[ia].frame_id - a[ia].start_frame > b[ib].frame_id - b[ib].start_frame:
            dup_b.add(ib)
        else:
            dup_a.add(ia)
    return ([t for i, t in enumerate(a) if i not in dup_a],
            [t for i, t in enumerate(b) if i not in dup_b])


class ByteTrack:
    """supervision.ByteTrack's constructor and update; `update` takes xyxy boxes and scores
    and returns (indices of the detections tracked, their external track ids)."""

    def __init__(self, track_activation_threshold: float = 0.25, lost_track_buffer: int = 30,
                 minimum_matching_threshold: float = 0.8, frame_rate: float = 30,
                 minimum_consecutive_frames: int = 1):
        self.track_activation_threshold = track_activation_threshold
        self.minimum_matching_threshold = minimum_matching_threshold
        self.frame_id = 0
        self.det_thresh = track_activation_threshold + 0.1
        if self.det_thresh > 1.0:
            self.det_thresh = track_activation_threshold
        self.max_time_lost = int(frame_rate / 30.0 * lost_track_buffer)
        self.minimum_consecutive_frames = minimum_consecutive_frames
        self.kalman_filter = KalmanFilter()
        self.shared_kalman = KalmanFilter()
        self.tracked_tracks: list[STrack] = []
        self.lost_tracks: list[STrack] = []
        self.removed_tracks: list[STrack] = []
        self.internal_id_counter = IdCounter()
        self.external_id_counter = IdCounter(start_id=1)

    def reset(self) -> None:
        self.frame_id = 0
        self.internal_id_counter.reset()
        self.external_id_counter.reset()
        self.tracked_tracks, self.lost_tracks, self.removed_tracks = [], [], []

    def update(self, xyxy: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """supervision's update_with_detections: each output track goes back to the detection
        it overlaps best (IoU assignment at 0.5); detections without a track are left out."""
        tensors = np.hstack((xyxy, confidence[:, np.newaxis]))
        tracks = self.update_with_tensors(tensors)
        if not tracks:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ious = box_iou_batch(np.asarray([d[:4] for d in tensors]).reshape(-1, 4),
                             np.asarray([t.tlbr for t in tracks]))
        matches, _, _ = linear_assignment(1 - ious, 0.5)
        ids = np.full(len(tensors), -1, dtype=np.int64)
        for i_det, i_track in matches:
            ids[i_det] = int(tracks[i_track].external_track_id)
        keep = np.flatnonzero(ids != -1)
        return keep, ids[keep]

    def _stracks(self, boxes: np.ndarray, scores: np.ndarray) -> list[STrack]:
        return [STrack(STrack.tlbr_to_tlwh(tlbr), score, self.minimum_consecutive_frames,
                       self.shared_kalman, self.internal_id_counter, self.external_id_counter)
                for tlbr, score in zip(boxes, scores)]

    def update_with_tensors(self, tensors: np.ndarray) -> list[STrack]:
        self.frame_id += 1
        activated, refind, lost, removed = [], [], [], []
        boxes = tensors[:, :4]
        valid = np.isfinite(tensors).all(axis=1) & (boxes[:, 2] - boxes[:, 0] > 0) & \
            (boxes[:, 3] - boxes[:, 1] > 0)
        tensors = tensors[valid]
        scores, bboxes = tensors[:, 4], tensors[:, :4]
        remain = scores >= self.track_activation_threshold
        second = np.logical_and(scores > 0.1, scores < self.track_activation_threshold)
        detections = self._stracks(bboxes[remain], scores[remain])

        unconfirmed = [t for t in self.tracked_tracks if not t.is_activated]
        tracked = [t for t in self.tracked_tracks if t.is_activated]
        # first association, with the high-score detections
        pool = joint_tracks(tracked, self.lost_tracks)
        STrack.multi_predict(pool, self.shared_kalman)
        dists = fuse_score(iou_distance(pool, detections), detections)
        matches, u_track, u_detection = linear_assignment(dists, self.minimum_matching_threshold)
        for itracked, idet in matches:
            track, det = pool[itracked], detections[idet]
            if track.state == TrackState.Tracked:
                track.update(det, self.frame_id)
                activated.append(track)
            else:
                track.re_activate(det, self.frame_id)
                refind.append(track)
        # second association, with the low-score detections
        detections_second = self._stracks(bboxes[second], scores[second])
        r_tracked = [pool[i] for i in u_track if pool[i].state == TrackState.Tracked]
        matches, u_track, _ = linear_assignment(iou_distance(r_tracked, detections_second), 0.5)
        for itracked, idet in matches:
            track, det = r_tracked[itracked], detections_second[idet]
            if track.state == TrackState.Tracked:
                track.update(det, self.frame_id)
                activated.append(track)
            else:
                track.re_activate(det, self.frame_id)
                refind.append(track)
        for it in u_track:
            track = r_tracked[it]
            if track.state != TrackState.Lost:
                track.state = TrackState.Lost
                lost.append(track)
        # unconfirmed tracks, usually tracks with only one beginning frame
        detections = [detections[i] for i in u_detection]
        dists = fuse_score(iou_distance(unconfirmed, detections), detections)
        matches, u_unconfirmed, u_detection = linear_assignment(dists, 0.7)
        for itracked, idet in matches:
            unconfirmed[itracked].update(detections[idet], self.frame_id)
            activated.append(unconfirmed[itracked])
        for it in u_unconfirmed:
            unconfirmed[it].state = TrackState.Removed
            removed.append(unconfirmed[it])
        # new tracks
        for inew in u_detection:
            track = detections[inew]
            if track.score >= self.det_thresh:
                track.activate(self.kalman_filter, self.frame_id)
                activated.append(track)
        # state
        for track in self.lost_tracks:
            if self.frame_id - track.frame_id > self.max_time_lost:
                track.state = TrackState.Removed
                removed.append(track)
        self.tracked_tracks = [t for t in self.tracked_tracks if t.state == TrackState.Tracked]
        self.tracked_tracks = joint_tracks(self.tracked_tracks, activated)
        self.tracked_tracks = joint_tracks(self.tracked_tracks, refind)
        self.lost_tracks = sub_tracks(self.lost_tracks, self.tracked_tracks)
        self.lost_tracks.extend(lost)
        self.lost_tracks = sub_tracks(self.lost_tracks, self.removed_tracks)
        self.removed_tracks = removed
        self.tracked_tracks, self.lost_tracks = remove_duplicate_tracks(self.tracked_tracks,
                                                                        self.lost_tracks)
        return [t for t in self.tracked_tracks if t.is_activated]
