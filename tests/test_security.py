"""Security with real parts: CURVE keys from `facewatch keys`, the real daemon's encrypted event
socket against `facewatch events` and plain subscribers, the refusal of an unencrypted
non-loopback bind, RTSP passwords kept out of every output, and owner-only files.

(The gallery's 0600/0700 modes are tested in test_gallery.py::test_new_gallery_is_private.)
"""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from conftest import REPO, free_port, read_jsonl, wait_for, write_config
from facewatch.daemon.config import is_loopback_endpoint, parse_config
from decision_feed import DecisionFeed, decision, publish_only_config
from facewatch.stages.publish_stage import EventLog

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facewatch.daemon.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def make_keys(folder: Path, *clients: str) -> Path:
    args = ["keys", "--out", str(folder)]
    for name in clients:
        args += ["--client", name]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return folder


# --- `facewatch keys` ----------------------------------------------------------------------

def test_keys_command_writes_private_keypairs(tmp_path):
    out = make_keys(tmp_path / "etc" / "keys", "alice")
    assert mode(tmp_path / "etc") == 0o700 and mode(out) == 0o700 and mode(out / "clients") == 0o700
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["alice.key_secret", "clients/alice.key", "server.key", "server.key_secret"]
    for name in files:
        assert mode(out / name) == 0o600, name
    public, secret = zmq.auth.load_certificate(out / "server.key_secret")
    assert len(public) == 40 and len(secret) == 40
    assert zmq.curve_public(secret) == public                 # a real keypair
    assert zmq.auth.load_certificate(out / "server.key") == (public, None)   # public only
    c_public, c_secret = zmq.auth.load_certificate(out / "alice.key_secret")
    assert zmq.auth.load_certificate(out / "clients" / "alice.key") == (c_public, None)
    assert secret.decode() not in (out / "server.key").read_text()

    again = cli("keys", "--out", str(out))                    # never silently replaced
    assert again.returncode == 2 and "server.key_secret exists" in again.stderr
    assert zmq.auth.load_certificate(out / "server.key_secret")[1] == secret
    assert cli("keys", "--out", str(out), "--force").returncode == 0
    assert zmq.auth.load_certificate(out / "server.key_secret")[1] != secret
    bad = cli("keys", "--out", str(tmp_path / "k2"), "--client", "../x")
    assert bad.returncode == 2 and "--client '../x'" in bad.stderr


# --- the event socket --------------------------------------------------------------------

def test_events_and_metrics_are_loopback_by_default(tmp_path):
    cfg = parse_config({"cameras": [{"name": "a", "uri": "a.mp4"}]}, tmp_path)
    assert cfg.publish.endpoint == "tcp://127.0.0.1:5570" and cfg.metrics.host == "127.0.0.1"
    assert cfg.publish.curve_secret_key_file is None        # fine on loopback
    for endpoint, local in [("tcp://127.0.0.1:1", True), ("tcp://127.3.4.5:1", True),
                            ("tcp://[::1]:1", True), ("tcp://localhost:1", True),
                            ("ipc:///run/fw/events", True), ("tcp://0.0.0.0:1", False),
                            ("tcp://*:1", False), ("tcp://[::]:1", False),
                            ("tcp://10.0.0.5:1", False), ("tcp://camera-host:1", False)]:
        assert is_loopback_endpoint(endpoint) is local, endpoint


def test_non_loopback_bind_needs_a_curve_key(tmp_path, short_dir):
    port = free_port()
    config = write_config(tmp_path / "config.yaml", [{"name": "a", "uri": "a.mp4"}],
                          publish={"endpoint": f"tcp://0.0.0.0:{port}"})
    result = cli("validate-config", str(config))
    assert result.returncode == 78
    assert "publish.curve_secret_key_file" in result.stderr and "0.0.0.0" in result.stderr
    started = time.monotonic()
    run = cli("run", "--config", str(config), timeout=60)      # refused before any stage starts
    assert run.returncode == 78 and "publish.curve_secret_key_file" in run.stderr, run.stderr
    assert "started" not in run.stderr and time.monotonic() - started < 60
    for endpoint in (f"tcp://*:{port}", f"tcp://eth0:{port}", f"tcp://192.0.2.1:{port}"):
        config = write_config(tmp_path / "config.yaml", [{"name": "a", "uri": "a.mp4"}],
                              publish={"endpoint": endpoint})
        assert "publish.curve_secret_key_file" in cli("validate-config", str(config)).stderr

    keys = make_keys(short_dir / "keys")
    config = write_config(tmp_path / "config.yaml", [{"name": "a", "uri": "a.mp4"}],
                          publish={"endpoint": f"tcp://0.0.0.0:{port}",
                                   "curve_secret_key_file": str(keys / "server.key_secret")})
    assert cli("validate-config", str(config)).returncode == 0


