"""Attach and keep-alive against real executor subprocesses on loopback (tests/test_executor.py's servers).

A run's events are replayed from its run log and followed live; a run asked to keep going outlives its
client until an attached client sees it end; several executors stand in for scaled-out replicas.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import pid_alive  # noqa: E402
from test_executor import (ROOT, client, collect, executor, lines_of, pb2, run_cli, server, server_factory,  # noqa: E402,F401
                           shared_home, tasks_dir, wait_until)

TASK = "a/until_released.py"


def start(client, run_id: str, *args: str, keep_alive: float = 0.0):
    """Starts a run of until_released.py; returns (call, events up to its first tick, its pid)."""
    call = client.run("six_a", TASK, list(args), run_id=run_id, keep_alive_seconds=keep_alive)
    events = []
    for event in call:
        events.append(event)
        if event.HasField("line") and event.line.text.startswith("tick"):
            pid = int(lines_of(events)[0].split()[1])
            return call, events, pid
    raise AssertionError(f"until_released.py printed no tick: {events}")


def release(server, run_id: str) -> None:
    (server.home / "buffer" / run_id / "release").touch()


def test_attach_to_a_finished_run_replays_it_from_a_position_and_ends_with_its_status(client):
    events, status = collect(client.run("six_a", "c/lines.py", ["5"], run_id="attach-finished"))
    replay, replayed_status = collect(client.attach("attach-finished"))
    assert lines_of(replay) == lines_of(events) == [f"line {i}" for i in range(5)]
    assert replayed_status == status
    assert [e.seq for e in replay] == list(range(len(replay))) == [e.seq for e in events]

    later, _ = collect(client.attach("attach-finished", from_seq=replay[3].seq))
    assert later == replay[3:]


def test_attach_to_a_live_run_replays_then_follows_it_to_its_end(client, server):
    call, seen, pid = start(client, "attach-live", "3")
    _, attached, first = executor.attach_where_held([client], "attach-live", running_only=True)
    assert first.HasField("started") and first.started.pid == pid
    release(server, "attach-live")
    events, status = collect([first, *attached])
    run_events, run_status = collect(call)
    assert status.exit_code == run_status.exit_code == 3 and not status.cancelled
    assert lines_of(events) == lines_of(seen + run_events)
    assert lines_of(events, pb2.STDERR) == ["released"]


def test_attach_at_or_past_the_end_of_a_finished_run_answers_its_status_again(client, server):
    *_, ended = client.run("six_a", "c/lines.py", ["3"], run_id="attach-past-end")
    for from_seq in (ended.seq, ended.seq + 1, 2 ** 62, 2 ** 63 - 1):
        assert list(client.attach("attach-past-end", from_seq=from_seq)) == [ended], from_seq
    resumed = run_cli(server, "attach", "attach-past-end", "--from-seq", str(ended.seq + 1))
    assert resumed.returncode == 0 and resumed.stdout == resumed.stderr == ""


def test_attach_past_the_end_of_a_live_run_follows_it_from_there_and_ends_with_its_status(client, server):
    call, seen, _ = start(client, "attach-ahead")
    ahead = seen[-1].seq + 3  # events not yet seen by anyone, perhaps not yet written
    _, attached, first = executor.attach_where_held([client], "attach-ahead", from_seq=ahead, running_only=True)
    far = client.attach("attach-ahead", from_seq=2 ** 63 - 1)
    release(server, "attach-ahead")
    events, status = collect([first, *attached])
    assert first.seq == ahead and [e.seq for e in events] == list(range(ahead, ahead + len(events)))
    assert lines_of(events, pb2.STDERR) == ["released"] and status.exit_code == 0
    *run_events, ended = call
    assert ended.status == status and list(far) == [ended]


def test_a_lost_runs_status_appended_after_a_torn_record_is_replayed(client, server):
    """A crash (kill -9, power cut) can leave a run log's last record half written; the next executor appends
    the run's `lost` status (report_lost) after it."""
    collect(client.run("six_a", "c/lines.py", ["2"], run_id="whole"))
    runs = server.home / "logs" / "runs"
    *records, _ = (runs / "whole.jsonl").read_bytes().splitlines(keepends=True)  # started, line 0, line 1
    torn = runs / "torn.jsonl"
    torn.write_bytes(b"".join(records[:-1]) + records[-1][:20])
    executor.report_lost({"run_id": "torn", "log_path": str(torn)}, "1", 0)
    replay, status = collect(client.attach("torn"))
    assert status.ended_by.startswith("lost:") and lines_of(replay) == ["line 0"]
    assert list(client.attach("torn", from_seq=replay[-1].seq + 1))[0].status == status


