"""The walking skeleton, end to end: ./bootstrap.sh brings up PostgreSQL, the
executor and Airflow as local processes; Airflow reaches the executor; a second
run keeps the warehouse's data; `down` leaves nothing running."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from conftest import AirflowAPI, bootstrap, pid_alive, read_secrets, stack_config, warehouse_dsn


@pytest.fixture(scope="module")
def stack(stack_home: Path) -> Iterator[dict[str, str]]:
    env = stack_config(stack_home / "full-stack")
    yield env
    bootstrap("down", env=env, check=False)


def recorded_pids(home: Path) -> list[int]:
    pids = [int(f.read_text()) for f in (home / "run").glob("*.pid")]
    postmaster = home / "pg" / "data" / "postmaster.pid"
    return pids + [int(postmaster.read_text().split()[0])]


def group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on."""
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split()[3] for line in lines
            if any(int(pid) in pids for pid in re.findall(r"pid=(\d+)", line))]


def test_up_brings_every_component_up_healthy(stack: dict[str, str]) -> None:
    out = bootstrap("up", env=stack).stdout
    status = bootstrap("status", env=stack).stdout
    for component in ("postgres", "executor", "airflow-api", "airflow-scheduler",
                      "airflow-dag-processor", "airflow-triggerer"):
        assert f"{component} " in status
    assert "unhealthy" not in status, status
    assert "password" in out


def test_nothing_listens_beyond_loopback(stack: dict[str, str]) -> None:
    pids = {member for pid in recorded_pids(Path(stack["VPE_HOME"])) for member in group_members(pid)}
    addresses = listening_addresses(pids)
    assert any(addr.endswith(":" + stack["VPE_EXECUTOR_PORT"]) for addr in addresses)
    assert [a for a in addresses if not a.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))] == []


def test_the_executor_keeps_workspaces_in_the_warehouse_database(stack: dict[str, str]) -> None:
    """The path every user runs is the several-hosts one: the workspace store, as vpe_executor."""
    status = bootstrap("status", env=stack).stdout
    assert f"workspace store: postgresql://vpe_executor@127.0.0.1:{stack['VPE_PG_PORT']}/warehouse" in status, status
    assert read_secrets(Path(stack["VPE_HOME"]))["VPE_EXECUTOR_DB_PASSWORD"] not in status


def test_airflow_reaches_the_executor_through_grpc_default(stack: dict[str, str]) -> None:
    airflow = AirflowAPI(stack)
    run_id = airflow.trigger("ping_grpc")
    assert airflow.wait_for_run("ping_grpc", run_id) == "success"
    assert "pong" in airflow.task_log("ping_grpc", run_id, "ping")


def test_second_up_starts_nothing_and_keeps_warehouse_rows(stack: dict[str, str]) -> None:
    with psycopg.connect(warehouse_dsn(stack)) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bootstrap_marker (note text)")
        conn.execute("INSERT INTO bootstrap_marker VALUES ('kept across bootstrap runs')")
    pids_before = recorded_pids(Path(stack["VPE_HOME"]))

    out = bootstrap("up", env=stack).stdout

    assert out.count("already running") == 3, out
    assert recorded_pids(Path(stack["VPE_HOME"])) == pids_before
    with psycopg.connect(warehouse_dsn(stack)) as conn:
        notes = conn.execute("SELECT note FROM bootstrap_marker").fetchall()
    assert notes == [("kept across bootstrap runs",)]


def test_down_stops_every_started_process(stack: dict[str, str]) -> None:
    pids = recorded_pids(Path(stack["VPE_HOME"]))
    groups = {pid: group_members(pid) for pid in pids}
    assert all(pid_alive(pid) for pid in pids)

    bootstrap("down", env=stack)

    started = set(pids).union(*groups.values())
    survivors = [pid for pid in started if pid_alive(pid)]
    assert survivors == []
    status = bootstrap("status", env=stack, check=False)
    assert status.returncode == 1
    assert " healthy" not in status.stdout
