"""What a production host does to a daemon, each situation created for real against the real
daemon: a disk that fills under the event log (a 64 KiB tmpfs), logrotate and SIGHUP, a gallery
file deleted and created again by `facewatch enroll`, a stage SIGKILLed (event identity), a
taken port, a camera that never connects. No connected subscriber may lose an event.

The stall of an RTSP camera (connection open, no data) is in test_capture, beside the other
RTSP tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from conftest import EMBEDDER, REPO, wait_for
from decision_feed import DecisionFeed, decision, publish_only_config
from stages.messages import FaceEmbeddings, parse_event
from stages.transport import Endpoints, Transport
from test_pipeline import metric, scrape


# --- helpers -------------------------------------------------------------------------------

class EventSubscriber(threading.Thread):
    """A real SUB socket that keeps up and keeps every event it got."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.subscribe(b"")
        self.sock.connect(endpoint)
        self.events: list[dict] = []
        self.stop = threading.Event()
        self.start()

    def run(self):
        while not self.stop.is_set():
            if self.sock.poll(50):
                self.events.append(parse_event(self.sock.recv_multipart()[-1]))
        self.sock.close(linger=0)

    def close(self):
        self.stop.set()
        self.join(5)
        self.ctx.term()


@pytest.fixture
def subscribers():
    subs: list[EventSubscriber] = []
    yield lambda endpoint: subs.append(EventSubscriber(endpoint)) or subs[-1]
    for s in subs:
        s.close()


def connect(feed: DecisionFeed, sub: EventSubscriber) -> int:
    """Send decisions until the subscriber gets one (ZeroMQ's slow joiner); from the returned
    seq on, the subscriber is connected and must get every event."""
    wait_for(lambda: feed.send(decision(track_id=feed.sent + 1)) and sub.events, 30,
             "the subscriber to receive its first event")
    return sub.events[0]["seq"]


def assert_nothing_lost(sub: EventSubscriber, first_seq: int, last_seq: int) -> None:
    wait_for(lambda: sub.events and sub.events[-1]["seq"] >= last_seq, 20,
             f"the subscriber to get every event up to seq {last_seq}")
    seqs = [e["seq"] for e in sub.events]
    assert seqs == list(range(first_seq, last_seq + 1)), "a connected subscriber lost events"


def log_lines(path: Path) -> list[dict]:
    """Every line of the event log, each of which must be a whole JSON object."""
    raw = path.read_bytes() if path.exists() else b""
    assert not raw or raw.endswith(b"\n"), f"half a line at the end of {path}: {raw[-80:]!r}"
    return [json.loads(line) for line in raw.splitlines()]


def daemon_lines(daemon) -> str:
    """The daemon's log without the per-event lines."""
    return "\n".join(line for line in daemon.log_text().splitlines()
                     if "facewatch.publish: unknown camera=" not in line)


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB file system (tmpfs), so the event log's disk really fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 64 KiB tmpfs needs root (mount -t tmpfs)")
    path = tmp_path / "disk"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


# --- 1. the event log's disk fills ---------------------------------------------------------