def test_attach_refusals_are_clean_status_codes(client):
    collect(client.run("six_a", "c/lines.py", ["1"], run_id="attach-done"))
    cases = [("no-such-run", {}, grpc.StatusCode.NOT_FOUND, "no-such-run"),
             ("../escape", {}, grpc.StatusCode.INVALID_ARGUMENT, "run_id '../escape' is invalid"),
             ("attach-done", {"from_seq": -1}, grpc.StatusCode.INVALID_ARGUMENT, "from_seq=-1"),
             ("attach-done", {"from_seq": -2 ** 63}, grpc.StatusCode.INVALID_ARGUMENT, f"from_seq={-2 ** 63}"),
             ("attach-done", {"running_only": True}, grpc.StatusCode.NOT_FOUND, "no run 'attach-done' is running")]
    for run_id, kwargs, code, reason in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(client.attach(run_id, **kwargs))
        assert info.value.code() == code and reason in info.value.details(), (run_id, kwargs, info.value.details())


def test_attach_without_the_token_is_unauthenticated(server_factory):
    srv = server_factory(token="attach-token").start()
    collect(srv.client("attach-token").run("six_a", "c/lines.py", ["1"], run_id="attach-token-run"))
    for token in (None, "wrong"):
        with pytest.raises(grpc.RpcError) as info:
            list(srv.client(token).attach("attach-token-run"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert collect(srv.client("attach-token").attach("attach-token-run"))[1].exit_code == 0


def test_run_with_keep_alive_outlives_its_client_and_attach_gets_its_final_status(client, server):
    call, seen, pid = start(client, "kept", keep_alive=60)
    call.cancel()
    # An attached client going away does not stop it either.
    _, attached, _ = executor.attach_where_held([client], "kept", running_only=True)
    next(attached)
    attached.cancel()
    _, attached, first = executor.attach_where_held([client], "kept", from_seq=seen[-1].seq + 1, running_only=True)
    assert pid_alive(pid)
    release(server, "kept")
    events, status = collect([first, *attached])
    assert status.exit_code == 0 and not status.cancelled
    assert first.seq == seen[-1].seq + 1 and lines_of(events, pb2.STDERR) == ["released"]


def test_keep_alive_ends_when_no_client_attaches_in_time(client, server):
    call, _, pid = start(client, "kept-expires", keep_alive=1)
    call.cancel()
    assert wait_until(lambda: not pid_alive(pid), 20), "the run outlived its keep-alive"
    _, status = collect(client.attach("kept-expires"))
    assert status.cancelled
    assert "no client attached for 1s (keep_alive_seconds)" in server.log()


def test_without_keep_alive_losing_the_run_client_kills_the_run_even_with_attached_clients(client):
    call, _, pid = start(client, "not-kept")
    _, attached, _ = executor.attach_where_held([client], "not-kept", running_only=True)
    call.cancel()
    _, status = collect(attached)
    assert status.cancelled and status.signal
    assert wait_until(lambda: not pid_alive(pid), 5)


def test_attach_and_cancel_find_the_replica_holding_the_run(server_factory, tmp_path):
    """Two executors stand in for replicas: one with state of its own, one sharing the first's VPE_HOME."""
    alone = server_factory(home=tmp_path / "alone").start()
    sharing = server_factory().start()
    replicas = [sharing.client(), alone.client()]
    call, seen, pid = start(alone.client(), "on-alone", keep_alive=60)
    assert next(e for e in seen if e.HasField("started")).started.replica == alone.target

    holder, attached, first = executor.attach_where_held(replicas, "on-alone", running_only=True)
    assert holder is replicas[1] and first.started.pid == pid
    call.cancel()
    reply = executor.cancel_where_held(replicas, "on-alone")
    assert reply.found
    assert collect(attached)[1].cancelled
    assert not executor.cancel_where_held(replicas, "on-alone").found


def test_a_replica_sharing_the_state_replays_finished_runs_but_leaves_live_ones_to_their_holder(server_factory,
                                                                                                 server, client):
    other = server_factory().start()
    call, _, _ = start(client, "shared-live")
    with pytest.raises(grpc.RpcError) as info:
        list(other.client().attach("shared-live"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "another replica" in info.value.details()
    release(server, "shared-live")
    _, status = collect(call)
    assert collect(other.client().attach("shared-live"))[1] == status


def test_replica_targets_lists_every_address_behind_a_name():
    assert executor.replica_targets("dns:///localhost:3170") == ["127.0.0.1:3170"]
    assert executor.replica_targets("127.0.0.1:3170") == ["127.0.0.1:3170"]
    assert executor.replica_targets("no-such-host.invalid:3170") == ["no-such-host.invalid:3170"]


def test_cli_attach_prints_the_output_and_exits_with_the_runs_code(client, server):
    collect(client.run("six_a", "t/exit_with.py", ["5"], run_id="cli-attach"))
    result = run_cli(server, "attach", "cli-attach")
    assert result.returncode == 5 and result.stdout == "exiting 5\n"
    later = run_cli(server, "attach", "cli-attach", "--from", "2")
    assert later.returncode == 5 and later.stdout == ""
    missing = run_cli(server, "attach", "no-such-run")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    usage = run_cli(server, "attach", "--help")
    assert usage.returncode == 0 and "--from" in usage.stdout
    for bad in ("-1", str(2 ** 63), "x"):
        refused = run_cli(server, "attach", "cli-attach", "--from", bad)
        assert refused.returncode == 2 and "is no event seq" in refused.stderr, bad



OPERATOR_PROBE = '''
from types import SimpleNamespace
from vpe import ExecutorOperator

try:
    ExecutorOperator(task_id="bad", env="six_a", script="c/lines.py", limits={"memory": "1G"})
except ValueError as err:
    print("refused:", err)
operator = ExecutorOperator(task_id="step", env="six_a", script="c/lines.py", args=["5000"],
                            limits={"output_bytes": "4K"})
ti = SimpleNamespace(dag_id="probe", run_id="limits", task_id="step", try_number=1, map_index=-1)
try:
    operator.execute({"ti": ti})
except Exception as err:
    print("failed:", str(err).splitlines()[0])
'''


def test_operator_limits_reach_the_run(server):
    """ExecutorOperator.execute outside a DAG run (as tests/test_airflow.py's probe), against the test server."""
    conn = {"conn_type": "grpc", "host": "127.0.0.1", "port": server.port, "extra": {"auth_type": "NO_AUTH"}}
    env = {**os.environ, "AIRFLOW_CONN_GRPC_DEFAULT": json.dumps(conn)}
    result = subprocess.run([sys.executable, "-c", OPERATOR_PROBE], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [line for line in result.stdout.splitlines() if line.startswith(("refused:", "failed:"))]
    assert len(outcomes) == 2, result.stdout[-3000:]
    refused, failed = outcomes
    assert refused.startswith("refused: unknown limits ['memory']") and "memory_bytes" in refused
    assert failed.startswith("failed: c/lines.py was stopped (killed: output limit 4 KiB)"), failed
