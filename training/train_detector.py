"""Train the one-class YOLOv8 face detector with ultralytics on the fixed WIDER FACE split.

    facewatch train-detector --size n --imgsz 640 --epochs 300 [--hours 1.0] [--resume]
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
from pathlib import Path

from training.paths import require_dir, runs_dir, shared_data_dir
from training.ultralytics_env import configure_offline
from training.widerface import SPLIT_FILE, write_dataset_yaml

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
                        help="with --pose: box checkpoint whose matching layers start the model (default "
                             "runs/detector/yolov8<size>-<imgsz>/weights/best.pt; 'none' for scratch)")


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
        from training.widerface_landmarks import write_pose_dataset

        data_yaml, report, _ = write_pose_dataset(data_root, project / name / "dataset", args.split)
        for side in ("train", "val"):
            log.info("%s: %d faces, %d with landmarks", side, report[side]["faces"],
                     report[side]["faces_with_landmarks"])
    else:
        data_yaml, report = write_dataset_yaml(data_root, project / name / "dataset", args.split)
    for side in ("train", "val"):
        log.info("%s: %d images, %d skipped", side, report[side]["images"], report[side]["skipped"])
        for rel, reason in report[side]["skipped_reasons"].items():
            log.warning("skipped %s: %s", rel, reason)
    (project / name / "dataset" / "report.json").write_text(json.dumps(report, indent=1))

    from ultralytics import YOLO  # after configure_offline: its import probes the network

    last = project / name / "weights" / "last.pt"
    if args.resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume given but no checkpoint at {last}")
        YOLO(str(last)).train(resume=True)
    else:
        pretrained: str | bool = False
        if pose:
            model = YOLO(str(pose_model_yaml(args.size, project / name)))
            init = pose_init_checkpoint(args, project)
            if init is not None:
                model.load(str(init))  # transfers every layer whose name and shape match
                pretrained = str(init)
        else:
            model = YOLO(f"yolov8{args.size}.yaml")
        model.train(data=str(data_yaml), epochs=args.epochs, time=args.hours, imgsz=args.imgsz,
                    batch=args.batch, device=args.device, workers=args.workers, project=str(project),
                    name=name, exist_ok=True, pretrained=pretrained, amp=False, plots=True, seed=0,
                    deterministic=False, patience=0, cache="ram", verbose=True, **AUGMENT)
    best = project / name / "weights" / "best.pt"
    log.info("best checkpoint: %s", best)
    return best


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
