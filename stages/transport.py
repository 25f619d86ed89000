"""The one module that owns ZeroMQ: context, sockets, endpoints, high-water marks, timeouts.

Topology (downstream stages bind, upstream stages connect, so any stage can restart and its
peers reconnect by themselves):

    capture[cam] --PUSH--> frames --PULL detect --PUSH--> faces --PULL embed
        --PUSH--> embeddings --PULL match --PUSH--> decisions --PULL publish --PUB--> events
    every stage --PUSH--> control --PULL supervisor

Endpoints are ipc:// sockets in the runtime directory, or tcp://host:base_port+i so stages can
run on other hosts. Every limit is declared once, in `Defaults`.

The public event socket can be a CURVE server (`CurveServer`, keys from `facewatch keys`):
encrypted, and, with a clients folder, open only to the client keys in it (a ZAP handler).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from facewatch.stages.errors import SetupError
from facewatch.stages.messages import Control, Message, MessageError, SeqTracker, decode, encode

log = logging.getLogger("facewatch.transport")

ENDPOINT_NAMES = ("frames", "faces", "embeddings", "decisions", "control")
IPC_PATH_MAX = 107   # sun_path limit on Linux, minus the terminating NUL


class Defaults:
    """Every queue limit and timeout of the pipeline, in one place."""
    FRAME_SNDHWM = 1          # capture: one frame waits in ZeroMQ; the rest in its drop-oldest queue
    FRAME_RCVHWM = 2          # detect: per camera connection, so a slow detector sees recent frames
    DATA_HWM = 200            # crops / embeddings / decisions: small, and losing them loses events
    CONTROL_HWM = 1000
    PUB_HWM = 10000           # events buffered per slow subscriber before PUB drops for it
    LINGER_MS = 2000          # close() keeps delivering pending messages this long (drain)
    SEND_TIMEOUT_S = 5.0      # a blocked downstream: give up on one message after this long
    RECONNECT_IVL_MS = 100
    RECONNECT_IVL_MAX_MS = 2000


@dataclass(frozen=True)
class Endpoints:
    frames: str
    faces: str
    embeddings: str
    decisions: str
    control: str | None    # None: a stage started by hand with tcp and no runtime dir

    @classmethod
    def for_runtime(cls, transport: str, runtime_dir: Path | None, host: str = "127.0.0.1",
                    base_port: int = 5580) -> "Endpoints":
        """Pipeline links as ipc:// in the runtime dir, or tcp://host:base_port+i. The control
        link is always local (ipc): each host's supervisor watches its own stages."""
        def ipc(name: str) -> str:
            if runtime_dir is None:
                raise ValueError(f"the {name} socket needs a runtime directory (runtime.dir)")
            path = Path(runtime_dir) / f"{name}.sock"
            if len(str(path)) > IPC_PATH_MAX:
                raise ValueError(f"ipc socket path too long ({len(str(path))} > {IPC_PATH_MAX} "
                                 f"characters): {path}; use a shorter runtime.dir")
            return f"ipc://{path}"

        data = ENDPOINT_NAMES[:-1]
        if transport == "tcp":
            links = [f"tcp://{host}:{base_port + i}" for i in range(len(data))]
            control = ipc("control") if runtime_dir is not None else None
        else:
            links = [ipc(name) for name in data]
            control = ipc("control")
        return cls(*links, control)

    @classmethod
    def from_config(cls, cfg) -> "Endpoints":
        rt = cfg.runtime
        return cls.for_runtime(rt.transport, rt.dir, rt.host, rt.base_port)

    def input_of(self, stage_kind: str) -> str | None:
        """The endpoint a stage kind binds and reads (capture has none)."""
        return {"detect": self.frames, "embed": self.faces, "match": self.embeddings,
                "publish": self.decisions}.get(stage_kind)

    def output_of(self, stage_kind: str) -> str | None:
        """The endpoint a stage kind connects and writes to (publish has none internally)."""
        return {"capture": self.frames, "detect": self.faces, "embed": self.embeddings,
                "match": self.decisions}.get(stage_kind)


