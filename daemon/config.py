"""The daemon's configuration: one pydantic model per section, validated once at load.

Unknown keys are errors everywhere (extra="forbid"); an error names the key path, the YAML line
and the bad value (URIs redacted). Relative paths are resolved against the config file's
directory. `${VAR}` in a camera URI is taken from the environment when the URI is opened, so
secrets can come from systemd credentials / EnvironmentFile instead of the file itself.

`facewatch validate-config PATH` prints OK or the error and exits non-zero.
"""
from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

STAGE_KINDS = ("capture", "detect", "embed", "match", "publish")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DEVICE = re.compile(r"^/dev/video(\d+)$")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, key path, line and bad value."""


# --- URIs ----------------------------------------------------------------------------------

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:password|passwd|pass|pwd|token|key|secret|auth)=)[^&;#]*")


def redact_uri(uri: str) -> str:
    """A URI safe to log, put in an event or a metric label: the password and secret query values
    become ***. Use this wherever a camera URI leaves the process.

    The userinfo ends at the *last* '@' (passwords often contain an unescaped '@' or '/'), so an
    odd URI is over-redacted rather than leaked."""
    uri = str(uri)
    m = _SCHEME.match(uri)
    if m:
        rest = uri[m.end():]
        at = rest.rfind("@")
        if at >= 0 and ":" in rest[:at]:
            uri = f"{m.group(0)}{rest[:at].split(':', 1)[0]}:***@{rest[at + 1:]}"
    return _SECRET_QUERY.sub(r"\1***", uri)


def expand_env(value: str) -> str:
    """Replace ${VAR} with the environment's value; a missing variable is an error naming it."""
    def sub(m: re.Match) -> str:
        if m[1] not in os.environ:
            raise ConfigError(f"environment variable {m[1]} is not set (referenced as ${{{m[1]}}})")
        return os.environ[m[1]]
    return _ENV_REF.sub(sub, value)


# --- sections ------------------------------------------------------------------------------

class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _resolve(path: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths are relative to the config file's directory (context `base_dir`)."""
    if path is None:
        return None
    path = Path(os.path.expanduser(str(path)))
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else (Path(base) / path).resolve()


class CameraConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="unique; used in events, metric labels and process names")
    uri: str = Field(min_length=1, description="rtsp://..., /dev/videoN, or a video file path")
    loop: bool = Field(False, description="files only: start again at the end instead of ending")
    realtime: bool = Field(True, description="files only: pace at the file's frame rate and drop "
                                             "frames when behind (false: every frame, as fast as "
                                             "the pipeline takes them)")
    fps_cap: float | None = Field(None, gt=0, le=240)
    roi: tuple[int, int, int, int] | None = Field(None, description="[x1, y1, x2, y2] pixels")

    @property
    def kind(self) -> Literal["stream", "device", "file"]:
        if _DEVICE.match(self.uri):
            return "device"
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", self.uri) and not self.uri.startswith("file://"):
            return "stream"
        return "file"

    @property
    def safe_uri(self) -> str:
        return redact_uri(self.uri)

    def open_uri(self) -> str:
        """The URI to open: ${VAR} expanded, file:// stripped. Never log this; log safe_uri."""
        uri = expand_env(self.uri)
        return uri[len("file://"):] if uri.startswith("file://") else uri

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str, info: ValidationInfo) -> str:
        uri = uri.strip()   # ${VAR}s are expanded when opened: the service's environment
                            # (EnvironmentFile, credentials) may differ from validate-config's
        if _DEVICE.match(uri) or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri) and \
                not uri.startswith("file://"):
            return uri
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return str(_resolve(Path(path), info))

    @field_validator("roi")
    @classmethod
    def _roi(cls, roi):
        if roi is not None:
            x1, y1, x2, y2 = roi
            if min(roi) < 0 or x2 <= x1 or y2 <= y1:
                raise ValueError("roi must be [x1, y1, x2, y2] with 0 <= x1 < x2 and 0 <= y1 < y2")
        return roi

    @field_validator("loop", "realtime")
    @classmethod
    def _file_only(cls, v: bool, info: ValidationInfo) -> bool:
        uri = info.data.get("uri")
        kind = None if uri is None else CameraConfig.model_construct(uri=uri).kind
        if kind not in (None, "file") and v != CameraConfig.model_fields[info.field_name].default:
            raise ValueError(f"{str(v).lower()} applies to video files only, "
                             f"not {kind} sources")
        return v


