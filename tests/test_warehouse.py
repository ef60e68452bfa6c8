"""The warehouse (ddl.sql + dml.sql) on a real PostgreSQL: re-applying changes
nothing, loading is duplicate-proof, bad rows land in rejected_rows with a
reason while the rest loads, and the views compute what a person would by hand."""
from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any, Iterator

import psycopg
import pytest

from conftest import bootstrap

UTC = dt.timezone.utc
TARGETS = ["landslide_event", "location", "weather_window", "weather_hour", "pending_window"]
EVENT_COLUMNS = ["run_id", "source", "row_number", "catalog_id", "event_date", "event_time", "time_text", "last_edited",
                 "title", "country", "country_code", "admin_division", "near", "continent_code", "location_accuracy",
                 "hazard_type", "landslide_category", "landslide_trigger", "landslide_size", "landslide_setting",
                 "fatalities", "injuries", "source_link", "latitude", "longitude", "elevation"]
WEATHER_COLUMNS = ["run_id", "catalog_id", "is_event", "latitude", "longitude", "elevation", "window_date",
                   "observed_at", "timezone", "temperature_2m", "relative_humidity_2m", "precipitation", "rain",
                   *(f"soil_{kind}_{depth}cm" for kind in ("temperature", "moisture")
                     for depth in ("0_to_7", "7_to_28", "28_to_100", "100_to_255"))]
SOIL_DEPTHS = 4

Row = dict[str, Any]


def event(catalog_id: str, day: dt.date, lat: float, lon: float, **values: Any) -> Row:
    return {"source": "catalog.csv", "row_number": int(catalog_id) + 1, "catalog_id": catalog_id, "event_date": day,
            "event_time": None, "time_text": None, "country": "Peru", "near": "Huancabamba",
            "continent_code": "SA", "hazard_type": "landslide", "landslide_category": "Landslide",
            "landslide_size": "Medium", "latitude": lat, "longitude": lon, "elevation": None, **values}


def weather_day(ev: Row, is_event: bool, hours: int = 24, **values: Any) -> list[Row]:
    """The hourly rows of an event's day (is_event) or of the same day a year earlier."""
    day = ev["event_date"] if is_event else ev["event_date"].replace(year=ev["event_date"].year - 1)
    start = dt.datetime.combine(day, dt.time(), UTC)
    rows = []
    for hour in range(hours):
        row = {"catalog_id": ev["catalog_id"], "is_event": is_event, "latitude": ev["latitude"],
               "longitude": ev["longitude"], "elevation": 120.0, "window_date": day,
               "observed_at": start + dt.timedelta(hours=hour), "temperature_2m": 10.0 + hour,
               "relative_humidity_2m": 80.0, "precipitation": 0.5, "rain": 0.4}
        for i, depth in enumerate(("0_to_7", "7_to_28", "28_to_100", "100_to_255")):
            row[f"soil_temperature_{depth}cm"] = 8.0 - i
            row[f"soil_moisture_{depth}cm"] = 0.30 + i / 100
        rows.append({**row, **{k: (v(hour) if callable(v) else v) for k, v in values.items()}})
    return rows


def both_days(ev: Row) -> list[Row]:
    return weather_day(ev, True) + weather_day(ev, False)


EVENTS = [event("1", dt.date(2019, 3, 10), -10.3838, -75.4267),
          event("2", dt.date(2019, 3, 11), 54.5494, -3.5875, country="United Kingdom", near="Whitehaven",
                continent_code="EU"),
          event("3", dt.date(2020, 7, 1), 35.0, -110.5, country="United States", near="Flagstaff",
                continent_code="NA", event_time=dt.time(2, 30), time_text="2:30")]


def stage(conn: psycopg.Connection, run_id: str, events: list[Row] = (), weather: list[Row] = ()) -> None:
    with conn.cursor() as cur:
        for table, columns, rows in (("staging.landslide_event", EVENT_COLUMNS, events),
                                     ("staging.weather_hourly", WEATHER_COLUMNS, weather)):
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([run_id if c == "run_id" else row.get(c) for c in columns])


