"""Several executor replicas behind one target: gRPC's multi-address form `ipv4:a:p,b:p`, each replica with a
VPE_HOME of its own. New runs spread over the replicas; Attach and Cancel reach the one holding a run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_executor import collect, executor, server_factory, shared_home, tasks_dir  # noqa: E402,F401


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