class CaptureConfig(Section):
    queue_size: int = Field(2, ge=1, le=64, description="frames held per camera; oldest dropped")
    reconnect_initial_s: float = Field(0.5, gt=0, le=60)
    reconnect_max_s: float = Field(30.0, gt=0, le=3600)
    open_timeout_s: float = Field(10.0, gt=0, le=120)
    read_timeout_s: float = Field(10.0, gt=0, le=120)
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    # FFmpeg's frame threads each hold decoded frames: 1 keeps a 1080p camera ~8 MB smaller
    # (issue 13) and decodes at ~7 ms a frame; 0 is OpenCV's default (one per CPU core)
    decode_threads: int = Field(1, ge=0, le=64,
                                description="FFmpeg decoder threads per camera; 0 = one per core")

    @model_validator(mode="after")
    def _order(self):
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


class ModelsConfig(Section):
    # A key left out means the shipped model (stages.model_files: $FACEWATCH_MODELS, the source
    # checkout's models/, else <prefix>/share/facewatch/models of the installed package).
    detector: Path
    embedder: Path
    # Five landmarks per face for an embedder that aligns on them; null: the detector's own
    # keypoints, if it has any, else the box fallback (counted in facewatch_alignment_fallbacks).
    landmarks: Path | None
    providers: list[str] = Field(default_factory=lambda: ["CUDAExecutionProvider",
                                                          "CPUExecutionProvider"], min_length=1)
    threads: int = Field(0, ge=0, le=256, description="onnxruntime intra-op threads; 0 = auto")
    # onnxruntime's threads busy-wait between operators: faster only on cores nothing else needs;
    # on a shared CPU they take time from decoding and the other stages (stages.onnx_session)
    spin_wait: bool = Field(False, description="onnxruntime intra-op threads spin while idle")
    detector_conf: float = Field(0.25, gt=0, lt=1)
    detector_iou: float = Field(0.5, gt=0, lt=1)
    detector_imgsz: int | None = Field(None, ge=32, le=4096, description="null: from the model")
    # fp32 or int8 per execution provider (stages.precision): with int8 a stage loads the model's
    # int8 copy (`facewatch quantize-model`): <kind>_int8 when set, else <model>.int8.onnx beside
    # the model when present and quantised from it, else the float file (logged); auto (CPU): the
    # int8 copy where it is clearly faster on this CPU, timed once per host (stages.int8_probe)
    precision: dict[str, Literal["fp32", "int8", "auto"]] = Field(
        default_factory=lambda: {"CPUExecutionProvider": "auto", "CUDAExecutionProvider": "fp32"})
    detector_int8: Path | None = None
    landmarks_int8: Path | None = None
    embedder_int8: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _shipped_models(cls, data):
        if isinstance(data, dict):
            from facewatch.stages import model_files

            data = dict(data)
            for key, name in (("detector", model_files.DETECTOR), ("embedder", model_files.EMBEDDER),
                              ("landmarks", model_files.LANDMARKS)):
                if key not in data:
                    data[key] = str(model_files.shipped_model(name))
        return data

    @field_validator("detector", "embedder", "landmarks", "detector_int8", "landmarks_int8",
                     "embedder_int8")
    @classmethod
    def _relative_to_config(cls, v, info: ValidationInfo):
        return None if v is None else _resolve(v, info)

    @field_validator("precision")
    @classmethod
    def _precision(cls, precision: dict[str, str]) -> dict[str, str]:
        from facewatch.stages.precision import INT8_PROVIDERS

        bad = [p for p in precision if not p.endswith("ExecutionProvider")]
        if bad:
            raise ValueError(f"not onnxruntime execution provider names: {bad}")
        gpu_int8 = [p for p, v in precision.items() if v != "fp32" and p not in INT8_PROVIDERS]
        if gpu_int8:
            raise ValueError(f"int8 and auto are for {list(INT8_PROVIDERS)} only (the int8 files "
                             f"are CPU graphs); {gpu_int8} keep fp32")
        return precision

    @field_validator("providers")
    @classmethod
    def _providers(cls, providers: list[str]) -> list[str]:
        bad = [p for p in providers if not p.endswith("ExecutionProvider")]
        if bad:
            raise ValueError(f"not onnxruntime execution provider names: {bad}")
        return providers

    @field_validator("detector_imgsz")
    @classmethod
    def _imgsz(cls, v):
        if v is not None and v % 32:
            raise ValueError("detector_imgsz must be a multiple of 32")
        return v


