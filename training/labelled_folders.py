"""Extra identities for the embedder from folders of face photos (`train-embedder --labelled-folder`).

Layout: `DIR/<identity>/.../<photo>`; the identity is the photo's top-level subfolder (CFP:
`Images/001/frontal/01.jpg` is identity 001). The faces are found and cropped exactly as for
`--unlabelled-folder` (`training.folder_teacher`: YuNet's face nearest the centre, plausible
points only; `embedder_data.load_folder_crops`), so the same `teacher-cache --folder` cache serves
both. A keep list (`--labelled-keep`, e.g. `training/splits/cfp_keep.txt`) restricts the identities
to those whose subfolder is its first tab-separated column: how CFP's people who may be LFW
people stay out (`training.cfp_identities`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facewatch.stages.face_crop import CropSpec


def read_keep_list(path: Path) -> list[str]:
    """Subfolder names: the first tab-separated column of each line that is not blank or '#'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--labelled-keep: keep list not found: {path}")
    names = [ln.split("\t", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.startswith("#")]
    if not names:
        raise ValueError(f"--labelled-keep {path}: lists no identity (first column: subfolder name)")
    return names


def identity_of(rel: str, folder: Path) -> str:
    """The top-level subfolder of a photo path relative to the labelled folder."""
    parts = rel.split("/")
    if len(parts) < 2:
        raise ValueError(f"--labelled-folder {folder}: photo {rel!r} is not in an identity "
                         f"subfolder (expected DIR/<identity>/.../<photo>)")
    return parts[0]


@dataclass
class LabelledFaces:
    crops: np.ndarray              # (N, S, S, 3) uint8 BGR
    labels: np.ndarray             # (N,) int32, from `first_label` on
    vectors: np.ndarray | None     # (N, 128) the teacher's unit vectors (not centred), or None
    identities: list[str]          # "<folder>/<subfolder>" per class, in label order
    report: dict


def load_labelled_folders(folders: list[Path], keep_files: list[Path] | None, teacher: str,
                          spec: CropSpec, first_label: int) -> LabelledFaces:
    """Faces of every identity of every folder (those of its keep list only, when given), one
    class per identity, numbered from `first_label` (after LFW's classes). `teacher`: 'sface' or
    'dlib' (its vectors come back), or 'none' (YuNet's geometry from the SFace cache, no vectors)."""
    from facewatch.training.embedder_data import load_folder_crops
    from facewatch.training.folder_teacher import load_folder_faces

    if keep_files and len(keep_files) != len(folders):
        raise ValueError(f"--labelled-keep given {len(keep_files)} times for {len(folders)} "
                         f"--labelled-folder: give one keep list per folder, in the same order, "
                         f"or none")
    cache_teacher = "sface" if teacher == "none" else teacher
    crops, labels, vectors, identities = [], [], [], []
    report = {"folders": {}, "identities": 0, "faces": 0}
    for n, folder in enumerate(folders):
        folder = Path(folder)
        faces = load_folder_faces(folder, cache_teacher)   # names a missing or empty folder
        people = np.array([identity_of(str(p), folder) for p in faces.paths])
        present = sorted(set(people.tolist()))
        kept = present
        if keep_files:
            wanted = read_keep_list(keep_files[n])
            absent = sorted(set(wanted) - set(present))
            if absent:
                raise ValueError(f"--labelled-keep {keep_files[n]} names {len(absent)} identities "
                                 f"that {folder} has no photos of (e.g. {absent[:3]}); wrong "
                                 f"folder or keep list?")
            kept = sorted(wanted)
        usable = faces.detected & faces.yunet_plausible
        if teacher == "dlib" or spec.alignment == "five_point":
            usable &= faces.dlib_plausible
        rows = np.flatnonzero(usable & np.isin(people, kept))
        classes = sorted(set(people[rows].tolist()))
        if not classes:
            raise ValueError(f"--labelled-folder {folder}: no identity with a usable face "
                             f"({len(kept)} identities kept, {int(usable.sum())} usable faces)")
        label_of = {c: first_label + len(identities) + i for i, c in enumerate(classes)}
        crops.append(load_folder_crops(faces, rows, spec))
        labels.append(np.array([label_of[p] for p in people[rows]], np.int32))
        if teacher != "none":
            vectors.append(faces.vectors(teacher)[rows])
        identities += [f"{folder}/{c}" for c in classes]
        report["folders"][str(folder)] = {
            "identities": len(classes), "faces": int(len(rows)),
            "identities_left_out_by_keep_list": len(present) - len(kept),
            "identities_without_usable_face": len(kept) - len(classes),
            "faces_left_out": int(np.isin(people, kept).sum() - len(rows)),
            "keep_list": str(keep_files[n]) if keep_files else None,
            "cache": Path(faces.cache).name}
    report["identities"], report["faces"] = len(identities), int(sum(len(x) for x in labels))
    return LabelledFaces(np.concatenate(crops), np.concatenate(labels),
                         np.concatenate(vectors) if vectors else None, identities, report)
