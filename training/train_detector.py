"""Train the one-class YOLOv8 face detector with ultralytics on the fixed WIDER FACE split.

    facewatch train-detector --size n --imgsz 640 --epochs 300 [--hours 1.0] [--resume]
    facewatch train-detector --init nudenet --pseudo lfw:1500 --pseudo clip --epochs 60 --name N
    facewatch train-detector --pose --size n --imgsz 320 --hours 0.75 --name yolov8n-pose-320

`--pose` trains YOLOv8-pose with five landmarks per face (dlib 5-point pseudo-labels, see
training/widerface_landmarks.py), its matching layers initialised from a box checkpoint
(`--init`, default the box run `yolov8<size>-<imgsz>`'s best.pt).

Runs go to `runs/detector/<name>/` (weights/last.pt is the resume point, weights/best.pt the
model to export). Nothing here touches the network.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from facewatch.training.paths import require_dir, runs_dir, shared_data_dir
from facewatch.training.ultralytics_env import configure_offline
from facewatch.training.widerface import SPLIT_FILE, write_dataset_yaml

log = logging.getLogger("facewatch.train_detector")

# Heavy augmentation: 1,160 training images are ~10x fewer than WIDER's train split.
AUGMENT = dict(mosaic=1.0, mixup=0.1, copy_paste=0.0, scale=0.6, translate=0.1, fliplr=0.5,
               hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, close_mosaic=5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="WIDER FACE folder (images/, labels/); default $FACEWATCH_DATA/widerface")
    parser.add_argument("--split", type=Path, default=SPLIT_FILE,
                        help="JSON with 'train' and 'val' image lists (default: the committed split)")
    parser.add_argument("--size", choices=["n", "s", "m"], default="n", help="YOLOv8 model size")
    parser.add_argument("--imgsz", type=int, default=640, help="training image size (pixels)")
    parser.add_argument("--epochs", type=int, default=300, help="total epochs of the run")
    parser.add_argument("--hours", type=float, default=None,
                        help="wall-clock budget; ultralytics fits the LR schedule to it")
    parser.add_argument("--batch", type=int, default=16, help="images per training batch")
    parser.add_argument("--device", default="cpu", help="'cpu' or a CUDA index such as '0'")
    parser.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    parser.add_argument("--name", default=None,
                        help="run name (default yolov8<size>-<imgsz>, with --pose yolov8<size>-pose-<imgsz>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    parser.add_argument("--pose", action="store_true",
                        help="train the five-landmark pose model (yolov8<size>-pose) instead of boxes only")
    parser.add_argument("--init", type=Path, default=None,
                        help="box model: 'nudenet' (YOLOv8n converted from the nudenet wheel, see "
                             "training/nudenet_init.py) or a checkpoint; default random weights. With "
                             "--pose: box checkpoint whose matching layers start the model (default "
                             "runs/detector/yolov8<size>-<imgsz>/weights/best.pt; 'none' for scratch)")
    parser.add_argument("--pseudo", action="append", default=[], metavar="NAME[:MAX]",
                        help="add teacher-labelled images from runs/detector/pseudo/NAME (made by "
                             "`facewatch label-faces`), at most MAX of them (a fixed sample); repeatable")
    parser.add_argument("--lr0", type=float, default=None,
                        help="initial learning rate (default: ultralytics' choice for the optimizer)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="after every epoch, copy the resumable weights (no optimizer state) and "
                             "the curves there, e.g. training/checkpoints/<run>; --resume reads them "
                             "from there when the run folder has none")


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def train(args: argparse.Namespace) -> Path:
    configure_offline()
    data_root = require_dir(Path(args.data or shared_data_dir() / "widerface"), "WIDER FACE folder")
    pose = getattr(args, "pose", False)
    name = args.name or f"yolov8{args.size}{'-pose' if pose else ''}-{args.imgsz}"
    project = runs_dir() / "detector"
    if pose:
        from facewatch.training.widerface_landmarks import write_pose_dataset

        data_yaml, report, _ = write_pose_dataset(data_root, project / name / "dataset", args.split)
        for side in ("train", "val"):
            log.info("%s: %d faces, %d with landmarks", side, report[side]["faces"],
                     report[side]["faces_with_landmarks"])
    else:
        data_yaml, report = write_dataset_yaml(data_root, project / name / "dataset", args.split)
        report["pseudo"] = add_pseudo_sources(project / name / "dataset" / "train.txt", args.pseudo)
    for side in ("train", "val"):
        log.info("%s: %d images, %d skipped", side, report[side]["images"], report[side]["skipped"])
        for rel, reason in report[side]["skipped_reasons"].items():
            log.warning("skipped %s: %s", rel, reason)
    for source, added in report.get("pseudo", {}).items():
        log.info("train: + %d teacher-labelled images from %s", added, source)
    (project / name / "dataset" / "report.json").write_text(json.dumps(report, indent=1))

    from ultralytics import YOLO  # after configure_offline: its import probes the network

    last = project / name / "weights" / "last.pt"
    if args.resume:
        if not last.is_file() and args.checkpoint_dir and (Path(args.checkpoint_dir) / "last.pt").is_file():
            last.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(args.checkpoint_dir) / "last.pt", last)
            curves = Path(args.checkpoint_dir) / "results.csv"
            if curves.is_file():  # ultralytics appends the new epochs to it
                shutil.copy(curves, last.parent.parent / "results.csv")
            log.info("resuming from the committed checkpoint %s", Path(args.checkpoint_dir) / "last.pt")
        if not last.is_file():
            raise FileNotFoundError(f"--resume given but no checkpoint at {last}"
                                    + (f" or {args.checkpoint_dir}/last.pt" if args.checkpoint_dir else ""))
        model = YOLO(str(last))
        add_checkpoint_copy(model, args.checkpoint_dir)
        # the path, not True: ultralytics refuses resume=True for a checkpoint without optimizer state
        model.train(resume=str(last), data=str(data_yaml), workers=args.workers)
    else:
        pretrained: str | bool = False
        schedule: dict = {}
        if pose:
            model = YOLO(str(pose_model_yaml(args.size, project / name)))
            init = pose_init_checkpoint(args, project)
            if init is not None:
                model.load(str(init))  # transfers every layer whose name and shape match
                pretrained = str(init)
        else:
            model = YOLO(f"yolov8{args.size}.yaml")
            init = box_init_checkpoint(args, project, data_root)
            if init is not None:
                pretrained = str(init)
                # pretrained biases (the folded BatchNorm shifts) must not see ultralytics' warm-up
                # bias LR of 0.1; one warm-up epoch is enough for a model that already finds faces
                schedule = dict(warmup_epochs=1.0, warmup_bias_lr=0.0)
        if args.lr0 is not None:
            schedule.update(lr0=args.lr0, optimizer="AdamW")
        add_checkpoint_copy(model, args.checkpoint_dir)
        model.train(data=str(data_yaml), epochs=args.epochs, time=args.hours, imgsz=args.imgsz,
                    batch=args.batch, device=args.device, workers=args.workers, project=str(project),
                    name=name, exist_ok=True, pretrained=pretrained, amp=False, plots=True, seed=0,
                    deterministic=False, patience=0, cache="ram", verbose=True, **{**AUGMENT, **schedule})
    best = project / name / "weights" / "best.pt"
    log.info("best checkpoint: %s", best)
    return best


def add_pseudo_sources(train_list: Path, sources: list[str], seed: int = 0) -> dict[str, int]:
    """Append teacher-labelled images (`NAME[:MAX]`, a fixed random sample) to the training list."""
    added = {}
    for spec in sources:
        name, images = pseudo_sample(spec, seed)
        with train_list.open("a") as out:
            out.writelines(f"{p}\n" for p in images)
        added[name] = len(images)
    return added


def pseudo_sample(spec: str, seed: int = 0) -> tuple[str, list[Path]]:
    """The labelled images of `NAME[:MAX]` under runs/detector/pseudo: all, or a fixed sample of MAX."""
    from facewatch.training.pseudo_labels import pseudo_root

    name, _, cap = spec.partition(":")
    folder = pseudo_root() / name / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"no teacher-labelled images at {folder}: run "
                                f"`facewatch label-faces --source ...` for {name!r} first")
    images = sorted(p for p in folder.iterdir() if (folder.parent / "labels" / f"{p.stem}.txt").is_file())
    if cap:
        if not cap.isdigit():
            raise ValueError(f"--pseudo {spec}: MAX must be a whole number of images")
        rng = np.random.default_rng(seed)
        images = sorted(rng.permutation(np.array(images, dtype=object))[: int(cap)].tolist())
    return name, images


def box_init_checkpoint(args: argparse.Namespace, project: Path, data_root: Path) -> Path | None:
    """The starting weights of a box model: none, nudenet's converted YOLOv8n, or a checkpoint."""
    init = args.init
    if init is None or str(init).lower() == "none":
        return None
    if str(init).lower() != "nudenet":
        if not Path(init).is_file():
            raise FileNotFoundError(f"--init checkpoint not found: {init} (or pass 'nudenet')")
        return Path(init)
    if args.size != "n":
        raise ValueError(f"--init nudenet is a YOLOv8n; got --size {args.size}")
    out = project / "init" / "nudenet-face.pt"
    if not out.is_file():
        import cv2

        from facewatch.training.nudenet_init import convert
        from facewatch.training.widerface import load_split

        # BatchNorm moments from the training side's images, as training will see them
        train = load_split(args.split)["train"]
        images = [cv2.imread(str(data_root / "images" / rel)) for rel in train[::34][:32]]
        convert(out, [i for i in images if i is not None], calibration_size=args.imgsz)
    return out