class DetectConfig(Section):
    batch_max: int = Field(8, ge=1, le=64, description="frames per detector batch, across cameras")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="wait for more frames to batch")
    # On the CPU a batch's frames are detected side by side, one per lane (stages.detector_lanes)
    lanes: int = Field(0, ge=0, le=64, description="CPU detector lanes; 0 = one per core, "
                                                     "at most 4; 1 = one batched call")
    tracker: Literal["bytetrack"] = Field("bytetrack", description="supervision's ByteTrack")
    track_buffer: int = Field(30, ge=1, le=10000, description="frames a lost track is kept")
    track_high_thresh: float = Field(0.4, gt=0, lt=1)
    track_low_thresh: float = Field(0.25, gt=0, lt=1)
    new_track_thresh: float = Field(0.5, gt=0, lt=1)
    match_thresh: float = Field(0.8, gt=0, le=1)
    min_face_px: int = Field(20, ge=1, le=4096, description="shorter box side, frame pixels")
    # 8, not 20: the crop is the face upscaled to the embedder's size, so a sharp 45-60 px face
    # measures ~11 and 20 rejected nearly every face under 60 px; validation pairs blurred to
    # ~9 lose 0.7 points of accuracy, to ~5.5 lose 4.6 (models/README.md, "Small and blurred faces")
    min_blur: float = Field(8.0, ge=0, description="Laplacian variance of the crop; 0 = off")
    crop_size: int | None = Field(None, ge=16, le=1024, description="null: embedder metadata")
    crop_scale: float | None = Field(None, gt=0.5, le=4, description="null: embedder metadata")


class EmbedConfig(Section):
    batch_max: int = Field(32, ge=1, le=512)
    batch_wait_ms: float = Field(10.0, ge=0, le=1000)
    votes: int = Field(3, ge=1, le=100, description="frames embedded at a track's start; the "
                                                  "match decision is made once this many voted")
    recheck_interval_s: float = Field(2.0, ge=0, description="then one frame per interval")
    first_votes: int = Field(1, ge=1, le=100, description="a track's first decision once this "
                             "many embeddings are in (1: its first good crop); revised when the "
                             "full vote of `votes` disagrees")

    @model_validator(mode="after")
    def _first_votes(self):
        if self.first_votes > self.votes:
            raise ValueError(f"first_votes ({self.first_votes}) must be <= votes ({self.votes})")
        return self


class MatchConfig(Section):
    target_far: float = Field(0.01, gt=0, lt=0.5, description="false-accept rate per decision: "
                              "the share of strangers' decisions allowed to name someone; the "
                              "threshold follows the gallery's size (stages.open_set)")
    threshold: float | None = Field(None, ge=-1, le=1, description="a raw cosine threshold "
                                    "instead of target_far (null: derived from target_far)")
    vote_window: int = Field(7, ge=1, le=1000, description="latest votes a decision counts")


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc:// and for tcp:// bound to a loopback address (127.0.0.0/8, ::1, localhost);
    False for anything reachable from other hosts (0.0.0.0, *, an interface name, a LAN address)."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:   # "*", an interface name or a host name: assume it is reachable
        return False


class PublishConfig(Section):
    endpoint: str = Field("tcp://127.0.0.1:5570", description="ZeroMQ PUB bind address")
    event_log: Path | None = Field(Path("events.jsonl"), description="JSONL; null disables it")
    snapshots: bool = False
    snapshot_quality: int = Field(85, ge=1, le=100)
    hwm: int = Field(10000, ge=1)
    curve_secret_key_file: Path | None = Field(
        None, description="the daemon's CURVE secret key (`facewatch keys`): events are "
                          "encrypted; required when endpoint is not loopback")
    curve_clients_dir: Path | None = Field(
        None, description="folder of client public keys (*.key) allowed to subscribe; null: "
                          "any client that has the server's public key")

    @field_validator("event_log")
    @classmethod
    def _relative_to_config(cls, v, info: ValidationInfo):
        return _resolve(v, info)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^(tcp|ipc)://\S+$", v):
            raise ValueError("endpoint must be tcp://HOST:PORT or ipc://PATH")
        return v

    @field_validator("curve_secret_key_file")
    @classmethod
    def _curve_required_off_host(cls, v, info: ValidationInfo):
        endpoint = info.data.get("endpoint")
        if v is None and endpoint is not None and not is_loopback_endpoint(endpoint):
            raise ValueError(f"required because publish.endpoint {endpoint} is reachable from "
                             f"other hosts (events name people: they leave this host only "
                             f"encrypted); make a key with `facewatch keys --out DIR`")
        return _resolve(v, info)

    @field_validator("curve_clients_dir")
    @classmethod
    def _clients_need_curve(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("curve_secret_key_file") is None:
            raise ValueError("needs publish.curve_secret_key_file")
        return _resolve(v, info)


class MetricsConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=1, le=65535)