@dataclass(frozen=True)
class CurveServer:
    """The event socket's CURVE identity, and the folder of client public keys allowed in
    (None: any client that has the server's public key)."""
    public_key: bytes
    secret_key: bytes
    clients_dir: Path | None = None

    @classmethod
    def load(cls, secret_file, clients_dir=None, key: str = "publish.curve_secret_key_file"
             ) -> "CurveServer":
        """Read a `facewatch keys` secret key file; errors name the config key and the file."""
        path = Path(secret_file)
        if not zmq.has("curve"):
            raise SetupError(f"{key} is set but this libzmq {zmq.zmq_version()} has no CURVE")
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise SetupError(f"{key}: cannot read {path} (expected a CURVE secret key file "
                             f"made by `facewatch keys`): {exc}") from None
        if not secret or len(secret) != 40 or len(public) != 40:
            raise SetupError(f"{key}: {path} holds no CURVE secret key (expected the "
                             f"server.key_secret file made by `facewatch keys`, not server.key)")
        if mode & stat.S_IROTH:
            raise SetupError(f"{key}: {path} is readable by every user (mode {mode:04o}); "
                             f"chmod 600 it")
        if clients_dir is not None and not Path(clients_dir).is_dir():
            raise SetupError(f"publish.curve_clients_dir: folder not found: {clients_dir}")
        return cls(public, secret, None if clients_dir is None else Path(clients_dir))


class AddressInUse(SetupError):
    """A tcp endpoint this process must bind is taken by another process."""


def tcp_bind_problem(endpoint: str) -> str | None:
    """Why a tcp:// endpoint cannot be bound here now (taken, or not an address of this host),
    or None (free, ipc://, or an interface name only ZeroMQ resolves). Binds and closes a plain
    socket with SO_REUSEADDR, as ZeroMQ does, so a port in TIME_WAIT counts as free."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    host = host.strip("[]")
    host = "0.0.0.0" if host in ("*", "") else host
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, ValueError):
        return None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "address already in use by another process"
            return exc.strerror or str(exc)
    return None


class Sender:
    """PUSH side of a pipeline link: encodes messages and stamps sender, instance and seq."""

    def __init__(self, socket: zmq.Socket, sender: str, endpoint: str):
        self.socket, self.sender, self.endpoint = socket, sender, endpoint
        self.instance = os.getpid()
        self.seq = 0
        self.timeouts = 0

    def _stamp(self, msg: Message) -> list:
        msg.sender, msg.instance, msg.seq = self.sender, self.instance, self.seq
        return encode(msg)

    def try_send(self, msg: Message) -> bool:
        """Send now or not at all (the high-water mark is reached): never blocks."""
        try:
            self.socket.send_multipart(self._stamp(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self.seq += 1
        return True

    def wait_writable(self, timeout_s: float) -> bool:
        return bool(self.socket.poll(int(timeout_s * 1000), zmq.POLLOUT))

    def send(self, msg: Message, timeout_s: float = Defaults.SEND_TIMEOUT_S) -> bool:
        """Send, waiting up to timeout_s for room downstream; False (and logged) if it never came."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.try_send(msg):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                self.timeouts += 1
                log.warning("%s: downstream %s not accepting for %.1f s; dropped a %s message",
                            self.sender, self.endpoint, timeout_s, msg.KIND)
                return False
            self.wait_writable(min(left, 0.1))


class Receiver:
    """PULL side of a pipeline link: decodes and checks per-sender sequence numbers."""

    def __init__(self, socket: zmq.Socket, endpoint: str):
        self.socket, self.endpoint = socket, endpoint
        self.seq = SeqTracker()
        self.lost = 0       # messages missing from per-sender sequences
        self.last_gap = 0   # how many were missing just before the last message returned
        self.invalid = 0    # messages that failed to decode
        self._poller = None  # the socket and a wake descriptor (recv's `wake`)
        self._poller_wake = None

    def waiting(self) -> bool:
        """A message is ready to be received now."""
        return bool(self.socket.poll(0, zmq.POLLIN))

    def recv(self, timeout_s: float, wake=None) -> Message | None:
        """The next valid message, or None if none arrived within timeout_s. `wake`: a file
        descriptor (its object's `fileno()`) that ends the wait early when readable, e.g. work
        finished on another thread (its owner empties it)."""
        timeout_ms = max(0, int(timeout_s * 1000))
        if wake is None:
            ready = self.socket.poll(timeout_ms, zmq.POLLIN)
        else:
            if self._poller is None or self._poller_wake is not wake:
                self._poller, self._poller_wake = zmq.Poller(), wake
                self._poller.register(self.socket, zmq.POLLIN)
                self._poller.register(wake, zmq.POLLIN)
            ready = self.socket in dict(self._poller.poll(timeout_ms))
        if not ready:
            return None
        frames = self.socket.recv_multipart(copy=False)
        try:
            msg = decode(frames)
        except MessageError as exc:
            self.invalid += 1
            log.error("dropped an invalid message on %s: %s", self.endpoint, exc)
            return None
        gap = self.last_gap = self.seq.check(msg)
        if gap:
            self.lost += gap
            log.warning("%d message(s) from %s lost before seq %d", gap, msg.sender, msg.seq)
        return msg


