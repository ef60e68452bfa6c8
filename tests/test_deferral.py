"""Deferrable ExecutorOperator runs on the real scheduler complete in their first try, whatever their duration.

Airflow 3.3.2 fails a deferred task whose trigger fires before the scheduler has handled the worker's
defer-exit event (README, "Deferrable runs and Airflow's defer race"). The race needs many runs that end
just after deferring while the scheduler is busy: one DAG run maps RUNS_AT_ONCE runs that end as soon as they
start, all queued together, and RUNS_AFTER_DEFERRAL runs that end 0-2 s after the operator hands them to the
triggerer. Every task instance must succeed in try 1 (retries=0: a retry cannot hide a failure). Under the
LocalExecutor and again under the CeleryExecutor, whose executor events reach the scheduler later.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from conftest import AirflowAPI, offline_demo_stack

DEFER_AFTER = 2.0  # the test DAG's defer_after: runs longer than this move to the triggerer
RUNS_AT_ONCE = 30
RUNS_AFTER_DEFERRAL = 17  # ending DEFER_AFTER + 0.0, 0.125, ... 2.0 s after they started
SECONDS = [0.0] * RUNS_AT_ONCE + [DEFER_AFTER + i / 8 for i in range(RUNS_AFTER_DEFERRAL)]

TEST_DAG = f'''
from datetime import timedelta

import pendulum
from airflow.sdk import dag
from vpe import ExecutorOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def vpe_test_deferral():
    ExecutorOperator.partial(task_id="sleep", env="ingestion", script="vpe_test/sleep_for.py", retries=0,
                             deferrable=True, defer_after=timedelta(seconds={DEFER_AFTER})).expand(
        args=[[str(seconds)] for seconds in {SECONDS!r}])


vpe_test_deferral()
'''

SLEEP_FOR = '''
import sys, time
time.sleep(float(sys.argv[1]))
print("slept", sys.argv[1])
'''


@pytest.fixture(scope="module", params=[
    "LocalExecutor",
    pytest.param("CeleryExecutor", marks=pytest.mark.skipif(shutil.which("redis-server") is None,
                                                            reason="needs Redis: apt-get install redis-server")),
])
def deferral_stack(stack_home: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield from offline_demo_stack(stack_home, f"deferral-{request.param}",
                                  {"dags/vpe_test_deferral.py": TEST_DAG, "tasks/vpe_test/sleep_for.py": SLEEP_FOR},
                                  {"VPE_AIRFLOW_EXECUTOR": request.param})


def test_deferrable_runs_ending_at_once_or_just_after_deferring_all_succeed_in_their_first_try(
        deferral_stack: dict[str, str]) -> None:
    airflow = AirflowAPI(deferral_stack)
    run_id = airflow.trigger("vpe_test_deferral")
    airflow.wait_for_run("vpe_test_deferral", run_id, timeout=900)

    instances = airflow.request("GET", f"/api/v2/dags/vpe_test_deferral/dagRuns/{run_id}/taskInstances"
                                       "?limit=100")["task_instances"]
    outcome = sorted((ti["map_index"], ti["state"], ti["try_number"]) for ti in instances)
    failed = [(index, state, tries) for index, state, tries in outcome if (state, tries) != ("success", 1)]
    assert len(outcome) == len(SECONDS)
    assert failed == [], f"{len(failed)} of {len(SECONDS)} not (success, try 1): {failed}\n" + "\n".join(
        airflow.task_log("vpe_test_deferral", run_id, "sleep", 1, index)[-1500:] for index, _, _ in failed[:2])

    # The runs that outlast defer_after did free their worker slot: the triggerer followed them.
    for index in range(RUNS_AT_ONCE, len(SECONDS)):
        log = airflow.task_log("vpe_test_deferral", run_id, "sleep", 1, index)
        assert "freeing this worker slot" in log, log[-1500:]
        assert "following run" in log, log[-1500:]