def add_checkpoint_copy(model, checkpoint_dir: Path | None) -> None:
    """After each saved epoch, copy last.pt without optimizer state (resumable weights, ~6 MB)
    and the per-epoch curves to `checkpoint_dir`, the folder committed between sessions."""
    if checkpoint_dir is None:
        return
    folder = Path(checkpoint_dir)

    def copy(trainer) -> None:
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        ckpt = torch.load(trainer.last, map_location="cpu", weights_only=False)
        ckpt["optimizer"] = None  # AdamW moments rebuild in a few steps; the file stays small
        torch.save(ckpt, folder / "last.pt.tmp")
        (folder / "last.pt.tmp").replace(folder / "last.pt")
        results = Path(trainer.save_dir) / "results.csv"
        if results.is_file():
            shutil.copy(results, folder / "results.csv")

    model.add_callback("on_model_save", copy)


def pose_model_yaml(size: str, run_dir: Path) -> Path:
    """ultralytics' yolov8-pose architecture with one class and five (x, y, visibility) points,
    so a box checkpoint's head (one class) transfers whole; the file name carries the scale."""
    import yaml
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(f"yolov8{size}-pose.yaml")
    cfg.pop("yaml_file", None)
    cfg.update(nc=1, kpt_shape=[5, 3], scale=size)
    path = run_dir / f"yolov8{size}-pose-face.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def pose_init_checkpoint(args: argparse.Namespace, project: Path) -> Path | None:
    init = args.init
    if init is not None and str(init).lower() == "none":
        return None
    init = Path(init or project / f"yolov8{args.size}-{args.imgsz}" / "weights" / "best.pt")
    if not init.is_file():
        raise FileNotFoundError(f"box checkpoint to start the pose model from not found: {init} "
                                f"(train it first, pass --init PATH, or --init none)")
    return init


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(parser.parse_args(argv))


if __name__ == "__main__":
    main()
