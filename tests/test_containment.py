"""Containment: run logs, hostile requests, runs that try to escape, executor crashes, limits, retention.

Real executor subprocesses on loopback with real task processes (the harness is test_executor's).
Tasks that misbehave on purpose live in tests/fixtures/tasks/c/.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from test_executor import FIXTURES, ROOT, Server, clean_environ, collect, lines_of, wait_until
from conftest import pid_alive

sys.path.insert(0, str(ROOT))
import executor  # noqa: E402

pb2 = executor.pb2


@pytest.fixture(scope="module")
def env_home(tmp_path_factory) -> Path:
    """One built-env cache for this module's servers (the envs build once, on the first start)."""
    return tmp_path_factory.mktemp("containment-envs")


@pytest.fixture(scope="module")
def make_server(env_home, tmp_path_factory):
    servers: list[Server] = []
    tasks = FIXTURES / "tasks"

    def make(*flags: str, home: Path | None = None, **environ: str) -> Server:
        home = home or tmp_path_factory.mktemp("home")
        if not (home / "envs").exists():
            (home / "envs").symlink_to(env_home, target_is_directory=True)
        server = Server(home, FIXTURES / "envs", tasks, *flags, environ=clean_environ(**environ))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(make_server) -> Server:
    return make_server("--max-concurrent", "2", "--max-queue", "4").start()


@pytest.fixture
def client(server) -> executor.ExecutorClient:
    return server.client()


def config_of(server: Server) -> executor.Config:
    return executor.Config(home=server.home)


# ---------------------------------------------------------------- run log

def test_run_log_replays_the_stream_event_for_event(client, server):
    streamed = list(client.run("six_a", "t/interleave.py", run_id="replay"))
    replayed = list(executor.read_run_events(config_of(server), "replay"))
    assert [seq for seq, _ in replayed] == list(range(len(streamed)))
    assert [event for _, event in replayed] == streamed
    assert streamed[-1].status.log_path == str(server.home / "logs" / "runs" / "replay.jsonl")
    tail = list(executor.read_run_events(config_of(server), "replay", from_seq=len(streamed) - 2))
    assert [seq for seq, _ in tail] == [len(streamed) - 2, len(streamed) - 1]
    assert tail[-1][1].HasField("status")


def test_run_log_can_be_followed_while_the_run_goes_on(client, server):
    call = client.run("six_a", "t/before_sleep.py", ["1"], run_id="follow")
    assert next(call).HasField("started")
    followed = [event for _, event in executor.read_run_events(config_of(server), "follow", follow=lambda: True)]
    streamed = [next(call), *call]
    assert followed[1:] == streamed and followed[-1].status.exit_code == 0


def test_reading_the_log_of_an_unknown_or_malformed_run_is_refused_with_a_code(server):
    for run_id, code in (("never-ran", grpc.StatusCode.NOT_FOUND), ("../x", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(executor.Refused) as info:
            executor.read_run_events(config_of(server), run_id)
        assert info.value.code == code


def test_a_run_log_is_capped_with_a_marker_and_the_stream_keeps_every_line(make_server):
    srv = make_server(VPE_EXECUTOR_RUN_LOG_MAX_BYTES="8192").start()
    events, status = collect(srv.client().run("six_a", "c/lines.py", ["2000"], run_id="capped"))
    assert lines_of(events, pb2.STDOUT) == [f"line {i}" for i in range(2000)]
    marker = lines_of(events, pb2.STDERR)[-1]
    assert "lines" in marker and "not logged" in marker
    log_path = Path(status.log_path)
    assert log_path.stat().st_size < 8192 + 2048
    replayed = [event for _, event in executor.read_run_events(config_of(srv), "capped")]
    assert replayed[-1] == pb2.RunEvent(status=status) and lines_of(replayed[:-1])[-1] == marker


def test_a_run_id_named_like_an_env_build_log_writes_only_its_own_log(client, server):
    build_log = server.home / "logs" / "executor" / "env-six_a.log"
    before = build_log.read_bytes() if build_log.exists() else b""
    events, status = collect(client.run("six_a", "t/interleave.py", run_id="env-six_a"))
    assert status.exit_code == 0
    assert (build_log.read_bytes() if build_log.exists() else b"") == before
