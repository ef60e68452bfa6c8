"""The Airflow side: DAG files import cleanly, and the real scheduler runs the
ingestion DAG through the executor (offline demo: local Open-Meteo stand-in)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from conftest import ROOT, AirflowAPI, free_port, offline_demo_stack, pid_alive, read_secrets, warehouse_dsn

DEMO_EVENTS = 15  # tasks/ingestion/demo_catalog.csv: 21 rows, 6 of them rejected
SOIL_DEPTHS = 4

TEST_DAGS = '''
"""DAGs the tests need next to the real ones: a failing task and a long one."""
from datetime import timedelta

import pendulum
from airflow.sdk import dag
from vpe import ExecutorOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(schedule=None, start_date=START, catchup=False)
def vpe_test_fail():
    ExecutorOperator(task_id="fail", env="ingestion", script="vpe_test/fail.py", retries=0)


@dag(schedule=None, start_date=START, catchup=False)
def vpe_test_sleep():
    ExecutorOperator(task_id="sleep", env="ingestion", script="vpe_test/sleep.py", retries=0,
                     execution_timeout=timedelta(minutes=10))


vpe_test_fail()
vpe_test_sleep()
'''

FAIL_TASK = '''
import sys
print("starting the doomed step")
print("ValueError: the catalog has no rows", file=sys.stderr)
sys.exit(3)
'''

# Writes its own and a grandchild's PID where the test can find them, then waits.
SLEEP_TASK = '''
import os, subprocess, time
child = subprocess.Popen(["sleep", "600"])
with open(os.path.join(os.environ["VPE_WORKSPACE"], "pids"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
print("sleeping", flush=True)
time.sleep(600)
'''


def dag_structure(dags_dir: Path) -> dict:
    """Parses the folder like the dag-processor (no database), in a process of its own."""
    probe = textwrap.dedent(f"""
        import json
        from airflow.dag_processing.dagbag import BundleDagBag
        bag = BundleDagBag(dag_folder={str(dags_dir)!r}, bundle_path={str(dags_dir)!r})
        print(json.dumps({{
            "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
            "dags": {{dag_id: {{t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}}
                     for dag_id, dag in bag.dags.items()}},
        }}))
    """)
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_dag_imports_with_the_expected_tasks() -> None:
    parsed = dag_structure(ROOT / "dags")
    assert parsed["errors"] == {}
    assert parsed["dags"]["ping_grpc"] == {"ping": []}
    assert parsed["dags"]["ingestion"] == {
        "extract_args": ["extract"], "extract": ["crawl"], "crawl": ["load"], "load": [],
    }


@pytest.fixture(scope="module")
def demo_stack(stack_home: Path) -> Iterator[dict[str, str]]:
    """The whole platform in offline-demo mode, with the test DAGs and task scripts beside the real ones."""
    yield from offline_demo_stack(stack_home, "airflow", {"dags/vpe_test.py": TEST_DAGS,
                                                          "tasks/vpe_test/fail.py": FAIL_TASK,
                                                          "tasks/vpe_test/sleep.py": SLEEP_TASK})


def warehouse_counts(env: dict[str, str]) -> dict[str, int]:
    with psycopg.connect(warehouse_dsn(env, "warehouse_demo")) as conn:
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("landslide_event", "weather_window", "weather_data", "soil", "location")}


def test_ingestion_dag_loads_the_demo_catalog(demo_stack: dict[str, str]) -> None:
    airflow = AirflowAPI(demo_stack)
    run_id = airflow.trigger("ingestion")
    assert airflow.wait_for_run("ingestion", run_id) == "success", airflow.explain("ingestion", run_id)

    counts = warehouse_counts(demo_stack)
    assert counts["landslide_event"] == DEMO_EVENTS
    assert counts["weather_window"] == 2 * DEMO_EVENTS  # event day + the same day a year earlier
    assert counts["weather_data"] == 24 * counts["weather_window"]
    assert counts["soil"] == SOIL_DEPTHS * counts["weather_data"]
    assert "21 rows" in airflow.task_log("ingestion", run_id, "extract", map_index=0)
    assert "SYNTHETIC" in airflow.task_log("ingestion", run_id, "crawl")


def test_second_ingestion_run_adds_no_rows(demo_stack: dict[str, str]) -> None:
    before = warehouse_counts(demo_stack)
    airflow = AirflowAPI(demo_stack)
    run_id = airflow.trigger("ingestion")
    assert airflow.wait_for_run("ingestion", run_id) == "success", airflow.explain("ingestion", run_id)
    assert warehouse_counts(demo_stack) == before


def test_a_run_given_one_source_extracts_only_that_one(demo_stack: dict[str, str]) -> None:
    airflow = AirflowAPI(demo_stack)
    run_id = airflow.trigger("ingestion", {"sources": ["tasks/ingestion/demo_catalog.csv"]})
    assert airflow.wait_for_run("ingestion", run_id) == "success", airflow.explain("ingestion", run_id)
    instances = airflow.request("GET", f"/api/v2/dags/ingestion/dagRuns/{run_id}/taskInstances")["task_instances"]
    assert sorted(ti["map_index"] for ti in instances if ti["task_id"] == "extract") == [0]
    assert "demo_catalog.csv" in airflow.task_log("ingestion", run_id, "extract", map_index=0)


def test_failing_script_fails_the_task_with_its_stderr(demo_stack: dict[str, str]) -> None:
    airflow = AirflowAPI(demo_stack)
    run_id = airflow.trigger("vpe_test_fail")
    assert airflow.wait_for_run("vpe_test_fail", run_id) == "failed"
    assert airflow.task_state("vpe_test_fail", run_id, "fail") == "failed"
    log = airflow.task_log("vpe_test_fail", run_id, "fail")
    assert "starting the doomed step" in log
    assert "exited with 3" in log
    assert "ValueError: the catalog has no rows" in log


def test_marking_a_running_task_failed_kills_the_remote_processes(demo_stack: dict[str, str]) -> None:
    airflow = AirflowAPI(demo_stack)
    run_id = airflow.trigger("vpe_test_sleep")
    pids_file = wait_for_file(Path(demo_stack["VPE_HOME"]) / "buffer", "vpe_test_sleep*/pids")
    pids = [int(pid) for pid in pids_file.read_text().split()]
    assert all(pid_alive(pid) for pid in pids)

    airflow.request("PATCH", f"/api/v2/dags/vpe_test_sleep/dagRuns/{run_id}/taskInstances/sleep",
                    {"new_state": "failed"})
    marked = time.monotonic()

    while any(pid_alive(pid) for pid in pids) and time.monotonic() - marked < 5:
        time.sleep(0.1)
    assert [pid for pid in pids if pid_alive(pid)] == []


def wait_for_file(folder: Path, pattern: str, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [path for path in folder.glob(pattern) if path.stat().st_size]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no {pattern} under {folder} after {timeout}s")


OPERATOR_PROBE = '''
from types import SimpleNamespace
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from vpe import ExecutorOperator

operator = ExecutorOperator(task_id="step", env={env!r}, script="vpe_test/fail.py")
ti = SimpleNamespace(dag_id="probe", run_id="manual__2026-01-01T00:00:00+00:00", task_id="step", try_number=1)
try:
    operator.execute({{"ti": ti}})
except AirflowFailException as err:
    print("final:", err)
except AirflowException as err:
    print("retryable:", err)
'''


def run_operator(env_name: str, port: str, token: str = "") -> str:
    """ExecutorOperator.execute outside a DAG run, against whatever listens on `port`."""
    conn = {"conn_type": "grpc", "host": "127.0.0.1", "port": int(port), "password": token,
            "extra": {"auth_type": "NO_AUTH"}}
    env = {**os.environ, "AIRFLOW_CONN_GRPC_DEFAULT": json.dumps(conn)}
    result = subprocess.run([sys.executable, "-c", OPERATOR_PROBE.format(env=env_name)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_unreachable_executor_is_a_retryable_error() -> None:
    outcome = run_operator("ingestion", str(free_port()))
    assert outcome.startswith("retryable: executor unreachable through connection 'grpc_default'")


def test_refused_request_fails_without_retry(demo_stack: dict[str, str]) -> None:
    token = read_secrets(Path(demo_stack["VPE_HOME"]))["VPE_EXECUTOR_TOKEN"]
    outcome = run_operator("no_such_env", demo_stack["VPE_EXECUTOR_PORT"], token)
    assert outcome.startswith("final: the executor refused vpe_test/fail.py in env 'no_such_env': NOT_FOUND")
