"""`facewatch events`: subscribe to the daemon's event PUB socket and print one JSON line each.

Lost events are reported on stderr from the `seq` numbers (a slow subscriber loses events at
the publisher's high-water mark; ZeroMQ says nothing). Output is flushed per line so that
`facewatch events | jq` and scripts see events as they happen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import zmq
import zmq.auth

from facewatch.stages.messages import EVENT_TYPES, MessageError, parse_event
from facewatch.stages.transport import Defaults

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5570"  # the default of publish.endpoint in the config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                   help=f"the daemon's event endpoint (default {DEFAULT_ENDPOINT})")
    p.add_argument("--type", dest="types", action="extend", nargs="+", choices=EVENT_TYPES,
                   help="print only these event types (default: all)")
    p.add_argument("--count", type=int, help="exit after printing this many events")
    p.add_argument("--timeout", type=float,
                   help="exit after this many seconds without an event (status 1 if --count "
                        "was not reached)")
    p.add_argument("--server-key", help="CURVE public key of the daemon (Z85, 40 characters, or "
                                        "a zmq certificate file such as server.key from "
                                        "`facewatch keys`); encrypts the connection. A key "
                                        "that starts with '-' goes as --server-key=KEY")
    p.add_argument("--client-key", help="this subscriber's keypair file (NAME.key_secret from "
                                        "`facewatch keys --client NAME`), for a daemon that "
                                        "admits only known clients (default: a one-off key)")


def _server_key(value: str) -> bytes:
    if Path(value).is_file():
        public, _ = zmq.auth.load_certificate(value)
        return public
    if len(value) != 40:
        raise ValueError(f"--server-key must be a 40-character Z85 key or a certificate file, "
                         f"got {len(value)} characters")
    return value.encode("ascii")


def _client_keypair(path: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--client-key {path}: {exc}") from None
    if not secret:
        raise ValueError(f"--client-key {path} holds no secret key (give NAME.key_secret, "
                         f"not NAME.key)")
    return public, secret


def open_subscriber(ctx: zmq.Context, endpoint: str, server_key: str | None = None,
                    client_key: str | None = None) -> zmq.Socket:
    """A SUB socket for events. Built here, not by transport.Transport.subscriber, because CURVE
    keys must be set before connect(); the limits still come from transport.Defaults."""
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.rcvhwm = Defaults.PUB_HWM  # as deep as the publisher's queue for us
    sock.reconnect_ivl = Defaults.RECONNECT_IVL_MS  # a restarting daemon is found again quickly
    sock.reconnect_ivl_max = Defaults.RECONNECT_IVL_MAX_MS
    if client_key and not server_key:
        sock.close()
        raise ValueError("--client-key needs --server-key")
    if server_key:
        if not zmq.has("curve"):
            sock.close()
            raise ValueError("--server-key given but this libzmq has no CURVE support")
        try:
            sock.curve_serverkey = _server_key(server_key)
            sock.curve_publickey, sock.curve_secretkey = (
                _client_keypair(client_key) if client_key else zmq.curve_keypair())  # one-off
        except ValueError:
            sock.close()
            raise
    sock.subscribe(b"")  # events carry no topic prefix: filter by type after parsing
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        raise ValueError(f"cannot connect to --endpoint {endpoint!r}: {exc}") from exc
    return sock


class SeqWatch:
    """Gaps in one publisher's seq: the number of events lost between two received ones."""

    def __init__(self) -> None:
        self.last: int | None = None

    def check(self, seq: int) -> str | None:
        last, self.last = self.last, seq
        if last is None or seq == last + 1:
            return None
        if seq <= last:
            return f"seq went back from {last} to {seq}: the daemon restarted"
        lost = seq - last - 1
        span = f"seq {last + 1}" if lost == 1 else f"seq {last + 1}..{seq - 1}"
        return f"missed {lost} event{'s' * (lost > 1)} ({span})"


def run(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    ctx = zmq.Context()
    try:
        sock = open_subscriber(ctx, args.endpoint, args.server_key, args.client_key)
    except ValueError:
        ctx.term()
        raise
    try:
        return _loop(sock, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `facewatch events | head`: the reader left, not an error
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        # linger 0: a reader leaving (Ctrl-C, closed pipe) must never wait on unsent frames.
        sock.close(linger=0)
        ctx.term()


def _loop(sock: zmq.Socket, args: argparse.Namespace) -> int:
    watch, printed = SeqWatch(), 0
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    timeout_ms = None if args.timeout is None else int(args.timeout * 1000)
    while args.count is None or printed < args.count:
        if not poller.poll(timeout_ms):
            if args.count is None:
                return 0
            print(f"facewatch events: {args.timeout:g} s without an event; got {printed} of "
                  f"{args.count}", file=sys.stderr)
            return 1
        frames = sock.recv_multipart()
        try:  # a topic, if the publisher sends one, is a separate first frame
            event = parse_event(frames[-1])
        except MessageError as exc:
            print(f"facewatch events: ignored a message: {exc}", file=sys.stderr, flush=True)
            continue
        gap = watch.check(int(event["seq"]))
        if gap:
            print(f"facewatch events: {gap}", file=sys.stderr, flush=True)
        if args.types and event["type"] not in args.types:
            continue
        print(json.dumps(event, ensure_ascii=False, separators=(",", ":")), flush=True)
        printed += 1
    return 0
