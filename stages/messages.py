"""Every message that crosses a stage boundary, defined in one place.

A message is a dataclass with scalar fields and numpy array fields. On the wire it is a ZeroMQ
multipart message: frame 0 is a UTF-8 JSON header (schema version, kind, sender, instance, seq,
scalar fields, and dtype/shape of each array), followed by one raw frame per array. Nothing is
pickled: a receiver only ever builds numbers, strings and arrays of whitelisted dtypes.

`seq` counts the messages one sender instance has sent (0, 1, 2, ...); receivers use
`SeqTracker` to count gaps (lost messages) and notice a restarted sender (a new `instance`).

Published events (`facewatch events`, external subscribers) are plain JSON objects with
`EVENT_SCHEMA`; `event_json` / `parse_event` are the one definition of that wire format.

Event identity, guaranteed within one daemon run (`run_id`, new each time the daemon starts),
whatever stages crash and restart meanwhile (stages.run_state keeps the counters):
- `seq` strictly increases, by 1 per event; a gap means events were lost (publish died with
  them, or the subscriber's queue overflowed). A new run starts again at 0 with a new run_id.
- `track_id` names one track: a (camera, track_id) pair is never reused within the run, also
  after detect restarts or a camera's stream ends and starts again.
- `event_id` is a random UUID, unique across runs.

Timing: FaceCrops, FaceEmbeddings and TrackDecision carry `stamps`, the wall-clock times
(time.time()) at which the frame behind them passed each step (STAMP_ORDER), so a decision
says where its latency went; publish turns them into the event's optional `timing_ms`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

SCHEMA_VERSION = 1   # internal stage-to-stage messages; bump on any incompatible change
EVENT_SCHEMA = "facewatch.event/1"
EVENT_TYPES = ("recognized", "unknown", "track_ended")

# Wall-clock stamps a frame collects on its way (the `stamps` field), in pipeline order. The
# capture time is the message's own wall_ts; publish adds the event's ts.
STAMP_ORDER = ("detect_recv",    # detect took the frame off its socket (queued before: capture
                                 # queue + ZeroMQ)
               "detect_start",   # its detector batch started (batch wait before)
               "detect_done",    # detector, tracker, landmarks and crops done
               "embed_recv",     # embed received the crops
               "embed_start",    # their embedder batch started (batch wait before)
               "embed_done",
               "match_done")     # the vote was counted and the decision made


def _check_stamps(kind: str, stamps) -> dict:
    if not isinstance(stamps, dict) or any(k not in STAMP_ORDER or not isinstance(v, (int, float))
                                           for k, v in stamps.items()):
        raise MessageError(f"{kind}.stamps must map names of {STAMP_ORDER} to times, got "
                           f"{stamps!r}")
    return stamps


# Only plain numeric dtypes may cross a boundary (no object arrays, no structured dtypes).
_DTYPES = {"uint8", "int32", "int64", "float32", "float64"}


class MessageError(ValueError):
    """A message that cannot be decoded or violates its schema; the text says which and why."""


def _check_array(kind: str, name: str, value, dtype: str, shape: tuple) -> np.ndarray:
    """Validate one array field: dtype exactly, shape with None as a wildcard."""
    if not isinstance(value, np.ndarray):
        raise MessageError(f"{kind}.{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
        raise MessageError(f"{kind}.{name} must have dtype {dtype}, got {value.dtype}")
    if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise MessageError(f"{kind}.{name} must have shape {want}, got {value.shape}")
    return value


@dataclass(kw_only=True)
class Message:
    """Base: the header fields every message carries. Subclasses declare KIND and ARRAYS."""
    KIND: ClassVar[str] = ""
    ARRAYS: ClassVar[tuple[str, ...]] = ()

    camera: str
    sender: str = ""      # stage name of the sender, set by transport.Sender
    instance: int = 0     # the sender process's pid: a new instance restarts seq at 0
    seq: int = -1         # set by transport.Sender on send

    def _n(self, name: str) -> int:
        return len(getattr(self, name))


@dataclass(kw_only=True)
class VideoFrame(Message):
    """capture -> detect: one decoded frame (or its region of interest)."""
    KIND: ClassVar[str] = "VideoFrame"
    ARRAYS: ClassVar[tuple[str, ...]] = ("image",)

    frame_index: int          # counts frames read from the source since the capture started
    pts: float                # media timestamp, seconds (monotonic across file loops)
    wall_ts: float            # time.time() when the frame was read: start of end-to-end latency
    frame_width: int          # full frame size, before the region of interest
    frame_height: int
    roi_x: int = 0            # offset of `image` in the full frame (0, 0 without an roi)
    roi_y: int = 0
    image: np.ndarray         # H x W x 3 uint8 BGR

    def __post_init__(self) -> None:
        _check_array(self.KIND, "image", self.image, "uint8", (None, None, 3))


@dataclass(kw_only=True)
class FaceCrops(Message):
    """detect -> embed: the tracked faces of one frame to embed (stages.embed_selection) that
    passed the quality gate, as crops.

    Full frames never travel past detect. `ended_tracks` lists tracks of this camera that the
    tracker dropped at this frame (sent even when there are no faces)."""
    KIND: ClassVar[str] = "FaceCrops"
    ARRAYS: ClassVar[tuple[str, ...]] = ("track_ids", "boxes", "scores", "blur", "crops", "ended_tracks")

    frame_index: int
    pts: float
    wall_ts: float
    epoch: int                # identifies the detect process's trackers: track ids are unique
                              # per (camera, epoch); a new epoch means every older track ended
    track_ids: np.ndarray     # (N,) int64
    boxes: np.ndarray         # (N, 4) float32 [x1, y1, x2, y2], full-frame pixels
    scores: np.ndarray        # (N,) float32 detector confidence
    blur: np.ndarray          # (N,) float32 Laplacian variance of the crop (sharpness)
    crops: np.ndarray         # (N, S, S, 3) uint8 BGR, from stages.face_crop.crop_faces
    ended_tracks: np.ndarray  # (K,) int64
    stamps: dict = field(default_factory=dict)   # STAMP_ORDER name -> time.time()
    first_decision: bool = False   # a track's first decision waits for one of these crops:
                                   # embed runs them at once, without waiting for company

    def __post_init__(self) -> None:
        n = len(self.track_ids)
        _check_stamps(self.KIND, self.stamps)
        if not isinstance(self.first_decision, bool):
            raise MessageError(f"{self.KIND}.first_decision must be true or false, got "
                               f"{self.first_decision!r}")
        _check_array(self.KIND, "track_ids", self.track_ids, "int64", (n,))
        _check_array(self.KIND, "boxes", self.boxes, "float32", (n, 4))
        _check_array(self.KIND, "scores", self.scores, "float32", (n,))
        _check_array(self.KIND, "blur", self.blur, "float32", (n,))
        _check_array(self.KIND, "crops", self.crops, "uint8", (n, None, None, 3))
        _check_array(self.KIND, "ended_tracks", self.ended_tracks, "int64", (None,))


@dataclass(kw_only=True)
class FaceEmbeddings(Message):
    """embed -> match: embeddings of the faces of one frame that were chosen for embedding.

    `crops` is either empty (snapshots disabled) or one crop per face, for event snapshots."""
    KIND: ClassVar[str] = "FaceEmbeddings"
    ARRAYS: ClassVar[tuple[str, ...]] = ("track_ids", "boxes", "embeddings", "crops", "ended_tracks")

    frame_index: int
    pts: float
    wall_ts: float
    epoch: int                # as in FaceCrops
    track_ids: np.ndarray     # (N,) int64
    boxes: np.ndarray         # (N, 4) float32
    embeddings: np.ndarray    # (N, D) float32 unit vectors
    crops: np.ndarray         # (N or 0, S, S, 3) uint8
    ended_tracks: np.ndarray  # (K,) int64
    stamps: dict = field(default_factory=dict)   # as in FaceCrops, and embed's own

    def __post_init__(self) -> None:
        n = len(self.track_ids)
        _check_stamps(self.KIND, self.stamps)
        _check_array(self.KIND, "track_ids", self.track_ids, "int64", (n,))
        _check_array(self.KIND, "boxes", self.boxes, "float32", (n, 4))
        _check_array(self.KIND, "embeddings", self.embeddings, "float32", (n, None))
        _check_array(self.KIND, "crops", self.crops, "uint8", (None, None, None, 3))
        if len(self.crops) not in (0, n):
            raise MessageError(f"{self.KIND}.crops must hold 0 or {n} crops, got {len(self.crops)}")
        _check_array(self.KIND, "ended_tracks", self.ended_tracks, "int64", (None,))


@dataclass(kw_only=True)
class TrackDecision(Message):
    """match -> publish: one decision about a track (recognized, unknown) or its end.

    publish turns it into a public event, adding event_id, its own seq, ts and latency."""
    KIND: ClassVar[str] = "TrackDecision"
    ARRAYS: ClassVar[tuple[str, ...]] = ("snapshot",)

    type: str                  # one of EVENT_TYPES
    track_id: int
    name: str | None
    person_id: int | None
    similarity: float | None   # mean cosine similarity of the winning votes (None: no vote)
    threshold: float
    votes: int                 # frames that voted
    bbox: list[float]          # [x1, y1, x2, y2] frame pixels of the latest face
    frame_pts: float
    capture_ts: float          # wall clock when the deciding frame was captured
    snapshot: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 3), np.uint8))
    # (1, S, S, 3) uint8 crop of the best-matching face, or empty when snapshots are off
    revision: int = 0          # 0: the track's first decision; +1 per later change
    first_pts: float | None = None   # media time of the track's first embedded (good) crop
    stamps: dict = field(default_factory=dict)   # of the deciding frame (STAMP_ORDER)

    def __post_init__(self) -> None:
        _check_stamps(self.KIND, self.stamps)
        if self.type not in EVENT_TYPES:
            raise MessageError(f"{self.KIND}.type must be one of {EVENT_TYPES}, got {self.type!r}")
        if len(self.bbox) != 4:
            raise MessageError(f"{self.KIND}.bbox must have 4 numbers, got {self.bbox!r}")
        _check_array(self.KIND, "snapshot", self.snapshot, "uint8", (None, None, None, 3))


@dataclass(kw_only=True)
class EndOfStream(Message):
    """A camera's stream ended (file finished, or shutdown). Flows down the whole pipeline, after
    every message of that camera, so each stage can flush that camera and know when it is done."""
    KIND: ClassVar[str] = "EndOfStream"
    reason: str = "eof"        # "eof" (source ended), "error" (unreadable file) or "shutdown"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls for cls in (VideoFrame, FaceCrops, FaceEmbeddings, TrackDecision, EndOfStream)
}


def encode(msg: Message) -> list:
    """Message -> multipart frames [JSON header, array payloads...]. Arrays go as raw buffers."""
    fields, arrays, payloads = {}, [], []
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if f.name in msg.ARRAYS:
            a = np.ascontiguousarray(value)
            arrays.append({"name": f.name, "dtype": a.dtype.name, "shape": list(a.shape)})
            payloads.append(memoryview(a).cast("B") if a.size else b"")
        elif f.name not in ("sender", "instance", "seq"):
            fields[f.name] = value
    header = {"schema": SCHEMA_VERSION, "kind": msg.KIND, "sender": msg.sender,
              "instance": msg.instance, "seq": msg.seq, "fields": fields, "arrays": arrays}
    return [json.dumps(header, separators=(",", ":"), allow_nan=False).encode()] + payloads


def _buffer(frame) -> memoryview:
    # zmq.Frame (recv copy=False) exposes .buffer; bytes work too
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def decode(frames: list) -> Message:
    """Multipart frames -> Message, validating schema version, kind, dtypes and shapes."""
    if not frames:
        raise MessageError("empty message")
    try:
        header = json.loads(bytes(_buffer(frames[0])))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise MessageError("header must be a JSON object")
    if header.get("schema") != SCHEMA_VERSION:
        raise MessageError(f"schema version {header.get('schema')!r} not supported "
                           f"(this build speaks {SCHEMA_VERSION})")
    cls = MESSAGE_TYPES.get(header.get("kind"))
    if cls is None:
        raise MessageError(f"unknown message kind {header.get('kind')!r}")
    specs = header.get("arrays", [])
    if len(frames) != 1 + len(specs):
        raise MessageError(f"{cls.KIND}: header lists {len(specs)} arrays, got {len(frames) - 1} payloads")
    kwargs = dict(header.get("fields", {}))
    for spec, frame in zip(specs, frames[1:]):
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if name not in cls.ARRAYS or dtype not in _DTYPES or not isinstance(shape, list):
            raise MessageError(f"{cls.KIND}: bad array spec {spec!r}")
        buf = _buffer(frame)
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if buf.nbytes != expected:
            raise MessageError(f"{cls.KIND}.{name}: payload has {buf.nbytes} bytes, "
                               f"shape {shape} {dtype} needs {expected}")
        kwargs[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else \
            np.zeros(shape, dtype)
    try:
        msg = cls(**kwargs)
    except TypeError as exc:  # missing or unexpected field names
        raise MessageError(f"{cls.KIND}: {exc}") from exc
    msg.sender, msg.instance, msg.seq = str(header.get("sender", "")), int(header.get("instance", 0)), \
        int(header.get("seq", -1))
    return msg


class SeqTracker:
    """Per-sender sequence check on the receiving side: counts lost messages, notices restarts."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}   # sender -> (instance, last seq)

    def check(self, msg: Message) -> int:
        """Return how many messages from this sender were lost just before `msg` (0 normally)."""
        prev = self._last.get(msg.sender)
        self._last[msg.sender] = (msg.instance, msg.seq)
        if prev is None or prev[0] != msg.instance:
            return 0   # first message of this sender instance: nothing to compare with
        return max(0, msg.seq - prev[1] - 1)


