#!/usr/bin/env python3
"""load: the run's events, hourly weather and rejects into the warehouse, in one transaction.

COPYs every extract's events-*.csv, crawl's hourly.csv and (if there is one)
pending_windows.csv into staging, records the extracts' rejects-*.jsonl in
rejected_rows, then calls the warehouse's set-based merge load_staging(run_id)
and prints what it inserted, updated (a newer version of a report), found
already present, and rejected. An event row identical to one of an earlier extract's file
(the same catalog as CSV and XLSX) is staged once; the printed summary shows that
every event row is accounted for; its last line ("vpe-outlet-extra: {json}") says what the load changed, in
which database, for the Airflow asset events of its task. All or nothing: any error rolls everything back.
Loading the same run again adds nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import psycopg
import psycopg.conninfo
from psycopg.types.json import Jsonb

from common import (CRAWL_SUMMARY, EVENT_COLUMNS, EVENTS, FAILED_WINDOWS, HOURLY, HOURLY_COLUMNS, PENDING_WINDOWS,
                    REJECTS, WINDOW_COLUMNS, Progress, StepFailed, add_run_arguments, connect_warehouse, extract_files,
                    log, query_warehouse, run_step, workspace)

STAGING_TABLES = ("staging.landslide_event", "staging.weather_hourly", "staging.pending_window")
# What makes two extracts' rows the same event: everything but where it was read from.
EVENT_CONTENT = [i for i, name in enumerate(EVENT_COLUMNS) if name not in ("source", "row_number")]


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


def distinct_events(paths: list[Path]) -> tuple[list[list[str | None]], int]:
    """The rows of all events files; a row identical to an earlier file's row is left out.
    Returns (rows to stage, rows left out)."""
    rows: list[list[str | None]] = []
    seen: set[tuple] = set()
    copies = 0
    for path in paths:
        for row in csv_rows(path, EVENT_COLUMNS):
            content = tuple(row[i] for i in EVENT_CONTENT)
            if content in seen:
                copies += 1
            else:
                seen.add(content)
                rows.append(row)
    return rows, copies


def copy_into(cursor: psycopg.Cursor, table: str, columns: Sequence[str], rows: Iterable[Sequence[str | None]],
              total: int, run_id: str) -> int:
    progress = Progress(f"{table} rows staged", total)
    names = ", ".join(("run_id", *columns))
    with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row((run_id, *row))
            progress.advance()
    return progress.done


def record_rejects(cursor: psycopg.Cursor, paths: list[Path], run_id: str) -> tuple[int, int]:
    """The extracts' rejects into rejected_rows; returns (rejects in the files, newly recorded)."""
    total = new = 0
    for path in paths:
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


def load(dsn: str, folder: Path, run_id: str) -> list[Sequence]:
    connection = connect_warehouse(dsn)
    try:
        with connection, connection.cursor() as cursor:
            return stage_and_merge(cursor, folder, run_id)
    except psycopg.Error as error:
        reason = " ".join(str(error).split())
        raise StepFailed(f"warehouse load failed, nothing committed: {type(error).__name__}: {reason}") from None


