"""`facewatch events` as a real subprocess, fed by a real ZeroMQ publisher in the test.

The test publishes on an XPUB socket (a PUB that also reports subscriptions), so it starts
sending exactly when the subscriber has joined instead of sleeping and hoping.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from facewatch.stages.messages import EVENT_SCHEMA, event_json

ROOT = Path(__file__).resolve().parent.parent
JOIN_TIMEOUT_MS = 60_000  # the subprocess imports numpy and pyzmq on a busy 2-core machine


def event(seq: int, type_: str = "recognized", name: str | None = "ann") -> dict:
    return {"schema": EVENT_SCHEMA, "type": type_, "seq": seq, "event_id": f"cam1-7-{seq}",
            "camera": "cam1", "track_id": 7, "name": name, "person_id": 1 if name else None,
            "similarity": 0.8, "threshold": 0.5, "votes": 3, "bbox": [1.0, 2.0, 30.0, 40.0],
            "frame_pts": 1.5, "ts": 1700000000.0, "capture_ts": 1699999999.9, "latency_ms": 42.0}


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def publisher(ctx: zmq.Context, curve_secret: bytes | None = None) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.XPUB)
    sock.linger = 0
    if curve_secret:
        sock.curve_server = True
        sock.curve_secretkey = curve_secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def interactive_signals() -> None:
    """As a terminal would start it: Ctrl-C not ignored. An ignored SIGINT is inherited across
    exec, and Python then installs no KeyboardInterrupt handler; in the full suite something in
    the pytest process (not our code: no SIG_IGN in it) leaves SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(endpoint: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "facewatch.daemon.cli", "events", "--endpoint", endpoint, *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interactive_signals)


def wait_joined(pub: zmq.Socket, proc: subprocess.Popen) -> None:
    """Until the subscription of `proc` arrives (b"\\x01" + empty topic); skips unsubscribes."""
    deadline = time.monotonic() + JOIN_TIMEOUT_MS / 1000
    while pub.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        if pub.recv() == b"\x01":
            return
    proc.kill()
    pytest.fail(f"subscriber never joined; stderr: {proc.communicate()[1]}")


def test_prints_events_and_reports_gaps(ctx):
    pub, endpoint = publisher(ctx)
    proc = start(endpoint, "--count", "5", "--timeout", "30")
    wait_joined(pub, proc)
    sent = [event(0), event(1), event(3, "unknown", None), event(4), event(0)]  # lost 2; restart
    pub.send(event_json(sent[0]))
    pub.send(event_json(sent[1]))
    pub.send(b"not json at all")
    for e in sent[2:]:
        pub.send(event_json(e))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [json.loads(line) for line in out.splitlines()] == sent
    assert "missed 1 event (seq 2)" in err
    assert "seq went back from 4 to 0" in err
    assert "ignored a message: event is not JSON" in err


def test_type_filter_and_topic_frame(ctx):
    pub, endpoint = publisher(ctx)
    proc = start(endpoint, "--type", "recognized", "track_ended", "--count", "2", "--timeout", "30")
    wait_joined(pub, proc)
    sent = [event(0, "unknown", None), event(1), event(2, "unknown", None), event(3, "track_ended")]
    for e in sent:  # a topic frame before the JSON, as a publisher with topics would send
        pub.send_multipart([e["type"].encode(), event_json(e)])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 3]
    assert "missed" not in err  # filtered events are not lost events


def test_timeout(ctx):
    pub, endpoint = publisher(ctx)
    proc = start(endpoint, "--count", "3", "--timeout", "0.5")
    wait_joined(pub, proc)
    pub.send(event_json(event(0)))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and len(out.splitlines()) == 1
    assert "0.5 s without an event; got 1 of 3" in err
    proc = start("tcp://127.0.0.1:1", "--timeout", "0.3")  # nobody there, no --count: a clean end
    assert proc.wait(timeout=60) == 0 and proc.stdout.read() == ""


def test_bad_arguments():
    for args, message in [(["--endpoint", "nonsense"], "cannot connect to --endpoint 'nonsense'"),
                          (["--count", "0"], "--count must be at least 1"),
                          (["--server-key", "short"], "40-character Z85 key"),
                          (["--client-key", "alice.key_secret"], "--client-key needs --server-key"),
                          (["--server-key", "x" * 40, "--client-key", "/nonexistent/a.key_secret"],
                           "--client-key /nonexistent/a.key_secret")]:
        proc = start("tcp://127.0.0.1:1", "--timeout", "0.1", *args)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_curve_encrypted(ctx, tmp_path):
    # a key starting with "-" on purpose (Z85 has that character; ~1 key in 85): argparse takes
    # "--server-key -..." for two options, so such a key goes as --server-key=KEY, as the help says
    public, secret = zmq.curve_keypair()
    while not public.startswith(b"-"):
        public, secret = zmq.curve_keypair()
    pub, endpoint = publisher(ctx, curve_secret=secret)
    proc = start(endpoint, f"--server-key={public.decode()}", "--count", "1", "--timeout", "30")
    wait_joined(pub, proc)
    pub.send(event_json(event(0)))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and json.loads(out)["seq"] == 0, err
    wrong, _ = zmq.curve_keypair()  # the handshake fails: nothing arrives
    proc = start(endpoint, f"--server-key={wrong.decode()}", "--count", "1", "--timeout", "1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == ""


def test_reader_leaving_and_ctrl_c_end_quietly(ctx):
    pub, endpoint = publisher(ctx)
    proc = start(endpoint)
    wait_joined(pub, proc)
    pub.send(event_json(event(0)))
    assert json.loads(proc.stdout.readline())["seq"] == 0
    proc.stdout.close()  # like `facewatch events | head -1`
    deadline = time.monotonic() + 60
    seq = 1
    while proc.poll() is None and time.monotonic() < deadline:
        pub.send(event_json(event(seq)))
        seq += 1
        time.sleep(0.05)  # pacing the publisher, not waiting for a result
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr.read()

    proc = start(endpoint)
    wait_joined(pub, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "Traceback" not in proc.stderr.read()