def load(conn: psycopg.Connection, run_id: str, events: list[Row] = (), weather: list[Row] = ()
         ) -> dict[str, tuple[int, int, int, int]]:
    """Stages and merges one run in one transaction, as tasks/ingestion/load.py does.
    Returns target -> (inserted, updated, already present, rejected)."""
    with conn.transaction():
        stage(conn, run_id, events, weather)
        rows = conn.execute("SELECT * FROM load_staging(%s)", (run_id,)).fetchall()
    assert [r[0] for r in rows] == TARGETS
    return {target: tuple(counts) for target, *counts in rows}


def snapshot(conn: psycopg.Connection) -> dict[str, tuple[int, str]]:
    """Row count and checksum of every table's content."""
    tables = [f"{s}.{t}" for s, t in conn.execute(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('public', 'staging', 'crawl') ORDER BY 1, 2")]
    return {table: conn.execute(
        f"SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
    ).fetchone() for table in tables}


def schema_shape(conn: psycopg.Connection) -> list[tuple]:
    """Columns, constraints, indexes, views and functions as the catalog describes them."""
    return conn.execute("""
        SELECT 'column', table_schema || '.' || table_name || '.' || column_name,
               data_type || coalesce(numeric_precision::text, '') || coalesce(numeric_scale::text, '')
        FROM information_schema.columns WHERE table_schema IN ('public', 'staging', 'crawl')
        UNION ALL
        SELECT 'constraint', conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace IN ('public'::regnamespace, 'staging'::regnamespace, 'crawl'::regnamespace)
        UNION ALL
        SELECT 'index', schemaname || '.' || indexname, indexdef FROM pg_indexes
        WHERE schemaname IN ('public', 'staging', 'crawl')
        UNION ALL
        SELECT 'view', schemaname || '.' || viewname, definition FROM pg_views
        WHERE schemaname IN ('public', 'staging', 'crawl')
        UNION ALL
        SELECT 'function', p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)) FROM pg_proc p
        WHERE pronamespace IN ('public'::regnamespace, 'staging'::regnamespace)
        ORDER BY 1, 2""").fetchall()


@pytest.fixture
def warehouse(empty_db: tuple[str, dict[str, str]]) -> Iterator[tuple[psycopg.Connection, dict[str, str]]]:
    dsn, env = empty_db
    bootstrap("migrate", env=env)
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn, env


def test_applying_the_schema_twice_to_an_empty_warehouse_changes_nothing(
        empty_db: tuple[str, dict[str, str]]) -> None:
    dsn, env = empty_db
    bootstrap("migrate", env=env)
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = snapshot(conn), schema_shape(conn)
        bootstrap("migrate", env=env)
        assert (snapshot(conn), schema_shape(conn)) == before
        assert conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall() == [(1,), (3,), (4,), (5,), (6,), (7,)]
        assert all(count == 0 for table, (count, _) in before[0].items()
                   if table not in ("public.schema_version", "public.code_alias"))


def test_applying_the_schema_again_to_a_populated_warehouse_keeps_every_row(warehouse) -> None:
    conn, env = warehouse
    load(conn, "run-1", EVENTS, [w for ev in EVENTS for w in both_days(ev)])
    stage(conn, "run-pending", EVENTS[:1])  # staged but not merged yet: must survive too
    before = snapshot(conn), schema_shape(conn)
    assert conn.execute("SELECT count(*) FROM soil").fetchone() == (len(EVENTS) * 48 * SOIL_DEPTHS,)

    bootstrap("migrate", env=env)

    assert (snapshot(conn), schema_shape(conn)) == before
    assert load(conn, "run-pending")["landslide_event"] == (0, 0, 1, 0)


def test_loading_the_same_batch_twice_adds_nothing(warehouse) -> None:
    conn, _ = warehouse
    weather = [w for ev in EVENTS for w in both_days(ev)]
    first = load(conn, "run-1", EVENTS, weather)
    after_first = snapshot(conn)
    second = load(conn, "run-2", EVENTS, weather)

    assert first == {"landslide_event": (3, 0, 0, 0), "location": (3, 0, 3, 0), "weather_window": (6, 0, 0, 0),
                     "weather_hour": (144, 0, 0, 0), "pending_window": (0, 0, 0, 0)}
    assert second == {"landslide_event": (0, 0, 3, 0), "location": (0, 0, 6, 0), "weather_window": (0, 0, 6, 0),
                      "weather_hour": (0, 0, 144, 0), "pending_window": (0, 0, 0, 0)}
    assert snapshot(conn) == after_first
    assert after_first["staging.weather_hourly"][0] == after_first["staging.landslide_event"][0] == 0


def test_an_overlapping_batch_adds_only_its_new_rows(warehouse) -> None:
    conn, _ = warehouse
    first_events, second_events = EVENTS[:2], EVENTS[1:]
    # The second batch repeats event 2 with its event day only, and brings event 3.
    load(conn, "run-1", first_events, [w for ev in first_events for w in both_days(ev)])
    counts = load(conn, "run-2", second_events, weather_day(EVENTS[1], True) + both_days(EVENTS[2]))

    assert counts["landslide_event"] == (1, 0, 1, 0)
    assert counts["weather_window"] == (2, 0, 1, 0)
    assert counts["weather_hour"] == (48, 0, 24, 0)
    assert conn.execute("SELECT count(*) FROM weather_hour").fetchone() == (3 * 48,)
    assert conn.execute("SELECT count(*) FROM soil").fetchone() == (3 * 48 * SOIL_DEPTHS,)
    assert conn.execute("SELECT count(DISTINCT catalog_id) FROM landslide_event").fetchone() == (3,)


def test_bad_rows_are_rejected_with_reasons_and_the_rest_is_loaded(warehouse) -> None:
    conn, _ = warehouse
    good = EVENTS[0]
    bad_events = [
        event("10", dt.date(2019, 1, 1), 95.0, 10.0),                       # latitude out of range
        event("11", dt.date(2019, 1, 1), 10.0, 10.0, continent_code="XX"),  # unknown continent
        event("12", None, 10.0, 10.0),                                      # no date
        event("13", dt.date(2019, 1, 1), None, 10.0),                       # no latitude
        {**good, "row_number": 99},                                         # same id twice in the file
    ]
    hours = weather_day(good, True)
    hours[0]["relative_humidity_2m"] = 130.0
    hours[1]["precipitation"] = -1.0
    hours[2]["soil_moisture_7_to_28cm"] = 1.7
    hours[3]["observed_at"] = None
    hours[4]["latitude"] = float("nan")
    orphan = weather_day(event("404", dt.date(2019, 5, 5), 1.0, 1.0), True, hours=1)
    wrong_day = weather_day(good, False, hours=2, window_date=good["event_date"] + dt.timedelta(days=3))

    counts = load(conn, "run-bad", [good, *bad_events], hours + orphan + wrong_day)

    assert counts["landslide_event"] == (1, 0, 0, 5)
    assert counts["weather_hour"] == (19, 0, 0, 8)
    reasons = dict(conn.execute("SELECT row_key, reason FROM rejected_rows WHERE run_id = 'run-bad'").fetchall())
    stamp = "2019-03-10T{:02d}:00Z".format
    assert reasons == {
        "catalog_id 10 row 11": "violates location_latitude_range (latitude=95.000000)",
        "catalog_id 11 row 12": "violates landslide_event_continent_code_known (continent_code=XX)",
        "catalog_id 12 row 13": "event_date is missing (landslide_event.event_date is NOT NULL)",
        "catalog_id 13 row 14": "latitude is missing (location.latitude is NOT NULL)",
        "catalog_id 1 row 99": "repeats catalog_id 1 of row 2",
        f"catalog_id 1 event {stamp(0)}": "violates weather_hour_relative_humidity_2m_range (relative_humidity_2m=130.0)",
        f"catalog_id 1 event {stamp(1)}": "violates weather_hour_precipitation_range (precipitation=-1.0)",
        f"catalog_id 1 event {stamp(2)}":
            "violates weather_hour_soil_moisture_7_to_28cm_range (soil_moisture_7_to_28cm=1.7)",
        "catalog_id 1 event ?": "observed_at is missing (weather_hour.observed_at is NOT NULL)",
        f"catalog_id 1 event {stamp(4)}": "violates location_latitude_range (latitude=NaN)",
        "catalog_id 404 event 2019-05-05T00:00Z":
            "catalog_id 404 is not in landslide_event (its catalog row is missing or was rejected)",
        "catalog_id 1 non-event 2018-03-10T00:00Z":
            "non-event window_date 2019-03-13 is not before the date of event 1 (2019-03-10)",
        "catalog_id 1 non-event 2018-03-10T01:00Z":
            "non-event window_date 2019-03-13 is not before the date of event 1 (2019-03-10)",
    }
    raw = conn.execute("SELECT raw FROM rejected_rows WHERE row_key = 'catalog_id 11 row 12'").fetchone()[0]
    assert raw["continent_code"] == "XX" and raw["near"] == "Huancabamba"
    assert conn.execute("SELECT catalog_id FROM landslide_event").fetchall() == [("1",)]
    assert conn.execute("SELECT hours_observed FROM event_weather_daily").fetchall() == [(19,)]

    # The same bad input again is counted again but recorded once.
    again = load(conn, "run-bad-again", [good, *bad_events], hours + orphan + wrong_day)
    assert again["landslide_event"] == (0, 0, 1, 5) and again["weather_hour"] == (0, 0, 19, 8)
    assert conn.execute("SELECT count(*) FROM rejected_rows").fetchone() == (13,)


def test_a_changed_catalog_row_updates_the_event_and_a_moved_window_row_is_rejected(warehouse) -> None:
    conn, _ = warehouse
    ev = EVENTS[0]
    load(conn, "run-1", [ev], weather_day(ev, True, hours=12))
    resized = {**ev, "landslide_size": "Large"}
    later_hours = weather_day(ev, True)[12:]
    elsewhere = [{**h, "latitude": 1.5} for h in later_hours[:2]]

    counts = load(conn, "run-2", [resized], later_hours[2:] + elsewhere)

    # Both versions are undated (the legacy export has no last_edited): the later load wins.
    assert counts["landslide_event"] == (0, 1, 0, 0)
    assert counts["weather_hour"] == (10, 0, 0, 2)
    reasons = sorted(r for (r,) in conn.execute("SELECT DISTINCT reason FROM rejected_rows"))
    assert reasons == [
        "the event window of event 1 is at (-10.383800, -75.426700) on 2019-03-10, "
        "this row says (1.500000, -75.426700) on 2019-03-10",
    ]
    assert conn.execute("SELECT landslide_size FROM landslide_event").fetchone() == ("Large",)
    assert conn.execute("SELECT version->>'landslide_size', replaced_by_run FROM landslide_event_history"
                        ).fetchall() == [("Medium", "run-2")]
    # The accepted later hours widen the window to the whole day.
    assert conn.execute("SELECT hours_observed FROM event_weather_daily").fetchone() == (22,)


def test_views_summarise_each_day_as_computed_by_hand(warehouse) -> None:
    conn, _ = warehouse
    slide = event("1", dt.date(2021, 6, 15), 27.7, 85.3, country="Nepal", near="Kathmandu", continent_code="AS",
                  time_text="night")
    twin = event("2", dt.date(2021, 6, 15), 27.7, 85.3, landslide_category="Mudslide")  # same place, same day
    next_day = event("3", dt.date(2021, 6, 16), 27.7, 85.3)
    american = event("4", dt.date(2021, 6, 15), 40.0, -105.0, continent_code="NA")
    moisture_0_7 = [0.30, 0.35, 0.41, 0.38]
    day = weather_day(slide, True, hours=4, temperature_2m=lambda h: 10.0 + 2 * h,
                      precipitation=lambda h: [0.0, 1.5, 2.0, 0.5][h], rain=lambda h: [0.0, 1.0, 2.0, 0.0][h],
                      relative_humidity_2m=lambda h: 70.0 + 10 * h, soil_moisture_0_to_7cm=lambda h: moisture_0_7[h],
                      soil_moisture_7_to_28cm=0.3, soil_moisture_28_to_100cm=None,
                      soil_temperature_100_to_255cm=None, soil_moisture_100_to_255cm=None)
    year_before = weather_day(slide, False, hours=3, temperature_2m=lambda h: 1.0 + h, precipitation=0.0,
                              rain=0.0, relative_humidity_2m=50.0, soil_moisture_0_to_7cm=0.2)
    twin_day = [{**h, "catalog_id": "2"} for h in day]
    following = weather_day(next_day, True, hours=2, temperature_2m=40.0, precipitation=9.0)

    load(conn, "run-1", [slide, twin, next_day, american], day + year_before + twin_day + following)

    assert conn.execute("SELECT count(*) FROM weather_data").fetchone() == (4 + 3 + 2,)
    features = ("hours_observed, precipitation_sum, rain_sum, temperature_2m_mean, temperature_2m_max, "
                "relative_humidity_2m_mean, soil_moisture_0_to_7cm_max, soil_moisture_7_to_28cm_max, "
                "soil_moisture_28_to_100cm_max, soil_moisture_100_to_255cm_max")
    slide_day = (4, Decimal("4.00"), Decimal("3.00"), Decimal("13.00"), Decimal("16.00"), Decimal("85.00"),
                 Decimal("0.41"), Decimal("0.30"), None, None)
    events = conn.execute(f"SELECT catalog_id, {features} FROM event_weather_daily ORDER BY catalog_id").fetchall()
    assert events == [
        ("1", *slide_day),
        ("2", *slide_day),
        ("3", 2, Decimal("18.00"), Decimal("0.80"), Decimal("40.00"), Decimal("40.00"), Decimal("80.00"),
         Decimal("0.30"), Decimal("0.31"), Decimal("0.32"), Decimal("0.33")),
        ("4", *[None] * 10),
    ]
    details = conn.execute("SELECT event_time, time_text, continent_code, landslide_type FROM event_weather_daily "
                           "WHERE catalog_id IN ('1', '2', '4') ORDER BY catalog_id").fetchall()
    # Event 2's own continent (SA) loses: the first catalog row at a place describes the place.
    assert details == [(None, "night", "AS", "Landslide"), (None, None, "AS", "Mudslide"),
                       (None, None, "NA", "Landslide")]

    training = conn.execute(f"SELECT label, catalog_id, window_date, {features} FROM training_days "
                            "WHERE catalog_id = '1' ORDER BY label").fetchall()
    assert training == [
        ("event", "1", dt.date(2021, 6, 15), *slide_day),
        ("non-event", "1", dt.date(2020, 6, 15), 3, Decimal("0.00"), Decimal("0.00"), Decimal("2.00"),
         Decimal("3.00"), Decimal("50.00"), Decimal("0.20"), Decimal("0.31"), Decimal("0.32"), Decimal("0.33")),
    ]
    assert conn.execute("SELECT label, count(*) FROM training_days GROUP BY label ORDER BY label").fetchall() == [
        ("event", 3), ("non-event", 1)]
