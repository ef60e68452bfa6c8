#!/usr/bin/env python3
"""Benchmark: the set-based warehouse load (version 3) vs. the seed's per-row trigger load.

(a) COPY into staging + load_staging() (dml.sql) into version 3's weather_hour,
    one row per place-hour, one transaction.
(b) The baseline, exactly as the seed did it, on the seed's layout (version 2,
    tests/fixtures/warehouse_v2): one INSERT per row into a staging table whose
    AFTER INSERT trigger fans each row out to location, datetime, weather_data
    and four soil rows. Built as kindly as the approach allows: keyed tables, so
    its lookups are index probes, and prepared statements.
(c) The physical floor: the same rows COPYed into a table with no index,
    constraint or trigger.

All load the same generated data (hourly rows for an event day and its
non-event day, four soil depths each) into fresh databases on the same
PostgreSQL server, in the same run. (b) runs twice: all rows in one transaction
(the kindest case for it) and with a commit per row (what a naive loader does).
(b) is too slow for the full set, so it loads the first rows only and its rate
is extrapolated; the table says so.

Uses the server at VPE_WAREHOUSE_DSN (creates and drops its own scratch databases
there; needs a role that may create databases, e.g. the superuser's DSN) or,
without it, starts a throwaway cluster of its own.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from executor import free_port  # noqa: E402

SEED_SCHEMA = ROOT / "tests" / "fixtures" / "warehouse_v2"
HOURS_PER_WINDOW = 24
ZONE = "Asia/Kathmandu"

MEASUREMENTS = ("temperature_2m relative_humidity_2m precipitation rain "
                "soil_temperature_0_to_7cm soil_temperature_7_to_28cm soil_temperature_28_to_100cm "
                "soil_temperature_100_to_255cm soil_moisture_0_to_7cm soil_moisture_7_to_28cm "
                "soil_moisture_28_to_100cm soil_moisture_100_to_255cm").split()
# The seed's staging (version 2) names the catalog key event_id; today's names it catalog_id.
SEED_EVENT_COLUMNS = "run_id source row_number event_id event_date latitude longitude".split()
SEED_WEATHER_COLUMNS = ["run_id", "event_id", "is_event", "latitude", "longitude", "elevation", "window_date",
                        "observed_at", *MEASUREMENTS]


def todays_names(columns: list[str]) -> list[str]:
    return ["catalog_id" if name == "event_id" else name for name in columns]


EVENT_COLUMNS = todays_names(SEED_EVENT_COLUMNS)
WEATHER_COLUMNS = [*todays_names(SEED_WEATHER_COLUMNS), "timezone"]

# The seed's loading style: every inserted row fans out at once, row by row.
SEED_TRIGGER_SQL = """
CREATE UNLOGGED TABLE seed_weather_hourly (LIKE staging.weather_hourly);

CREATE FUNCTION seed_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_location bigint;
    v_datetime bigint;
    v_weather bigint;
BEGIN
    INSERT INTO location (latitude, longitude, elevation)
    VALUES (round(NEW.latitude::numeric, 6), round(NEW.longitude::numeric, 6), NEW.elevation)
    ON CONFLICT (latitude, longitude) DO NOTHING;
    SELECT location_id INTO v_location FROM location
    WHERE latitude = round(NEW.latitude::numeric, 6) AND longitude = round(NEW.longitude::numeric, 6);

    INSERT INTO datetime (instant) VALUES (NEW.observed_at) ON CONFLICT (instant) DO NOTHING;
    SELECT datetime_id INTO v_datetime FROM datetime WHERE instant = NEW.observed_at;

    INSERT INTO weather_data (location_id, datetime_id, temperature_2m, relative_humidity_2m, precipitation, rain)
    VALUES (v_location, v_datetime, NEW.temperature_2m, NEW.relative_humidity_2m, NEW.precipitation, NEW.rain)
    ON CONFLICT (location_id, datetime_id) DO NOTHING
    RETURNING weather_id INTO v_weather;

    IF v_weather IS NOT NULL THEN
        INSERT INTO soil (weather_id, depth_top_cm, depth_bottom_cm, temperature, moisture) VALUES
            (v_weather, 0, 7, NEW.soil_temperature_0_to_7cm, NEW.soil_moisture_0_to_7cm),
            (v_weather, 7, 28, NEW.soil_temperature_7_to_28cm, NEW.soil_moisture_7_to_28cm),
            (v_weather, 28, 100, NEW.soil_temperature_28_to_100cm, NEW.soil_moisture_28_to_100cm),
            (v_weather, 100, 255, NEW.soil_temperature_100_to_255cm, NEW.soil_moisture_100_to_255cm);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER seed_fan_out AFTER INSERT ON seed_weather_hourly
