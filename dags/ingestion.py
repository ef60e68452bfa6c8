"""
### ingestion: NASA Global Landslide Catalog + Open-Meteo weather → warehouse

Every step runs on the executor, inside the `ingestion` environment
(`envs/ingestion.yml`), as a script from `tasks/ingestion/`; its output streams
into the task's log. The steps of one DAG run share a working folder on the
executor, so each finds what the one before it wrote.

1. **extract_csv / extract_xlsx** (in parallel) read the catalog in both formats
   (params `csv_source`, `xlsx_source`: a path relative to the repo, an absolute
   path on the executor's machine, or an http(s) URL; the demo catalog by
   default). Rows that cannot be used are kept with their reason.
2. **crawl** fetches hourly weather and soil data from the Open-Meteo archive for
   each event day and the same day one year earlier (the non-event sample),
   batched and cached, within the free tier's limits.
3. **load** merges everything into the warehouse star schema in one transaction.

Re-running on the same catalog adds nothing. Query the result with
`./bootstrap.sh psql`.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag
from executor_operator import ExecutorOperator


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["vpe", "ingestion"],
    doc_md=__doc__,
    params={
        "csv_source": Param("tasks/ingestion/demo_catalog.csv", type="string",
                            description="Catalog as CSV: repo-relative path, absolute path or URL"),
        "xlsx_source": Param("tasks/ingestion/demo_catalog.xlsx", type="string",
                             description="Catalog as XLSX: repo-relative path, absolute path or URL"),
    },
    default_args={
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "execution_timeout": timedelta(hours=1),
    },
)
def ingestion() -> None:
    extract_csv = ExecutorOperator(task_id="extract_csv", env="ingestion", script="ingestion/extract.py",
                                   args=["--name", "csv", "{{ params.csv_source }}"])
    extract_xlsx = ExecutorOperator(task_id="extract_xlsx", env="ingestion", script="ingestion/extract.py",
                                    args=["--name", "xlsx", "{{ params.xlsx_source }}"])
    # A large catalog under the free tier's 10,000 calls a day can take hours: it waits in
    # the triggerer (deferrable), not in a worker slot.
    crawl = ExecutorOperator(task_id="crawl", env="ingestion", script="ingestion/crawl.py",
                             execution_timeout=timedelta(hours=12), deferrable=True)
    load = ExecutorOperator(task_id="load", env="ingestion", script="ingestion/load.py")

    [extract_csv, extract_xlsx] >> crawl >> load


ingestion()