# --- public events -------------------------------------------------------------------------

EVENT_FIELDS = ("schema", "type", "seq", "event_id", "camera", "track_id", "name", "person_id",
                "similarity", "threshold", "votes", "bbox", "frame_pts", "ts", "capture_ts",
                "latency_ms")
# Also sent, optional for parse_event (older facewatch.event/1 producers lack them): "run_id"
# (hex, see the module docstring), "snapshot_jpeg" (base64, publish.snapshots), "revision"
# (0: a track's first decision, then +1 per changed decision), "first_pts" (media time of the
# track's first embedded crop), "timing_ms" (timing_ms below).


# timing_ms keys: the step between two stamps (capture: the frame's wall_ts; publish: the ts)
TIMING_STEPS = (("queued", "capture", "detect_recv"),
                ("detect_batch_wait", "detect_recv", "detect_start"),
                ("detect", "detect_start", "detect_done"),
                ("to_embed", "detect_done", "embed_recv"),
                ("embed_batch_wait", "embed_recv", "embed_start"),
                ("embed", "embed_start", "embed_done"),
                ("match", "embed_done", "match_done"),
                ("publish", "match_done", "publish"))


def timing_ms(capture_ts: float, stamps: dict, published: float) -> dict:
    """The event's `timing_ms`: where the deciding frame's latency went, step by step (the
    steps sum to latency_ms); steps whose stamps are missing are left out."""
    at = {"capture": capture_ts, **stamps, "publish": published}
    return {name: round((at[b] - at[a]) * 1000, 1) for name, a, b in TIMING_STEPS
            if a in at and b in at}