FOR EACH ROW EXECUTE FUNCTION seed_fan_out();
"""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def generate(rows: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """Catalog rows and hourly weather rows (SEED_WEATHER_COLUMNS): per event, its day and the same day a
    year earlier."""
    rng = random.Random(seed)
    events, weather = [], []
    n_events = max(1, rows // (2 * HOURS_PER_WINDOW))
    for n in range(n_events):
        catalog_id = str(n + 1)
        lat, lon = round(rng.uniform(-60, 70), 4), round(rng.uniform(-180, 180), 4)
        day = dt.date(2001, 1, 1) + dt.timedelta(days=rng.randrange(20 * 365))
        events.append(("bench", "bench.csv", n + 2, catalog_id, day, lat, lon))
        for is_event, window in ((True, day), (False, day.replace(year=day.year - 1, day=min(day.day, 28)))):
            start = dt.datetime.combine(window, dt.time(), dt.timezone.utc)
            for hour in range(HOURS_PER_WINDOW):
                temperature = round(rng.uniform(-10, 35), 1)
                weather.append((
                    "bench", catalog_id, is_event, lat, lon, 250.0, window, start + dt.timedelta(hours=hour),
                    temperature, float(rng.randrange(20, 101)), round(rng.uniform(0, 5), 1),
                    round(rng.uniform(0, 4), 1),
                    *(round(temperature - depth, 1) for depth in (0.5, 1.0, 1.5, 2.0)),
                    *(round(rng.uniform(0.1, 0.5), 3) for _ in range(4)),
                ))
    return events, weather[:rows]


def copy_rows(conn: psycopg.Connection, table: str, columns: list[str], rows: list[tuple]) -> None:
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def as_csv(rows: list[tuple]) -> bytes:
    """The rows as the CSV file tasks/ingestion/load.py would COPY (rendered before the clock starts)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(
        ["" if value is None else value.isoformat() if hasattr(value, "isoformat") else value for value in row]
        for row in rows)
    return out.getvalue().encode()


def copy_csv(conn: psycopg.Connection, table: str, columns: list[str], data: bytes) -> None:
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT csv)") as copy:
        for start in range(0, len(data), 1 << 20):
            copy.write(data[start:start + (1 << 20)])


def proc_stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields from the state on (index 1 is the parent pid, 11-14 utime, stime, cutime, cstime)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


class Clock:
    """Wall seconds, and the CPU seconds of the whole PostgreSQL server when it runs on this machine (its
    processes, parallel workers and background writers included; other sessions too, on a shared server).
    A busy machine stretches wall time, most of all the per-row round trips, far more than CPU time."""

    def __init__(self, conn: psycopg.Connection) -> None:
        try:
            self.postmaster = int(proc_stat(conn.info.backend_pid)[1])
        except OSError:
            self.postmaster = None
        self.wall, self.cpu = time.perf_counter(), self.server_cpu()

    def server_cpu(self) -> float | None:
        if self.postmaster is None:
            return None
        own = proc_stat(self.postmaster)
        ticks = sum(int(own[i]) for i in (11, 12, 13, 14))  # itself, and its children that have exited
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError):
                fields = proc_stat(stat.parent.name)
                if fields[1] == str(self.postmaster):
                    ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> tuple[float, float | None]:
        cpu = self.server_cpu()
        return time.perf_counter() - self.wall, (cpu - self.cpu if cpu is not None else None)