class GalleryConfig(Section):
    path: Path = Path("gallery.db")
    poll_interval_s: float = Field(1.0, gt=0, le=3600)

    @field_validator("path")
    @classmethod
    def _relative_to_config(cls, v, info: ValidationInfo):
        return _resolve(v, info)


class RuntimeConfig(Section):
    dir: Path | None = Field(None, description="null: $RUNTIME_DIRECTORY, else a new temp dir")
    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = Field("127.0.0.1", description="tcp: the address of the host running detect, "
                                                "embed, match and publish (they bind there)")
    base_port: int = Field(5580, ge=1, le=65500, description="tcp: first of 4 ports")

    @field_validator("dir")
    @classmethod
    def _relative_to_config(cls, v, info: ValidationInfo):
        return _resolve(v, info)


class SupervisorConfig(Section):
    restart_initial_s: float = Field(0.5, gt=0, le=60)
    restart_max_s: float = Field(30.0, gt=0, le=3600)
    restart_reset_s: float = Field(30.0, gt=0, description="running this long resets backoff")
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    heartbeat_timeout_s: float = Field(30.0, gt=0, description="silent this long: killed")
    ready_timeout_s: float = Field(300.0, gt=0, description="setup longer than this: killed")
    shutdown_timeout_s: float = Field(7.0, gt=0, lt=60, description="drain deadline on SIGTERM")
    unhealthy_after_s: float = Field(120.0, gt=0, description="a core stage down this long "
                                                              "stops WATCHDOG=1")
    stages: list[str] | None = Field(None, description="stages this host runs (null: all); "
                                                       "others run elsewhere over tcp")
    # CPU priority per stage kind (nice increments, 0-19; only lowering needs no privilege),
    # e.g. {detect: 5} to let decoding, the decisions' few crops and other services on the host
    # go before detection. Off by default: on 2 saturated cores it did not bring first events
    # sooner (README, "First event after a face appears").
    nice: dict[str, int] = Field(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v):
        if v is not None:
            bad = [s for s in v if s not in STAGE_KINDS]
            if bad:
                raise ValueError(f"unknown stages {bad}; choose from {list(STAGE_KINDS)}")
        return v

    @field_validator("nice")
    @classmethod
    def _nice(cls, v):
        bad = [s for s in v if s not in STAGE_KINDS]
        if bad:
            raise ValueError(f"unknown stages {bad}; choose from {list(STAGE_KINDS)}")
        out = [f"{s}: {n}" for s, n in v.items() if not 0 <= n <= 19]
        if out:
            raise ValueError(f"nice increments must be 0-19 (raising a priority needs "
                             f"privileges), got {', '.join(out)}")
        return v