@pytest.mark.timeout(180)
def test_full_disk_never_stops_events_and_the_log_resumes(short_dir, small_disk, daemons,
                                                          subscribers):
    """The event log sits on a 64 KiB tmpfs that a filler file nearly fills. While the disk is
    full every event still reaches the subscriber, the log holds only whole lines, publish is
    not restarted, the failure is logged once and exported; once the filler is deleted the log
    catches up by itself with every event, in order."""
    log_path = small_disk / "events.jsonl"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 44 * 1024)
    config = publish_only_config(short_dir, publish={"event_log": str(log_path)})
    cfg = yaml.safe_load(config.read_text())
    port = cfg["metrics"]["port"]
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = DecisionFeed(short_dir / "run")
    try:
        first = connect(feed, sub)
        for _ in range(110):   # ~40 KB of events for ~20 KB of free space
            assert feed.send(decision(track_id=feed.sent + 1)), "publish stopped taking decisions"
        assert_nothing_lost(sub, first, feed.sent - 1)
        samples = wait_for(lambda: (s := scrape(port)) and
                           metric(s, "facewatch_event_log_up") == 0 and s, 20,
                           "facewatch_event_log_up to go to 0")
        errors = metric(samples, "facewatch_event_log_write_errors_total", error="ENOSPC")
        assert errors >= 1
        logged = log_lines(log_path)
        assert 10 < len(logged) < feed.sent, "the disk was expected to fill part-way"
        assert [e["seq"] for e in logged] == list(range(len(logged)))
        text = daemon_lines(daemon)
        assert text.count("cannot write (No space left on device") == 1, text

        filler.unlink()                          # space returns
        wait_for(lambda: len(log_lines(log_path)) == feed.sent, 10,
                 "the event log to catch up once space returned")
        assert [e["seq"] for e in log_lines(log_path)] == list(range(feed.sent))
        for _ in range(5):
            assert feed.send(decision(track_id=feed.sent + 1))
        wait_for(lambda: len(log_lines(log_path)) == feed.sent, 10, "new events in the log")
        assert_nothing_lost(sub, first, feed.sent - 1)
        samples = wait_for(lambda: (s := scrape(port)) and
                           metric(s, "facewatch_event_log_up") == 1 and s, 10,
                           "facewatch_event_log_up back to 1")
        assert metric(samples, "facewatch_event_log_lost_total") == 0
        text = daemon_lines(daemon)
        assert text.count("writing again; no line lost") == 1, text
        assert daemon.stage("publish")["restarts"] == 0
        assert "Traceback" not in text
        assert daemon.stop(10) == 0
    finally:
        feed.close()


# --- 3. SIGHUP: logrotate, and never a stop ------------------------------------------------

@pytest.mark.timeout(180)
def test_sighup_reopens_the_event_log_after_logrotate_and_never_stops(short_dir, daemons,
                                                                      subscribers):
    """logrotate's `create` rotation: the log is renamed, then SIGHUP (the unit's ExecReload).
    The daemon goes on, later events go to a new 0600 file at the configured path, nothing is
    lost or restarted; a burst of SIGHUPs changes nothing."""
    config = publish_only_config(short_dir)
    cfg = yaml.safe_load(config.read_text())
    log_path = Path(cfg["publish"]["event_log"])
    daemon = daemons(config, short_dir / "run")
    daemon.wait_ready(90)
    sub = subscribers(cfg["publish"]["endpoint"])
    feed = DecisionFeed(short_dir / "run")
    try:
        first = connect(feed, sub)
        for _ in range(10):
            assert feed.send()
        wait_for(lambda: len(log_lines(log_path)) == feed.sent, 10, "events in the log")
        rotated = log_path.with_name("events.jsonl.1")
        os.rename(log_path, rotated)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_for(lambda: log_path.exists(), 5, "the event log reopened at its path")
        before = feed.sent
        for _ in range(10):
            assert feed.send()
        for _ in range(5):
            os.kill(daemon.proc.pid, signal.SIGHUP)
        for _ in range(10):
            assert feed.send()
        wait_for(lambda: len(log_lines(log_path)) == feed.sent - before, 10,
                 "later events in the new file")
        assert_nothing_lost(sub, first, feed.sent - 1)
        seqs = [e["seq"] for e in log_lines(rotated) + log_lines(log_path)]
        assert seqs == list(range(feed.sent)), "every event in one of the two files, in order"
        assert (log_path.stat().st_mode & 0o777) == 0o600
        assert daemon.proc.poll() is None, "SIGHUP stopped the daemon"
        assert daemon.stage("publish")["restarts"] == 0
        assert "SIGHUP: reloading" in daemon.log_text()
        assert daemon.stop(10) == 0
    finally:
        feed.close()
