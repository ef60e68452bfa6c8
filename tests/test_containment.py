"""Containment: run logs, hostile requests, runs that try to escape, executor crashes, limits, retention.

Real executor subprocesses on loopback with real task processes (the harness is test_executor's).
Tasks that misbehave on purpose live in tests/fixtures/tasks/c/.
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
def tasks(tmp_path_factory) -> Path:
    """The fixture tasks plus a symlink loop (made here: no symlinks in git)."""
    folder = tmp_path_factory.mktemp("tasks") / "tasks"
    shutil.copytree(FIXTURES / "tasks", folder)
    (folder / "c" / "loop.py").symlink_to("loop.py")
    return folder


@pytest.fixture(scope="module")
def make_server(env_home, tasks, tmp_path_factory):
    servers: list[Server] = []

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
    """Any env var name is allowed, so the reserved ones are shown to stay refused regardless."""
    return make_server("--max-concurrent", "2", "--max-queue", "4", VPE_TASK_ENV_ALLOW="*",
                       VPE_WAREHOUSE_DSN="postgresql://executor@127.0.0.1/w").start()


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
    srv = make_server(VPE_EXECUTOR_RUN_LOG_MAX="8K").start()
    events, status = collect(srv.client().run("six_a", "c/lines.py", ["2000"], run_id="capped"))
    assert lines_of(events, pb2.STDOUT) == [f"line {i}" for i in range(2000)]
    marker = lines_of(events, pb2.STDERR)[-1]
    assert "lines" in marker and "not logged" in marker
    log_path = Path(status.log_path)
    assert log_path.stat().st_size < 8192 + 2048
    replayed = [event for _, event in executor.read_run_events(config_of(srv), "capped")]
    assert replayed[-1].status == status and lines_of(replayed[:-1])[-1] == marker


def test_a_run_id_named_like_an_env_build_log_writes_only_its_own_log(client, server):
    build_log = server.home / "logs" / "executor" / "env-six_a.log"
    before = build_log.read_bytes() if build_log.exists() else b""
    events, status = collect(client.run("six_a", "t/interleave.py", run_id="env-six_a"))
    assert status.exit_code == 0
    assert (build_log.read_bytes() if build_log.exists() else b"") == before


# ---------------------------------------------------------------- hostile requests

def request(**fields) -> pb2.RunRequest:
    return pb2.RunRequest(**{"env": "six_a", "task": "t/noop.py", **fields})


KIB64 = "x" * (64 * 1024)
HOSTILE = [
    ("path segment over 255 bytes", request(task="x/" + "c" * 300 + ".py"), "255 bytes"),
    ("symlink loop", request(task="c/loop.py"), "cannot be resolved"),
    ("40 args of 64 KiB", request(args=[KIB64] * 40), "bytes"),
    ("one arg of 256 KiB in UTF-8", request(args=["\N{COLLISION SYMBOL}" * 65536]), "bytes"),
    ("40 env vars of 64 KiB", request(env_vars={f"BIG_{i}": KIB64[:-16] for i in range(40)}), "bytes"),
    ("BASH_ENV", request(env_vars={"BASH_ENV": "/tmp/evil.sh"}), "BASH_ENV"),
    ("proxy", request(env_vars={"https_proxy": "http://evil:3128"}), "https_proxy"),
    ("CA bundle", request(env_vars={"REQUESTS_CA_BUNDLE": "/tmp/evil.pem"}), "REQUESTS_CA_BUNDLE"),
    ("override a passed-through value", request(env_vars={"VPE_WAREHOUSE_DSN": "postgresql://evil/w"}),
     "VPE_WAREHOUSE_DSN"),
    ("override HOME", request(env_vars={"HOME": "/root"}), "HOME"),
]


@pytest.mark.parametrize("request_", [r for _, r, _ in HOSTILE], ids=[name for name, _, _ in HOSTILE])
def test_hostile_request_is_refused_as_invalid_before_it_runs(server, request_):
    name, _, says = next(h for h in HOSTILE if h[1] is request_)
    stub = executor.pb2_grpc.ExecutorStub(server.channel())
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Run(request_, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert says in info.value.details()
    assert "Traceback" not in server.log()


def test_request_env_vars_need_the_allowlist_by_default():
    cfg = executor.Config()
    assert executor.validate_env_vars({"VPE_ALLOW_SYNTHETIC_WEATHER": "1"}, cfg) == {"VPE_ALLOW_SYNTHETIC_WEATHER": "1"}
    with pytest.raises(executor.Refused) as info:
        executor.validate_env_vars({"MY_SETTING": "1"}, cfg)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "VPE_TASK_ENV_ALLOW" in str(info.value)


def test_each_task_gets_a_home_of_its_own_in_its_workspace(client, server):
    homes = []
    for run_id in ("home-1", "home-2"):
        events, status = collect(client.run("six_a", "t/echo.py", run_id=run_id, workspace="homes"))
        homes.append(Path(json.loads(lines_of(events, pb2.STDOUT)[0])["env"]["HOME"]))
    assert homes[0] != homes[1] and all(home.is_dir() for home in homes)
    assert all(home.is_relative_to(server.home / "buffer" / "homes") for home in homes)


def test_cli_run_refused_exits_125_and_a_task_exit_2_stays_2(server):
    env = clean_environ(VPE_EXECUTOR_PORT=str(server.port))
    cli = [sys.executable, str(ROOT / "executor.py"), "run"]
    refused = subprocess.run([*cli, "nope", "t/noop.py"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 125 and "NOT_FOUND" in refused.stderr
    task = subprocess.run([*cli, "six_a", "t/exit_with.py", "--", "2"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert task.returncode == 2