class FacewatchConfig(Section):
    cameras: list[CameraConfig] = Field(min_length=1)
    capture: CaptureConfig = Field(default_factory=dict)  # validated with context
    models: ModelsConfig = Field(default_factory=dict)  # validated with context
    detect: DetectConfig = Field(default_factory=dict)  # validated with context
    embed: EmbedConfig = Field(default_factory=dict)  # validated with context
    match: MatchConfig = Field(default_factory=dict)  # validated with context
    publish: PublishConfig = Field(default_factory=dict)  # validated with context
    metrics: MetricsConfig = Field(default_factory=dict)  # validated with context
    gallery: GalleryConfig = Field(default_factory=dict)  # validated with context
    runtime: RuntimeConfig = Field(default_factory=dict)  # validated with context
    supervisor: SupervisorConfig = Field(default_factory=dict)  # validated with context

    @model_validator(mode="after")
    def _unique_cameras(self):
        seen: set[str] = set()
        for cam in self.cameras:
            if cam.name in seen:
                raise ValueError(f"duplicate camera name {cam.name!r}")
            seen.add(cam.name)
        return self

    def camera(self, name: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise KeyError(f"no camera named {name!r}; configured: {[c.name for c in self.cameras]}")


# --- loading -------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in keys:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            keys.add(key)
        return super().construct_mapping(node, deep)


def _line_of(root, loc: tuple) -> int | None:
    """1-based YAML line of the node at `loc` (the deepest part of it that exists)."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _path_text(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _redacted(value):
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v) for v in value)
    return value


def _safe_value(value) -> str:
    text = repr(_redacted(value))
    return text if len(text) <= 120 else text[:117] + "..."


def format_errors(exc: ValidationError, source: str, root=None) -> str:
    lines = []
    for err in exc.errors():
        # pydantic appends the failing union member / validator name: keep the user's key path
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = _path_text(loc)
        line = _line_of(root, loc) if root is not None else None
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "missing" else f" (got {_safe_value(err.get('input'))})"
        lines.append(f"{source}: {where}{f' (line {line})' if line else ''}: {msg}{got}")
    return "\n".join(lines)


def _check_duplicate_cameras(data: dict, source: str, root) -> None:
    """Reported before validation so the error can name the second entry's key path and line."""
    cameras = data.get("cameras")
    if not isinstance(cameras, list):
        return
    first: dict[str, int] = {}
    for i, cam in enumerate(cameras):
        name = cam.get("name") if isinstance(cam, dict) else None
        if isinstance(name, str) and name in first:
            loc = ("cameras", i, "name")
            line = _line_of(root, loc) if root is not None else None
            raise ConfigError(f"{source}: {_path_text(loc)}{f' (line {line})' if line else ''}: "
                              f"duplicate camera name, already used by cameras[{first[name]}] "
                              f"(got {name!r})")
        if isinstance(name, str):
            first[name] = i


def parse_config(data: dict, base_dir: Path, source: str = "config", root=None) -> FacewatchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    _check_duplicate_cameras(data, source, root)
    try:
        cfg = FacewatchConfig.model_validate(data, context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source, root)) from None
    _check_port_clashes(cfg, source, root)
    return cfg


_ANY_HOST = {"*", "", "0.0.0.0", "::"}
_LOOPBACK_NAMES = {"localhost": "127.0.0.1"}


def _check_port_clashes(cfg: FacewatchConfig, source: str, root) -> None:
    """Two listeners of this daemon on one port (the event socket, /metrics, the tcp links):
    one of them could never bind, so it is refused here naming both keys."""
    listeners = []   # (key path, what, host, port)
    endpoint = cfg.publish.endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if port.isdigit():
            listeners.append((("publish", "endpoint"), f"publish.endpoint {endpoint}",
                              host.strip("[]"), int(port)))
    if cfg.metrics.enabled:
        listeners.append((("metrics", "port"), f"metrics.port {cfg.metrics.port}",
                          cfg.metrics.host, cfg.metrics.port))
    if cfg.runtime.transport == "tcp":
        base = cfg.runtime.base_port
        listeners += [(("runtime", "base_port"), f"runtime.base_port {base} (uses {base}-{base + 3})",
                       cfg.runtime.host, base + i) for i in range(4)]
    for i, (loc_a, what_a, host_a, port_a) in enumerate(listeners):
        for loc_b, what_b, host_b, port_b in listeners[i + 1:]:
            if loc_a == loc_b or port_a != port_b:
                continue
            a, b = (_LOOPBACK_NAMES.get(h, h) for h in (host_a, host_b))
            if a == b or a in _ANY_HOST or b in _ANY_HOST:
                line = _line_of(root, loc_b) if root is not None else None
                raise ConfigError(f"{source}: {_path_text(loc_b)}"
                                  f"{f' (line {line})' if line else ''}: port {port_b} is also "
                                  f"used by {what_a}; {what_b} needs a port of its own")


