"""Soak: the offline demo's `ingestion` and `landslide_monitor` and a deferrable user DAG, many DAG runs mixed
and partly concurrent, on the real scheduler; counts what a daily unattended monitor must never see.

Brings up a throwaway offline-demo stack (own VPE_HOME and ports) with bootstrap.sh on a copy of dags/ and
tasks/ plus the user DAG, warms up (the monitor's first scheduled run, one crawling `ingestion` run), then
triggers waves of one `ingestion`, one `landslide_monitor` and three user-DAG runs at once (sleeping
0 s, DEFER_AFTER + 0.5 s and DEFER_AFTER + 3 s: the last two defer) until --runs DAG runs have ended.
Reports, per DAG: runs, failed runs, task instances whose first try failed, retries, and the median wall
time per DAG run (start to end); then the median wall of --solo cached `ingestion` runs one at a time (as
bench/dag.py times them). Goal: 0 / 0 / 0, and a cached `ingestion` run alone ≈ 4 s.

Run with the test venv:  .vpe/venv/bin/python bench/soak.py [--runs 50]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AirflowAPI, bootstrap, repo_copy_stack_config, stack_parent, wait_for_envs  # noqa: E402

DEFER_AFTER = 5
USER_DAG = f'''
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag
from vpe import ExecutorOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, max_active_runs=8,
     params={{"seconds": Param(0.0, type="number")}})
def vpe_soak_user():
    ExecutorOperator(task_id="sleep", env="ingestion", script="vpe_soak/sleep_for.py",
                     args=["{{{{ params.seconds }}}}"], deferrable=True, defer_after=timedelta(seconds={DEFER_AFTER}),
                     retries=2, retry_delay=timedelta(seconds=5))


vpe_soak_user()
'''
SLEEP_FOR = '''
import sys, time
time.sleep(float(sys.argv[1]))
print("slept", sys.argv[1])
'''
WAVE = [("ingestion", {}), ("landslide_monitor", {}),
        ("vpe_soak_user", {"seconds": 0}), ("vpe_soak_user", {"seconds": DEFER_AFTER + 0.5}),
        ("vpe_soak_user", {"seconds": DEFER_AFTER + 3})]


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def run_wave(airflow: AirflowAPI, wave: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    runs = [(dag_id, airflow.trigger(dag_id, conf)) for dag_id, conf in wave]
    for dag_id, run_id in runs:
        airflow.wait_for_run(dag_id, run_id, timeout=1800)
    return runs


def outcome(airflow: AirflowAPI, dag_id: str, run_id: str) -> dict:
    """A finished DAG run's state, wall time, first-try failures and retries."""
    run = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    tis = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")
    tries = [ti["try_number"] for ti in tis["task_instances"] if ti["try_number"]]
    first_try_failed = sum(1 for ti in tis["task_instances"]
                           if ti["try_number"] > 1 or (ti["try_number"] == 1 and ti["state"] != "success"))
    return {"dag_id": dag_id, "failed": run["state"] != "success", "wall": seconds(run["start_date"], run["end_date"]),
            "first_try_failed": first_try_failed, "retries": sum(t - 1 for t in tries)}


def warm_up(airflow: AirflowAPI) -> None:
    """The monitor's first (scheduled) run on unpausing, and one ingestion run that fills the crawl cache."""
    airflow.wait_for_dag("landslide_monitor")
    airflow.request("PATCH", "/api/v2/dags/landslide_monitor", {"is_paused": False})
    deadline = time.monotonic() + 300
    while not (runs := airflow.request("GET", "/api/v2/dags/landslide_monitor/dagRuns")["dag_runs"]):
        if time.monotonic() > deadline:
            raise SystemExit("landslide_monitor was not scheduled after unpausing")
        time.sleep(2)
    airflow.wait_for_run("landslide_monitor", runs[0]["dag_run_id"], timeout=1800)
    run_wave(airflow, [("ingestion", {})])


def report(results: list[dict]) -> None:
    print(f"\n{'DAG':<20} {'runs':>5} {'failed':>7} {'1st-try failed':>15} {'retries':>8} {'median wall s':>14}")
    for dag_id in sorted({r["dag_id"] for r in results}):
        rows = [r for r in results if r["dag_id"] == dag_id]
        print(f"{dag_id:<20} {len(rows):>5} {sum(r['failed'] for r in rows):>7} "
              f"{sum(r['first_try_failed'] for r in rows):>15} {sum(r['retries'] for r in rows):>8} "
              f"{statistics.median(r['wall'] for r in rows):>14.1f}")
    print(f"{'all':<20} {len(results):>5} {sum(r['failed'] for r in results):>7} "
          f"{sum(r['first_try_failed'] for r in results):>15} {sum(r['retries'] for r in results):>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="DAG runs to count, in waves of 5 (default: 50)")
    parser.add_argument("--solo", type=int, default=3, help="cached ingestion runs alone afterwards (default: 3)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args()

    home = stack_parent("vpe-soak-")
    env = repo_copy_stack_config(home, "soak", {"dags/vpe_soak_user.py": USER_DAG,
                                                "tasks/vpe_soak/sleep_for.py": SLEEP_FOR})
    print(f"bringing up an offline-demo stack in {home}", flush=True)
    bootstrap("--offline-demo", "up", env=env)
    results: list[dict] = []
    try:
        wait_for_envs(env)
        airflow = AirflowAPI(env)
        warm_up(airflow)
        while len(results) < args.runs:
            wave = WAVE[:args.runs - len(results)]
            results += [outcome(airflow, dag_id, run_id) for dag_id, run_id in run_wave(airflow, wave)]
            print(f"{len(results)} runs ended, {sum(r['failed'] for r in results)} failed", flush=True)
        solo = [outcome(airflow, *run) for _ in range(args.solo) for run in run_wave(airflow, [("ingestion", {})])]
    finally:
        if not args.keep:
            bootstrap("down", env=env, check=False)
    report(results)
    if solo:
        print(f"\ningestion alone, cached: {len(solo)} runs, {sum(r['failed'] for r in solo)} failed, median wall "
              f"{statistics.median(r['wall'] for r in solo):.1f} s (goal ≈ 4 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
