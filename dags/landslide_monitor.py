"""
### landslide_monitor: NASA's live landslide catalog, daily, into the warehouse

Each day it reads only what is new or edited in the live catalog (the ArcGIS
layer, `$VPE_GLC_LAYER_URL`) since the last successful load, crawls the weather
for it and loads it. Steps run on the executor in the `ingestion` environment,
like the `ingestion` DAG (which stays for one-off catalog files).

1. **extract** `live --since warehouse`: the warehouse keeps, per source, the
   newest edit it has loaded (`source_watermark()`); reports created or edited
   after it are read, every report when there is none yet.
2. **crawl** `--pending-from-warehouse`: the weather of those reports' windows,
   plus the windows still **pending** in the warehouse. The archive lags real
   time by some days: a window whose day it cannot serve yet waits as pending
   (not failed, not retried in a loop) and a later run fetches it.
3. **load** merges events (edits keep the older version in
   `landslide_event_history`), weather and pending windows, advances the
   watermark, and emits the Airflow assets of the tables it updates, so a DAG
   scheduled on them runs after each load; each event's extra says which
   database the load changed and what it changed (`changed`, `events_added`,
   `events_updated`, `hours_added`, `windows_pending`).

Starts paused: unpause it (UI toggle, or `./bootstrap.sh airflow dags unpause
landslide_monitor`) to start the daily runs; the first reads the whole catalog.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, dag
from vpe import ExecutorOperator

WAREHOUSE_TABLES = ("landslide_event", "weather_window", "weather_hour", "pending_window")


def warehouse_asset(table: str) -> Asset:
    """A warehouse table as an asset named and identified warehouse.<table>, whatever host, port or database
    the parsing machine is configured with: Airflow identifies an asset by name and URI together, so a URI
    built from settings made a second asset after every mode switch and refused the next run (README,
    "Assets"). Which database a load changed is in each asset event's extra."""
    return Asset(name=f"warehouse.{table}", uri=f"vpe-warehouse://public/{table}")


@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # The first run reads the whole catalog and crawls its weather for hours: the user starts it.
    is_paused_upon_creation=True,
    tags=["vpe", "ingestion", "monitor"],
    doc_md=__doc__,
    params={
        "archive_lag_days": Param(5, type="integer", minimum=0,
                                  description="Days the weather archive lags real time: windows of later days "
                                              "are pending without asking; 0 asks the archive about every day"),
    },
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=5),
        "execution_timeout": timedelta(hours=1),
    },
)
def landslide_monitor() -> None:
    extract = ExecutorOperator(task_id="extract", env="ingestion", script="ingestion/extract.py",
                               args=["live", "--name", "live", "--since", "warehouse"])
    # The first run crawls the whole catalog's weather under the free tier's daily limit: it waits in
    # the triggerer (deferrable), not in a worker slot.
    crawl = ExecutorOperator(task_id="crawl", env="ingestion", script="ingestion/crawl.py",
                             args=["--pending-from-warehouse", "--archive-lag-days",
                                   "{{ params.archive_lag_days }}"],
                             execution_timeout=timedelta(hours=12), deferrable=True)
    load = ExecutorOperator(task_id="load", env="ingestion", script="ingestion/load.py",
                            outlets=[warehouse_asset(table) for table in WAREHOUSE_TABLES])

    extract >> crawl >> load


landslide_monitor()