def load_set_based(dsn: str, events: list[tuple], weather: list[tuple]) -> tuple[float, float | None]:
    """(a): COPY both staging tables, merge, commit. Returns (wall, server CPU) seconds."""
    events_csv, weather_csv = as_csv(events), as_csv([(*row, ZONE) for row in weather])
    with psycopg.connect(dsn) as conn:
        clock = Clock(conn)
        copy_csv(conn, "staging.landslide_event", EVENT_COLUMNS, events_csv)
        copy_csv(conn, "staging.weather_hourly", WEATHER_COLUMNS, weather_csv)
        counts = conn.execute("SELECT * FROM load_staging('bench')").fetchall()
        conn.commit()
        elapsed = clock.stop()
    log("set-based counts (inserted, updated, already present, rejected): "
        + ", ".join(f"{t} {i}/{u}/{a}/{r}" for t, i, u, a, r in counts))
    return elapsed


def load_floor(dsn: str, weather: list[tuple]) -> tuple[float, float | None]:
    """(c): COPY into a table with no index, constraint or trigger, commit. Returns (wall, server CPU) seconds."""
    weather_csv = as_csv([(*row, ZONE) for row in weather])
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE floor (LIKE staging.weather_hourly)")
        conn.commit()
        clock = Clock(conn)
        copy_csv(conn, "floor", WEATHER_COLUMNS, weather_csv)
        conn.commit()
        return clock.stop()


def load_per_row(dsn: str, events: list[tuple], weather: list[tuple], commit_each_row: bool
                 ) -> tuple[float, float | None]:
    """(b): one INSERT per weather row through the fan-out trigger, on the seed's layout.
    Returns (wall, server CPU) seconds.

    The events go in first through the seed's load_staging (not timed): the seed
    had no event windows, so only the hourly rows are compared.
    """
    insert = (f"INSERT INTO seed_weather_hourly ({', '.join(SEED_WEATHER_COLUMNS)}) "
              f"VALUES ({', '.join(['%s'] * len(SEED_WEATHER_COLUMNS))})")
    with psycopg.connect(dsn) as conn:
        conn.execute(SEED_TRIGGER_SQL)
        copy_rows(conn, "staging.landslide_event", SEED_EVENT_COLUMNS, events)
        conn.execute("SELECT * FROM load_staging('bench')")
        conn.commit()
        conn.autocommit = commit_each_row
        cur = conn.cursor()
        clock = Clock(conn)
        for row in weather:
            cur.execute(insert, row)
        conn.commit()
        elapsed = clock.stop()
        soil = conn.execute("SELECT count(*) FROM soil").fetchone()[0]
    log(f"per-row load: {len(weather)} rows, {soil} soil rows")
    return elapsed


