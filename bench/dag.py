"""End-to-end wall time of the `ingestion` DAG, split into time inside the remote
runs and everything else (scheduling, dispatch, Airflow's task start-up).

Brings up a throwaway offline-demo stack (local Open-Meteo stand-in, own
VPE_HOME and ports) with bootstrap.sh, triggers the DAG --runs times on one
catalog, and reads each task's executor-side duration from XCom. "Remote" is
the critical path: the slowest extract (one per source), then crawl, then load. The first run
crawls (the stand-in answers with --latency-ms); later runs hit the crawl cache.
Goal: everything else <= 5 s per DAG run.

Run with the test venv:  .vpe/venv/bin/python bench/dag.py [--catalog ../shared/data/glc_sample]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import AirflowAPI, bootstrap, free_port, stack_config, stack_parent, wait_for_envs  # noqa: E402


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def remote_seconds(airflow: AirflowAPI, run_id: str, extracts: int) -> dict[str, float]:
    """Each step's executor-side duration; `extract` is the slowest of its mapped instances."""
    base = f"/api/v2/dags/ingestion/dagRuns/{run_id}/taskInstances"

    def duration(task: str, map_index: int = -1) -> float:
        entry = airflow.request("GET", f"{base}/{task}/xcomEntries/return_value?map_index={map_index}")
        return entry["value"]["duration_seconds"]

    return {"extract": max(duration("extract", index) for index in range(extracts)),
            "crawl": duration("crawl"), "load": duration("load")}


def measure(airflow: AirflowAPI, conf: dict[str, list[str]]) -> tuple[float, float]:
    run_id = airflow.trigger("ingestion", conf)
    state = airflow.wait_for_run("ingestion", run_id, timeout=3600)
    if state != "success":
        raise SystemExit(f"ingestion run {run_id} ended {state}: see the stack's logs")
    run = airflow.request("GET", f"/api/v2/dags/ingestion/dagRuns/{run_id}")
    remote = remote_seconds(airflow, run_id, len(conf["sources"]))
    return seconds(run["start_date"], run["end_date"]), sum(remote.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", default=str(ROOT / "tasks/ingestion/demo_catalog"),
                        help="catalog path without extension; .csv and .xlsx must both exist (default: the demo)")
    parser.add_argument("--runs", type=int, default=3, help="DAG runs to time (default: 3)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    args = parser.parse_args()
    catalog = Path(args.catalog).resolve()
    conf = {"sources": [f"{catalog}.csv", f"{catalog}.xlsx"]}

    home = stack_parent("vpe-bench-")
    env = stack_config(home / "vpe")
    env["VPE_OPEN_METEO_PORT"] = str(free_port())
    env["VPE_ARCGIS_PORT"] = str(free_port())
    print(f"bringing up an offline-demo stack in {home}", flush=True)
    bootstrap("--offline-demo", "up", env=env)
    try:
        wait_for_envs(env)
        airflow = AirflowAPI(env)
        rows = []
        for i in range(args.runs):
            wall, remote = measure(airflow, conf)
            rows.append((wall, remote))
            print(f"run {i + 1}: wall {wall:.1f}s, remote {remote:.1f}s, else {wall - remote:.1f}s", flush=True)
    finally:
        if not args.keep:
            bootstrap("down", env=env, check=False)

    print(f"\ncatalog {catalog.name}, {args.runs} DAG runs (run 1 crawls, later runs hit the cache)")
    print(f"{'run':<6} {'wall s':>8} {'remote s':>9} {'else s':>8}")
    for i, (wall, remote) in enumerate(rows, 1):
        print(f"{i:<6} {wall:>8.1f} {remote:>9.1f} {wall - remote:>8.1f}")
    overhead = [wall - remote for wall, remote in rows]
    print(f"median everything-else per DAG run: {statistics.median(overhead):.1f}s (goal <= 5 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
