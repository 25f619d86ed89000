"""`facewatch enroll` and `facewatch gallery list|remove|export|check`: operator commands."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stages.gallery import Gallery, GalleryError, check_name, file_model_id

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def add_enroll_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", required=True, type=Path, help="gallery file (created if missing)")
    p.add_argument("--name", required=True, help="the person's name (adds to them if enrolled)")
    p.add_argument("images", nargs="+", type=Path, help="photos with exactly one face each")
    p.add_argument("--detector", type=Path, default=MODELS_DIR / "face_detector.onnx",
                   help="face detector ONNX (default: the repository's models/)")
    p.add_argument("--embedder", type=Path, default=MODELS_DIR / "face_embedder.onnx",
                   help="face embedder ONNX; the gallery records which file made its embeddings")
    p.add_argument("--landmarks", type=Path, default=MODELS_DIR / "face_landmarks.onnx",
                   help="landmark model ONNX, used when the embedder aligns faces on five points "
                        "(as models.landmarks in the daemon's config)")
    p.add_argument("--cpu", action="store_true", help="use the CPU even where CUDA is available")


def run_enroll(args: argparse.Namespace) -> int:
    # Imported here: `gallery list` must not pay for onnxruntime.
    from daemon.enrollment import prepare, store
    from stages.face_detector import FaceDetector
    from stages.face_embedder import FaceEmbedder
    from stages.face_landmarks import landmarks_to_run
    from stages.onnx_session import DEFAULT_PROVIDERS

    check_name(args.name)
    if args.gallery.exists():  # a damaged gallery fails now, not after the slow part
        Gallery(args.gallery, create=False).close()
    providers = ("CPUExecutionProvider",) if args.cpu else DEFAULT_PROVIDERS
    embedder = FaceEmbedder(args.embedder, providers=providers)
    # The daemon's detect stage runs the same landmark model on the faces it crops.
    detector = FaceDetector(args.detector, providers=providers,
                            landmarks=landmarks_to_run(embedder.crop_spec.alignment, args.landmarks))
    model_id = file_model_id(args.embedder)
    samples, embeddings = prepare(args.images, detector, embedder)
    # Opened (and, for a new gallery, created) only once every photo passed.
    with Gallery(args.gallery) as gallery:
        result = store(gallery, args.name, samples, embeddings, model_id)
        total = sum(p.n_embeddings for p in gallery.persons() if p.id == result.person_id)
    for s in result.samples:
        x1, y1, x2, y2 = (int(round(v)) for v in s.box)
        print(f"  {s.source}: face [{x1}, {y1}, {x2}, {y2}] score {s.score:.2f} "
              f"sharpness {s.sharpness:.0f}")
    print(f"enrolled {result.name} (person {result.person_id}): {len(result.samples)} new "
          f"embeddings, {total} in all, model {model_id}, gallery {args.gallery}")
    return 0


def add_gallery_arguments(p: argparse.ArgumentParser) -> None:
    # --gallery is accepted before or after the action; SUPPRESS keeps one from erasing the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gallery", type=Path, default=argparse.SUPPRESS, help="gallery file")
    p.add_argument("--gallery", type=Path, default=argparse.SUPPRESS, help="gallery file")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="enrolled people")
    listing.add_argument("--json", action="store_true", help="one JSON object per person")
    remove = actions.add_parser("remove", parents=[common], help="delete a person and their embeddings")
    remove.add_argument("name")
    export = actions.add_parser("export", parents=[common],
                                help="write the gallery as JSON (biometric data: keep it private)")
    export.add_argument("--out", type=Path, help="output file (mode 0600); default: stdout")
    actions.add_parser("check", parents=[common], help="SQLite integrity check; exit 1 if damaged")


def run_gallery(args: argparse.Namespace) -> int:
    path = getattr(args, "gallery", None)
    if path is None:
        raise ValueError("--gallery PATH is required")
    with Gallery(path, create=False) as gallery:
        return _ACTIONS[args.action](gallery, args)


def _list(gallery: Gallery, args: argparse.Namespace) -> int:
    people = gallery.persons()
    if args.json:
        for p in people:
            print(json.dumps({"id": p.id, "name": p.name, "embeddings": p.n_embeddings,
                              "created": p.created}, ensure_ascii=False))
        return 0
    snap = gallery.snapshot()
    print(f"{len(people)} {'person' if len(people) == 1 else 'people'}, {len(snap)} embeddings, "
          f"model {snap.model_id or '-'}, dimension {snap.embeddings.shape[1] or '-'}")
    width = max((len(p.name) for p in people), default=4)
    for p in people:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.created))
        print(f"{p.id:>5}  {p.name:<{width}}  {p.n_embeddings:>3} embeddings  enrolled {created}")
    return 0


def _remove(gallery: Gallery, args: argparse.Namespace) -> int:
    count = {p.name: p.n_embeddings for p in gallery.persons()}.get(args.name)
    if not gallery.remove(args.name):
        raise GalleryError(f"no person named {args.name!r} in gallery {gallery.path}")
    print(f"removed {args.name} ({count} embeddings) from {gallery.path}")
    return 0


def _export(gallery: Gallery, args: argparse.Namespace) -> int:
    if args.out is None:
        gallery.export(sys.stdout)
    else:
        n = gallery.export(args.out)
        print(f"exported {n} people to {args.out}", file=sys.stderr)
    return 0


def _check(gallery: Gallery, args: argparse.Namespace) -> int:
    problems = gallery.integrity_check()
    for line in problems:
        print(line)
    return 0 if problems == ["ok"] else 1


_ACTIONS = {"list": _list, "remove": _remove, "export": _export, "check": _check}
