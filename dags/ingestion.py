"""
### ingestion: NASA Global Landslide Catalog + Open-Meteo weather → warehouse

Every step runs on the executor, inside the `ingestion` environment
(`envs/ingestion.yml`), as a script from `tasks/ingestion/`; its output streams
into the task's log. The steps of one DAG run share a workspace (a folder on
the executor), so each finds what the one before it wrote.

1. **extract** runs once per catalog source, in parallel (param `sources`: a
   list of paths relative to the repo, absolute paths on the executor's machine,
   http(s) URLs of CSV/XLSX files in either export format, ArcGIS layer URLs
   ending in /FeatureServer/<n>, or `live` for NASA's layer; the demo catalog as
   CSV and XLSX by default). Only the sources listed are read. Rows that cannot
   be used are kept with their reason.
2. **crawl** fetches hourly weather and soil data from the Open-Meteo archive for
   each event day and the same day one year earlier (the non-event sample),
   batched and cached in the warehouse (shared by every executor host), within
   the free tier's limits; days the archive does not
   serve yet are left pending.
3. **load** merges everything into the warehouse star schema in one transaction.

Re-running on the same catalog adds nothing. Query the result with
`./bootstrap.sh psql`.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from vpe import ExecutorOperator


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["vpe", "ingestion"],
    doc_md=__doc__,
    params={
        "sources": Param(["tasks/ingestion/demo_catalog.csv", "tasks/ingestion/demo_catalog.xlsx"], type="array",
                         items={"type": "string", "minLength": 1}, minItems=1,
                         description="Catalog sources, one extract each: repo-relative or absolute paths or URLs "
                                     "of CSV/XLSX exports, ArcGIS layer URLs (.../FeatureServer/0), or `live`"),
    },
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "execution_timeout": timedelta(hours=1),
    },
)
def ingestion() -> None:
    @task
    def extract_args(params: dict | None = None) -> list[list[str]]:
        """One extract per source; each names its files by the source's position in the list."""
        return [["--name", f"source-{index}", source] for index, source in enumerate(params["sources"])]

    extract = ExecutorOperator.partial(task_id="extract", env="ingestion", script="ingestion/extract.py").expand(
        args=extract_args())
    # A large catalog under the free tier's 10,000 calls a day can take hours: it waits in
    # the triggerer (deferrable), not in a worker slot.
    crawl = ExecutorOperator(task_id="crawl", env="ingestion", script="ingestion/crawl.py",
                             execution_timeout=timedelta(hours=12), deferrable=True)
    load = ExecutorOperator(task_id="load", env="ingestion", script="ingestion/load.py")

    extract >> crawl >> load


ingestion()
