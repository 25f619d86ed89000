"""Loading ONNX models: execution-provider choice, clear refusals, embedded metadata."""
from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import onnxruntime as ort

from facewatch.stages.errors import ModelError, SetupError  # noqa: F401  (ModelError re-exported)

log = logging.getLogger("facewatch.onnx")

DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_fallback_logged: set[str] = set()




def choose_providers(requested) -> list[str]:
    """Keep the requested providers that this onnxruntime build has, in order; CPU always last."""
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    for provider in missing:
        if provider not in _fallback_logged:  # once per process, not once per model or frame
            _fallback_logged.add(provider)
            log.warning("%s requested but not available in this onnxruntime build (%s); "
                        "falling back to %s", provider, ort.__version__,
                        chosen[0] if chosen else "CPUExecutionProvider")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def load_session(path, providers=DEFAULT_PROVIDERS, threads: int = 0,
                 what: str = "model", cpu_arena: bool = False,
                 spin: bool = False) -> ort.InferenceSession:
    """`spin`: onnxruntime's intra-op threads busy-wait for work between operators (its
    default). Off by default: the daemon's stages share the CPU with each other and with video
    decoding, and spinning threads burn the cores those need (measured on 2 cores beside other
    work: the int8 detector took 52 core-ms a 720p frame spinning, 31 without, and was faster).
    `cpu_arena`: onnxruntime's CPU memory arena and memory patterns. Off by default: they keep
    the largest batch's buffers for the life of the process (detector at batch 8 of 1080p
    frames: ~27 MB more RSS, no measurable speed-up here); the embedder turns them on (its
    batches of small crops run ~20% faster with them)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} file not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = cpu_arena
    options.enable_mem_pattern = cpu_arena
    try:
        session = ort.InferenceSession(str(path), options, providers=choose_providers(providers))
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
        raise ModelError(f"{what} {path} is not a loadable ONNX model: "
                         f"{str(exc).splitlines()[0][:300]}") from exc
    return session


def metadata(session: ort.InferenceSession) -> dict[str, object]:
    """Custom metadata of the file; JSON values and Python literals are decoded."""
    out: dict[str, object] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            out[key] = json.loads(value)
        except (ValueError, TypeError):
            try:  # ultralytics writes Python reprs, e.g. names "{0: 'face'}"
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
    return out