class ControlClient:
    """A stage's line to the supervisor. Never blocks: a missing supervisor must not stall a stage."""

    def __init__(self, socket: zmq.Socket, stage: str):
        self.socket, self.stage = socket, stage

    def send(self, type_: str, **fields) -> None:
        msg = Control(type=type_, stage=self.stage, pid=os.getpid(), ts=time.time(), **fields)
        try:
            self.socket.send(msg.to_json(), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("control queue full; dropped %s", type_)


class ControlServer:
    def __init__(self, socket: zmq.Socket, endpoint: str):
        self.socket, self.endpoint = socket, endpoint

    def recv(self, timeout_s: float) -> Control | None:
        if not self.socket.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        data = self.socket.recv()
        try:
            return Control.from_json(data)
        except MessageError as exc:
            log.error("invalid control message on %s: %s", self.endpoint, exc)
            return None


class Transport:
    """One ZeroMQ context per process, and every socket the process uses."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._authenticator = None

    def _socket(self, kind: int, endpoint: str, bind: bool, sndhwm: int | None = None,
                rcvhwm: int | None = None, linger_ms: int = Defaults.LINGER_MS,
                curve: CurveServer | None = None) -> zmq.Socket:
        sock = self.context.socket(kind)
        if curve is not None:   # before bind: the mechanism is fixed per connection
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = curve.public_key, curve.secret_key
        sock.setsockopt(zmq.LINGER, linger_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, Defaults.RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, Defaults.RECONNECT_IVL_MAX_MS)
        if sndhwm is not None:
            sock.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm is not None:
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
        try:
            if bind:
                if endpoint.startswith("ipc://"):
                    Path(endpoint[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
                sock.bind(endpoint)
            else:
                sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            if bind and exc.errno == errno.EADDRINUSE:   # a restart cannot fix this
                raise AddressInUse(f"cannot bind {endpoint}: address already in use by another "
                                   f"process") from None
            raise OSError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from exc
        self._sockets.append(sock)
        return sock

    def sender(self, endpoint: str, sender: str, hwm: int = Defaults.DATA_HWM,
               bind: bool = False) -> Sender:
        return Sender(self._socket(zmq.PUSH, endpoint, bind, sndhwm=hwm), sender, endpoint)

    def receiver(self, endpoint: str, hwm: int = Defaults.DATA_HWM, bind: bool = True) -> Receiver:
        return Receiver(self._socket(zmq.PULL, endpoint, bind, rcvhwm=hwm), endpoint)

    def publisher(self, endpoint: str, hwm: int = Defaults.PUB_HWM,
                  curve: CurveServer | None = None) -> zmq.Socket:
        """The public event socket; with `curve`, only CURVE clients get events (and, with a
        clients folder, only those whose public key is in it)."""
        if curve is not None and curve.clients_dir is not None:
            self._allow_clients(curve.clients_dir)
        return self._socket(zmq.PUB, endpoint, bind=True, sndhwm=hwm, curve=curve)

    def _allow_clients(self, clients_dir: Path) -> None:
        if self._authenticator is None:
            self._authenticator = ThreadAuthenticator(self.context, log=log)
            self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=str(clients_dir))
        count = len(list(Path(clients_dir).glob("*.key")))
        if count == 0:
            log.warning("no client keys (*.key) in %s: no subscriber can connect", clients_dir)
        else:
            log.info("event subscribers limited to the %d client key(s) in %s", count, clients_dir)

    def subscriber(self, endpoint: str, topic: bytes = b"") -> zmq.Socket:
        sock = self._socket(zmq.SUB, endpoint, bind=False)
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        return sock

    def control_client(self, endpoint: str, stage: str) -> ControlClient:
        return ControlClient(self._socket(zmq.PUSH, endpoint, bind=False,
                                          sndhwm=Defaults.CONTROL_HWM, linger_ms=500), stage)

    def control_server(self, endpoint: str) -> ControlServer:
        return ControlServer(self._socket(zmq.PULL, endpoint, bind=True,
                                          rcvhwm=Defaults.CONTROL_HWM), endpoint)

    def close(self, linger_ms: int | None = None) -> None:
        """Close every socket (pending messages get `linger_ms` to leave), then the context."""
        for sock in self._sockets:
            sock.close(linger=linger_ms)
        self._sockets.clear()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self.context.term()
