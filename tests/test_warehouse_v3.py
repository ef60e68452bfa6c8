"""Warehouse version 3 on a real PostgreSQL: the in-place upgrade of a populated version-2 warehouse,
true UTC event instants, report versions and their history, watermarks, pending windows, concurrent
loads, and the least-privilege roles (local mode, and the compose init path against the same server)."""
from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from conftest import ROOT, bootstrap, read_secrets

sys.path.insert(0, str(ROOT / "tasks" / "ingestion"))
from codes import code  # noqa: E402 (the steps' own modules)
from common import HOURLY_COLUMNS, WINDOW_COLUMNS  # noqa: E402 (the contract)
from test_ingestion import DEMO, ingestion_python, load_counts, ok, step, workdir  # noqa: F401 (fixtures)
from test_warehouse import (EVENTS, SOIL_DEPTHS, both_days, event, load, schema_shape, snapshot, stage,  # noqa: F401
                            warehouse, weather_day)

UTC = dt.timezone.utc
V2 = ROOT / "tests" / "fixtures" / "warehouse_v2"  # ddl.sql and dml.sql as version 2 shipped them
V2_EVENT_COLUMNS = ["run_id", "source", "row_number", "event_id", "event_date", "event_time", "time_text", "country",
                    "near", "continent_code", "hazard_type", "landslide_type", "landslide_size", "latitude",
                    "longitude", "elevation"]
V2_WEATHER_COLUMNS = ["run_id", "event_id", "is_event", "latitude", "longitude", "elevation", "window_date",
                      "observed_at", "temperature_2m", "relative_humidity_2m", "precipitation", "rain",
                      *(f"soil_{kind}_{depth}cm" for kind in ("temperature", "moisture")
                        for depth in ("0_to_7", "7_to_28", "28_to_100", "100_to_255"))]
MEASUREMENTS = ["temperature_2m", "relative_humidity_2m", "precipitation", "rain",
                *(f"soil_{kind}_{depth}cm" for kind in ("temperature", "moisture")
                  for depth in ("0_to_7", "7_to_28", "28_to_100", "100_to_255"))]
DAILY = ("catalog_id, hours_observed, precipitation_sum, rain_sum, temperature_2m_mean, temperature_2m_max, "
         "relative_humidity_2m_mean, soil_moisture_0_to_7cm_max, soil_moisture_7_to_28cm_max, "
         "soil_moisture_28_to_100cm_max, soil_moisture_100_to_255cm_max")
ARCGIS = "https://gis.earthdata.nasa.gov/gis01/rest/services/Landslides/COOLR_Reports_Points/FeatureServer/0"


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def local_day(ev: dict[str, Any], zone_offset_hours: int, **values: Any) -> list[dict[str, Any]]:
    """The event day's 24 hours as the crawl writes them: local midnight onwards, as true UTC instants."""
    start = dt.datetime.combine(ev["event_date"], dt.time(), dt.timezone(dt.timedelta(hours=zone_offset_hours)))
    return [{**row, "observed_at": start + dt.timedelta(hours=n)}
            for n, row in enumerate(weather_day(ev, True, **values))]


# ------------------------------------------------------------------ upgrade from version 2

