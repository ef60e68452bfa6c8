#!/usr/bin/env python3
"""load: the run's events, hourly weather and rejects into the warehouse, in one transaction.

COPYs events.csv and hourly.csv into staging, records extract's rejects in
rejected_rows, then calls the warehouse's set-based merge load_staging(run_id)
and prints what it inserted, found already present, and rejected. All or
nothing: any error rolls everything back. Loading the same run again adds nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import psycopg
from psycopg.types.json import Jsonb

from common import (CRAWL_SUMMARY, EVENT_COLUMNS, EVENTS, FAILED_WINDOWS, HOURLY, HOURLY_COLUMNS, REJECTS, Progress,
                    StepFailed, add_run_arguments, log, run_folder, run_step)


def csv_rows(path: Path, columns: Sequence[str]) -> Iterator[list[str | None]]:
    """The file's rows with blanks as NULL; its header must be exactly `columns`."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = tuple(next(reader, ()))
        if header != tuple(columns):
            raise StepFailed(f"{path} has columns {list(header)}, expected {list(columns)}: rerun the step that wrote it")
        for row in reader:
            yield [value if value != "" else None for value in row]


def count_rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as handle:
        return max(0, sum(1 for _ in csv.reader(handle)) - 1)


def copy_into(cursor: psycopg.Cursor, table: str, path: Path, columns: Sequence[str], run_id: str) -> int:
    progress = Progress(f"{table} rows staged", count_rows(path))
    names = ", ".join(("run_id", *columns))
    with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for row in csv_rows(path, columns):
            copy.write_row((run_id, *row))
            progress.advance()
    return progress.done


def record_rejects(cursor: psycopg.Cursor, path: Path, run_id: str) -> tuple[int, int]:
    """Extract's rejects into rejected_rows; returns (rejects in the file, newly recorded)."""
    total = new = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            reject = json.loads(line)
            cursor.execute(
                "INSERT INTO rejected_rows (source, row_key, raw, reason, run_id) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (reject["source"], reject["row_key"], Jsonb(reject["raw"]), reject["reason"], run_id))
            total += 1
            new += cursor.rowcount
    return total, new


def load(dsn: str, folder: Path, run_id: str) -> list[tuple]:
    try:
        connection = psycopg.connect(dsn, connect_timeout=10)
    except psycopg.OperationalError as error:
        reason = str(error).strip().splitlines()[0]
        raise StepFailed(f"cannot connect to the warehouse ({reason}): is it up? (./bootstrap.sh status)") from None
    try:
        with connection, connection.cursor() as cursor:
            return stage_and_merge(cursor, folder, run_id)
    except psycopg.Error as error:
        reason = " ".join(str(error).split())
        raise StepFailed(f"warehouse load failed, nothing committed: {type(error).__name__}: {reason}") from None


def stage_and_merge(cursor: psycopg.Cursor, folder: Path, run_id: str) -> list[Sequence]:
    # A leftover of this run (a crash between COPY and merge) must not be merged twice.
    cursor.execute("DELETE FROM staging.landslide_event WHERE run_id = %s", (run_id,))
    cursor.execute("DELETE FROM staging.weather_hourly WHERE run_id = %s", (run_id,))
    events = copy_into(cursor, "staging.landslide_event", folder / EVENTS, EVENT_COLUMNS, run_id)
    hourly = copy_into(cursor, "staging.weather_hourly", folder / HOURLY, HOURLY_COLUMNS, run_id)
    rejects, new_rejects = record_rejects(cursor, folder / REJECTS, run_id)
    log.info("staged %d events and %d hourly rows (%d windows); extract's %d rejects: %d newly recorded",
             events, hourly, hourly // 24, rejects, new_rejects)
    cursor.execute("SELECT * FROM load_staging(%s)", (run_id,))
    columns = [column.name for column in cursor.description]
    return [columns, *cursor.fetchall()]


def print_table(rows: list[Sequence]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        log.info("  %s", "  ".join(str(value).rjust(width) for value, width in zip(row, widths)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default=os.environ.get("VPE_WAREHOUSE_DSN"),
                        help="warehouse connection string (default: $VPE_WAREHOUSE_DSN)")
    parser.add_argument("--allow-synthetic", action="store_true",
                        default=os.environ.get("VPE_ALLOW_SYNTHETIC_WEATHER") == "1",
                        help="load weather that came from the local synthetic server (offline demos only; "
                             "default: $VPE_ALLOW_SYNTHETIC_WEATHER=1)")
    add_run_arguments(parser, with_run_id=True)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not args.dsn:
        raise StepFailed("no warehouse DSN: set VPE_WAREHOUSE_DSN (./bootstrap.sh exports it) or pass --dsn")
    folder, run_id = run_folder(args, create=False, needs=HOURLY)
    for name in (EVENTS, REJECTS):
        if not (folder / name).is_file():
            raise StepFailed(f"{folder / name} does not exist: run extract and crawl for this run folder first")
    summary_path = folder / CRAWL_SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if summary.get("stopped"):
        log.warning("crawl stopped early (%s): loading what it fetched; crawl and load again to add the rest",
                    summary["stopped"])
    if summary.get("synthetic"):
        if not args.allow_synthetic:
            raise StepFailed(f"the weather of this run is SYNTHETIC (from {summary.get('url')}) and would stay in the "
                             f"warehouse for good (an hour stored first is kept): crawl against the real API, or "
                             f"for a demo pass --allow-synthetic (or set VPE_ALLOW_SYNTHETIC_WEATHER=1)")
        log.warning("*** loading SYNTHETIC weather values (from %s), not observations ***", summary.get("url"))
    failed = count_rows(folder / FAILED_WINDOWS) if (folder / FAILED_WINDOWS).is_file() else 0
    if failed:
        log.info("%d windows have no weather (crawl could not fetch them; see %s)", failed, FAILED_WINDOWS)
    rows = load(args.dsn, folder, run_id)
    log.info("load_staging(%r), committed:", run_id)
    print_table(rows)
    return 0


if __name__ == "__main__":
    run_step("load", main)