class PlainOrForeignSubscriber:
    """A SUB that the daemon must refuse: no CURVE at all, or CURVE with a client key the
    daemon does not know. A socket monitor reports the failed handshake, so the test knows it
    really connected and was turned away (not merely too late)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, server_key: bytes | None = None):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.subscribe(b"")
        if server_key is not None:
            self.sock.curve_serverkey = server_key
            self.sock.curve_publickey, self.sock.curve_secretkey = zmq.curve_keypair()
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(endpoint)
        self.refusals = 0

    def refused(self) -> int:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                         zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                self.refusals += 1
            assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "the daemon accepted this subscriber"
        return self.refusals

    def received(self) -> int:
        count = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            count += 1
        return count


@pytest.mark.timeout(240)
@pytest.mark.parametrize("only_known_clients", [False, True],
                         ids=["any-curve-client", "known-clients-only"])
def test_curve_events_reach_only_curve_subscribers(short_dir, daemons, only_known_clients):
    """The real daemon on 127.0.0.1 with CURVE: `facewatch events --server-key` gets the
    events; a plain subscriber (and, with curve_clients_dir, a CURVE client whose key is not
    in it) connects, is refused in the handshake and gets nothing."""
    keys = make_keys(short_dir / "keys", "alice")
    publish = {"curve_secret_key_file": str(keys / "server.key_secret"),
               "event_log": str(short_dir / "logs" / "new" / "events.jsonl")}
    if only_known_clients:
        publish["curve_clients_dir"] = str(keys / "clients")
    config = publish_only_config(short_dir, publish=publish)
    endpoint = yaml.safe_load(config.read_text())["publish"]["endpoint"]
    assert endpoint.startswith("tcp://127.0.0.1:")
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)

    ctx = zmq.Context()
    server_public = zmq.auth.load_certificate(keys / "server.key")[0]
    refused = [PlainOrForeignSubscriber(ctx, endpoint)]
    if only_known_clients:
        refused.append(PlainOrForeignSubscriber(ctx, endpoint, server_key=server_public))
    wanted = 3
    args = ["events", "--endpoint", endpoint, "--server-key", str(keys / "server.key"),
            "--count", str(wanted), "--timeout", "120"]
    if only_known_clients:
        args += ["--client-key", str(keys / "alice.key_secret")]
    events_proc = subprocess.Popen([sys.executable, "-m", "facewatch.daemon.cli", *args], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    feed = DecisionFeed(short_dir / "run")
    try:
        wait_for(lambda: all(r.refused() for r in refused), 30,
                 "the daemon to refuse the plain/foreign subscribers' handshakes")
        # PUB drops what is sent before a subscriber joined: keep publishing until it has 3
        wait_for(lambda: events_proc.poll() is not None or (feed.send() and False), 120,
                 "`facewatch events --server-key` to receive 3 events")
        out, err = events_proc.communicate(timeout=30)
        assert events_proc.returncode == 0, err
        got = [json.loads(line) for line in out.splitlines()]
        assert len(got) == wanted and {e["camera"] for e in got} == {"door"}
        for _ in range(5):
            feed.send()
        log_path = short_dir / "logs" / "new" / "events.jsonl"
        wait_for(lambda: len(read_jsonl(log_path)) == feed.sent, 30, "every event in the log")
        assert all(r.received() == 0 for r in refused), "an unauthenticated subscriber got events"
        assert all(r.refused() >= 1 for r in refused)
    finally:
        if events_proc.poll() is None:
            events_proc.kill()
            events_proc.communicate()
        feed.close()
        for r in refused:
            r.sock.close()
            r.monitor.close()
        ctx.term()
    assert "CURVE, server key " + server_public.decode() in daemon.log_text()
    assert daemon.stop(10) == 0
    # the event log and the folders the daemon made for it are owner-only
    assert mode(log_path) == 0o600
    assert mode(log_path.parent) == 0o700 and mode(log_path.parent.parent) == 0o700


def test_bad_curve_key_file_stops_the_daemon(short_dir, daemons):
    """A public key given where the secret one belongs: publish cannot start, and the daemon
    stops with status 78 naming the file instead of restarting publish forever."""
    keys = make_keys(short_dir / "keys")
    config = publish_only_config(short_dir, publish={
        "curve_secret_key_file": str(keys / "server.key")})
    daemon = daemons(config, short_dir / "run")
    code = daemon.wait_exit(90)
    text = daemon.log_text()
    assert code == 78, text[-3000:]
    assert f"publish.curve_secret_key_file: {keys / 'server.key'} holds no CURVE secret key" in text
    assert "restart #" not in text and "Traceback" not in text


def test_event_log_is_created_owner_only(tmp_path):
    log = EventLog(tmp_path / "a" / "b" / "events.jsonl")
    log.write(b"{}")
    log.close()
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    assert mode(tmp_path / "a" / "b" / "events.jsonl") == 0o600
    shared = tmp_path / "shared"        # an existing folder keeps the mode its owner chose
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    EventLog(shared / "events.jsonl").close()
    assert mode(shared) == 0o755 and mode(shared / "events.jsonl") == 0o600


# --- RTSP passwords ----------------------------------------------------------------------

SECRET = "s3cretPW"


@pytest.mark.timeout(240)
def test_rtsp_password_never_leaves_the_config(short_dir, daemons):
    """A camera whose password is in the URI, pointing at a closed port: the daemon retries it
    and publishes events about it, and the password appears in no log line (daemon and stages,
    FFmpeg's included), no /metrics sample, no event, not in status.json, the process command
    lines or any file of the runtime directory except the 0600 effective config."""
    uri = f"rtsp://user:{SECRET}@127.0.0.1:{free_port()}/x"
    config = publish_only_config(
        short_dir, [{"name": "door", "uri": uri}], stages=("capture", "publish"),
        capture={"reconnect_initial_s": 0.1, "reconnect_max_s": 0.5, "open_timeout_s": 1})
    cfg = yaml.safe_load(config.read_text())
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    feed = DecisionFeed(short_dir / "run")     # events about this camera, as match would send
    try:
        for i in range(3):
            assert feed.send(decision("door", track_id=i + 1))
        log_path = Path(cfg["publish"]["event_log"])
        wait_for(lambda: len(read_jsonl(log_path)) == 3, 30, "3 events in the log")
    finally:
        feed.close()
    url = f"http://127.0.0.1:{cfg['metrics']['port']}/metrics"

    def scrape_after_retries():
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        line = next((ln for ln in text.splitlines()
                     if ln.startswith('facewatch_camera_reconnects_total{camera="door"}')), "")
        return text if line and float(line.split()[-1]) >= 2 else None

    metrics = wait_for(scrape_after_retries, 60, "two reconnect attempts in /metrics")
    status_text = (short_dir / "run" / "status.json").read_text()
    cmdlines = [Path(f"/proc/{s['pid']}/cmdline").read_bytes().decode(errors="replace")
                for s in json.loads(status_text)["stages"].values() if s.get("pid")]
    assert len(cmdlines) == 2
    assert daemon.stop(10) == 0
    outputs = {"daemon stdout/stderr": daemon.log_text(), "/metrics": metrics,
               "event log": log_path.read_text(), "status.json": status_text,
               "stage command lines": "\n".join(cmdlines)}
    for path in (short_dir / "run").rglob("*"):
        if path.is_file() and path.name != "config.json":
            outputs[str(path)] = path.read_bytes().decode(errors="replace")
    for where, text in outputs.items():
        assert SECRET not in text, f"the RTSP password appears in {where}"
    assert "user:***@127.0.0.1" in outputs["daemon stdout/stderr"]   # the URI is logged redacted
    assert 'camera="door"' in metrics and len(read_jsonl(log_path)) == 3
    effective = short_dir / "run" / "config.json"   # the stages' copy of the config: owner-only
    assert mode(effective) == 0o600 and mode(short_dir / "run") == 0o700
