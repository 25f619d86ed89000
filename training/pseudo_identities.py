"""Identities for the embedder from unlabelled face folders: photos that SFace says show one person.

    python -m facewatch.training.pseudo_identities --folder DIR [--folder DIR ...] --out DIR
           [--lfw DIR] [--far 1e-6] [--max-size 40]

ArcFace needs people seen more than once, and LFW's training people mostly have one photo. The
unlabelled folders hold repeats nobody labelled: CelebA's first 10,000 images sample its 10,177
people about once each on average, so some 2,500 of them appear twice or more, and UTKFace takes
part of its photos from celebrity collections. SFace (0.99 on LFW pairs) finds them:

1. the threshold: the cosine (centred SFace vectors, as `cfp_identities`) that different LFW
   people on disk exceed at rate `--far` (every pair of their usable faces), with the share of
   same-person pairs that reach it (what share of true repeats can be found); a folder larger
   than LFW gets a stricter rate, so that it expects no more chance edges than LFW does;
2. edges between usable faces of one folder at or above it, near-duplicates (the same photo
   twice, cosine >= DUPLICATE) collapsed first, so a pair is two photos, not one photo twice;
3. a person is a connected group of 2 to `--max-size` faces in which every face is at least the
   threshold from the group's mean without it (a chain of look-alikes fails this); larger groups
   are dropped whole: a merge of several people, not one;
4. a group as close to any LFW person on disk as `cfp_identities.FACE_THRESHOLD` is left out:
   LFW's validation people and those the owners hold out are never trained on.

Written: `OUT/<group>/<folder>__<photo>` links to the photos (the layout `train-embedder
--labelled-folder OUT` reads; its `teacher-cache --folder OUT` recomputes only those photos),
`OUT/keep.txt` (every group, for `--labelled-keep` when another labelled folder has a list) and
`OUT/report.json` (threshold, counts per step, per folder). Research data stays where it is;
nothing is copied.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_FAR = 1e-6
DUPLICATE = 0.95      # the same photo re-encoded or re-cropped scores ~0.97-1.0; two photos far less
MAX_SIZE = 40
BLOCK = 4096
REPORT = "report.json"   # marks a folder this tool wrote (and may replace)


@dataclass
class Faces:
    """Usable faces of every folder, one row each."""
    folder: np.ndarray      # (N,) index into `folders`
    paths: np.ndarray       # (N,) photo path relative to its folder
    vectors: np.ndarray     # (N, 128) centred unit SFace vectors
    folders: list[Path]


def _usable(faces) -> np.ndarray:
    return faces.detected & faces.yunet_plausible


def lfw_reference(lfw_dir: Path):
    """(centre, LFW faces' centred vectors, their people) of every usable LFW face on disk."""
    from facewatch.training.folder_teacher import load_folder_faces
    from facewatch.training.teacher_cache import centred

    lfw = load_folder_faces(lfw_dir, "sface")
    keep = _usable(lfw)
    centre = lfw.sface[keep].mean(axis=0)
    people = np.array([p.split("/", 1)[0] for p in lfw.paths[keep]])
    return centre, centred(lfw.sface[keep], centre), people


def _pairs_above(a: np.ndarray, threshold: float):
    """(i, j, cosine) of every pair i < j of rows of `a` with cosine >= threshold."""
    rows, cols, sims = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for s in range(0, len(a), BLOCK):
        block = a[s:s + BLOCK] @ a.T
        below = np.arange(block.shape[1])[None, :] <= np.arange(s, s + len(block))[:, None]
        block[below] = -1                               # each pair once: column after row
        i, j = np.nonzero(block >= threshold)
        rows.append(i + s), cols.append(j), sims.append(block[i, j])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


@dataclass
class Calibration:
    """Pair scores of the LFW faces on disk: where different people's pairs end, per rate."""
    impostor: np.ndarray     # cosines of different-person pairs above FLOOR, highest first
    same: np.ndarray         # cosines of same-person pairs above FLOOR
    different_pairs: int
    same_pairs: int
    faces: int

    def threshold(self, rate: float) -> float:
        allowed = int(rate * self.different_pairs)
        return float(self.impostor[allowed]) + 1e-6 if allowed < len(self.impostor) else FLOOR

    def report(self, rate: float) -> dict:
        t = self.threshold(rate)
        return {"threshold": round(t, 4), "far": rate, "lfw_faces": self.faces,
                "different_pairs": self.different_pairs, "same_pairs": self.same_pairs,
                "same_pairs_found": round(float((self.same >= t).sum()) / max(1, self.same_pairs), 4)}


FLOOR = 0.3   # the top impostor scores decide every threshold: pairs below are not kept


def calibrate(vectors: np.ndarray, people: np.ndarray) -> Calibration:
    """Every pair of the given faces, scored."""
    n = len(vectors)
    ids = np.unique(people, return_inverse=True)[1]
    same_total = int(sum(c * (c - 1) // 2 for c in np.bincount(ids)))
    i, j, s = _pairs_above(vectors, FLOOR)
    same = ids[i] == ids[j]
    return Calibration(np.sort(s[~same])[::-1], s[same], n * (n - 1) // 2 - same_total,
                       same_total, n)


def folder_rate(far: float, calibration_faces: int, faces: int) -> float:
    """The pair rate that gives a folder of `faces` as many chance edges as `far` gives the
    calibration's faces: pairs grow with the square of the faces."""
    return far * min(1.0, (calibration_faces / max(faces, 1)) ** 2)


def load_faces(folders: list[Path], centre: np.ndarray) -> Faces:
    from facewatch.training.folder_teacher import load_folder_faces
    from facewatch.training.teacher_cache import centred

    idx, paths, vecs = [], [], []
    for n, folder in enumerate(folders):
        faces = load_folder_faces(folder, "sface")
        keep = _usable(faces)
        idx.append(np.full(int(keep.sum()), n)), paths.append(faces.paths[keep])
        vecs.append(centred(faces.sface[keep], centre))
    return Faces(np.concatenate(idx), np.concatenate(paths), np.concatenate(vecs), list(folders))


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def group(vectors: np.ndarray, threshold: float, max_size: int = MAX_SIZE) -> tuple[list[np.ndarray], dict]:
    """Rows of each person found (lists of 2+ face indices) and the counts of each step."""
    i, j, s = _pairs_above(vectors, min(threshold, DUPLICATE))
    # 1. near-duplicates: one face stands for each group of copies
    dup = s >= DUPLICATE
    copies = _components(len(vectors), i[dup], j[dup])
    first = {}
    for row, c in enumerate(copies):
        first.setdefault(c, row)
    rep = np.array([first[c] for c in copies])
    distinct = rep == np.arange(len(vectors))
    # 2. edges between distinct photos
    keep = (s >= threshold) & ~dup & distinct[i] & distinct[j]
    comp = _components(len(vectors), i[keep], j[keep])
    sizes = np.bincount(comp)
    counts = {"faces": len(vectors), "near_duplicates_dropped": int((~distinct).sum()),
              "edges": int(keep.sum()), "groups_2_plus": int(((sizes >= 2)).sum()),
              "groups_too_large": int((sizes > max_size).sum()), "groups_not_coherent": 0}
    people = []
    for c in np.flatnonzero((sizes >= 2) & (sizes <= max_size)):
        rows = np.flatnonzero((comp == c) & distinct)
        v = vectors[rows]
        total = v.sum(axis=0)
        others = total[None] - v                               # the mean of the rest, per face
        others /= np.linalg.norm(others, axis=1, keepdims=True) + 1e-12
        if np.min(np.sum(v * others, axis=1)) < threshold:
            counts["groups_not_coherent"] += 1
            continue
        people.append(rows)
    counts["people"] = len(people)
    counts["faces_in_people"] = int(sum(len(p) for p in people))
    return people, counts


def leave_out_lfw(people: list[np.ndarray], vectors: np.ndarray, lfw_vectors: np.ndarray,
                  lfw_people: np.ndarray, threshold: float) -> tuple[list[np.ndarray], list[dict]]:
    """People whose mean face is as close as `threshold` to an LFW person's mean are left out."""
    from facewatch.training.validation_guard import person_means

    names, means = person_means(lfw_vectors, lfw_people)
    kept, left = [], []
    for rows in people:
        m = vectors[rows].mean(axis=0)
        sims = means @ (m / (np.linalg.norm(m) + 1e-12))
        best = int(np.argmax(sims))
        if sims[best] >= threshold:
            left.append({"faces": len(rows), "lfw": str(names[best]), "cosine": round(float(sims[best]), 3)})
        else:
            kept.append(rows)
    return kept, left


def write_links(out: Path, people: list[np.ndarray], faces: Faces) -> None:
    """OUT/<group>/<folder>__<photo> -> the photo, and OUT/keep.txt. An OUT of an earlier run
    (it has REPORT) is replaced whole; any other non-empty OUT is refused, never deleted."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).is_file()):
            raise FileExistsError(f"--out {out}: exists and was not written by pseudo_identities "
                                  f"(no {REPORT}); give a new or empty folder, nothing was changed")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for g, rows in enumerate(people):
        person = out / f"{g:05d}"
        person.mkdir()
        for row in rows:
            folder = faces.folders[faces.folder[row]]
            rel = str(faces.paths[row])
            os.symlink((folder / rel).resolve(), person / f"{folder.resolve().name}__{rel.replace('/', '__')}")
    # every group: the keep list `--labelled-keep` wants beside another folder's (e.g. CFP's)
    (out / "keep.txt").write_text("".join(f"{g:05d}\n" for g in range(len(people))))


def main() -> None:
    from facewatch.training.cfp_identities import FACE_THRESHOLD
    from facewatch.training.lfw import default_images_dir

    p = argparse.ArgumentParser(description="pseudo-identities from unlabelled face folders")
    p.add_argument("--folder", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=None, help="LFW images on disk (threshold and guard)")
    p.add_argument("--far", type=float, default=DEFAULT_FAR,
                   help="rate at which different LFW people pass the threshold")
    p.add_argument("--max-size", type=int, default=MAX_SIZE)
    p.add_argument("--lfw-threshold", type=float, default=FACE_THRESHOLD)
    args = p.parse_args()
    if not 0.0 < args.far < 1.0:
        p.error(f"--far must be a pair rate between 0 and 1, got {args.far}")
    if args.max_size < 2:
        p.error(f"--max-size must be at least 2 photos, got {args.max_size}")
    out = args.out.resolve()
    for f in args.folder:
        if out == f.resolve() or out in f.resolve().parents:
            p.error(f"--out {args.out} holds the photos of --folder {f}: it is replaced whole")
    centre, lfw_vectors, lfw_people = lfw_reference(Path(args.lfw or default_images_dir()))
    calib = calibrate(lfw_vectors, lfw_people)
    faces = load_faces(args.folder, centre)
    people, per_folder = [], {}
    for n, folder in enumerate(faces.folders):   # within a folder: its people repeat there
        rows = np.flatnonzero(faces.folder == n)
        rate = folder_rate(args.far, calib.faces, len(rows))
        found, counts = group(faces.vectors[rows], calib.threshold(rate), args.max_size)
        found, left = leave_out_lfw([rows[g] for g in found], faces.vectors, lfw_vectors,
                                    lfw_people, args.lfw_threshold)
        people += found
        sizes = np.bincount([len(r) for r in found]) if found else np.zeros(1, int)
        per_folder[str(folder)] = {
            **calib.report(rate), **counts, "left_out_as_lfw_people": len(left),
            "people_kept": len(found), "faces_kept": int(sum(len(r) for r in found)),
            "people_by_size": {int(k): int(v) for k, v in enumerate(sizes) if v},
            "left_out_examples": left[:20]}
    write_links(args.out, people, faces)
    report = {"far": args.far, "people": len(people), "faces": int(sum(len(r) for r in people)),
              "folders": per_folder}
    (args.out / REPORT).write_text(json.dumps(report, indent=1))
    print(json.dumps({**report, "folders": {f: {k: v for k, v in r.items() if k != "left_out_examples"}
                                            for f, r in per_folder.items()}}))


if __name__ == "__main__":
    main()
