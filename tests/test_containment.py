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

from test_executor import ROOT, Server, clean_environ, collect, lines_of, wait_until
from test_executor import server_factory, shared_home, tasks_dir  # noqa: F401 (the harness's fixtures)
from conftest import pid_alive

sys.path.insert(0, str(ROOT))
import executor  # noqa: E402

pb2 = executor.pb2


@pytest.fixture(scope="module")
def make_server(server_factory, shared_home, tasks_dir, tmp_path_factory):
    """Servers with a VPE_HOME each, sharing the session's built envs; the tasks get a symlink loop."""
    loop = tasks_dir / "c" / "loop.py"
    if not loop.is_symlink():
        loop.symlink_to("loop.py")
    (shared_home / "envs").mkdir(exist_ok=True)

    def make(*flags: str, home: Path | None = None, **environ: str) -> Server:
        home = home or tmp_path_factory.mktemp("home")
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "envs").exists():
            (home / "envs").symlink_to(shared_home / "envs", target_is_directory=True)
        return server_factory(*flags, home=home, environ=clean_environ(**environ))

    return make


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


# ---------------------------------------------------------------- nothing escapes a run

def cgroups_writable() -> bool:
    """What the executor needs for per-run cgroups: creating one in the pids, memory and freezer hierarchies."""
    for controller in ("pids", "memory", "freezer"):
        probe = Path("/sys/fs/cgroup") / controller / f"vpe-test-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError:
            return False
    return True


@pytest.fixture(scope="module", params=["cgroup", "subreaper"])
def mode(request) -> str:
    if request.param == "cgroup" and not cgroups_writable():
        pytest.skip("no writable cgroup v1 hierarchies here (not root?)")
    return request.param


@pytest.fixture(scope="module")
def contained(make_server, mode) -> Server:
    return make_server("--max-concurrent", "2", VPE_EXECUTOR_CONTAINMENT=mode).start()


def pids_printed(call) -> list[int]:
    """The PIDs on the first line the task prints with numbers."""
    for event in call:
        pids = [int(word) for word in event.line.text.split() if word.isdigit()]
        if pids:
            return pids
    raise AssertionError("the task printed no PIDs")


def final_status(call):
    events = list(call)
    assert events and events[-1].HasField("status"), events
    return events[-1].status


def unmanaged(home: Path) -> list[int]:
    """Processes started for runs of the executors of `home` (they carry its VPE_BUFFER)."""
    marker = f"VPE_BUFFER={home / 'buffer'}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and pid_alive(int(pid)):
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_ping_says_which_containment_is_in_force(contained, mode):
    assert contained.client().ping().containment.startswith(f"{mode}:")
    cli = subprocess.run([sys.executable, str(ROOT / "executor.py"), "ping"], capture_output=True, text=True,
                         env=clean_environ(VPE_EXECUTOR_PORT=str(contained.port)), timeout=60)
    assert f"containment: {mode}:" in cli.stdout


def test_timeout_reaches_a_grandchild_that_left_the_session_and_is_recorded(contained):
    call = contained.client().run("six_a", "c/escapes.py", timeout_seconds=1)
    task, daemon = pids_printed(call)
    status = final_status(call)
    assert status.timed_out and status.signal == signal.SIGTERM
    assert not pid_alive(task) and not pid_alive(daemon)


def test_a_task_that_exits_leaving_a_setsid_daemon_ends_and_the_daemon_is_stopped(contained):
    call = contained.client().run("six_a", "c/escapes.py", ["0"], timeout_seconds=30)
    _, daemon = pids_printed(call)
    status = final_status(call)
    assert status.exit_code == 0 and not status.timed_out
    assert not pid_alive(daemon)


def test_a_daemon_with_its_stdio_closed_is_stopped_when_its_task_exits(contained):
    call = contained.client().run("six_a", "c/true_daemon.py", timeout_seconds=30)
    [daemon] = pids_printed(call)
    status = final_status(call)
    assert status.exit_code == 0 and not pid_alive(daemon)