def apply_v2(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("ddl.sql", "dml.sql"):
            conn.execute((V2 / name).read_text())


def load_v2(conn: psycopg.Connection, run_id: str, events: list[dict], weather: list[dict]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        for table, columns, rows in (("staging.landslide_event", V2_EVENT_COLUMNS, events),
                                     ("staging.weather_hourly", V2_WEATHER_COLUMNS, weather)):
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    values = {**row, "event_id": row.get("catalog_id"), "landslide_type": row.get("landslide_category")}
                    copy.write_row([run_id if c == "run_id" else values.get(c) for c in columns])
        cur.execute("SELECT * FROM load_staging(%s)", (run_id,))


def v2_hours(conn: psycopg.Connection) -> list[tuple]:
    """Every hourly measurement of a version-2 warehouse, one row per (place, hour) as version 3 keeps them."""
    pivot = ", ".join(f"max(s.{kind}) FILTER (WHERE s.depth_top_cm = {top})"
                      for kind in ("temperature", "moisture") for top in (0, 7, 28, 100))
    return conn.execute(f"""
        SELECT l.latitude, l.longitude, d.instant, w.temperature_2m, w.relative_humidity_2m, w.precipitation,
               w.rain, {pivot}
        FROM weather_data w JOIN datetime d USING (datetime_id) JOIN location l USING (location_id)
        LEFT JOIN soil s USING (weather_id)
        GROUP BY w.weather_id, l.latitude, l.longitude, d.instant ORDER BY 1, 2, 3""").fetchall()


def v3_hours(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(f"""
        SELECT l.latitude, l.longitude, h.observed_at, {', '.join('h.' + m for m in MEASUREMENTS)}
        FROM weather_hour h JOIN location l USING (location_id) ORDER BY 1, 2, 3""").fetchall()


EVENT_FACTS = ("catalog_id, source, event_date, event_time, time_text, lower(hazard_type), lower(landslide_size), "
               "location_id, loaded_at")


def test_a_populated_v2_warehouse_upgrades_in_place_and_keeps_every_measurement_and_event(
        empty_db: tuple[str, dict[str, str]]) -> None:
    dsn, env = empty_db
    apply_v2(dsn)
    mudslide = event("4", dt.date(2018, 5, 2), 27.7, 85.3, landslide_category="Mudslide", landslide_size="Very_large",
                     time_text="night")
    sparse = [{**h, "soil_moisture_28_to_100cm": None, "soil_temperature_28_to_100cm": None,
               "soil_temperature_100_to_255cm": None} for h in weather_day(mudslide, True, hours=6)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        load_v2(conn, "v2-run", [*EVENTS, mudslide], [w for ev in EVENTS for w in both_days(ev)] + sparse)
        stage_only = conn.cursor()
        with stage_only.copy(f"COPY staging.landslide_event ({', '.join(V2_EVENT_COLUMNS)}) FROM STDIN") as copy:
            copy.write_row(["v2-staged", "catalog.csv", 9, "9", dt.date(2017, 1, 1), None, None, "Peru", "Lima", "SA",
                            "landslide", "Rockfall", "Small", -12.0, -77.0, None])
        hours = v2_hours(conn)
        events = conn.execute(f"SELECT {EVENT_FACTS}, landslide_type FROM landslide_event ORDER BY 1").fetchall()
        daily = conn.execute(f"SELECT {DAILY} FROM event_weather_daily ORDER BY 1").fetchall()
        training = conn.execute(f"SELECT label, {DAILY} FROM training_days ORDER BY 1, 2").fetchall()
        counts = conn.execute("SELECT (SELECT count(*) FROM weather_data), (SELECT count(*) FROM soil), "
                              "(SELECT count(*) FROM weather_window), (SELECT count(*) FROM rejected_rows)").fetchone()
    assert len(hours) == 3 * 48 + 6 and counts[1] == 3 * 48 * SOIL_DEPTHS + 6 * 3

    bootstrap("migrate", env=env)

    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall() == [(1,), (3,), (4,), (5,), (6,), (7,)]
        assert v3_hours(conn) == hours
        assert conn.execute(f"SELECT {EVENT_FACTS}, landslide_category FROM landslide_event ORDER BY 1"
                            ).fetchall() == [(*e[:-1], code(e[-1], "landslide_category")) for e in events]
        assert conn.execute(f"SELECT {DAILY} FROM event_weather_daily ORDER BY 1").fetchall() == daily
        assert conn.execute(f"SELECT label, {DAILY} FROM training_days ORDER BY 1, 2").fetchall() == training
        assert conn.execute("SELECT (SELECT count(*) FROM weather_data), (SELECT count(*) FROM soil), "
                            "(SELECT count(*) FROM weather_window), (SELECT count(*) FROM rejected_rows)"
                            ).fetchone() == counts
        assert conn.execute("SELECT landslide_size, landslide_category FROM landslide_event WHERE catalog_id = '4'"
                            ).fetchone() == ("very_large", "mudslide")
        upgraded = snapshot(conn), schema_shape(conn)

        bootstrap("migrate", env=env)
        assert (snapshot(conn), schema_shape(conn)) == upgraded

        # The row staged under version 2 and never merged is merged by version 3.
        assert conn.execute("SELECT * FROM load_staging('v2-staged')").fetchall()[0] == ("landslide_event", 1, 0, 0, 0)
        # Loading the same catalog and weather again adds no hour; the reports are updated once (they now
        # carry the catalog's other columns), their version-2 rows kept in the history.
        again = load(conn, "v3-run", [*EVENTS, mudslide], [w for ev in EVENTS for w in both_days(ev)])
        assert again["weather_hour"] == (0, 0, 3 * 48, 0) and again["weather_window"] == (0, 0, 6, 0)
        assert again["landslide_event"] == (0, 4, 0, 0)
        assert conn.execute("SELECT count(*) FROM landslide_event_history").fetchone() == (4,)
        assert v3_hours(conn) == hours


def test_an_upgraded_warehouse_has_the_shape_of_a_new_one(empty_db: tuple[str, dict[str, str]]) -> None:
    dsn, env = empty_db
    apply_v2(dsn)
    bootstrap("migrate", env=env)
    fresh = f"{dsn}_fresh"
    with psycopg.connect(dsn, autocommit=True) as conn:
        upgraded = schema_shape(conn)
        conn.execute(f'CREATE DATABASE "{fresh.rsplit("/", 1)[1]}"')
    bootstrap("migrate", env={**env, "VPE_WAREHOUSE_DB": fresh.rsplit("/", 1)[1]})
    with psycopg.connect(fresh, autocommit=True) as conn:
        assert schema_shape(conn) == upgraded


# ------------------------------------------------------------------ upgrade from version 3

def staging_key_columns(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT c.table_name, c.column_name FROM information_schema.columns c "
                        "JOIN information_schema.tables t USING (table_schema, table_name) "
                        "WHERE c.table_schema = 'staging' AND t.table_type = 'BASE TABLE' "
                        "AND c.column_name IN ('event_id', 'catalog_id') ORDER BY 1").fetchall()


def test_a_v3_warehouse_renames_its_staging_key_and_still_knows_its_rejects(warehouse) -> None:
    conn, env = warehouse
    ev = EVENTS[0]
    bad_hours = [*weather_day(ev, True, hours=1, relative_humidity_2m=130.0),
                 *weather_day(event("404", ev["event_date"], 1.0, 1.0), True, hours=1)]
    load(conn, "events", [ev])
    load(conn, "crawl-1", [], bad_hours)
    stage(conn, "crashed", [ev])
    rejects = conn.execute("SELECT source, row_key, reason FROM rejected_rows ORDER BY 2").fetchall()
    assert rejects == [
        ("open-meteo", f"catalog_id 1 event {ev['event_date']}T00:00Z",
         "violates weather_hour_relative_humidity_2m_range (relative_humidity_2m=130.0)"),
        ("open-meteo", f"catalog_id 404 event {ev['event_date']}T00:00Z",
         "catalog_id 404 is not in landslide_event (its catalog row is missing or was rejected)")]
    # Back to version 3: staging and the loads' rejects named the key event_id.
    conn.execute("DELETE FROM schema_version WHERE version = 4")
    conn.execute("UPDATE rejected_rows SET row_key = replace(row_key, 'catalog_id ', 'event_id '), "
                 "reason = replace(reason, 'catalog_id ', 'event_id ')")
    for table in ("landslide_event", "weather_hourly", "pending_window"):
        conn.execute(f"ALTER TABLE staging.{table} RENAME COLUMN catalog_id TO event_id")

    bootstrap("migrate", env=env)

    assert staging_key_columns(conn) == [("landslide_event", "catalog_id"), ("pending_window", "catalog_id"),
                                         ("weather_hourly", "catalog_id")]
    assert conn.execute("SELECT catalog_id FROM staging.landslide_event WHERE run_id = 'crashed'").fetchall() == [
        ("1",)]
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (7,)
    assert load(conn, "crawl-2", [], bad_hours)["weather_hour"] == (0, 0, 0, 2)
    assert conn.execute("SELECT source, row_key, reason FROM rejected_rows ORDER BY 2").fetchall() == rejects


# ------------------------------------------------------------------ local and UTC event times

def test_event_instants_are_true_utc_from_the_places_zone_with_the_days_offset(warehouse) -> None:
    conn, _ = warehouse
    # Lake Oswego, Oregon: UTC-7 in July (daylight saving), UTC-8 in January.
    summer = event("1", dt.date(2019, 7, 15), 45.42, -122.67, event_time=dt.time(14, 30), time_text="2:30 PM")
    winter = event("2", dt.date(2019, 1, 15), 45.43, -122.67, event_time=dt.time(14, 30), time_text="2:30 PM")
    no_time = event("3", dt.date(2019, 7, 16), 45.44, -122.67, time_text="night")
    zone = {"timezone": "America/Los_Angeles"}
    load(conn, "events", [summer, winter, no_time])
    assert conn.execute("SELECT count(*) FROM landslide_event WHERE timezone IS NULL AND instant IS NULL"
                        ).fetchone() == (3,), "the zone is unknown until the place's weather is loaded"

    hours = (local_day(summer, -7, **zone, precipitation=lambda h: h / 10)
             + local_day(winter, -8, **zone) + local_day(no_time, -7, **zone))
    load(conn, "weather", [], hours)

    rows = conn.execute("SELECT catalog_id, event_date, event_time, timezone, utc_offset, instant FROM landslide_event "
                        "ORDER BY catalog_id").fetchall()
    assert rows == [
        ("1", dt.date(2019, 7, 15), dt.time(14, 30), "America/Los_Angeles", dt.timedelta(hours=-7),
         at("2019-07-15T21:30+00:00")),
        ("2", dt.date(2019, 1, 15), dt.time(14, 30), "America/Los_Angeles", dt.timedelta(hours=-8),
         at("2019-01-15T22:30+00:00")),
        ("3", dt.date(2019, 7, 16), None, "America/Los_Angeles", dt.timedelta(hours=-7), None),
    ]
    # The event's hour is a row of its window: 14:00 local is the window's 15th hour.
    assert conn.execute("SELECT event_hour, event_hour_precipitation FROM event_weather_daily WHERE catalog_id = '1'"
                        ).fetchone() == (at("2019-07-15T21:00+00:00"), Decimal("1.40"))
    assert conn.execute("SELECT event_hour FROM event_weather_daily WHERE catalog_id = '3'").fetchone() == (None,)
    assert conn.execute("SELECT local_date, local_hour, utc_hour FROM hourly_weather "
                        "WHERE observed_at = '2019-07-15T21:00Z' AND latitude = 45.42").fetchone() == (
        dt.date(2019, 7, 15), 14, 21)


def test_weather_with_a_zone_the_tz_database_does_not_know_is_rejected(warehouse) -> None:
    conn, _ = warehouse
    ev = EVENTS[0]
    counts = load(conn, "run", [ev], weather_day(ev, True, hours=2, timezone="Mars/Olympus_Mons"))
    assert counts["weather_hour"] == (0, 0, 0, 2)
    assert {r for (r,) in conn.execute("SELECT reason FROM rejected_rows")} == {
        "timezone Mars/Olympus_Mons is not in the tz database"}


def test_a_gmt_zone_from_a_utc_crawl_gives_way_to_the_places_own(warehouse) -> None:
    conn, _ = warehouse
    ev = EVENTS[0]
    load(conn, "utc crawl", [ev], weather_day(ev, True, hours=1, timezone="GMT"))
    load(conn, "auto crawl", [], weather_day(ev, False, hours=1, timezone="America/Lima"))
    load(conn, "utc crawl again", [], weather_day(ev, True, hours=2, timezone="GMT"))
    assert conn.execute("SELECT l.timezone, e.timezone FROM location l JOIN landslide_event e USING (location_id)"
                        ).fetchone() == ("America/Lima", "America/Lima")


# ------------------------------------------------------------------ report versions, history, watermark

def test_a_newer_version_updates_the_event_and_an_older_or_undated_one_is_rejected(warehouse) -> None:
    conn, _ = warehouse
    first = event("7", dt.date(2020, 2, 1), 10.0, 20.0, last_edited=at("2020-02-03T10:00+00:00"), title="Slide A")
    edited = {**first, "last_edited": at("2021-05-06T07:08+00:00"), "title": "Slide A (revised)", "fatalities": 3}
    assert load(conn, "v1", [first])["landslide_event"] == (1, 0, 0, 0)
    assert load(conn, "v2", [edited])["landslide_event"] == (0, 1, 0, 0)
    assert load(conn, "v2 again", [edited])["landslide_event"] == (0, 0, 1, 0)
    assert load(conn, "v1 again", [first])["landslide_event"] == (0, 0, 0, 1)
    assert load(conn, "undated", [{**first, "last_edited": None}])["landslide_event"] == (0, 0, 0, 1)

    assert conn.execute("SELECT title, fatalities, last_edited FROM landslide_event").fetchone() == (
        "Slide A (revised)", 3, at("2021-05-06T07:08+00:00"))
    history = conn.execute("SELECT catalog_id, last_edited, version->>'title', replaced_by_run "
                           "FROM landslide_event_history").fetchall()
    assert history == [("7", at("2020-02-03T10:00+00:00"), "Slide A", "v2")]
    assert [r for (r,) in conn.execute("SELECT reason FROM rejected_rows ORDER BY run_id")] == [
        "catalog_id 7: this version (undated) is not newer than the stored one (last edited 2021-05-06T07:08Z), "
        "which is kept",
        "catalog_id 7: this version (last edited 2020-02-03T10:00Z) is not newer than the stored one "
        "(last edited 2021-05-06T07:08Z), which is kept",
    ]


def test_a_new_or_newer_version_describes_its_place_and_nothing_else_overwrites_it(warehouse) -> None:
    conn, _ = warehouse
    place = "SELECT country, near, continent_code FROM location"
    first = event("31", dt.date(2020, 2, 1), -8.6993, 125.6723, country="Indonesia", near="Dili", continent_code="AS",
                  last_edited=at("2020-02-03T10:00+00:00"))
    load(conn, "v1", [first], weather_day(first, True, hours=1))
    edited = {**first, "country": "East Timor", "near": None, "last_edited": at("2021-01-01T00:00+00:00")}
    assert load(conn, "v2", [edited])["landslide_event"] == (0, 1, 0, 0)
    assert conn.execute(place).fetchall() == [("East Timor", "Dili", "AS")], "a blank keeps what was stored"
    neighbour = event("32", dt.date(2020, 2, 2), -8.6993, 125.6723, country="Timor-Leste", continent_code="OC")
    load(conn, "older, same, weather", [first, edited], weather_day(edited, False, hours=1))
    assert conn.execute(place).fetchall() == [("East Timor", "Dili", "AS")]
    load(conn, "new", [neighbour])
    assert conn.execute(place).fetchall() == [("Timor-Leste", "Huancabamba", "OC")]


def test_two_versions_of_one_report_in_one_batch_keep_the_newest(warehouse) -> None:
    conn, _ = warehouse
    older = event("7", dt.date(2020, 2, 1), 10.0, 20.0, last_edited=at("2020-02-03T10:00+00:00"), title="old")
    newer = {**older, "row_number": 30, "last_edited": at("2020-03-01T00:00+00:00"), "title": "new"}
    assert load(conn, "run", [older, newer])["landslide_event"] == (1, 0, 0, 1)
    assert conn.execute("SELECT title FROM landslide_event").fetchone() == ("new",)
    assert conn.execute("SELECT row_key, reason FROM rejected_rows").fetchall() == [
        ("catalog_id 7 row 8", "repeats catalog_id 7 of row 30")]


def test_an_edit_that_moves_the_event_drops_its_old_windows_and_zone(warehouse) -> None:
    conn, _ = warehouse
    ev = event("5", dt.date(2020, 6, 1), 10.0, 20.0, last_edited=at("2020-06-02T00:00+00:00"))
    load(conn, "v1", [ev], [{**h, "timezone": "Africa/Ndjamena"} for h in both_days(ev)])
    moved = {**ev, "latitude": 11.0, "last_edited": at("2020-07-01T00:00+00:00")}
    assert load(conn, "v2", [moved])["landslide_event"] == (0, 1, 0, 0)
    assert conn.execute("SELECT count(*) FROM weather_window").fetchone() == (0,)
    assert conn.execute("SELECT l.latitude, e.timezone FROM landslide_event e JOIN location l USING (location_id)"
                        ).fetchone() == (Decimal("11.000000"), None)
    assert conn.execute("SELECT count(*) FROM weather_hour").fetchone() == (48,), "the old place's hours stay"
    # The next crawl's windows at the new place load as usual.
    assert load(conn, "v2 weather", [], weather_day(moved, True))["weather_window"] == (1, 0, 0, 0)


def test_watermark_per_source_is_the_newest_loaded_last_edited(warehouse) -> None:
    conn, _ = warehouse
    watermark = "SELECT source_watermark(%s)"
    assert conn.execute(watermark, ("catalog.csv",)).fetchone() == (None,)
    csv_events = [event("1", dt.date(2020, 1, 1), 1.0, 1.0, last_edited=at("2020-01-05T00:00+00:00")),
                  event("2", dt.date(2020, 1, 2), 2.0, 2.0, last_edited=at("2020-03-05T12:00+00:00")),
                  event("3", dt.date(2020, 1, 3), 3.0, 3.0)]
    arcgis = [event("4", dt.date(2021, 1, 1), 4.0, 4.0, source=ARCGIS, last_edited=at("2021-02-01T00:00+00:00"))]
    load(conn, "run-1", csv_events + arcgis)
    assert conn.execute(watermark, ("catalog.csv",)).fetchone() == (at("2020-03-05T12:00+00:00"),)
    assert conn.execute(watermark, (ARCGIS,)).fetchone() == (at("2021-02-01T00:00+00:00"),)
    # A rejected (older) version does not move it; a newer one from the layer does.
    load(conn, "run-2", [{**csv_events[1], "last_edited": at("2019-01-01T00:00+00:00"), "title": "older"},
                         {**arcgis[0], "last_edited": at("2021-03-01T00:00+00:00"), "title": "edited"}])
    assert conn.execute(watermark, ("catalog.csv",)).fetchone() == (at("2020-03-05T12:00+00:00"),)
    assert conn.execute(watermark, (ARCGIS,)).fetchone() == (at("2021-03-01T00:00+00:00"),)


# ------------------------------------------------------------------ pending windows

def stage_pending(conn: psycopg.Connection, run_id: str, rows: list[tuple]) -> None:
    with conn.cursor().copy("COPY staging.pending_window (run_id, catalog_id, is_event, latitude, longitude, "
                            "window_date) FROM STDIN") as copy:
        for row in rows:
            copy.write_row((run_id, *row))


def load_with_pending(conn: psycopg.Connection, run_id: str, pending: list[tuple], weather: list[dict] = ()
                      ) -> dict[str, tuple[int, int, int, int]]:
    with conn.transaction():
        stage_pending(conn, run_id, pending)
        return load(conn, run_id, [], weather)


def test_pending_windows_wait_in_the_warehouse_until_their_hours_load(warehouse) -> None:
    conn, _ = warehouse
    ev = EVENTS[0]
    load(conn, "events", [ev])
    day, year_before = ev["event_date"], ev["event_date"].replace(year=ev["event_date"].year - 1)
    pending = [("1", True, ev["latitude"], ev["longitude"], day),
               ("1", False, ev["latitude"], ev["longitude"], year_before),
               ("404", True, 1.0, 1.0, day)]
    assert load_with_pending(conn, "crawl-1", pending)["pending_window"] == (2, 0, 0, 1)
    first_seen = conn.execute("SELECT first_seen, last_checked FROM pending_window WHERE is_event").fetchone()
    assert load_with_pending(conn, "crawl-2", pending[:2])["pending_window"] == (0, 0, 2, 0)
    assert conn.execute("SELECT first_seen, last_checked > %s FROM pending_window WHERE is_event",
                        (first_seen[1],)).fetchone() == (first_seen[0], True)

    load(conn, "crawl-3", [], weather_day(ev, True))
    assert conn.execute("SELECT is_event, window_date FROM pending_window").fetchall() == [(False, year_before)]
    assert conn.execute("SELECT reason FROM rejected_rows WHERE source = 'crawl pending windows'").fetchall() == [
        ("catalog_id 404 is not in landslide_event (its catalog row is missing or was rejected)",)]


# ------------------------------------------------------------------ concurrent loads

def test_two_concurrent_loads_of_the_same_rows_count_each_row_once(warehouse) -> None:
    conn, env = warehouse
    dsn = env["VPE_WAREHOUSE_DSN"]
    stored = event("9", dt.date(2020, 1, 1), 1.0, 1.0, last_edited=at("2020-01-02T00:00+00:00"))
    load(conn, "stored", [stored])
    edited = {**stored, "last_edited": at("2020-02-01T00:00+00:00"), "title": "edited"}
    rows = [edited, *EVENTS], [w for ev in EVENTS for w in both_days(ev)]
    results: dict[str, Any] = {}

    def second_load() -> None:
        try:
            with psycopg.connect(dsn) as other, other.transaction():
                stage(other, "second", *rows)
                results["second"] = other.execute("SELECT * FROM load_staging('second')").fetchall()
        except psycopg.Error as error:
            results["second"] = error

    with psycopg.connect(dsn) as first:
        with first.transaction():
            stage(first, "first", *rows)
            results["first"] = first.execute("SELECT * FROM load_staging('first')").fetchall()
            pid = first.info.backend_pid
            worker = threading.Thread(target=second_load)
            worker.start()
            wait_until_blocked_by(conn, pid)
        worker.join(timeout=120)
    assert not worker.is_alive()

    assert not isinstance(results["second"], Exception), results["second"]
    counts = {name: {target: tuple(c) for target, *c in rows} for name, rows in results.items()}
    assert counts["first"]["landslide_event"] == (3, 1, 0, 0)
    assert counts["second"]["landslide_event"] == (0, 0, 4, 0)
    assert counts["first"]["weather_hour"] == (144, 0, 0, 0)
    assert counts["second"]["weather_hour"] == (0, 0, 144, 0)
    assert conn.execute("SELECT count(*) FROM landslide_event_history").fetchone() == (1,)


def wait_until_blocked_by(conn: psycopg.Connection, pid: int) -> None:
    """Until another backend waits for a lock `pid` holds (the second load queueing behind the first)."""
    for _ in range(600):
        blocked = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY (pg_blocking_pids(pid))",
                               (pid,)).fetchone()[0]
        if blocked:
            return
        threading.Event().wait(0.1)
    raise AssertionError("the second load never waited for the first")


# ------------------------------------------------------------------ roles

def role_dsn(env: dict[str, str], user: str, secret: str, database: str) -> str:
    password = read_secrets(Path(env["VPE_HOME"]))[secret]
    return f"postgresql://{user}:{password}@127.0.0.1:{env['VPE_PG_PORT']}/{database}"


def test_the_loader_loads_but_cannot_drop_truncate_alter_or_delete(warehouse) -> None:
    _, env = warehouse
    dsn = role_dsn(env, "vpe_loader", "VPE_LOADER_PASSWORD", env["VPE_WAREHOUSE_DB"])
    with psycopg.connect(dsn, autocommit=True) as loader:
        assert load(loader, "as loader", EVENTS[:1], weather_day(EVENTS[0], True))["weather_hour"] == (24, 0, 0, 0)
        assert loader.execute("SELECT source_watermark('catalog.csv')").fetchone() == (None,)
        for statement in ("DROP TABLE weather_hour", "TRUNCATE landslide_event CASCADE",
                          "ALTER TABLE location ADD COLUMN x int", "DELETE FROM landslide_event",
                          "UPDATE location SET elevation = 1", "TRUNCATE staging.weather_hourly",
                          "DROP SCHEMA staging CASCADE", "CREATE TABLE mine (x int)", "SELECT staging.merge_pending('x')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                loader.execute(statement)


def test_the_reader_reads_everything_and_writes_only_its_scratch_schema(warehouse) -> None:
    conn, env = warehouse
    load(conn, "run", EVENTS[:1], weather_day(EVENTS[0], True))
    dsn = role_dsn(env, "vpe_reader", "VPE_READER_PASSWORD", env["VPE_WAREHOUSE_DB"])
    with psycopg.connect(dsn, autocommit=True) as reader:
        assert reader.execute("SELECT count(*) FROM event_weather_daily").fetchone() == (1,)
        assert reader.execute("SELECT count(*) FROM weather_hour").fetchone() == (24,)
        reader.execute("CREATE TABLE scratch.wet_days AS SELECT * FROM training_days WHERE precipitation_sum > 0")
        for statement in ("INSERT INTO landslide_event (catalog_id) VALUES ('x')", "DELETE FROM rejected_rows",
                          "CREATE TABLE public.mine (x int)", "SELECT * FROM load_staging('x')",
                          "INSERT INTO staging.weather_hourly (run_id) VALUES ('x')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute(statement)


def test_airflows_role_owns_its_metadata_and_cannot_reach_the_warehouse(warehouse) -> None:
    _, env = warehouse
    for database in (env["VPE_WAREHOUSE_DB"], "warehouse"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(role_dsn(env, "airflow", "VPE_AIRFLOW_DB_PASSWORD", database)).close()
    with psycopg.connect(role_dsn(env, "airflow", "VPE_AIRFLOW_DB_PASSWORD", "airflow"), autocommit=True) as airflow:
        assert airflow.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'airflow'"
                               ).fetchone() == ("airflow",)
        airflow.execute("CREATE TABLE IF NOT EXISTS vpe_probe (x int)")
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(role_dsn(env, "vpe_loader", "VPE_LOADER_PASSWORD", "airflow")).close()


def test_psql_opens_a_reader_session_and_admin_the_superuser(warehouse) -> None:
    _, env = warehouse
    who = "SELECT current_user"
    assert bootstrap("psql", "-tAc", who, env=env).stdout.strip() == "vpe_reader"
    assert bootstrap("psql", "--admin", "-tAc", who, env=env).stdout.strip() == "postgres"


def test_the_compose_init_gives_the_same_roles_their_logins(warehouse) -> None:
    """docker-compose.yml's airflow-init script, run against this server (`postgres` resolved as loopback)."""
    _, env = warehouse
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    script = compose["services"]["airflow-init"]["command"][1]
    init = re.search(r"<<'PY'\n(.*?)\n\s*PY\n", script, re.S).group(1)
    init = textwrap.dedent(init).replace('host="postgres"', f'host="127.0.0.1", port={env["VPE_PG_PORT"]}')
    secrets = read_secrets(Path(env["VPE_HOME"]))
    names = ("VPE_PG_PASSWORD", "VPE_AIRFLOW_DB_PASSWORD", "VPE_LOADER_PASSWORD", "VPE_READER_PASSWORD",
             "VPE_EXECUTOR_DB_PASSWORD")
    result = subprocess.run([sys.executable, "-c", init], capture_output=True, text=True, timeout=60,
                            env={"VPE_PG_USER": "postgres", "VPE_AIRFLOW_DB": "airflow_compose",
                                 **{name: secrets[name] for name in names}})
    assert result.returncode == 0, result.stderr
    bootstrap_roles = set(re.findall(r"\('(\w+)', :'\w+'\)", (ROOT / "bootstrap.sh").read_text()))
    assert bootstrap_roles == {"airflow", "vpe_loader", "vpe_reader", "vpe_executor"}
    for role, secret in (("airflow", "VPE_AIRFLOW_DB_PASSWORD"), ("vpe_loader", "VPE_LOADER_PASSWORD")):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(role_dsn(env, role, secret, env["VPE_WAREHOUSE_DB"] if role == "airflow"
                                     else "airflow_compose")).close()
    with psycopg.connect(role_dsn(env, "airflow", "VPE_AIRFLOW_DB_PASSWORD", "airflow_compose")) as airflow:
        assert airflow.execute("SELECT current_user").fetchone() == ("airflow",)
    with psycopg.connect(role_dsn(env, "vpe_executor", "VPE_EXECUTOR_DB_PASSWORD", env["VPE_WAREHOUSE_DB"])) as store:
        assert store.execute("SELECT current_user, has_table_privilege('workspace.file', 'INSERT')").fetchone() == (
            "vpe_executor", True)
    environment = compose["services"]["executor"]["environment"]["VPE_WAREHOUSE_DSN"]
    assert environment.startswith("postgresql://vpe_loader:${VPE_LOADER_PASSWORD")
    for service in ("airflow-scheduler", "airflow-init"):
        conn = compose["services"][service]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert conn.startswith("postgresql+psycopg2://airflow:${VPE_AIRFLOW_DB_PASSWORD")


def test_a_location_with_hours_cannot_be_deleted(warehouse) -> None:
    conn, _ = warehouse
    load(conn, "run", EVENTS[:1], weather_day(EVENTS[0], True, hours=1))
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="has hourly weather in weather_hour"):
        conn.execute("DELETE FROM location")


# ------------------------------------------------------------------ load.py with C1 columns and pending windows

def test_load_stages_the_crawls_pending_windows_and_accounts_for_every_event_row(
        ingestion_python: str, workdir: Path, empty_db: tuple[str, dict[str, str]]) -> None:
    dsn, env = empty_db
    bootstrap("migrate", env=env)
    run = workdir / "run"
    ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir))
    (run / "hourly.csv").write_text(",".join(HOURLY_COLUMNS) + "\n")
    windows = [w for w in (run / "windows-catalog.csv").read_text().splitlines()[1:] if w.startswith("101,")]
    (run / "pending_windows.csv").write_text("\n".join([",".join(WINDOW_COLUMNS), *windows]) + "\n")

    out = ok(step(ingestion_python, "load.py", workdir=workdir, env={"VPE_WAREHOUSE_DSN": dsn}))

    assert load_counts(out)["pending_window"] == (2, 0, 0, 0)
    assert "+ 15 loaded new + 0 updated" in out and "the counts add up" in out
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT e.catalog_id, p.is_event FROM pending_window p JOIN landslide_event e "
                            "USING (landslide_event_id) ORDER BY 2").fetchall() == [("101", False), ("101", True)]
        assert conn.execute("SELECT title, country_code, landslide_trigger, fatalities FROM landslide_event "
                            "WHERE catalog_id = '101'").fetchone() == ("Oso, Washington", "US", "rain", 43)


def test_an_older_airflow_database_is_handed_to_the_airflow_role(pg_env: dict[str, str]) -> None:
    env = {**pg_env, "VPE_AIRFLOW_DB": "airflow_from_v2"}
    superuser = role_dsn(env, "postgres", "VPE_PG_PASSWORD", "postgres")
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS airflow_from_v2")
        conn.execute("CREATE DATABASE airflow_from_v2")
    with psycopg.connect(role_dsn(env, "postgres", "VPE_PG_PASSWORD", "airflow_from_v2"), autocommit=True) as conn:
        conn.execute("CREATE TABLE dag_run (id serial PRIMARY KEY, note text)")
        conn.execute("CREATE VIEW dag_run_notes AS SELECT note FROM dag_run")

    bootstrap("up", "postgres", env=env)

    with psycopg.connect(role_dsn(env, "airflow", "VPE_AIRFLOW_DB_PASSWORD", "airflow_from_v2"),
                         autocommit=True) as airflow:
        airflow.execute("INSERT INTO dag_run (note) VALUES ('still usable')")
        airflow.execute("ALTER TABLE dag_run ADD COLUMN state text")  # what `airflow db migrate` does
        assert airflow.execute("SELECT note FROM dag_run_notes").fetchall() == [("still usable",)]
