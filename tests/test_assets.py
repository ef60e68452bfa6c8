"""The warehouse assets across a mode switch: a plain start registers the DAGs, the same VPE_HOME then comes
up in offline-demo mode (another warehouse database), and the monitor's first run must succeed in its first
try, record asset events that name the demo database and say what the load changed, and run a DAG scheduled
on one of those assets (README, "Assets")."""
from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

from conftest import AirflowAPI, bootstrap, repo_copy_stack_config, wait_for_envs

DOWNSTREAM_DAG = '''
import pendulum
from airflow.sdk import Asset, dag, task


@dag(schedule=[Asset.ref(name="warehouse.landslide_event")], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False)
def vpe_test_downstream():
    @task
    def report(triggering_asset_events=None):
        for asset, events in triggering_asset_events.items():
            print("downstream of", asset, [event.extra for event in events])

    report()


vpe_test_downstream()
'''
MONITOR = "landslide_monitor"


def dag_runs(airflow: AirflowAPI, dag_id: str) -> list[dict]:
    return airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]


def first_run(airflow: AirflowAPI, dag_id: str, timeout: float = 300) -> str:
    """The run id of the DAG's first run (scheduled by Airflow, not triggered by the test)."""
    deadline = time.monotonic() + timeout
    while not (runs := dag_runs(airflow, dag_id)):
        assert time.monotonic() < deadline, f"{dag_id} has no run after {timeout}s"
        time.sleep(2)
    return runs[0]["dag_run_id"]


def test_after_a_switch_to_the_offline_demo_the_monitor_loads_and_its_asset_events_name_the_demo_database(
        stack_home: Path) -> None:
    env = repo_copy_stack_config(stack_home, "assets", {"dags/vpe_test_downstream.py": DOWNSTREAM_DAG})
    try:
        bootstrap("up", env=env)
        AirflowAPI(env).wait_for_dag(MONITOR)  # the plain mode's parse registered the monitor's assets
        bootstrap("down", env=env)
        bootstrap("--offline-demo", "up", env=env)
        wait_for_envs(env)
        airflow = AirflowAPI(env)
        airflow.wait_for_dag(MONITOR)
        airflow.request("PATCH", f"/api/v2/dags/{MONITOR}", {"is_paused": False})
        run_id = first_run(airflow, MONITOR)
        assert airflow.wait_for_run(MONITOR, run_id, timeout=600) == "success", airflow.explain(MONITOR, run_id)

        instances = airflow.request("GET", f"/api/v2/dags/{MONITOR}/dagRuns/{run_id}/taskInstances")
        assert {(ti["task_id"], ti["try_number"]) for ti in instances["task_instances"]} == {
            ("extract", 1), ("crawl", 1), ("load", 1)}
        query = urllib.parse.urlencode({"source_dag_id": MONITOR, "source_run_id": run_id})
        events = airflow.request("GET", f"/api/v2/assets/events?{query}")
        extras = {event["uri"]: event["extra"] for event in events["asset_events"]}
        assert len(extras) == 4, events
        for extra in extras.values():
            assert extra["database"] == "warehouse_demo", extras
            assert extra["changed"] is True and extra["events_added"] > 0, extras
            assert {"events_updated", "hours_added", "windows_pending"} <= set(extra), extras

        downstream = first_run(airflow, "vpe_test_downstream")
        assert airflow.wait_for_run("vpe_test_downstream", downstream) == "success", \
            airflow.explain("vpe_test_downstream", downstream)
    finally:
        bootstrap("down", env=env, check=False)
