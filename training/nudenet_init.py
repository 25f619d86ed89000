"""Pretrained start for the face detector: nudenet's YOLOv8n, converted to a one-class checkpoint.

No COCO `yolov8n.pt` can be downloaded on our machines, but the `nudenet==3.4.2` wheel carries
`320n.onnx`: a YOLOv8n exported by ultralytics 8.2.46 (AGPL-3.0) with 18 classes, two of them
faces. Its initialisers keep ultralytics' parameter names, with each BatchNorm folded into its
conv's bias. The conversion:

1. loads them by name into `DetectionModel('yolov8n.yaml', nc=18)`; each BatchNorm becomes an
   identity carrying the folded bias (output checked against the ONNX on real images);
2. re-estimates every BatchNorm from real images so that batch statistics during fine-tuning
   reproduce the pretrained activations: weight = the channel's std, bias = folded bias + mean,
   running stats = those moments. In eval mode this is still exactly the folded network; in
   train mode a batch normalises to nearly the same values instead of to unit variance, which
   would throw the pretrained features away at the first step;
3. builds the one-class head from the two face classes (their logits averaged: one linear
   layer that scores both sexes' faces as the face class).

Training-time only: the daemon never imports this, nudenet or torch.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from facewatch.training.ultralytics_env import configure_offline
from facewatch.training.wheel_models import NUDENET_320N, wheel_model_path

log = logging.getLogger("facewatch.nudenet_init")
FACE_CLASSES = ("FACE_FEMALE", "FACE_MALE")
SOURCE_CLASSES = 18
SOURCE_IMGSZ = 320


def onnx_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Named initialisers and the class names from the file's ultralytics metadata."""
    import ast

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        names = ast.literal_eval(meta["names"])
    except (KeyError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: no ultralytics 'names' metadata (expected nudenet's 320n.onnx)") from exc
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
               if i.name.startswith("model.")}
    return weights, names


def face_class_indices(names: dict[int, str]) -> list[int]:
    found = [i for i, n in names.items() if n in FACE_CLASSES]
    if len(found) != len(FACE_CLASSES):
        raise ValueError(f"expected classes {FACE_CLASSES} in the model's names, got {names}")
    return sorted(found)


def load_folded(weights: dict[str, np.ndarray]):
    """DetectionModel(nc=18) carrying the ONNX weights, BatchNorms as identities."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=SOURCE_CLASSES, verbose=False).eval()
    state = model.state_dict()
    filled = set()
    for name, value in weights.items():
        target = name
        if name not in state and name.endswith(".conv.bias"):
            target = name[: -len(".conv.bias")] + ".bn.bias"  # the folded BatchNorm's shift
        if target not in state:
            raise ValueError(f"ONNX initialiser {name} has no place in yolov8n (nc={SOURCE_CLASSES})")
        if tuple(state[target].shape) != value.shape:
            raise ValueError(f"{name}: shape {value.shape}, yolov8n expects {tuple(state[target].shape)}")
        state[target] = torch.from_numpy(value.copy())
        filled.add(target)
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            state[f"{module_name}.weight"] = torch.ones_like(module.weight)
            state[f"{module_name}.running_mean"] = torch.zeros_like(module.running_mean)
            state[f"{module_name}.running_var"] = torch.full_like(module.running_var, 1 - module.eps)
            filled.update(f"{module_name}.{k}" for k in ("weight", "running_mean", "running_var",
                                                         "num_batches_tracked"))
    missing = [k for k in state if k not in filled]
    if missing:
        raise ValueError(f"{len(missing)} yolov8n parameters not in the ONNX file, e.g. {missing[:3]}")
    model.load_state_dict(state)
    return model


def to_input(images: list[np.ndarray], size: int) -> np.ndarray:
    """BGR images -> RGB NCHW 0..1, letterboxed with ultralytics' centred grey (as it trained)."""
    from facewatch.stages.face_detector import letterbox

    return cv2.dnn.blobFromImages([letterbox(i, size)[0] for i in images], 1 / 255.0, swapRB=True)


def reestimate_batchnorm(model, batch: np.ndarray) -> None:
    """Give each BatchNorm the moments of its conv's output on real images (see module doc)."""
    import torch
    from ultralytics.nn.modules import Conv

    moments, hooks = {}, []
    for module in model.modules():
        if isinstance(module, Conv) and isinstance(module.bn, torch.nn.BatchNorm2d):
            def hook(conv, _inputs, output, key=module):
                moments[key] = (output.mean(dim=(0, 2, 3)), output.var(dim=(0, 2, 3), unbiased=False))
            hooks.append(module.conv.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.from_numpy(batch))
    for handle in hooks:
        handle.remove()
    with torch.no_grad():
        for module, (mean, var) in moments.items():
            bn = module.bn
            var = var.clamp_min(1e-6)
            bn.bias.add_(mean)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)


def one_class_model(source, face_indices: list[int]):
    """DetectionModel(nc=1) with every layer of `source`; the class conv from the face classes."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    state, source_state = model.state_dict(), source.state_dict()
    for key, value in source_state.items():
        if key in state and state[key].shape == value.shape:
            state[key] = value.clone()
    head = source.model[-1]
    for i in range(len(head.cv3)):
        prefix = f"model.{len(source.model) - 1}.cv3.{i}.2"
        for part in ("weight", "bias"):
            state[f"{prefix}.{part}"] = source_state[f"{prefix}.{part}"][face_indices].mean(
                dim=0, keepdim=True).clone()
    model.load_state_dict(state)
    model.names = {0: "face"}
    return model.eval()


def save_checkpoint(model, path: Path, note: str) -> Path:
    import datetime

    import torch
    import ultralytics

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "train_args": {}, "epoch": -1, "date": datetime.datetime.now().isoformat(),
                "version": ultralytics.__version__, "facewatch_init": note}, path)
    return path


def convert(out: Path, calibration_images: list[np.ndarray], onnx_path: Path | None = None,
            calibration_size: int = 640) -> Path:
    """Write the one-class checkpoint `out` (ultralytics format) from nudenet's ONNX file."""
    configure_offline()
    onnx_path = Path(onnx_path or wheel_model_path(NUDENET_320N))
    weights, names = onnx_weights(onnx_path)
    faces = face_class_indices(names)
    model = load_folded(weights)
    reestimate_batchnorm(model, to_input(calibration_images, calibration_size))
    face_model = one_class_model(model, faces)
    log.info("converted %s (face classes %s) -> one-class YOLOv8n; BatchNorm moments from %d images",
             onnx_path, [names[i] for i in faces], len(calibration_images))
    return save_checkpoint(face_model, out, f"{NUDENET_320N.requirement}:{NUDENET_320N.relative}, "
                                            f"face classes {[names[i] for i in faces]} averaged")