def server_settings(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return ", ".join(f"{name}={conn.execute(f'SHOW {name}').fetchone()[0]}" for name in
                         ("server_version", "shared_buffers", "fsync", "synchronous_commit", "max_wal_size"))


def apply_schema(dsn: str, folder: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("ddl.sql", "dml.sql"):
            conn.execute((folder / name).read_text())


@contextlib.contextmanager
def scratch_database(server_dsn: str, schema: Path = ROOT) -> Iterator[str]:
    """A new database with the ddl.sql and dml.sql of `schema` (version 3: the repo root) applied."""
    name = f"vpe_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        try:
            conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.errors.InsufficientPrivilege:
            sys.exit(f"bench: {conn.info.user} may not create databases: unset VPE_WAREHOUSE_DSN (a throwaway "
                     f"cluster is started) or set it to the superuser's DSN")
    try:
        dsn = make_conninfo(server_dsn, dbname=name)
        apply_schema(dsn, schema)
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    bindir = Path(os.environ.get("VPE_PG_BIN") or "/usr/lib/postgresql/15/bin")
    workdir = Path(tempfile.mkdtemp(prefix="vpe-bench-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
    data, port = workdir / "data", free_port()
    subprocess.run(as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
    options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c max_wal_size=4GB"
    subprocess.run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(workdir / "log"), "-w",
                                "-o", options, "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                       check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def server_dsn_from_env() -> str | None:
    dsn = os.environ.get("VPE_WAREHOUSE_DSN")
    return make_conninfo(dsn, dbname="postgres") if dsn else None


def print_table(results: list[tuple[str, int, tuple[float, float | None]]], full_rows: int) -> None:
    """results: (method, rows, (wall, server CPU) seconds); the first is (a), the others are compared with it."""
    print(f"{'method':<58} {'rows':>10} {'seconds':>9} {'rows/s':>10} {'(a) is':>8} {'CPU s':>8} {'(a) is':>8}")
    wall_a, cpu_a = results[0][2]
    for method, rows, (wall, cpu) in results:
        rate = rows / wall
        cpu_columns = (f"{cpu:>8.1f} {(cpu / rows) / (cpu_a / results[0][1]):>7.2f}x"
                       if cpu and cpu_a else f"{'-':>8} {'-':>8}")
        print(f"{method:<58} {rows:>10,} {wall:>9.1f} {rate:>10,.0f} {results[0][1] / wall_a / rate:>7.2f}x "
              f"{cpu_columns}")
        if rows < full_rows:
            print(f"{'    extrapolated to ' + format(full_rows, ',') + ' rows':<58} {full_rows:>10,} "
                  f"{full_rows / rate:>9.1f} {rate:>10,.0f}")
    print("goal: (a) >= 25x (b) in one transaction (rows/s). CPU s: the PostgreSQL server's CPU time; "
          "its (a) is: CPU time per row vs (a)'s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="hourly rows for (a) and (c) (default 1,000,000)")
    parser.add_argument("--seed-rows", type=int, default=200_000,
                        help="hourly rows for (b) in one transaction; rate extrapolated (default 200,000)")
    parser.add_argument("--autocommit-rows", type=int, default=20_000,
                        help="hourly rows for (b) committing each row; rate extrapolated (default 20,000)")
    parser.add_argument("--random-seed", type=int, default=1, help="seed of the generated data (default 1)")
    args = parser.parse_args()

    log(f"generating {args.rows:,} hourly rows")
    events, weather = generate(args.rows, args.random_seed)
    results = []
    with contextlib.ExitStack() as stack:
        server = server_dsn_from_env() or stack.enter_context(throwaway_cluster())
        log(f"server: {server_settings(server)}")
        with scratch_database(server) as dsn:
            log(f"(a) set-based load of {len(weather):,} rows into version 3")
            results.append(("(a) COPY + load_staging, v3 (one row per place-hour)", len(weather),
                            load_set_based(dsn, events, weather)))
        for label, rows, commit_each_row in (("one transaction", args.seed_rows, False),
                                             ("a commit per row", args.autocommit_rows, True)):
            sample = weather[:min(rows, len(weather))]
            sample_events = {row[1] for row in sample}
            with scratch_database(server, SEED_SCHEMA) as dsn:
                log(f"(b) per-row load of {len(sample):,} rows on the seed's layout, {label}")
                results.append((f"(b) seed: INSERT per row + trigger, {label}", len(sample),
                                load_per_row(dsn, [e for e in events if e[3] in sample_events], sample,
                                             commit_each_row)))
        with scratch_database(server) as dsn:
            log(f"(c) COPY of {len(weather):,} rows into an unindexed table")
            results.append(("(c) floor: COPY into a table without index", len(weather), load_floor(dsn, weather)))
    print_table(results, len(weather))
    return 0


if __name__ == "__main__":
    sys.exit(main())
