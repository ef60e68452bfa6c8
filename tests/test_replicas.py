"""Several executor replicas behind one target: gRPC's multi-address form `ipv4:a:p,b:p`, each replica with a
VPE_HOME of its own. New runs spread over the replicas; Attach and Cancel reach the one holding a run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_executor import collect, executor, server_factory, shared_home, tasks_dir, wait_until  # noqa: E402,F401


def test_listed_addresses_parse_grpcs_multi_address_targets():
    assert executor.replica_targets("ipv4:10.1.0.1:3170,10.1.0.2:3171") == ["10.1.0.1:3170", "10.1.0.2:3171"]
    assert executor.replica_targets("ipv6:[::1]:3170,[::1]:3171") == ["[::1]:3170", "[::1]:3171"]
    assert executor.listed_addresses("dns:///executor:3170") is None
    assert executor.listed_addresses("executor:3170") is None
    with pytest.raises(ValueError, match="'10.1.0.2' is not host:port"):
        executor.listed_addresses("ipv4:10.1.0.1:3170,10.1.0.2")


def test_runs_spread_over_replicas_listed_in_one_target_and_are_found_where_they_run(server_factory, tmp_path):
    replicas = [server_factory(home=tmp_path / f"replica{i}").start() for i in range(2)]
    target = "ipv4:" + ",".join(replica.target for replica in replicas)
    client = executor.ExecutorClient(executor.open_channel(target))
    started = {}
    for i in range(6):
        events, status = collect(client.run("six_a", "c/lines.py", ["1"], run_id=f"spread-{i}"))
        assert status.exit_code == 0
        started[f"spread-{i}"] = next(e for e in events if e.HasField("started")).started.replica
    assert set(started.values()) == {replica.target for replica in replicas}

    per_replica = [executor.ExecutorClient(channel) for channel in executor.replica_channels(target)]
    for run_id, replica in started.items():
        holder, call, first = executor.attach_where_held(per_replica, run_id)
        assert replicas[per_replica.index(holder)].target == replica
        assert collect([first, *call])[1].exit_code == 0


# One try of a task instance, as tests/test_attach.py's probe: ExecutorOperator.execute outside a DAG run.
FAILOVER_PROBE = """
import sys
from types import SimpleNamespace
from vpe import ExecutorOperator

operator = ExecutorOperator(task_id="step", env="six_a", script="a/until_released.py")
ti = SimpleNamespace(dag_id="probe", run_id="failover", task_id="step", try_number=int(sys.argv[1]), map_index=-1)
try:
    result = operator.execute({"ti": ti})
    print("succeeded:", result["exit_code"], operator._replica)
except Exception as err:
    print("failed:", err)
"""
RUN_ID, WORKSPACE = "probe.failover.step", "probe.failover"


def start_try(target: str, try_number: int) -> subprocess.Popen:
    conn = {"conn_type": "vpe_executor", "host": target}
    return subprocess.Popen([sys.executable, "-c", FAILOVER_PROBE, str(try_number)], text=True,
                            env={**os.environ, "AIRFLOW_CONN_GRPC_DEFAULT": json.dumps(conn)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def outcome(probe: subprocess.Popen) -> str:
    out, err = probe.communicate(timeout=120)
    lines = [line for line in out.splitlines() if line.startswith(("succeeded:", "failed:"))]
    assert len(lines) == 1, out + err[-3000:]
    return lines[0]


def holds_run(replica) -> bool:
    try:
        next(replica.client().attach(RUN_ID, running_only=True))
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        return False


def test_a_replica_lost_mid_run_fails_that_try_at_once_and_the_retry_runs_on_a_live_replica(server_factory, tmp_path):
    """The replica holding a running try is killed: that try fails with a message naming the replica (no wait
    for it to come back), and the next try, passing over the dead replica, starts the run on the live one."""
    replicas = [server_factory(home=tmp_path / f"replica{i}").start() for i in range(2)]
    target = "ipv4:" + ",".join(replica.target for replica in replicas)
    first = start_try(target, 1)
    assert wait_until(lambda: any(holds_run(r) for r in replicas), 120, 0.2), first.communicate(timeout=5)
    lost, live = replicas if holds_run(replicas[0]) else replicas[::-1]
    os.killpg(lost.proc.pid, signal.SIGKILL)
    # The orphaned task of the killed executor ends too (a lost host would take it along).
    (lost.home / "buffer" / WORKSPACE / "release").touch()

    failed = outcome(first)
    assert failed.startswith(f"failed: executor replica {lost.target} was lost while it ran {RUN_ID} (UNAVAILABLE"), \
        failed
    assert "starts the step on a live replica" in failed

    (live.home / "buffer" / WORKSPACE).mkdir(parents=True, exist_ok=True)
    (live.home / "buffer" / WORKSPACE / "release").touch()
    assert outcome(start_try(target, 2)) == f"succeeded: 0 {live.target}"