def load_config(path, cameras: list[tuple[str, str]] | None = None, gallery: str | None = None,
                event_log: str | None = None) -> FacewatchConfig:
    """Read, override and validate. Overrides (from the command line) are relative to the CWD."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = {} if data is None else data
    if isinstance(data, dict):
        if cameras is not None:
            data["cameras"] = [{"name": n, "uri": _cli_uri(u)} for n, u in cameras]
        if gallery is not None:
            data.setdefault("gallery", {})["path"] = str(Path(gallery).resolve())
        if event_log is not None:
            data.setdefault("publish", {})["event_log"] = str(Path(event_log).resolve())
    return parse_config(data, path.resolve().parent, str(path), root)


def _cli_uri(uri: str) -> str:
    if _DEVICE.match(uri) or "://" in uri:
        return uri
    return str(Path(uri).resolve())   # a file named on the command line is relative to the CWD


def parse_camera_arg(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise ValueError(f"--camera expects NAME=URI, got {redact_uri(text)!r}")
    return name, uri


def config_to_json(cfg: FacewatchConfig) -> str:
    """The effective config for the stage processes (paths absolute, ${VAR} kept unexpanded)."""
    return cfg.model_dump_json(indent=1)


def config_from_json(text: str, source: str = "effective config") -> FacewatchConfig:
    import json
    return parse_config(json.loads(text), Path("/"), source)


def problems(cfg: FacewatchConfig) -> list[str]:
    """Things that validate but will not run as they are here (missing files or environment
    variables): warnings, since the service may run elsewhere or with another environment."""
    out = []
    for i, cam in enumerate(cfg.cameras):
        for var in _ENV_REF.findall(cam.uri):
            if var not in os.environ:
                out.append(f"cameras[{i}].uri: environment variable {var} is not set here")
    if cfg.models.landmarks is None and cfg.models.embedder.is_file():
        from facewatch.stages.embedder_info import read_embedder_info

        # not stages.face_crop.LANDMARK_LAYOUTS: OpenCV would add ~17 MB to the supervisor
        if read_embedder_info(cfg.models.embedder).crop_alignment != "box":
            out.append("models.landmarks is null but the embedder aligns faces on five landmarks: "
                       "faces get the box fallback crop (facewatch_alignment_fallbacks), at a "
                       "loss of accuracy; set it to models/face_landmarks.onnx")
    for i, cam in enumerate(cfg.cameras):
        if cam.kind == "file" and not Path(cam.uri).is_file() and not _ENV_REF.search(cam.uri):
            out.append(f"cameras[{i}].uri: file not found: {cam.safe_uri}")
    if cfg.publish.curve_secret_key_file is not None and \
            not cfg.publish.curve_secret_key_file.is_file():
        out.append(f"publish.curve_secret_key_file: file not found: "
                   f"{cfg.publish.curve_secret_key_file}")
    if cfg.publish.curve_clients_dir is not None and not cfg.publish.curve_clients_dir.is_dir():
        out.append(f"publish.curve_clients_dir: folder not found: {cfg.publish.curve_clients_dir}")
    return out


# --- `facewatch validate-config` -----------------------------------------------------------

def add_validate_config_arguments(parser) -> None:
    parser.add_argument("path", help="config file (YAML)")


def run_validate_config(args) -> int:
    """Exit 0 when the daemon would start with this file here; else 78 (EX_CONFIG, as `run`
    would), each reason on its own line: a bad key or value, a missing or unloadable model or
    key file, a port clash."""
    from facewatch.daemon.run_command import preflight_errors
    from facewatch.stages.errors import EXIT_SETUP

    try:
        cfg = load_config(args.path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SETUP
    errors = preflight_errors(cfg, load_models=True)
    for error in errors:
        print(f"error: {args.path}: {error}", file=sys.stderr)
    if errors:
        return EXIT_SETUP
    for warning in problems(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"OK: {args.path} ({len(cfg.cameras)} camera{'s' if len(cfg.cameras) != 1 else ''})")
    return 0


def with_runtime_dir(cfg: FacewatchConfig, default: Path | None = None) -> FacewatchConfig:
    """runtime.dir filled in: as configured, else $RUNTIME_DIRECTORY (systemd), else `default`."""
    if cfg.runtime.dir is not None:
        return cfg
    env = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    chosen = Path(env) if env else default
    if chosen is None:
        if cfg.runtime.transport == "tcp":
            return cfg
        raise ConfigError("runtime.dir is not set and $RUNTIME_DIRECTORY is empty: the ipc "
                          "transport needs a directory for its sockets")
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"dir": chosen})})