def stage_and_merge(cursor: psycopg.Cursor, folder: Path, run_id: str) -> list[Sequence]:
    # A leftover of this run (a crash between COPY and merge) must not be merged twice.
    for table in STAGING_TABLES:
        cursor.execute(f"DELETE FROM {table} WHERE run_id = %s", (run_id,))
    event_files = list(extract_files(folder, EVENTS).values())
    event_rows, copies = distinct_events(event_files)
    events = copy_into(cursor, "staging.landslide_event", EVENT_COLUMNS, event_rows, len(event_rows), run_id)
    hourly = copy_into(cursor, "staging.weather_hourly", HOURLY_COLUMNS, csv_rows(folder / HOURLY, HOURLY_COLUMNS),
                       count_rows(folder / HOURLY), run_id)
    pending_path = folder / PENDING_WINDOWS
    pending = copy_into(cursor, "staging.pending_window", WINDOW_COLUMNS, csv_rows(pending_path, WINDOW_COLUMNS),
                        count_rows(pending_path), run_id) if pending_path.is_file() else 0
    rejects, new_rejects = record_rejects(cursor, list(extract_files(folder, REJECTS).values()), run_id)
    log.info("staged %d events, %d hourly rows (%d windows) and %d pending windows; the extracts' %d rejects: "
             "%d newly recorded", events, hourly, hourly // 24, pending, rejects, new_rejects)
    cursor.execute("SELECT * FROM load_staging(%s)", (run_id,))
    columns = [column.name for column in cursor.description]
    table = [columns, *cursor.fetchall()]
    log_event_accounting(event_files, events, copies, table)
    return table


def log_event_accounting(files: list[Path], staged: int, copies: int, table: list[Sequence]) -> None:
    """Every event row of every extract is a copy left out, loaded new, updated, already present or rejected."""
    _, inserted, updated, present, rejected = next(row for row in table if row[0] == "landslide_event")
    total = staged + copies
    verdict = ("add up" if copies + inserted + updated + present + rejected == total
               else "DO NOT ADD UP (a bug: report it)")
    log.info("event rows: %d in %s = %d copies of an earlier file's row (the same event from another source, "
             "staged once) + %d loaded new + %d updated (a newer version of the report; the previous one is in "
             "landslide_event_history) + %d already present + %d rejected: the counts %s",
             total, ", ".join(path.name for path in files), copies, inserted, updated, present, rejected, verdict)


def check_extracts_complete(folder: Path) -> None:
    """Each extract writes its events file first and its rejects file last: both or it did not finish."""
    names = {kind: set(extract_files(folder, kind)) for kind in (EVENTS, REJECTS)}
    if not names[EVENTS]:
        raise StepFailed(f"{folder} has no {EVENTS.format(name='*')}: run extract and crawl for this workspace first")
    unfinished = names[EVENTS] ^ names[REJECTS]
    if unfinished:
        raise StepFailed(f"extract --name {', '.join(sorted(unfinished))} did not finish in {folder} (its events and "
                         f"rejects files must both be there): run that extract again, then crawl, then load")


def log_pending(dsn: str) -> int:
    """What waits for the archive now, this run's windows and earlier runs' alike; returns the windows."""
    windows, events, oldest = query_warehouse(dsn, "the pending windows", "SELECT count(*), count(DISTINCT "
                                              "landslide_event_id), min(window_date) FROM pending_window")[0]
    if windows:
        log.info("%d windows of %d events wait in the warehouse for the archive (table pending_window, oldest day "
                 "%s): a later crawl with --pending-from-warehouse fetches them", windows, events, oldest)
    else:
        log.info("no windows wait for the archive (table pending_window is empty)")
    return windows


def print_outlet_extra(dsn: str, rows: list[Sequence], pending: int, synthetic: bool) -> None:
    """What this load changed, for the extra of the asset events its Airflow task emits (the ExecutorOperator
    reads the line that starts with its OUTLET_EXTRA_MARK, "vpe-outlet-extra: "): a downstream DAG tells a
    demo load from a real one by the database, and a load that changed nothing by `changed`."""
    counts = {row[0]: row for row in rows[1:]}
    _, events_added, events_updated, _, _ = counts["landslide_event"]
    extra = {"database": psycopg.conninfo.conninfo_to_dict(dsn).get("dbname"), "synthetic_weather": synthetic,
             "changed": any(row[1] or row[2] for row in rows[1:]), "events_added": events_added,
             "events_updated": events_updated, "hours_added": counts["weather_hour"][1], "windows_pending": pending}
    print("vpe-outlet-extra: " + json.dumps(extra), flush=True)


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
    folder, run_id = workspace(args, create=False, needs=HOURLY)
    check_extracts_complete(folder)
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
    print_outlet_extra(args.dsn, rows, log_pending(args.dsn), bool(summary.get("synthetic")))
    return 0


if __name__ == "__main__":
    run_step("load", main)
