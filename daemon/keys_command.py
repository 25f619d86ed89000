"""`facewatch keys --out DIR`: a ZeroMQ CURVE keypair for the event socket.

Writes, in ZeroMQ's certificate format (the keys as 40-character Z85 text, readable by
zmq.auth.load_certificate and czmq's zcert):

    DIR/server.key_secret   the daemon's keypair: publish.curve_secret_key_file (0600)
    DIR/server.key          its public key: give it to subscribers
                            (`facewatch events --server-key DIR/server.key`)

and with `--client NAME` (repeatable) a keypair per subscriber:

    DIR/clients/NAME.key    public: the folder is publish.curve_clients_dir, so only these
                            clients can subscribe
    DIR/NAME.key_secret     the subscriber's keypair (`facewatch events --client-key`)

Files are created 0600 (secret keys; public ones too: nothing here needs to be world-readable)
and folders this creates 0700. Existing files are never overwritten unless --force is given:
replacing the server key locks out every subscriber.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import stat
from pathlib import Path

import zmq

log = logging.getLogger("facewatch.keys")

SERVER = "server"
CLIENTS_DIR = "clients"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the key files (created 0700)")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="also make a keypair for this subscriber (repeatable)")
    p.add_argument("--force", action="store_true", help="replace existing key files")


def _private_dir(path: Path) -> None:
    """Create missing folders 0700; warn when an existing one is open to other users."""
    missing = [p for p in reversed([path, *path.parents]) if not p.exists()]
    for folder in missing:
        folder.mkdir(mode=0o700, exist_ok=True)
    if not path.is_dir():
        raise ValueError(f"--out {path} is not a folder")
    mode = stat.S_IMODE(path.stat().st_mode)
    if path not in missing and mode & 0o077:
        log.warning("%s is accessible to other users (mode %04o); the secret key files in it "
                    "are 0600 regardless", path, mode)


def _certificate(public: bytes, secret: bytes | None, what: str) -> str:
    """ZeroMQ's certificate (ZPL) text, as zmq.auth.create_certificates writes it."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"#   ****  {what}  ****",
             f"#   facewatch keys, {now}",
             "#   ZeroMQ CURVE " + ("SECRET key: keep it private, never copy it to clients"
                                    if secret else "public key"),
             "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, force: bool) -> None:
    """Write 0600 with O_EXCL (no race with another writer, no symlink followed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    if force and path.exists():
        path.unlink()
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ValueError(f"{path} exists; not replacing a key (use --force)") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def make_keypair(folder: Path, name: str, public_folder: Path | None = None,
                 force: bool = False) -> tuple[Path, Path]:
    """folder/NAME.key_secret and (public_folder or folder)/NAME.key; returns their paths."""
    public, secret = zmq.curve_keypair()
    secret_path = folder / f"{name}.key_secret"
    public_path = (public_folder or folder) / f"{name}.key"
    for path in (secret_path, public_path):
        if path.exists() and not force:
            raise ValueError(f"{path} exists; not replacing a key (use --force)")
    _write(secret_path, _certificate(public, secret, f"{name} keypair"), force)
    _write(public_path, _certificate(public, None, f"{name} public key"), force)
    return secret_path, public_path


def run(args: argparse.Namespace) -> int:
    if not zmq.has("curve"):
        raise ValueError(f"this libzmq {zmq.zmq_version()} has no CURVE support")
    for name in args.client:
        if not _NAME.match(name) or name == SERVER:
            raise ValueError(f"--client {name!r}: a name of letters, digits, '_', '.', '-' "
                             f"(not {SERVER!r})")
    out = Path(args.out)
    _private_dir(out)
    secret, public = make_keypair(out, SERVER, force=args.force)
    print(f"server keypair: {secret}  (publish.curve_secret_key_file)")
    print(f"server public key: {public}  (facewatch events --server-key)")
    if args.client:
        clients = out / CLIENTS_DIR
        _private_dir(clients)
        for name in args.client:
            c_secret, c_public = make_keypair(out, name, clients, force=args.force)
            print(f"client {name}: {c_secret}  (facewatch events --client-key); "
                  f"public key {c_public}")
        print(f"allowed clients: {clients}  (publish.curve_clients_dir)")
    return 0
