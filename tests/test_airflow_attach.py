"""Runs that outlive their Airflow worker, through the real scheduler, triggerer and executor.

A retried task attaches to the remote run its killed try left running; a deferrable task waits in the
triggerer (state `deferred`) while its run goes on, a restarted triggerer attaches to it again, and
marking it failed there still kills the run.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import AirflowAPI, bootstrap, offline_demo_stack, pid_alive
from test_airflow import wait_for_file

ATTACH_DAGS = '''
"""DAGs for the attach tests: one retried task, two deferrable ones."""
from datetime import timedelta

import pendulum
from airflow.sdk import dag
from vpe import ExecutorOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False)
def vpe_attach_retry():
    ExecutorOperator(task_id="tick", env="ingestion", script="vpe_attach/until_released.py",
                     retries=1, retry_delay=timedelta(seconds=1))


@dag(schedule=None, start_date=START, catchup=False)
def vpe_attach_deferred():
    for name in ("released", "killed"):
        ExecutorOperator(task_id=name, env="ingestion", script="vpe_attach/until_released.py",
                         deferrable=True, retries=0, args=[name])


vpe_attach_retry()
vpe_attach_deferred()
'''

# Appends its pid to <workspace>/<name>.pids (a restarted run would add a second line), then ticks until a
# <name>.release file appears; <name> is argv[1], default "tick".
UNTIL_RELEASED = '''
import os, sys, time
name = sys.argv[1] if len(sys.argv) > 1 else "tick"
with open(f"{name}.pids", "a") as f:
    f.write(f"{os.getpid()}\\n")
print(f"remote pid {os.getpid()}", flush=True)
tick = 0
while not os.path.exists(f"{name}.release"):
    print(f"tick {tick}", flush=True)
    tick += 1
    time.sleep(0.5)
print("released", file=sys.stderr, flush=True)
'''


@pytest.fixture(scope="module")
def attach_stack(stack_home: Path) -> Iterator[dict[str, str]]:
    """The platform in offline-demo mode, with the attach test DAGs and task beside the real ones."""
    yield from offline_demo_stack(stack_home, "attach", {"dags/vpe_attach.py": ATTACH_DAGS,
                                                         "tasks/vpe_attach/until_released.py": UNTIL_RELEASED})


def task_runner_pid(ti_id: str) -> int:
    """The worker-side process running a task instance (the task SDK titles it `airflow worker -- <ti id>`)."""
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith(f"airflow worker -- {ti_id}"):
            return int(proc.name)
    raise AssertionError(f"no process titled 'airflow worker -- {ti_id}'")


def try_log(airflow: AirflowAPI, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
    """The log of one try of a task, or "" while that try has not begun."""
    ti = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
    return airflow.task_log(dag_id, run_id, task_id, try_number) if ti["try_number"] >= try_number else ""


def wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout}s for {what}")
        time.sleep(0.5)


def test_a_retry_attaches_to_the_run_its_killed_try_left_running(attach_stack: dict[str, str]) -> None:
    airflow = AirflowAPI(attach_stack)
    dag_id = "vpe_attach_retry"
    run_id = airflow.trigger(dag_id)
    pids_file = wait_for_file(Path(attach_stack["VPE_HOME"]) / "buffer", f"{dag_id}*/tick.pids")
    remote_pid = int(pids_file.read_text())
    ti = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/tick")
    assert ti["try_number"] == 1 and ti["state"] == "running"

    os.kill(task_runner_pid(ti["id"]), signal.SIGKILL)
    wait_for(lambda: "attaching to it instead of starting it again" in try_log(airflow, dag_id, run_id, "tick", 2),
             "try 2 to attach")
    assert pid_alive(remote_pid)
    (pids_file.parent / "tick.release").touch()

    assert airflow.wait_for_run(dag_id, run_id) == "success", airflow.explain(dag_id, run_id)
    assert pids_file.read_text().split() == [str(remote_pid)]
    second_try = airflow.task_log(dag_id, run_id, "tick", 2)
    assert f"remote pid {remote_pid}" in second_try and "tick 0" in second_try and "released" in second_try


def test_a_deferrable_task_waits_in_the_triggerer_while_its_run_goes_on(attach_stack: dict[str, str]) -> None:
    airflow = AirflowAPI(attach_stack)
    dag_id = "vpe_attach_deferred"
    run_id = airflow.trigger(dag_id)
    buffer = Path(attach_stack["VPE_HOME"]) / "buffer"
    pids = {name: wait_for_file(buffer, f"{dag_id}*/{name}.pids") for name in ("released", "killed")}
    remote_pids = {name: int(path.read_text()) for name, path in pids.items()}
    for name in pids:
        wait_for(lambda: airflow.task_state(dag_id, run_id, name) == "deferred", f"{name} to be deferred")
    wait_for(lambda: triggers_following(airflow, dag_id, run_id) == 1, "the triggerer to follow the runs")
    assert all(pid_alive(pid) for pid in remote_pids.values())

    restart_triggerer(attach_stack)
    wait_for(lambda: triggers_following(airflow, dag_id, run_id) == 2, "the restarted triggerer to attach again")
    assert all(pid_alive(pid) for pid in remote_pids.values())
    (pids["released"].parent / "released.release").touch()
    airflow.request("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/killed", {"new_state": "failed"})
    wait_for(lambda: not pid_alive(remote_pids["killed"]), "the killed task's remote run to stop")

    assert airflow.wait_for_run(dag_id, run_id) == "failed", airflow.explain(dag_id, run_id)
    assert airflow.task_state(dag_id, run_id, "released") == "success"
    log = airflow.task_log(dag_id, run_id, "released")
    assert "freeing this worker slot" in log
    assert f"remote pid {remote_pids['released']}" in log
    assert "[stderr] released" in log.split("freeing this worker slot")[1]
    assert pids["released"].read_text().split() == [str(remote_pids["released"])]


def triggers_following(airflow: AirflowAPI, dag_id: str, run_id: str) -> int:
    """How many triggers have attached to the remote runs of both tasks (the fewer of the two)."""
    return min(airflow.task_log(dag_id, run_id, task).count("following run") for task in ("released", "killed"))


def restart_triggerer(env: dict[str, str]) -> None:
    """Stops the triggerer as a deploy would (TERM to its process group), then lets bootstrap start it again."""
    pid = int((Path(env["VPE_HOME"]) / "run" / "airflow-triggerer.pid").read_text())
    os.killpg(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), "the triggerer to stop")
    bootstrap("--offline-demo", "up", env=env)
