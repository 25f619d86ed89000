"""fp32 or int8 per execution provider: which file of a model a stage loads (issue 14).

`facewatch quantize-model` writes `<model>.int8.onnx` beside a model. `models.precision` maps
an execution provider to the precision its stages run at; the provider that counts is the
first of `models.providers` this onnxruntime build has (the one the session will get). For
`int8` a stage loads `models.<kind>_int8` when the config names one (missing: refused at
start-up and by validate-config), else the `.int8.onnx` sibling when it is there and was
quantised from this very file (its `quantization.parent_sha256`), else the float file, saying
why in the log. CUDA keeps fp32: the int8 files are CPU graphs (QDQ / dynamic MatMul). `auto` (the CPU
default) takes the int8 copy only where it is clearly faster on this CPU: timed once per host
and file pair, side by side with the float file, and cached (stages.int8_probe).

An int8 embedder keeps its parent's `embedding_space`, so a gallery enrolled with the float
file (enrollment always uses it) is compared with int8 embeddings as it is.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from facewatch.stages.errors import SetupError

log = logging.getLogger("facewatch.precision")
PRECISIONS = ("fp32", "int8", "auto")
KINDS = ("detector", "landmarks", "embedder")
INT8_PROVIDERS = ("CPUExecutionProvider",)
DEFAULT_PRECISION = {"CPUExecutionProvider": "auto", "CUDAExecutionProvider": "fp32"}


def int8_sibling(path: Path) -> Path:
    """Where `facewatch quantize-model` writes a model's int8 copy."""
    path = Path(path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def provider_in_use(providers) -> str:
    """The first configured provider this onnxruntime has (CPU if none is)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return next((p for p in providers if p in available), "CPUExecutionProvider")


@dataclass(frozen=True)
class ModelChoice:
    kind: str           # detector, landmarks, embedder
    path: Path          # the file to load
    precision: str      # fp32 or int8
    provider: str       # the provider the choice was made for
    why: str            # for the log line

    def describe(self) -> str:
        return f"{self.kind} {self.path.name} at {self.precision} on {self.provider} ({self.why})"


def _parent_hash(path: Path) -> str | None:
    from facewatch.stages.embedder_info import read_onnx_metadata

    try:
        raw = read_onnx_metadata(path).get("quantization")
        return json.loads(raw).get("parent_sha256") if raw else None
    except (OSError, ValueError, AttributeError):   # unreadable: loading it will say why
        return None


def choose(models, kind: str) -> ModelChoice:
    """The file of model `kind` ("detector", "landmarks", "embedder") a stage loads under the
    `models` config section. SetupError for a configured int8 file that is missing or was
    quantised from another model."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(getattr(models, kind))
    provider = provider_in_use(models.providers)
    want = (getattr(models, "precision", None) or {}).get(provider, "fp32")
    if want not in ("int8", "auto"):
        return ModelChoice(kind, path, "fp32", provider, f"models.precision: {want}")
    explicit = getattr(models, f"{kind}_int8", None)
    candidate = Path(explicit) if explicit is not None else int8_sibling(path)
    if not candidate.is_file():
        if explicit is not None:
            raise SetupError(f"models.{kind}_int8: file not found: {candidate} (the int8 copy "
                             f"of {path}: `facewatch quantize-model --kind {kind} --model {path}`)")
        return ModelChoice(kind, path, "fp32", provider, f"no int8 copy: {candidate.name} not found")
    parent = _parent_hash(candidate)
    if parent is not None and path.is_file():
        from facewatch.stages.gallery import file_sha256

        if file_sha256(path)[:16] != parent:
            why = f"{candidate} was quantised from another file than {path}"
            if explicit is not None:
                raise SetupError(f"models.{kind}_int8: {why}; quantise this one again")
            return ModelChoice(kind, path, "fp32", provider, f"stale int8 copy not used: {why}")
    if want == "auto":
        return _timed_choice(models, kind, path, candidate, provider)
    return ModelChoice(kind, candidate, "int8", provider, "models.precision: int8")


def _timed_choice(models, kind: str, path: Path, candidate: Path, provider: str) -> ModelChoice:
    """`auto`: the int8 copy where this CPU runs it clearly faster than the float file."""
    from facewatch.stages.errors import ModelError
    from facewatch.stages.int8_probe import int8_verdict

    try:
        verdict = int8_verdict(kind, path, candidate, getattr(models, "threads", 0),
                               getattr(models, "spin_wait", False))
    # onnxruntime's run errors are RuntimeErrors; loading the float file then names its problem
    except (ModelError, ValueError, OSError, RuntimeError) as exc:
        return ModelChoice(kind, path, "fp32", provider, f"models.precision: auto, not timed: {exc}")
    if not verdict.use_int8:
        return ModelChoice(kind, path, "fp32", provider, f"models.precision: auto, {verdict.describe()}")
    return ModelChoice(kind, candidate, "int8", provider, f"models.precision: auto, {verdict.describe()}")


def load(choice: ModelChoice, float_path, loader):
    """`loader(path)` on the chosen file. When an int8 copy cannot be loaded, the float file is
    tried: if it fails too, its own error is raised (it names the configured file: a wrong or
    corrupt model), else the copy's (the copy is the problem)."""
    from facewatch.stages.errors import ModelError

    try:
        return loader(choice.path)
    except ModelError:
        if choice.precision == "fp32":
            raise
        loader(Path(float_path))
        raise


def record(metrics, stage: str, choice: ModelChoice) -> None:
    """The facewatch_model_precision gauge and one log line for a loaded model."""
    if metrics is not None:
        metrics.model_precision.labels(stage, choice.kind, choice.precision).set(1)
    log.info("%s", choice.describe())
