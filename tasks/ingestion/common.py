"""What the three ingestion steps share: the workspace and its files, logging, progress, failure."""
from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    import psycopg

HOURLY_VARIABLES = (
    "temperature_2m", "relative_humidity_2m", "precipitation", "rain",
    "soil_temperature_0_to_7cm", "soil_temperature_7_to_28cm",
    "soil_temperature_28_to_100cm", "soil_temperature_100_to_255cm",
    "soil_moisture_0_to_7cm", "soil_moisture_7_to_28cm",
    "soil_moisture_28_to_100cm", "soil_moisture_100_to_255cm",
)
# Files in the workspace (the folder of one DAG run); the CSV headers are the staging tables' columns (minus run_id).
# Each extract writes its own three, named by its --name, so extracts of several catalogs can share one workspace.
EVENTS = "events-{name}.csv"
WINDOWS = "windows-{name}.csv"
REJECTS = "rejects-{name}.jsonl"
EXTRACT_NAME = re.compile(r"[A-Za-z0-9_-]+")
HOURLY = "hourly.csv"
FAILED_WINDOWS = "failed_windows.csv"
PENDING_WINDOWS = "pending_windows.csv"
CRAWL_SUMMARY = "crawl_summary.json"
EVENT_COLUMNS = ("source", "row_number", "catalog_id", "event_date", "event_time", "time_text", "last_edited",
                 "title", "country", "country_code", "admin_division", "near", "continent_code",
                 "location_accuracy", "hazard_type", "landslide_category", "landslide_trigger", "landslide_size",
                 "landslide_setting", "fatalities", "injuries", "source_link", "latitude", "longitude", "elevation")
WINDOW_COLUMNS = ("catalog_id", "is_event", "latitude", "longitude", "window_date")
HOURLY_COLUMNS = ("catalog_id", "is_event", "latitude", "longitude", "elevation", "window_date", "observed_at",
                  "timezone", *HOURLY_VARIABLES)
FAILED_COLUMNS = (*WINDOW_COLUMNS, "reason")

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("ingestion")


class StepFailed(Exception):
    """A failure with a one-line reason that tells the user what to do next."""

    def __init__(self, reason: str, exit_code: int = 1) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


def buffer_dir() -> Path:
    if os.environ.get("VPE_BUFFER"):
        return Path(os.environ["VPE_BUFFER"])
    return Path(os.environ.get("VPE_HOME") or REPO / ".vpe") / "buffer"


def add_run_arguments(parser: argparse.ArgumentParser, with_run_id: bool = False) -> None:
    parser.add_argument("--workspace", type=Path, default=os.environ.get("VPE_WORKSPACE") or None,
                        help="the workspace folder (default: $VPE_WORKSPACE; by hand: extract makes "
                             "<buffer>/manual-<timestamp>, the later steps take the newest one)")
    if with_run_id:
        parser.add_argument("--run-id", default=os.environ.get("VPE_RUN_ID") or None,
                            help="run id (default: $VPE_RUN_ID, else the workspace's name)")


def extract_files(folder: Path, template: str) -> dict[str, Path]:
    """Every extract's file of one kind (EVENTS, WINDOWS or REJECTS) in the workspace, by extract name, sorted."""
    prefix, suffix = template.split("{name}")
    return {path.name[len(prefix):-len(suffix)]: path for path in sorted(folder.glob(f"{prefix}*{suffix}"))}


def workspace(args: argparse.Namespace, create: bool, needs: str) -> tuple[Path, str]:
    """The workspace and run id; `needs` is a glob pattern some file of the folder must match.
    By hand, extract starts a new folder and the later steps take the newest."""
    folder = args.workspace
    if folder is None and create:
        folder = buffer_dir() / f"manual-{datetime.now():%Y%m%d-%H%M%S}"
    elif folder is None:
        candidates = sorted(buffer_dir().glob(f"manual-*/{needs}"))
        if not candidates:
            raise StepFailed(f"no workspace with {needs} under {buffer_dir()}: run extract first or pass --workspace")
        folder = candidates[-1].parent
    folder = Path(folder)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not any(folder.glob(needs)):
        raise StepFailed(f"{folder} has no {needs}: run the previous step for this workspace first")
    run_id = getattr(args, "run_id", None) or os.environ.get("VPE_RUN_ID") or folder.name
    log.info("workspace %s (run id %s)", folder, run_id)
    return folder, run_id


@contextmanager
def atomic_write(path: Path, binary: bool = False) -> Iterator[IO]:
    """All or nothing: a half-written file never carries the final name, and a failed write leaves none."""
    partial = path.with_name(path.name + ".partial")
    try:
        with (partial.open("wb") if binary else partial.open("w", newline="", encoding="utf-8")) as handle:
            yield handle
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> int:
    count = 0
    with atomic_write(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


class Progress:
    """Logs 'label n/N (p%), rate/s, ETA' at most every `every` seconds and at the end."""

    def __init__(self, label: str, total: int, every: float = 5.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.started = self.last = time.monotonic()
        self.done = 0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%s %d/%d (%.0f%%), %.1f/s, ETA %.0fs", self.label, self.done, self.total,
                     100 * self.done / max(self.total, 1), rate, eta)


def warehouse_dsn(what: str) -> str:
    """$VPE_WAREHOUSE_DSN, which `what` (a step's option) needs."""
    dsn = os.environ.get("VPE_WAREHOUSE_DSN", "")
    if not dsn:
        raise StepFailed(f"{what} needs the warehouse: set VPE_WAREHOUSE_DSN (./bootstrap.sh exports it)")
    return dsn


def connect_warehouse(dsn: str) -> psycopg.Connection:
    import psycopg  # only the steps that talk to the warehouse need it

    try:
        return psycopg.connect(dsn, connect_timeout=10)
    except psycopg.OperationalError as error:
        reason = str(error).strip().splitlines()[0]
        raise StepFailed(f"cannot connect to the warehouse ({reason}): is it up? (./bootstrap.sh status)") from None


def query_warehouse(dsn: str, what: str, sql: str, *params: object) -> list[tuple]:
    """The rows of one read-only query for `what`; a warehouse error is a failed step with the reason."""
    import psycopg

    try:
        with connect_warehouse(dsn) as connection:
            return connection.execute(sql, params).fetchall()
    except psycopg.Error as error:
        raise StepFailed(f"could not read {what} from the warehouse ({' '.join(str(error).split())}): is its "
                         f"schema up to date? (./bootstrap.sh migrate)") from None


def run_step(name: str, main: Callable[[], int]) -> None:
    """Runs a step's main: logs to stdout, turns StepFailed into one line on stderr and its exit code."""
    # Under the executor (which sets VPE_RUN_ID) every line is stamped already, by it and by Airflow's log.
    stamp = "" if os.environ.get("VPE_RUN_ID") else "%(asctime)s "
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format=f"{stamp}{name}: %(message)s", datefmt="%H:%M:%S")
    try:
        code = main()
    except StepFailed as failure:
        print(f"{name}: error: {failure}", file=sys.stderr, flush=True)
        code = failure.exit_code
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun the same command to continue", file=sys.stderr, flush=True)
        code = 130
    sys.exit(code)
