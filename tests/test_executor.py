"""The executor against a real server subprocess on loopback, real env builds and real task processes.

Test envs and tasks live in tests/fixtures/; servers get their own VPE_HOME, ports and a copy of the
tasks dir. The built test envs are shared by every server of the session (the cache is keyed by the
yml's hash), so only the first start builds them.
"""
from __future__ import annotations

import datetime as dt
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

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))
import executor  # noqa: E402
from conftest import free_port, pid_alive  # noqa: E402

pb2 = executor.pb2
READY_TIMEOUT = 180.0


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def clean_environ(**extra: str) -> dict[str, str]:
    """The caller's VPE_* settings (e.g. from bootstrap) must not leak into a test server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPE_")}
    env.update(extra)
    return env


class BoundedClient(executor.ExecutorClient):
    """A broken executor fails a test instead of hanging it."""

    def run(self, *args, rpc_timeout: float | None = 60, **kwargs):
        return super().run(*args, rpc_timeout=rpc_timeout, **kwargs)


class Server:
    """`executor.py serve` as a subprocess in its own process group."""

    def __init__(self, home: Path, envs_dir: Path, tasks_dir: Path, *flags: str, environ: dict[str, str] | None = None,
                 token: str = "", tls: tuple[Path, Path] | None = None, channel_factory=None):
        self.home, self.envs_dir, self.tasks_dir = home, envs_dir, tasks_dir
        self.flags, self.token, self.tls = list(flags), token, tls
        self.channel_factory = channel_factory
        self.environ = environ or clean_environ()
        self.port = free_port()
        self.log_path = home / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, str(ROOT / "executor.py"), "serve", "--port", str(self.port), "--home", str(self.home),
                "--envs-dir", str(self.envs_dir), "--tasks-dir", str(self.tasks_dir), *self.flags]
        if self.tls:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        return argv

    def start(self, wait_for_envs: bool = True) -> "Server":
        self.home.mkdir(parents=True, exist_ok=True)
        env = dict(self.environ, VPE_EXECUTOR_TOKEN=self.token) if self.token else self.environ
        with self.log_path.open("a") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        client = self.client(self.token or None)
        assert wait_until(lambda: self._answers(client), 20, 0.1), f"executor did not answer Ping:\n{self.log()}"
        if wait_for_envs:
            assert wait_until(lambda: all(e.state != pb2.ENV_BUILDING for e in client.list_envs()), READY_TIMEOUT, 0.2), \
                f"envs still building after {READY_TIMEOUT}s:\n{self.log()}"
        return self

    def _answers(self, client: executor.ExecutorClient) -> bool:
        assert self.proc.poll() is None, f"executor exited {self.proc.returncode}:\n{self.log()}"
        try:
            client.ping(timeout=1)
            return True
        except grpc.RpcError:
            return False

    def channel(self) -> grpc.Channel:
        if self.channel_factory:
            return self.channel_factory(self.target)
        return executor.open_channel(self.target, tls_cert=str(self.tls[0]) if self.tls else "")

    def client(self, token: str | None = None) -> executor.ExecutorClient:
        return BoundedClient(self.channel(), token)

    def envs(self) -> dict[str, object]:
        return {e.name: e for e in self.client(self.token or None).list_envs()}

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vpe-home")


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory) -> Path:
    """The fixture tasks plus a symlink that escapes the tasks dir (made here: no symlinks in git)."""
    tasks = tmp_path_factory.mktemp("tasks") / "tasks"
    shutil.copytree(FIXTURES / "tasks", tasks)
    outside = tasks.parent / "outside.py"
    outside.write_text("print('escaped')\n")
    (tasks / "t" / "escape.py").symlink_to(outside)
    return tasks


@pytest.fixture(scope="session")
def server_factory(shared_home, tasks_dir):
    servers: list[Server] = []

    def make(*flags: str, home: Path | None = None, envs_dir: Path = FIXTURES / "envs", **kwargs) -> Server:
        server = Server(home or shared_home, envs_dir, tasks_dir, *flags, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory) -> Server:
    """The shared server: both test envs ready, 2 run slots."""
    srv = server_factory("--max-concurrent", "2", "--max-queue", "8",
                         environ=clean_environ(VPE_WAREHOUSE_DSN="postgresql://x@127.0.0.1/w", NOT_PASSED="secret",
                                               VPE_TASK_ENV_ALLOW="MY_SETTING"))
    srv.start()
    envs = srv.envs()
    assert {n: e.state for n, e in envs.items()} == {"six_a": pb2.ENV_READY, "six_b": pb2.ENV_READY}, srv.log()
    return srv


@pytest.fixture
def client(server) -> executor.ExecutorClient:
    return server.client()


def collect(call) -> tuple[list, object]:
    """(events before the status, the status)."""
    events = list(call)
    assert events and events[-1].HasField("status"), events
    return events[:-1], events[-1].status


def lines_of(events, stream: int | None = None) -> list[str]:
    return [e.line.text for e in events if e.HasField("line") and (stream is None or e.line.stream == stream)]


def run_cli(server: Server, *args: str, token: str = "") -> subprocess.CompletedProcess:
    env = clean_environ(VPE_EXECUTOR_PORT=str(server.port), VPE_EXECUTOR_TOKEN=token)
    return subprocess.run([sys.executable, str(ROOT / "executor.py"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


# ---------------------------------------------------------------- ping, CLI, health, reflection

def test_ping_answers_pong_version_and_env_states(client):
    reply = client.ping()
    assert reply.message == "pong"
    assert reply.version == executor.__version__
    assert {(e.name, e.state, e.backend.startswith("venv")) for e in reply.envs} == {
        ("six_a", pb2.ENV_READY, True), ("six_b", pb2.ENV_READY, True)}


def test_cli_ping_envs_and_run(server):
    ping = run_cli(server, "ping")
    assert ping.returncode == 0, ping.stderr
    assert f"executor {executor.__version__}" in ping.stdout and "six_a" in ping.stdout and "ready" in ping.stdout
    envs = run_cli(server, "envs")
    assert envs.returncode == 0 and "six_b" in envs.stdout
    run = run_cli(server, "run", "six_a", "t/exit_with.py", "--", "7")
    assert run.returncode == 7 and run.stdout == "exiting 7\n"
    refused = run_cli(server, "run", "nope", "t/noop.py")
    assert refused.returncode == executor.EXECUTOR_ERROR_EXIT and "NOT_FOUND" in refused.stderr


def test_cli_run_takes_options_after_env_and_task_and_gives_everything_after_dashes_to_the_task(server):
    result = run_cli(server, "run", "six_a", "t/echo.py", "first", "--run-id", "cli-order", "--workspace", "cli-ws",
                     "second", "--", "file.csv", "--name", "x", "--", "-v")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["args"] == ["first", "second", "file.csv", "--name", "x", "--", "-v"]
    assert seen["env"]["VPE_RUN_ID"] == "cli-order" and seen["cwd"] == str(server.home / "buffer" / "cli-ws")
    before = run_cli(server, "run", "--run-id", "cli-before", "six_a", "t/echo.py", "--", "--name", "y")
    assert json.loads(before.stdout)["args"] == ["--name", "y"] and json.loads(before.stdout)["env"]["VPE_RUN_ID"] == "cli-before"
    stray = run_cli(server, "run", "six_a", "t/echo.py", "--name", "y")
    assert stray.returncode == 2 and "--name" in stray.stderr and "after --" in stray.stderr
    bad = run_cli(server, "run", "six_a", "t/echo.py", "--workspace", "..")
    assert bad.returncode == executor.EXECUTOR_ERROR_EXIT and "INVALID_ARGUMENT" in bad.stderr and "workspace" in bad.stderr


def test_cli_ping_fails_fast_with_a_reason_when_nothing_listens():
    env = clean_environ(VPE_EXECUTOR_PORT=str(free_port()))
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "executor.py"), "ping", "--timeout", "1"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("variable, value", [("VPE_EXECUTOR_PORT", "abc"), ("VPE_EXECUTOR_MAX_CONCURRENT", "0"),
                                             ("VPE_EXECUTOR_KILL_GRACE", "-1"), ("VPE_EXECUTOR_MAX_QUEUE", "nan"),
                                             ("VPE_EXECUTOR_CONTAINMENT", "docker"), ("VPE_EXECUTOR_RUN_MEMORY", "lots"),
                                             ("VPE_EXECUTOR_RUN_MEMORY", "32G"), ("VPE_EXECUTOR_KEEP_LOGS", "-1")])
def test_bad_setting_is_a_one_line_error_naming_it(variable, value):
    result = subprocess.run([sys.executable, str(ROOT / "executor.py"), "ping"], capture_output=True, text=True,
                            env=clean_environ(**{variable: value}), timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and variable in result.stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["ping"], ["envs"], ["run"], ["cancel"]])
def test_cli_help(command):
    result = subprocess.run([sys.executable, str(ROOT / "executor.py"), *command, "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "usage: executor.py" in result.stdout


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "vpe.Executor"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"vpe.Executor", "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------- runs

def test_line_printed_before_a_sleep_arrives_before_the_sleep_ends(client):
    call = client.run("six_a", "t/before_sleep.py", ["3"])
    received = []
    for event in call:
        if event.HasField("line"):
            received.append((event.line.text, time.monotonic(), event.line.timestamp.ToDatetime(dt.timezone.utc)))
    assert [text for text, *_ in received] == ["before", "after"]
    (_, got_before, stamp_before), (_, got_after, stamp_after) = received
    assert got_after - got_before > 2.0, "'before' was held back until the task ended"
    assert (stamp_after - stamp_before).total_seconds() > 2.0
    assert abs((stamp_before - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 60


def test_stdout_and_stderr_keep_their_order_and_stream(client):
    events, status = collect(client.run("six_a", "t/interleave.py"))
    lines = [(e.line.stream, e.line.text) for e in events if e.HasField("line")]
    assert lines == [(pb2.STDOUT if i % 2 == 0 else pb2.STDERR, f"line {i}") for i in range(6)]
    assert status.exit_code == 0 and status.WhichOneof("outcome") == "exit_code"


def test_stream_starts_with_started_and_the_log_has_every_line(client, server):
    events, status = collect(client.run("six_a", "t/interleave.py", run_id="log-check"))
    assert events[0].HasField("started") and events[0].started.run_id == "log-check"
    assert status.log_path == str(server.home / "logs" / "runs" / "log-check.jsonl")
    logged = [json.loads(line) for line in Path(status.log_path).read_text().splitlines()]
    assert [(r["line"]["stream"], r["line"]["text"]) for r in logged if r["kind"] == "line"] == \
        [("STDOUT" if i % 2 == 0 else "STDERR", f"line {i}") for i in range(6)]


@pytest.mark.parametrize("arg,outcome,value", [("0", "exit_code", 0), ("3", "exit_code", 3), ("kill", "signal", 9)])
def test_exit_code_or_signal_is_a_normal_final_status(client, arg, outcome, value):
    events, status = collect(client.run("six_a", "t/exit_with.py", [arg]))
    assert lines_of(events) == [f"exiting {arg}"]
    assert status.WhichOneof("outcome") == outcome and getattr(status, outcome) == value
    assert not status.timed_out and not status.cancelled and status.duration_seconds > 0


def test_task_environment_is_minimal_and_explicit(client, server):
    events, status = collect(client.run("six_a", "t/echo.py", ["a b", "--flag"], env_vars={"MY_SETTING": "42"},
                                        run_id="env-check"))
    seen = json.loads(lines_of(events, pb2.STDOUT)[0])
    env = seen["env"]
    workspace_dir = server.home / "buffer" / "env-check"
    assert seen["args"] == ["a b", "--flag"]
    assert seen["cwd"] == str(workspace_dir)
    assert env["PATH"].split(":")[0] == str(server.home / "envs" / "six_a" / "bin") or \
        env["PATH"].split(":")[0].startswith(str(server.home / "envs" / "six_a-"))
    assert env["VPE_RUN_ID"] == "env-check" and env["VPE_WORKSPACE"] == str(workspace_dir)
    assert env["VPE_BUFFER"] == str(server.home / "buffer") and env["PYTHONUNBUFFERED"] == "1"
    assert env["VPE_WAREHOUSE_DSN"] == "postgresql://x@127.0.0.1/w"  # passed through by default
    assert env["MY_SETTING"] == "42"
    assert "NOT_PASSED" not in env
    assert set(env) <= {"PATH", "HOME", "LANG", "TZ", "PYTHONUNBUFFERED", "VPE_ENV", "VPE_RUN_ID", "VPE_WORKSPACE",
                        "VPE_BUFFER", "VPE_WAREHOUSE_DSN", "OPEN_METEO_ARCHIVE_URL", "MY_SETTING"}


def test_runs_given_one_workspace_share_its_folder_and_keep_their_own_logs(client, server):
    workspace = "dag-run-2024-01-01"
    assert not (server.home / "buffer" / workspace).exists()
    results: dict[str, tuple[list, object]] = {}

    def run(run_id: str) -> None:
        results[run_id] = collect(client.run("six_a", "t/append.py", ["0.5"], run_id=run_id, workspace=workspace))

    threads = [threading.Thread(target=run, args=(run_id,)) for run_id in ("extract-csv", "extract-xlsx")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    events, status = collect(client.run("six_a", "t/append.py", run_id="crawl", workspace=workspace))
    results["crawl"] = events, status

    workspace_dir = server.home / "buffer" / workspace
    for run_id, (events, status) in results.items():
        assert status.exit_code == 0, lines_of(events)
        assert events[0].started.workspace_dir == str(workspace_dir)
        assert json.loads(lines_of(events, pb2.STDOUT)[0])["cwd"] == str(workspace_dir)
        assert status.log_path == str(server.home / "logs" / "runs" / f"{run_id}.jsonl")
    assert sorted((workspace_dir / "shared.txt").read_text().split()) == ["crawl", "extract-csv", "extract-xlsx"]
    assert json.loads(lines_of(results["crawl"][0])[0])["lines"][-1] == "crawl"
    assert not (server.home / "buffer" / "crawl").exists(), "a run with a workspace makes no folder of its own"


def test_timeout_kills_the_task_and_says_so(client):
    started = time.monotonic()
    events, status = collect(client.run("six_a", "t/family.py", timeout_seconds=1))
    child, grandchild = map(int, lines_of(events)[0].split()[1:])
    assert status.timed_out and status.WhichOneof("outcome") == "signal" and status.signal == signal.SIGTERM
    assert 1.0 <= status.duration_seconds < 4 and time.monotonic() - started < 8
    assert wait_until(lambda: not pid_alive(child) and not pid_alive(grandchild), 2)


def start_family(client, run_id: str, *args: str, rpc_timeout: float | None = None):
    call = client.run("six_a", "t/family.py", list(args), run_id=run_id, rpc_timeout=rpc_timeout)
    for event in call:
        if event.HasField("line"):
            child, grandchild = map(int, event.line.text.split()[1:])
            assert pid_alive(child) and pid_alive(grandchild)
            return call, child, grandchild
    raise AssertionError("family.py printed no pids")


@pytest.mark.parametrize("args", [(), ("ignore-term",)], ids=["polite", "ignores-sigterm"])
def test_cancel_rpc_kills_child_and_grandchild_within_2s(client, args):
    call, child, grandchild = start_family(client, f"cancel-{len(args)}", *args)
    reply = client.cancel(f"cancel-{len(args)}")
    cancelled_at = time.monotonic()
    assert reply.found
    assert wait_until(lambda: not pid_alive(child) and not pid_alive(grandchild), 2.0), "task survived Cancel"
    assert time.monotonic() - cancelled_at <= 2.0
    status = list(call)[-1].status
    assert status.cancelled and status.signal == (signal.SIGKILL if args else signal.SIGTERM)


def test_client_going_away_kills_child_and_grandchild_within_2s(client, server):
    call, child, grandchild = start_family(client, "disconnect")
    call.cancel()
    assert wait_until(lambda: not pid_alive(child) and not pid_alive(grandchild), 2.0), "task survived disconnect"
    assert wait_until(lambda: "run disconnect: signal 15 (cancelled: client went away)" in server.log(), 5)


def test_deadline_passing_kills_the_task(client):
    call, child, grandchild = start_family(client, "deadline", rpc_timeout=1.5)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: not pid_alive(child) and not pid_alive(grandchild), 2.0)


def test_grandchild_left_behind_by_a_finished_task_is_stopped(client):
    events, status = collect(client.run("six_a", "t/leaves_daemon.py", timeout_seconds=30))
    grandchild = int(lines_of(events)[0].split()[1])
    assert status.exit_code == 0 and not status.timed_out
    assert status.duration_seconds < 5
    assert wait_until(lambda: not pid_alive(grandchild), 2.0)


def test_cancel_of_an_unknown_run_is_not_found_in_the_reply(client):
    reply = client.cancel("no-such-run")
    assert not reply.found and "no-such-run" in reply.message


def test_concurrency_limit_queues_then_refuses(server_factory):
    srv = server_factory("--max-concurrent", "1", "--max-queue", "1").start()
    client = srv.client()
    first = client.run("six_a", "t/before_sleep.py", ["1.5"], run_id="slot-1")
    assert next(first).HasField("started")
    second = client.run("six_a", "t/exit_with.py", ["0"], run_id="slot-2")
    queued = next(second)
    assert queued.HasField("queued") and queued.queued.position == 1 and "queued" in queued.queued.message
    with pytest.raises(grpc.RpcError) as info:
        list(client.run("six_a", "t/noop.py", run_id="slot-3"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in info.value.details()
    first_rest = list(first)
    second_rest = list(second)
    assert first_rest[-1].status.exit_code == 0 and second_rest[-1].status.exit_code == 0
    assert any(e.HasField("started") for e in second_rest), "queued run never started"
    assert srv.log().index("run slot-1: exit 0") < srv.log().index("run slot-2: started")
    assert srv.client().ping().message == "pong"


def test_isolation_two_envs_pin_different_six_versions_concurrently(client):
    results: dict[str, tuple[list, object]] = {}

    def run(env: str) -> None:
        results[env] = collect(client.run(env, "t/six_version.py", ["1"]))

    threads = [threading.Thread(target=run, args=(env,)) for env in ("six_a", "six_b")]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert lines_of(results["six_a"][0]) == ["1.16.0"]
    assert lines_of(results["six_b"][0]) == ["1.17.0"]
    assert time.monotonic() - started < sum(s.duration_seconds for _, s in results.values()), "runs did not overlap"


# ---------------------------------------------------------------- refusals

HUGE = "x" * (5 * 1024 * 1024)


def run_request(**fields) -> pb2.RunRequest:
    return pb2.RunRequest(**{"env": "six_a", "task": "t/noop.py", **fields})


HOSTILE_RUNS = [
    ("unknown env", run_request(env="nope"), grpc.StatusCode.NOT_FOUND),
    ("empty env", run_request(env=""), grpc.StatusCode.NOT_FOUND),
    ("env path traversal", run_request(env="../six_a"), grpc.StatusCode.NOT_FOUND),
    ("empty task", run_request(task=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("absolute task", run_request(task="/etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT),
    ("absolute task inside tasks", run_request(task=str(FIXTURES / "tasks/t/noop.py")), grpc.StatusCode.INVALID_ARGUMENT),
    ("dot-dot", run_request(task="t/../../outside.py"), grpc.StatusCode.INVALID_ARGUMENT),
    ("dot-dot to sibling", run_request(task="../tasks/t/noop.py"), grpc.StatusCode.INVALID_ARGUMENT),
    ("symlink escape", run_request(task="t/escape.py"), grpc.StatusCode.INVALID_ARGUMENT),
    ("missing script", run_request(task="t/missing.py"), grpc.StatusCode.INVALID_ARGUMENT),
    ("not a .py", run_request(task="t/not_python.sh"), grpc.StatusCode.INVALID_ARGUMENT),
    ("directory", run_request(task="t"), grpc.StatusCode.INVALID_ARGUMENT),
    ("NUL in task", run_request(task="t/noop.py\0.py"), grpc.StatusCode.INVALID_ARGUMENT),
    ("home-relative task", run_request(task="~/x.py"), grpc.StatusCode.INVALID_ARGUMENT),
    ("NUL in arg", run_request(args=["a\0b"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("too many args", run_request(args=["a"] * 2000), grpc.StatusCode.INVALID_ARGUMENT),
    ("env var name with dash", run_request(env_vars={"A-B": "1"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("env var name starting with digit", run_request(env_vars={"1A": "1"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("env var name with =", run_request(env_vars={"A=B": "1"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("override PATH", run_request(env_vars={"PATH": "/tmp"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("LD_PRELOAD", run_request(env_vars={"LD_PRELOAD": "/tmp/x.so"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("PYTHONSTARTUP", run_request(env_vars={"PYTHONSTARTUP": "/tmp/x.py"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("override VPE_WORKSPACE", run_request(env_vars={"VPE_WORKSPACE": "/"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("NUL in env value", run_request(env_vars={"A": "x\0y"}), grpc.StatusCode.INVALID_ARGUMENT),
    ("too many env vars", run_request(env_vars={f"V{i}": "1" for i in range(300)}), grpc.StatusCode.INVALID_ARGUMENT),
    ("negative timeout", run_request(timeout_seconds=-1), grpc.StatusCode.INVALID_ARGUMENT),
    ("NaN timeout", run_request(timeout_seconds=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ("infinite timeout", run_request(timeout_seconds=float("inf")), grpc.StatusCode.INVALID_ARGUMENT),
    ("run_id with slash", run_request(run_id="a/b"), grpc.StatusCode.INVALID_ARGUMENT),
    ("run_id dot-dot", run_request(run_id=".."), grpc.StatusCode.INVALID_ARGUMENT),
    ("run_id too long", run_request(run_id="r" * 200), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace dot-dot", run_request(workspace=".."), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace dot", run_request(workspace="."), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace absolute", run_request(workspace="/abs"), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace nested", run_request(workspace="a/../b"), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace starting with dash", run_request(workspace="-rf"), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace with space", run_request(workspace="dag run"), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace with NUL", run_request(workspace="a\0b"), grpc.StatusCode.INVALID_ARGUMENT),
    ("workspace too long", run_request(workspace="w" * 129), grpc.StatusCode.INVALID_ARGUMENT),
    ("message over 4 MiB", run_request(args=[HUGE]), grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def test_hostile_requests_get_clean_status_codes_and_ping_still_works(server):
    # a channel without the client's own size limit, so oversized messages reach the server
    channel = grpc.insecure_channel(server.target)
    stub = executor.pb2_grpc.ExecutorStub(channel)
    outcomes = {}
    for name, request, expected in HOSTILE_RUNS:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Run(request, timeout=10))
        outcomes[name] = (info.value.code(), expected, info.value.details())
    wrong = {name: got for name, got in outcomes.items() if got[0] != got[1]}
    assert not wrong, wrong
    assert all(len(details) > 20 for _, _, details in outcomes.values()), "every refusal says what to do"
    assert all("workspace" in details for name, (_, _, details) in outcomes.items() if name.startswith("workspace"))

    garbage = channel.unary_stream("/vpe.Executor/Run", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        list(garbage(b"\xff\xff\xff\xff\x0f", timeout=10))
    assert info.value.code() == grpc.StatusCode.INTERNAL  # grpcio's answer to an undecodable request
    unknown = channel.unary_unary("/vpe.Executor/Nope", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        unknown(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert len(HOSTILE_RUNS) + 2 >= 20
    assert executor.ExecutorClient(channel).ping().message == "pong"


def test_duplicate_running_run_id_is_refused(client):
    call, child, grandchild = start_family(client, "dup")
    with pytest.raises(grpc.RpcError) as info:
        list(client.run("six_a", "t/noop.py", run_id="dup"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    client.cancel("dup")
    assert list(call)[-1].status.cancelled


# ---------------------------------------------------------------- security

def test_token_auth_missing_wrong_and_right(server_factory):
    srv = server_factory(token="s3cret-token").start()
    for token in (None, "wrong", "s3cret-token-and-more"):
        with pytest.raises(grpc.RpcError) as info:
            srv.client(token).ping()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(srv.client(token).run("six_a", "t/noop.py"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = srv.client("s3cret-token")
    assert good.ping().message == "pong"
    assert collect(good.run("six_a", "t/exit_with.py", ["0"]))[1].exit_code == 0
    assert run_cli(srv, "ping").returncode == 1
    assert run_cli(srv, "ping", token="s3cret-token").returncode == 0

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(srv.channel())  # probes need no token
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def make_cert(folder: Path, name: str, issuer: tuple | None = None) -> tuple[Path, Path, tuple]:
    """A certificate for localhost/127.0.0.1, self-signed unless issuer=(cert, key) of a CA is given."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vpe-test-{name}")])
    issuer_cert, issuer_key = issuer or (None, key)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(issuer_cert.subject if issuer_cert else subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
            .sign(issuer_key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, (cert, key)


def test_tls_with_a_generated_certificate(server_factory, tmp_path):
    cert, key, _ = make_cert(tmp_path, "server")
    srv = server_factory(tls=(cert, key), token="tls-token").start()
    client = srv.client("tls-token")
    assert client.ping().message == "pong"
    assert lines_of(collect(client.run("six_b", "t/six_version.py"))[0]) == ["1.17.0"]
    with pytest.raises(grpc.RpcError) as info:
        executor.ExecutorClient(grpc.insecure_channel(srv.target), "tls-token").ping(timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    cli = subprocess.run([sys.executable, str(ROOT / "executor.py"), "ping", "--tls-cert", str(cert)],
                         capture_output=True, text=True, timeout=30,
                         env=clean_environ(VPE_EXECUTOR_PORT=str(srv.port), VPE_EXECUTOR_TOKEN="tls-token"))
    assert cli.returncode == 0, cli.stderr
    assert "TLS, token auth" in srv.log()


# ---------------------------------------------------------------- env builds

def write_env(folder: Path, name: str, *pip: str, python: str = "3.11", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pip_lines = "".join(f"      - {p}\n" for p in pip)
    path = folder / f"{name}.yml"
    path.write_text(f"name: {name}\nchannels:\n  - conda-forge\ndependencies:\n  - python={python}\n{extra}"
                    f"  - pip:\n{pip_lines}")
    return path


def test_env_cache_hit_then_rebuild_on_change_and_failed_rebuild_keeps_old_env(server_factory, tmp_path):
    home, envs_dir = tmp_path / "home", tmp_path / "envs"
    yml = write_env(envs_dir, "tiny", "six==1.16.0")

    first = server_factory(home=home, envs_dir=envs_dir).start()
    built = first.envs()["tiny"]
    assert built.state == pb2.ENV_READY and "built" in built.detail
    prefix = home / "envs" / f"tiny-{built.spec_hash}"
    marker_inode = (prefix / ".vpe-ready").stat().st_ino
    first.stop()

    second = server_factory(home=home, envs_dir=envs_dir).start()
    cached = second.envs()["tiny"]
    assert cached.state == pb2.ENV_READY and cached.spec_hash == built.spec_hash and "cached" in cached.detail
    assert (prefix / ".vpe-ready").stat().st_ino == marker_inode, "a cache hit must not rebuild"
    second.stop()

    yml.write_text(yml.read_text().replace("six==1.16.0", "six==1.17.0"))
    third = server_factory(home=home, envs_dir=envs_dir).start()
    rebuilt = third.envs()["tiny"]
    assert rebuilt.state == pb2.ENV_READY and rebuilt.spec_hash != built.spec_hash and "built" in rebuilt.detail
    assert lines_of(collect(third.client().run("tiny", "t/six_version.py"))[0]) == ["1.17.0"]
    assert not prefix.exists(), "the superseded build is removed after the swap"
    third.stop()

    yml.write_text(yml.read_text().replace("six==1.17.0", "six==0.0.424242"))
    fourth = server_factory(home=home, envs_dir=envs_dir).start()
    stale = fourth.envs()["tiny"]
    assert stale.state == pb2.ENV_READY and stale.stale and stale.spec_hash == rebuilt.spec_hash
    assert "rebuild failed" in stale.detail and stale.log_tail
    assert lines_of(collect(fourth.client().run("tiny", "t/six_version.py"))[0]) == ["1.17.0"]
    assert (home / "envs" / "tiny").resolve() == home / "envs" / f"tiny-{rebuilt.spec_hash}"


def test_broken_envs_fail_clearly_and_refuse_runs(server_factory, tmp_path):
    envs_dir = tmp_path / "envs"
    write_env(envs_dir, "bad_pin", "six==0.0.424242")
    write_env(envs_dir, "old_python", "six", python="3.99")
    write_env(envs_dir, "conda_only", "six", extra="  - cudatoolkit=11.8\n")
    (envs_dir / "not_yaml.yml").write_text("name: [unclosed\n")
    srv = server_factory(home=tmp_path / "home", envs_dir=envs_dir).start()
    envs = srv.envs()
    assert {n: e.state for n, e in envs.items()} == {n: pb2.ENV_FAILED for n in
                                                     ("bad_pin", "old_python", "conda_only", "not_yaml")}
    assert "six" in envs["bad_pin"].log_tail and envs["bad_pin"].log_path.endswith("env-bad_pin.log")
    assert "Python 3.99" in envs["old_python"].detail and "python=3.99" in envs["old_python"].detail
    assert "cudatoolkit=11.8" in envs["conda_only"].detail and "pip" in envs["conda_only"].detail
    assert "not valid YAML" in envs["not_yaml"].detail
    with pytest.raises(grpc.RpcError) as info:
        list(srv.client().run("bad_pin", "t/noop.py"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "build failed" in info.value.details()
    assert not list((tmp_path / "home" / "envs").glob("bad_pin-*")), "no half-built env is left behind"
    assert srv.client().ping().message == "pong"


def test_ping_answers_while_envs_build_and_runs_wait_for_ready(server_factory, tmp_path):
    slow_pkg = tmp_path / "slowpkg"
    slow_pkg.mkdir()
    (slow_pkg / "setup.py").write_text(
        "import time\nfrom setuptools import setup\ntime.sleep(4)\nsetup(name='slowpkg', version='1.0', py_modules=[])\n")
    envs_dir = tmp_path / "envs"
    write_env(envs_dir, "fresh", "six==1.16.0", f"slowpkg @ file://{slow_pkg}", extra="  - pip\n")
    srv = server_factory(home=tmp_path / "home", envs_dir=envs_dir).start(wait_for_envs=False)
    assert [e.state for e in srv.client().ping().envs] == [pb2.ENV_BUILDING]
    with pytest.raises(grpc.RpcError) as info:
        list(srv.client().run("fresh", "t/noop.py"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not ready" in info.value.details()
    assert wait_until(lambda: srv.envs()["fresh"].state == pb2.ENV_READY, READY_TIMEOUT, 0.2), srv.log()
    assert (tmp_path / "home" / "envs" / "fresh" / "bin" / "pip").exists(), "'- pip' installs pip"
    assert collect(srv.client().run("fresh", "t/noop.py"))[1].exit_code == 0


# ---------------------------------------------------------------- shutdown

def test_sigterm_stops_gracefully_and_kills_running_tasks(server_factory):
    srv = server_factory("--shutdown-grace", "1").start()
    call, child, grandchild = start_family(srv.client(), "shutdown")
    os.killpg(srv.proc.pid, signal.SIGTERM)
    assert srv.proc.wait(15) == 0
    assert not pid_alive(child) and not pid_alive(grandchild)
    assert "shutting down" in srv.log() and "stopped" in srv.log()
    with pytest.raises(grpc.RpcError):
        srv.client().ping(timeout=2)


def test_documented_grpc_default_connection_carries_the_token(server_factory, monkeypatch):
    """The README's AIRFLOW_CONN_GRPC_DEFAULT: token in `password`, channel from the grpc provider's hook."""
    pytest.importorskip("airflow.providers.grpc.hooks.grpc")
    from airflow.providers.grpc.hooks.grpc import GrpcHook

    srv = server_factory(token="conn-token").start()
    monkeypatch.setenv("AIRFLOW_CONN_GRPC_DEFAULT", json.dumps(
        {"conn_type": "grpc", "host": "127.0.0.1", "port": srv.port, "password": "conn-token",
         "extra": {"auth_type": "NO_AUTH"}}))
    hook = GrpcHook(grpc_conn_id="grpc_default")
    with hook.get_conn() as channel:
        client = executor.ExecutorClient(channel, token=hook.conn.password or None)
        assert client.ping().message == "pong"
        assert collect(client.run("six_a", "t/exit_with.py", ["5"]))[1].exit_code == 5


def test_mutual_tls_requires_a_client_certificate_from_the_ca(server_factory, tmp_path):
    ca_cert, _, ca = make_cert(tmp_path, "ca")
    server_cert, server_key, _ = make_cert(tmp_path, "server", issuer=ca)
    client_cert, client_key, _ = make_cert(tmp_path, "client", issuer=ca)
    srv = server_factory("--tls-ca", str(ca_cert), tls=(server_cert, server_key), channel_factory=lambda target:
                         executor.open_channel(target, str(ca_cert), str(client_cert), str(client_key))).start()
    assert srv.client().ping().message == "pong"
    without_client_cert = executor.ExecutorClient(executor.open_channel(srv.target, tls_ca=str(ca_cert)))
    with pytest.raises(grpc.RpcError) as info:
        without_client_cert.ping(timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------- resources

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_refused_runs_leak_no_file_descriptors(client, server):
    call, child, grandchild = start_family(client, "fd-holder")
    refused = []

    def refuse_duplicates(count: int) -> None:
        for _ in range(count):
            with pytest.raises(grpc.RpcError) as info:
                list(client.run("six_a", "t/noop.py", run_id="fd-holder"))
            refused.append(info.value.code())

    refuse_duplicates(3)  # the channel and any lazily opened server fds exist after this
    before = open_fds(server.proc.pid)
    refuse_duplicates(50)
    after = open_fds(server.proc.pid)
    client.cancel("fd-holder")
    assert list(call)[-1].status.cancelled
    assert set(refused) == {grpc.StatusCode.ALREADY_EXISTS}
    assert after - before < 10, f"{after - before} fds more after 50 refused runs"


def test_a_flooding_task_whose_client_went_away_is_stopped_and_frees_its_slot(server_factory, tasks_dir):
    """The executor stops reading a task's pipes while its client is slow; once the client is gone that pause
    must end, or the killed task is never reaped and its slot is never freed."""
    (tasks_dir / "t" / "flood.py").write_text("line = 'x' * 1000\nwhile True:\n    print(line)\n")
    srv = server_factory("--max-concurrent", "1", "--max-queue", "1").start()
    client = srv.client()
    call = client.run("six_a", "t/flood.py", run_id="flood")
    assert next(call).HasField("started")
    run_log = srv.home / "logs" / "runs" / "flood.jsonl"
    sizes: list[int] = []

    def output_paused() -> bool:  # the executor stopped reading: the queue for this client is full
        sizes.append(run_log.stat().st_size if run_log.exists() else 0)
        return len(sizes) > 5 and sizes[-1] == sizes[-6] > 0

    assert wait_until(output_paused, 60, 0.2), "the executor never paused reading a flooding task"
    call.cancel()
    events, status = collect(client.run("six_a", "t/exit_with.py", ["0"], run_id="after-flood", rpc_timeout=20))
    assert status.exit_code == 0
    assert wait_until(lambda: "run flood: signal 15 (cancelled: client went away)" in srv.log(), 5), srv.log()[-2000:]


def test_cli_run_cancelled_in_the_queue_says_it_never_started(client, server):
    holders = [start_family(client, f"queue-holder-{i}")[0] for i in range(2)]  # the shared server's 2 slots
    env = clean_environ(VPE_EXECUTOR_PORT=str(server.port))
    cli = subprocess.Popen([sys.executable, str(ROOT / "executor.py"), "run", "six_a", "t/noop.py", "--run-id",
                            "queued-cli"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "queued at position 1" in cli.stderr.readline()
        assert client.cancel("queued-cli").found
        assert cli.wait(30) == 1
        message = cli.stderr.read()
    finally:
        cli.kill()
        for i, call in enumerate(holders):
            client.cancel(f"queue-holder-{i}")
            list(call)
    assert "cancelled; never started" in message and "None" not in message, message
