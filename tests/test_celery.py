"""Airflow's CeleryExecutor in local mode (./bootstrap.sh --celery): Redis as the broker, Celery workers
running the task instances, all started, reported and stopped by bootstrap.

Needs Debian's redis-server (apt-get install redis-server; .ci/run installs it)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from conftest import AirflowAPI, bootstrap, offline_demo_stack, pid_alive

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs Redis: apt-get install redis-server")

WORKERS = 2


@pytest.fixture(scope="module")
def celery_stack(stack_home: Path) -> Iterator[dict[str, str]]:
    yield from offline_demo_stack(stack_home, "celery", {}, {"VPE_AIRFLOW_EXECUTOR": "CeleryExecutor"})


def worker_logs(env: dict[str, str]) -> dict[str, str]:
    folder = Path(env["VPE_HOME"]) / "logs" / "airflow"
    return {path.stem: path.read_text() for path in sorted(folder.glob("celery-worker-*.log"))}


def test_status_lists_redis_and_each_worker_healthy(celery_stack: dict[str, str]) -> None:
    # Without the setting: a running Redis tells bootstrap that the stack runs under Celery.
    status = bootstrap("status", env={**celery_stack, "VPE_AIRFLOW_EXECUTOR": "LocalExecutor"}).stdout
    assert re.search(r"^redis\s+127\.0\.0\.1:\d+\s+healthy$", status, re.M), status
    workers = re.findall(r"^airflow-celery-worker\s+(celery-worker-\d+@\S+)\s+healthy$", status, re.M)
    assert len(workers) == WORKERS, status


def test_a_team_server_has_real_users_not_the_simple_auth_manager(celery_stack: dict[str, str]) -> None:
    """The FAB auth manager's admin (password from the secrets file) signs in; its users API answers."""
    users = AirflowAPI(celery_stack).request("GET", "/auth/fab/v1/users")["users"]
    assert [(user["username"], [role["name"] for role in user["roles"]]) for user in users] == [("admin", ["Admin"])]
    assert not (Path(celery_stack["VPE_HOME"]) / "airflow" / "simple_auth_manager_passwords.json.generated").exists()


def test_ingestion_runs_on_the_celery_workers_in_first_tries(celery_stack: dict[str, str]) -> None:
    api = AirflowAPI(celery_stack)
    run_id = api.trigger("ingestion")
    assert api.wait_for_run("ingestion", run_id, timeout=600) == "success", api.explain("ingestion", run_id)
    tis = api.request("GET", f"/api/v2/dags/ingestion/dagRuns/{run_id}/taskInstances")["task_instances"]
    assert tis and {(ti["task_id"], ti["try_number"]) for ti in tis} == {(ti["task_id"], 1) for ti in tis}
    # Every task instance was executed by a Celery worker, not by a local process of the scheduler.
    executed = "\n".join(worker_logs(celery_stack).values())
    for ti in tis:
        assert re.search(rf"Executing workload in Celery: .*task_id='{ti['task_id']}', dag_id='ingestion', "
                         rf"run_id='{re.escape(run_id)}'", executed), ti["task_id"]


def test_down_stops_redis_and_the_workers(stack_home: Path, celery_stack: dict[str, str]) -> None:
    pids_folder = Path(celery_stack["VPE_HOME"]) / "run"
    pids = {path.stem: int(path.read_text()) for path in pids_folder.glob("*.pid")}
    assert {"redis", *(f"celery-worker-{i}" for i in range(1, WORKERS + 1))} <= set(pids), pids
    bootstrap("down", env=celery_stack)
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