def event_json(event: dict) -> bytes:
    """One event as compact JSON bytes (no trailing newline). Rejects NaN and missing fields."""
    missing = [k for k in EVENT_FIELDS if k not in event]
    if missing:
        raise MessageError(f"event lacks fields {missing}")
    if event["type"] not in EVENT_TYPES:
        raise MessageError(f"event type must be one of {EVENT_TYPES}, got {event['type']!r}")
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode()


def parse_event(data: bytes) -> dict:
    """Inverse of event_json, for subscribers: checks the schema string and the fields."""
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise MessageError(f"event is not JSON: {exc}") from exc
    if not isinstance(event, dict) or event.get("schema") != EVENT_SCHEMA:
        raise MessageError(f"not a {EVENT_SCHEMA} event: {str(data[:80])}")
    missing = [k for k in EVENT_FIELDS if k not in event]
    if missing:
        raise MessageError(f"event lacks fields {missing}")
    return event


# --- control messages (stage -> supervisor) ------------------------------------------------

CONTROL_SCHEMA = "facewatch.control/1"
CONTROL_TYPES = ("ready", "heartbeat", "eos", "finished", "error")


@dataclass(kw_only=True)
class Control:
    """The one JSON shape of every control message a stage sends to the supervisor.

    ready: setup done, the stage is processing; heartbeat: the stage loop is alive (sent every
    `heartbeat_s`); eos: the stage forwarded EndOfStream for `camera`; finished: every camera
    ended and the stage is exiting normally; error: something the operator should see (`reason`).
    """
    type: str
    stage: str
    pid: int
    ts: float
    camera: str | None = None
    reason: str | None = None
    detail: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in CONTROL_TYPES:
            raise MessageError(f"control type must be one of {CONTROL_TYPES}, got {self.type!r}")

    def to_json(self) -> bytes:
        return json.dumps({"schema": CONTROL_SCHEMA, **dataclasses.asdict(self)},
                          separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Control":
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise MessageError(f"control message is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or obj.pop("schema", None) != CONTROL_SCHEMA:
            raise MessageError(f"not a {CONTROL_SCHEMA} message: {str(data[:80])}")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise MessageError(f"control message: {exc}") from exc
