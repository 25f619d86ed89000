"""`facewatch enroll` and `facewatch gallery list|remove|export|check`: operator commands.

Both take the daemon's `--config`: enrollment then uses its models (detector, embedder,
landmarks, providers) and its `gallery.path`, so the daemon can compare what was enrolled;
`--gallery`, `--detector`, ... override single items. Without a config, the shipped models
(stages.model_files) are used and `--gallery` is required.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from facewatch.stages.gallery import Gallery, GalleryError, check_name, file_model_id


def _config(path: Path | None):
    if path is None:
        return None
    from facewatch.daemon.config import load_config

    return load_config(path)


def gallery_path(args: argparse.Namespace, cfg) -> Path:
    path = getattr(args, "gallery", None)
    if path is None and cfg is not None:
        return cfg.gallery.path
    if path is None:
        raise ValueError("no gallery: pass --config CONFIG (its gallery.path) or --gallery PATH")
    return path


def add_enroll_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="the daemon's config file: its models and gallery.path are used")
    p.add_argument("--gallery", type=Path, default=None,
                   help="gallery file (created if missing); default: the config's gallery.path")
    p.add_argument("--name", required=True, help="the person's name (adds to them if enrolled)")
    p.add_argument("images", nargs="+", type=Path,
                   help="photos of the person: one face each, or one clearly largest face")
    p.add_argument("--face", type=int, default=None, metavar="N",
                   help="take face N (1 = largest, as listed when a photo is refused) from "
                        "every photo, instead of the one dominant face")
    p.add_argument("--detector", type=Path, default=None,
                   help="face detector ONNX (default: the config's models.detector, else the "
                        "shipped model)")
    p.add_argument("--embedder", type=Path, default=None,
                   help="face embedder ONNX; the gallery records which file made its embeddings "
                        "(default: the config's models.embedder, else the shipped model)")
    p.add_argument("--landmarks", type=Path, default=None,
                   help="landmark model ONNX, used when the embedder aligns faces on five points "
                        "(default: the config's models.landmarks, else the shipped model)")
    p.add_argument("--cpu", action="store_true", help="use the CPU even where CUDA is available")


def enroll_models(args: argparse.Namespace, cfg) -> tuple[Path, Path, Path | None, tuple]:
    """(detector, embedder, landmarks, providers): the options, else the config's, else shipped."""
    from facewatch.stages import model_files
    from facewatch.stages.onnx_session import DEFAULT_PROVIDERS

    m = cfg.models if cfg is not None else None
    detector = args.detector or (m.detector if m else model_files.shipped_model(model_files.DETECTOR))
    embedder = args.embedder or (m.embedder if m else model_files.shipped_model(model_files.EMBEDDER))
    landmarks = args.landmarks or (m.landmarks if m else
                                   model_files.shipped_model(model_files.LANDMARKS))
    providers = tuple(m.providers) if m else DEFAULT_PROVIDERS
    if args.cpu:
        providers = ("CPUExecutionProvider",)
    return Path(detector), Path(embedder), None if landmarks is None else Path(landmarks), providers


def run_enroll(args: argparse.Namespace) -> int:
    # Imported here: `gallery list` must not pay for onnxruntime.
    from facewatch.daemon.enrollment import prepare, store
    from facewatch.stages.face_detector import FaceDetector
    from facewatch.stages.face_embedder import FaceEmbedder
    from facewatch.stages.face_landmarks import landmarks_to_run

    check_name(args.name)
    cfg = _config(args.config)
    gallery_file = gallery_path(args, cfg)
    detector_file, embedder_file, landmarks_file, providers = enroll_models(args, cfg)
    if gallery_file.exists():  # a damaged gallery fails now, not after the slow part
        Gallery(gallery_file, create=False).close()
    embedder = FaceEmbedder(embedder_file, providers=providers)
    # The daemon's detect stage runs the same landmark model on the faces it crops.
    detector = FaceDetector(detector_file, providers=providers,
                            landmarks=landmarks_to_run(embedder.crop_spec.alignment, landmarks_file))
    model_id = file_model_id(embedder_file)
    samples, embeddings = prepare(args.images, detector, embedder, face=args.face)
    # Opened (and, for a new gallery, created) only once every photo passed.
    with Gallery(gallery_file) as gallery:
        result = store(gallery, args.name, samples, embeddings, model_id)
        total = sum(p.n_embeddings for p in gallery.persons() if p.id == result.person_id)
    for s in result.samples:
        x1, y1, x2, y2 = (int(round(v)) for v in s.box)
        print(f"  {s.source}: face [{x1}, {y1}, {x2}, {y2}] score {s.score:.2f} "
              f"sharpness {s.sharpness:.0f}")
    print(f"enrolled {result.name} (person {result.person_id}): {len(result.samples)} new "
          f"embeddings, {total} in all, model {model_id}, gallery {gallery_file}")
    return 0


def add_gallery_arguments(p: argparse.ArgumentParser) -> None:
    # --gallery / --config are accepted before or after the action; SUPPRESS keeps one from
    # erasing the other.
    common = argparse.ArgumentParser(add_help=False)
    for parser in (common, p):
        parser.add_argument("--gallery", type=Path, default=argparse.SUPPRESS,
                            help="gallery file (default: the config's gallery.path)")
        parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                            help="the daemon's config file: its gallery.path is used")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="enrolled people")
    listing.add_argument("--json", action="store_true", help="one JSON object per person")
    remove = actions.add_parser("remove", parents=[common], help="delete a person and their embeddings")
    remove.add_argument("name", help="the person to delete")
    export = actions.add_parser("export", parents=[common],
                                help="write the gallery as JSON (biometric data: keep it private)")
    export.add_argument("--out", type=Path, help="output file (mode 0600); default: stdout")
    actions.add_parser("check", parents=[common], help="SQLite integrity check; exit 1 if damaged")


def run_gallery(args: argparse.Namespace) -> int:
    path = gallery_path(args, _config(getattr(args, "config", None)))
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