def test_cancel_reaches_a_double_forked_daemon(contained, mode):
    client = contained.client()
    call = client.run("six_a", "c/double_fork.py", run_id=f"double-fork-{mode}")
    [daemon] = pids_printed(call)
    assert client.cancel(f"double-fork-{mode}").found
    status = final_status(call)
    assert status.cancelled and not pid_alive(daemon)


def test_client_loss_reaches_a_writing_daemon_and_frees_the_run(contained, mode):
    client = contained.client()
    call = client.run("six_a", "c/double_fork.py", run_id=f"client-loss-{mode}")
    [daemon] = pids_printed(call)
    call.cancel()
    assert wait_until(lambda: not pid_alive(daemon), 30), "the daemon survived its run's client going away"
    assert wait_until(lambda: not client.cancel(f"client-loss-{mode}").found, 30), "the run never ended"


def test_a_run_id_stays_taken_until_its_last_process_is_gone(make_server):
    srv = make_server("--kill-grace", "5").start()
    client = srv.client()
    call = client.run("six_a", "c/ignore_term_escape.py", run_id="reuse")
    task, daemon = pids_printed(call)
    assert client.cancel("reuse").found
    call.cancel()  # the client goes away too; both processes ignore SIGTERM for the 5 s grace
    with pytest.raises(grpc.RpcError) as info:
        list(client.run("six_a", "t/noop.py", run_id="reuse"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert client.cancel("reuse").found, "the old run can still be cancelled"
    assert wait_until(lambda: not pid_alive(task) and not pid_alive(daemon), 30)
    assert wait_until(lambda: not client.cancel("reuse").found, 30)
    assert collect(client.run("six_a", "t/noop.py", run_id="reuse"))[1].exit_code == 0


def test_sigterm_stops_the_executor_while_a_silent_daemon_holds_a_runs_stdout(make_server, mode):
    srv = make_server("--shutdown-grace", "1", VPE_EXECUTOR_CONTAINMENT=mode).start()
    call = srv.client().run("six_a", "c/escapes.py", run_id="holds-stdout")
    _, daemon = pids_printed(call)
    os.kill(srv.proc.pid, signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.log()[-3000:]
    assert not pid_alive(daemon) and not unmanaged(srv.home)


def test_every_sigterm_stops_the_executor_whichever_thread_the_kernel_hands_it_to(make_server, tmp_path):
    """Before, about one executor in ten waited on forever: its main thread slept with no timeout while another
    thread took the signal, so twenty in a row catch that nine times in ten."""
    for attempt in range(20):
        srv = make_server(home=tmp_path / "home").start()
        assert collect(srv.client().run("six_a", "t/noop.py"))[1].exit_code == 0
        os.killpg(srv.proc.pid, signal.SIGTERM)
        try:
            assert srv.proc.wait(15) == 0, srv.log()[-3000:]
        finally:
            srv.stop()
        assert "stopped" in srv.log().splitlines()[-1], f"attempt {attempt}: {srv.log()[-2000:]}"


def test_executor_killed_mid_run_leaves_no_unmanaged_process_after_a_restart(make_server, mode, tmp_path):
    home = tmp_path / "crash-home"
    first = make_server(home=home, VPE_EXECUTOR_CONTAINMENT=mode).start()
    call = first.client().run("six_a", "c/escapes.py", run_id="crash")
    task, daemon = pids_printed(call)
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert pid_alive(task) and pid_alive(daemon), "orphans of the killed executor"
    journal, = (home / "run" / "executor").glob(f"{first.proc.pid}-*.jsonl")
    journal.with_suffix(".tmp").write_bytes(journal.read_bytes())  # as if killed while compacting its journal
    second = make_server(home=home, VPE_EXECUTOR_CONTAINMENT=mode).start()
    assert unmanaged(home) == []
    assert not pid_alive(task) and not pid_alive(daemon)
    *_, (_, last) = executor.read_run_events(executor.Config(home=home), "crash")
    assert last.status.ended_by.startswith("lost:")
    run_log = (home / "logs" / "runs" / "crash.jsonl").read_text()
    assert run_log.count('"kind": "status"') == 1, "reported lost once"
    assert "reported lost" in second.log()
    assert not list((home / "run" / "executor").glob(f"{first.proc.pid}-*"))


# ---------------------------------------------------------------- limits

def run_limited(server: Server, task: str, args: list[str], **limits):
    stub = executor.pb2_grpc.ExecutorStub(server.channel())
    request = pb2.RunRequest(env="six_a", task=task, args=args, limits=pb2.RunLimits(**limits))
    return collect(stub.Run(request, timeout=60))


def test_a_run_over_its_memory_limit_ends_with_a_status_naming_it(contained):
    events, status = run_limited(contained, "c/eat_memory.py", ["400"], memory_bytes=100 * 1024 * 1024)
    assert status.ended_by == "killed: memory limit 100 MiB", (status, lines_of(events))
    assert status.WhichOneof("outcome") == "signal"
    cli = subprocess.run([sys.executable, str(ROOT / "executor.py"), "run", "--memory", "100M", "six_a",
                          "c/eat_memory.py", "--", "400"], capture_output=True, text=True, timeout=60,
                         env=clean_environ(VPE_EXECUTOR_PORT=str(contained.port)))
    assert cli.returncode > 128 and "killed: memory limit 100 MiB" in cli.stderr


def test_a_run_over_its_output_limit_is_stopped_and_says_so(contained):
    for task in ("c/lines.py", "c/wide_lines.py"):  # short lines; 16,000-character ones
        events, status = run_limited(contained, task, ["forever"], output_bytes=100_000)
        assert status.ended_by == "killed: output limit 97.7 KiB" and status.WhichOneof("outcome") == "signal"
        *output, marker = lines_of(events)
        assert marker.startswith("[executor] output limit 97.7 KiB reached")
        assert 100_000 - 16_001 < printed_bytes(output) <= 100_000 + 16 * 1024, task


def printed_bytes(lines: list[str]) -> int:
    """What a client prints of these output lines: each one's UTF-8 and a newline."""
    return sum(len(line.encode()) + 1 for line in lines)


def test_output_past_the_limit_is_discarded_even_while_a_task_ignoring_sigterm_writes_on(make_server):
    srv = make_server("--kill-grace", "3").start()
    limit, crossing_line = 256 * 1024, 16 * 1024
    stub = executor.pb2_grpc.ExecutorStub(srv.channel())
    request = pb2.RunRequest(env="six_a", task="c/spew_ignoring_term.py", run_id="spew",
                             limits=pb2.RunLimits(output_bytes=limit))
    streamed = list(stub.Run(request, timeout=120))
    status = streamed[-1].status
    assert status.ended_by == "killed: output limit 256 KiB" and status.signal == signal.SIGKILL
    output = [line for line in lines_of(streamed) if not line.startswith("[executor]")]
    assert printed_bytes(output) <= limit + crossing_line
    *_, marker = lines_of(streamed)
    assert lines_of(streamed) == [*output, marker]
    assert marker.startswith("[executor] output limit 256 KiB reached: the run is stopped")
    logged = [event for _, event in executor.read_run_events(config_of(srv), "spew")]
    assert lines_of(logged) == [*output, marker] and logged[-1].status == status
    written = int((srv.home / "buffer" / "spew" / "written").read_text())
    assert written > 4 * limit, f"the task wrote only {written} bytes: the limit was hardly exercised"

    cli = subprocess.run([sys.executable, str(ROOT / "executor.py"), "run", "--output", "256K", "six_a",
                          "c/spew_ignoring_term.py"], capture_output=True, text=True, timeout=120,
                         env=clean_environ(VPE_EXECUTOR_PORT=str(srv.port)))
    stderr = cli.stderr.splitlines()
    said = [line for line in stderr if line.startswith("[executor]")]
    assert len(said) == 2 and said[0] == marker and "killed: output limit 256 KiB" in said[1]
    task_stderr = [line for line in stderr if not line.startswith("[executor]")]
    assert printed_bytes(cli.stdout.splitlines() + task_stderr) <= limit + crossing_line
    assert cli.returncode == 128 + signal.SIGKILL


def test_a_run_over_its_cpu_time_limit_ends_with_a_status_naming_it(contained):
    events, status = run_limited(contained, "c/spin.py", [], cpu_seconds=1)
    assert status.ended_by == "killed: cpu time limit 1 s" and status.signal == signal.SIGXCPU


def test_a_run_over_its_process_limit_ends_with_a_status_naming_it(contained):
    events, status = run_limited(contained, "c/fork_many.py", ["40"], processes=10)
    assert "process limit 10" in status.ended_by, (status, lines_of(events))


def test_limits_above_the_executors_cap_are_refused(server):
    stub = executor.pb2_grpc.ExecutorStub(server.channel())
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Run(request(limits=pb2.RunLimits(memory_bytes=2 ** 60)), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "VPE_EXECUTOR_RUN_MEMORY_CAP" in info.value.details()


# ---------------------------------------------------------------- retention

def test_old_and_oversized_run_logs_and_workspaces_are_pruned_but_not_the_crawl_cache(make_server, tmp_path):
    home = tmp_path / "retention-home"
    month_ago, now = time.time() - 30 * 86400, time.time()

    def make(path: Path, size: int, mtime: float) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        for touched in (path, path.parent):
            os.utime(touched, (mtime, mtime))
        return path

    logs, buffer = home / "logs" / "runs", home / "buffer"
    old_log = make(logs / "old.jsonl", 100, month_ago)
    recent_logs = [make(logs / f"recent-{i}.jsonl", 6000, now - 300 + i * 100) for i in range(3)]
    old_workspace = make(buffer / "old-dag-run" / "windows.csv", 100, month_ago).parent
    cache = make(buffer / "cache" / "open-meteo" / "answer.json", 100, month_ago)
    today = make(buffer / "today" / "windows.csv", 100, now)
    srv = make_server(home=home, VPE_EXECUTOR_KEEP_DAYS="7", VPE_EXECUTOR_KEEP_LOGS="13K").start()
    assert wait_until(lambda: "retention: removed 2 run logs" in srv.log(), 30), srv.log()
    assert not old_log.exists() and not recent_logs[0].exists() and all(p.exists() for p in recent_logs[1:])
    assert not old_workspace.exists() and cache.exists() and today.exists()


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def test_output_waiting_for_a_client_that_does_not_read_is_bounded_in_bytes(make_server):
    srv = make_server().start()
    before = rss_bytes(srv.proc.pid)
    call = srv.client().run("six_a", "c/wide_lines.py", run_id="unread", rpc_timeout=120)
    assert next(call).HasField("started")  # and then read nothing
    run_log = srv.home / "logs" / "runs" / "unread.jsonl"
    sizes: list[int] = []

    def output_paused() -> bool:
        sizes.append(run_log.stat().st_size if run_log.exists() else 0)
        return len(sizes) > 5 and sizes[-1] == sizes[-6] > 0

    assert wait_until(output_paused, 60, 0.2), "the executor never stopped reading the task"
    grown = rss_bytes(srv.proc.pid) - before
    call.cancel()
    assert grown < 64 * 1024 * 1024, f"the executor grew by {grown / 2**20:.0f} MiB for one unread run"


def test_the_run_journal_shows_exactly_the_runs_still_alive_and_stays_small(tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "JOURNAL_COMPACT_BYTES", 400)
    path = tmp_path / "1-2.jsonl"
    journal = executor.RunJournal(path)
    for i in range(12):
        journal.started({"run_id": f"r{i}", "log_path": f"/logs/r{i}.jsonl"})
    for i in range(0, 12, 2):
        journal.ended(f"r{i}")
    journal.ended("never-started")
    assert path.stat().st_size < 500, "rewritten with only the live runs once past the compaction size"
    crashed = tmp_path / "3-4.jsonl"  # what the journal would hold had the executor died while appending
    crashed.write_bytes(path.read_bytes() + b'{"started": {"run_id": "r99", "log')
    odd = sorted(f"r{i}" for i in range(1, 12, 2))
    assert sorted(r["run_id"] for r in executor.RunJournal.live_runs(path)) == odd
    assert sorted(r["run_id"] for r in executor.RunJournal.live_runs(crashed)) == odd
    for i in range(1, 12, 2):
        journal.ended(f"r{i}")
    assert path.stat().st_size == 0 and executor.RunJournal.live_runs(path) == []
    journal.started({"run_id": "left", "log_path": "/logs/left.jsonl"})
    journal.close()
    assert [r["run_id"] for r in executor.RunJournal.live_runs(path)] == ["left"], "kept for the next start"


def test_run_records_an_earlier_executor_left_in_a_folder_are_still_read(tmp_path):
    folder = tmp_path / "999999999-1"
    folder.mkdir()
    (folder / "old.json").write_text(json.dumps({"run_id": "old", "log_path": "/logs/old.jsonl"}))
    (folder / "torn.json").write_text('{"run_id": "to')
    assert executor.RunJournal.live_runs(folder) == [{"run_id": "old", "log_path": "/logs/old.jsonl"}]


def test_a_cgroup_left_by_a_dead_executor_without_a_record_is_emptied_and_removed(make_server, tmp_path):
    if not cgroups_writable():
        pytest.skip("no writable cgroup v1 hierarchies here (not root?)")
    home = tmp_path / "orphan-cgroup-home"
    stray = subprocess.Popen(["sleep", "300"])
    bystander = subprocess.Popen(["sleep", "300"])
    dead_executor = "999999999-1"  # no such pid
    folders = [executor.home_cgroup(home, c) / dead_executor / "run-x" for c in ("pids", "memory", "freezer")]
    try:
        for folder in folders:
            folder.mkdir(parents=True)
            (folder / "cgroup.procs").write_text(str(stray.pid))
        make_server(home=home, VPE_EXECUTOR_CONTAINMENT="cgroup").start()
        assert stray.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None, "only the dead executor's run is killed"
        assert not any(folder.parent.exists() for folder in folders)
    finally:
        for proc in (stray, bystander):
            proc.kill()
            proc.wait()


def test_an_executor_failure_is_a_status_saying_so_not_a_task_failure(make_server):
    srv = make_server("--max-concurrent", "1").start()
    runs_dir = srv.home / "logs" / "runs"
    shutil.rmtree(runs_dir)
    runs_dir.write_text("not a folder")  # the run log cannot be created
    events, status = collect(srv.client().run("six_a", "t/noop.py"))
    assert status.ended_by.startswith("executor error:") and status.WhichOneof("outcome") is None
    runs_dir.unlink()
    assert collect(srv.client().run("six_a", "t/noop.py"))[1].exit_code == 0, "the failed run gave its slot back"


def test_empty_cgroups_of_dead_executors_of_other_homes_go_and_a_stopped_executor_leaves_none(make_server, tmp_path):
    if not cgroups_writable():
        pytest.skip("no writable cgroup v1 hierarchies here (not root?)")
    controllers = ("pids", "memory", "freezer")
    me = executor.proc_info(os.getpid())
    dead = [executor.home_cgroup(tmp_path / "killed-home", c) / "999999999-1" / "parked-0" for c in controllers]
    busy = [executor.home_cgroup(tmp_path / "busy-home", c) / "999999999-1" / "run-y" for c in controllers]
    alive = [executor.home_cgroup(tmp_path / "live-home", c) / f"{me.pid}-{me.start}" for c in controllers]
    stranger = [executor.home_cgroup(tmp_path / "x", c).parent / f"not-vpe-{os.getpid()}" for c in controllers]
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        for folder in dead + busy + alive + stranger:
            folder.mkdir(parents=True)
        for folder in busy:
            (folder / "cgroup.procs").write_text(str(sleeper.pid))
        srv = make_server(home=tmp_path / "sweeping-home", VPE_EXECUTOR_CONTAINMENT="cgroup").start()
        assert not any(folder.parent.parent.exists() for folder in dead), "a killed executor's empty cgroups go"
        assert all(folder.exists() for folder in busy + alive + stranger), "what has processes, a live executor " \
                                                                           "or another owner stays"
        assert sleeper.poll() is None, "another home's processes are left to that home's executor"
        assert collect(srv.client().run("six_a", "t/noop.py"))[1].exit_code == 0
        srv.stop()
        assert not any(executor.home_cgroup(srv.home, c).exists() for c in controllers)
    finally:
        sleeper.kill()
        sleeper.wait()
        executor.remove_if_empty([*dead, *busy, *alive, *stranger, *(f.parent for f in dead + busy + alive),
                                  *(f.parent.parent for f in dead + busy)])
