"""`facewatch pack-detector-data`: the detector's training set as one small folder for a GPU host.

    facewatch pack-detector-data OUT --pseudo lfw:500 --pseudo clip [--max-side 640] [--val-every 2]

Training reads the shared WIDER FACE copy and `runs/detector/pseudo/` in place, ~300 MB of
full-size photos. A GPU host only needs what training at `--imgsz` sees, so this writes:

    OUT/widerface/{images,labels}/...        the split's images, longest side <= --max-side
    OUT/split.json                           every --train-every-th / --val-every-th image
    OUT/runs/detector/pseudo/NAME/{images,labels}   the same fixed samples train-detector draws

Labels are YOLO-normalised, so they stay valid under the resize and are copied as they are.
Train there with `FACEWATCH_DATA=OUT FACEWATCH_RUNS=OUT/runs facewatch train-detector
--split OUT/split.json --pseudo NAME ...`. WebP at quality 75 is ~half a JPEG's size at 85.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import cv2

from facewatch.training.paths import require_dir, shared_data_dir
from facewatch.training.train_detector import pseudo_sample
from facewatch.training.widerface import SPLIT_FILE, check_images, load_split

log = logging.getLogger("facewatch.pack_detector_data")
ENCODINGS = {"webp": cv2.IMWRITE_WEBP_QUALITY, "jpg": cv2.IMWRITE_JPEG_QUALITY}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("out", type=Path, help="folder to write (created; must be empty or absent)")
    a("--data", type=Path, default=None, help="WIDER FACE folder (default $FACEWATCH_DATA/widerface)")
    a("--split", type=Path, default=SPLIT_FILE, help="JSON with 'train' and 'val' image lists")
    a("--pseudo", action="append", default=[], metavar="NAME[:MAX]",
      help="teacher-labelled source to include, sampled as train-detector samples it; repeatable")
    a("--max-side", type=int, default=640, help="longest image side after the resize (pixels)")
    a("--train-every", type=int, default=1, help="keep every N-th WIDER training image (1: all)")
    a("--val-every", type=int, default=1, help="keep every N-th validation image (1: all)")
    a("--format", choices=sorted(ENCODINGS), default="webp", help="image encoding")
    a("--quality", type=int, default=75, help="encoder quality, 1-100")


def run(args: argparse.Namespace) -> int:
    report = pack(args)
    print(json.dumps(report, indent=1))
    return 0


def pack(args: argparse.Namespace) -> dict:
    if args.out.exists() and any(args.out.iterdir()):
        raise FileExistsError(f"{args.out} is not empty: pack into a new folder")
    if args.max_side < 32 or min(args.train_every, args.val_every) < 1 or not 1 <= args.quality <= 100:
        raise ValueError(f"--max-side must be >= 32, --train-every and --val-every >= 1 and --quality "
                         f"1-100; got {args.max_side}, {args.train_every}, {args.val_every}, {args.quality}")
    root = require_dir(Path(args.data or shared_data_dir() / "widerface"), "WIDER FACE folder")
    split = load_split(args.split)
    packer = _Packer(args.max_side, args.format, args.quality)
    out_split = {"packed_from": str(args.split), "train": [], "val": []}
    skipped = {}
    for side, images in (("train", split["train"][:: args.train_every]),
                         ("val", split["val"][:: args.val_every])):
        checked = check_images(root, images)   # the same images train-detector would keep
        skipped.update(checked.skipped)
        for image in checked.good:
            rel = str(image.relative_to(root / "images"))
            new_rel = str(Path(rel).with_suffix(f".{args.format}"))
            if packer.copy(root / "images" / rel, (root / "labels" / rel).with_suffix(".txt"),
                           args.out / "widerface" / "images" / new_rel,
                           (args.out / "widerface" / "labels" / rel).with_suffix(".txt")):
                out_split[side].append(new_rel)
    (args.out / "split.json").write_text(json.dumps(out_split, indent=1) + "\n")
    pseudo = {}
    for spec in args.pseudo:
        name, images = pseudo_sample(spec)
        dest = args.out / "runs" / "detector" / "pseudo" / name
        pseudo[name] = sum(packer.copy(p, p.parent.parent / "labels" / f"{p.stem}.txt",
                                       dest / "images" / f"{p.stem}.{args.format}",
                                       dest / "labels" / f"{p.stem}.txt") for p in images)
    return {"train": len(out_split["train"]), "val": len(out_split["val"]), "pseudo": pseudo,
            "skipped": skipped, "unreadable": packer.unreadable, "bytes": packer.bytes}


class _Packer:
    def __init__(self, max_side: int, fmt: str, quality: int) -> None:
        self.max_side, self.params, self.suffix = max_side, [ENCODINGS[fmt], quality], f".{fmt}"
        self.unreadable: list[str] = []
        self.bytes = 0

    def copy(self, image: Path, label: Path, image_out: Path, label_out: Path) -> bool:
        frame = cv2.imread(str(image))
        if frame is None or not label.is_file():
            self.unreadable.append(str(image))
            log.warning("left out %s: %s", image, "does not decode" if frame is None else "no label")
            return False
        scale = self.max_side / max(frame.shape[:2])
        if scale < 1:  # INTER_AREA: the small faces keep their detail best when shrinking
            frame = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)),
                               interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(self.suffix, frame, self.params)
        if not ok:
            raise RuntimeError(f"could not encode {image} as {self.suffix}")
        image_out.parent.mkdir(parents=True, exist_ok=True)
        label_out.parent.mkdir(parents=True, exist_ok=True)
        image_out.write_bytes(encoded.tobytes())
        shutil.copyfile(label, label_out)
        self.bytes += len(encoded)
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
