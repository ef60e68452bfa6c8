"""The landslide monitor: crawl's pending windows against the Open-Meteo stand-in's archive end, and the
landslide_monitor DAG on the real scheduler, against the offline stand-ins: the ArcGIS layer serves a catalog
file the test rewrites, and the Open-Meteo stand-in's archive end is moved at runtime. One stack, four runs:
the first (scheduled on unpausing) loads everything, the second only what was edited or added, the third the
window that was pending, the fourth nothing."""
from __future__ import annotations

import csv
import datetime
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from conftest import ROOT, AirflowAPI, bootstrap, free_port, stack_config, wait_for_envs, warehouse_dsn
from test_ingestion import api_calls, archive_server, ingestion_python, ok, read_csv, step, workdir  # noqa: F401

DAG = "landslide_monitor"
LAYER_PATH = "/arcgis/rest/services/Landslides/COOLR_Reports_Points/FeatureServer/0"
TABLES = ("landslide_event", "landslide_event_history", "weather_window", "weather_hour", "pending_window",
          "rejected_rows")
TODAY = datetime.datetime.now(datetime.timezone.utc).date()
YESTERDAY = TODAY - datetime.timedelta(days=1)


def export_time(moment: datetime.datetime | datetime.date) -> str:
    """The COOLR export's 'MM/DD/YYYY hh:mm:ss AM', with the milliseconds the layer keeps (hh:mm:ss.fff AM)."""
    if not isinstance(moment, datetime.datetime):
        moment = datetime.datetime.combine(moment, datetime.time())
    millis = f".{moment.microsecond // 1000:03d}" if moment.microsecond else ""
    return f"{moment:%m/%d/%Y %I:%M:%S}{millis} {moment:%p}"


def report(event_id: int, day: datetime.date, lat: float, lon: float, edited: datetime.datetime,
           title: str, fatalities: str = "") -> dict[str, str]:
    return {"source_name": "test", "event_id": str(event_id), "event_date": export_time(day), "event_title": title,
            "location_accuracy": "exact", "landslide_category": "landslide", "landslide_trigger": "rain",
            "landslide_size": "medium", "fatality_count": fatalities, "country_name": "Testland",
            "country_code": "CH", "submitted_date": export_time(edited), "created_date": export_time(edited),
            "last_edited_date": export_time(edited), "latitude": str(lat), "longitude": str(lon)}


FIRST_EDIT = datetime.datetime.combine(YESTERDAY, datetime.time(12))
FIRST = [report(9001, datetime.date(2019, 6, 1), 47.5, 8.5, FIRST_EDIT - datetime.timedelta(days=300), "Brienz"),
         report(9002, datetime.date(2020, 3, 15), 46.2, 7.3, FIRST_EDIT - datetime.timedelta(days=200), "Sion"),
         report(9003, YESTERDAY, 46.8, 9.8, FIRST_EDIT, "Davos")]


def write_catalog(path: Path, reports: list[dict[str, str]]) -> None:
    with (ROOT / "tasks" / "ingestion" / "demo_live_catalog.csv").open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(reports)


def http(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
        return json.loads(response.read())


# ------------------------------------------------------------------ crawl and the archive's end, no Airflow

def write_places(workdir: Path, windows: list[tuple[str, float]]) -> None:
    """One event window per (day, longitude); crawl asks for each place's local day (timezone=auto)."""
    rows = [f"e{i},true,45.0,{lon},{day}" for i, (day, lon) in enumerate(windows)]
    (workdir / "run" / "windows-catalog.csv").write_text("catalog_id,is_event,latitude,longitude,window_date\n"
                                                          + "\n".join(rows) + "\n")


def cached_days(workdir: Path) -> list[str]:
    """The days of the answers in the crawl cache of workdir's warehouse."""
    with psycopg.connect((workdir / "warehouse.dsn").read_text()) as conn:
        return [day for (day,) in conn.execute("SELECT day::text FROM crawl.answer ORDER BY day")]


def test_days_the_archive_has_no_values_for_yet_wait_and_older_ones_fail(ingestion_python: str,
                                                                           workdir: Path) -> None:
    after_today = (TODAY + datetime.timedelta(days=2)).isoformat()
    # At 120° W the local day 2018-12-31 ends at 08:00 UTC on 2019-01-01: its last 8 hours are not in yet.
    write_places(workdir, [(YESTERDAY.isoformat(), 20.0), ("2019-05-01", 20.0), ("2018-06-01", 20.0),
                           (after_today, 20.0), ("2018-12-31", -120.0)])
    with archive_server("--archive-end", "2018-12-31") as url:
        # A negative lag asks for days after today too, which the archive refuses as out of its range.
        out = ok(step(ingestion_python, "crawl.py", "--url", url, "--archive-lag-days", "-3",
                      "--max-failed-ratio", "1", workdir=workdir))
        assert api_calls(url)["archive_end"] == "2018-12-31"
    run = workdir / "run"
    assert [w["window_date"] for w in read_csv(run / "pending_windows.csv")] == [YESTERDAY.isoformat(), after_today]
    assert {(w["window_date"], w["reason"]) for w in read_csv(run / "failed_windows.csv")} == {
        ("2019-05-01", "the archive answered no values for 24 of the day's 24 hours (older than --recent-days 30)"),
        ("2018-12-31", "the archive answered no values for 8 of the day's 24 hours (older than --recent-days 30)")}
    assert len(read_csv(run / "hourly.csv")) == 24, "only 2018-06-01 has values"
    assert "the archive has no values yet for 4 place-days: 2 of the last 30 days wait as pending, 2 older" in out
    assert cached_days(workdir) == ["2018-06-01"], "an empty answer is not cached"


def test_moving_the_archive_end_serves_the_pending_days(ingestion_python: str, workdir: Path) -> None:
    half_in = (TODAY - datetime.timedelta(days=5)).isoformat()  # the stand-in's archive end at first
    write_places(workdir, [(YESTERDAY.isoformat(), 20.0), (half_in, -120.0), (half_in, 120.0)])
    with archive_server() as url:
        admin = url.replace("/v1/archive", "/admin/archive-end")
        ok(step(ingestion_python, "crawl.py", "--url", url, "--archive-lag-days", "0", workdir=workdir))
        assert [w["longitude"] for w in read_csv(workdir / "run" / "pending_windows.csv")] == ["20.0", "-120.0"]
        assert len(read_csv(workdir / "run" / "hourly.csv")) == 24, "east of Greenwich the day is complete"
        with pytest.raises(urllib.error.HTTPError) as refused:
            http(admin, {"archive_end": "soon"})
        assert refused.value.code == 400 and "YYYY-MM-DD" in json.loads(refused.value.read())["reason"]
        assert http(admin, {"archive_end": TODAY.isoformat()}) == {"archive_end": TODAY.isoformat()}
        ok(step(ingestion_python, "crawl.py", "--url", url, "--archive-lag-days", "0", workdir=workdir))
    assert read_csv(workdir / "run" / "pending_windows.csv") == []
    assert len(read_csv(workdir / "run" / "hourly.csv")) == 3 * 24


def test_the_warehouse_options_without_a_warehouse_say_what_to_set(ingestion_python: str, workdir: Path) -> None:
    write_places(workdir, [("2019-05-01", 20.0)])
    none = {"VPE_WAREHOUSE_DSN": ""}
    pending = step(ingestion_python, "crawl.py", "--pending-from-warehouse", workdir=workdir, env=none)
    crawl = step(ingestion_python, "crawl.py", workdir=workdir, env=none)
    extract = step(ingestion_python, "extract.py", "--since", "warehouse",
                   str(ROOT / "tests" / "fixtures" / "catalogs" / "coolr_export.csv"), workdir=workdir, env=none)
    for result, option in ((pending, "--pending-from-warehouse"), (crawl, "crawl (its answer cache is the "
                                                                          "warehouse's)"),
                           (extract, "--since warehouse")):
        assert result.returncode == 1 and f"{option} needs the warehouse: set VPE_WAREHOUSE_DSN" in result.stderr


# ------------------------------------------------------------------ the DAG on the real scheduler

@pytest.fixture(scope="module")
def monitor_stack(stack_home: Path) -> Iterator[dict[str, str]]:
    env = stack_config(stack_home / "monitor-stack")
    catalog = stack_home / "monitor-catalog.csv"
    write_catalog(catalog, FIRST)
    env.update(VPE_OPEN_METEO_PORT=str(free_port()), VPE_ARCGIS_PORT=str(free_port()),
               VPE_ARCGIS_CATALOG=str(catalog))
    bootstrap("--offline-demo", "up", env=env)
    wait_for_envs(env)
    yield env
    bootstrap("down", env=env, check=False)


class Monitor:
    """The DAG's runs and what they left in the demo warehouse."""

    def __init__(self, env: dict[str, str]) -> None:
        self.airflow = AirflowAPI(env)
        self.dsn = warehouse_dsn(env, "warehouse_demo")
        self.layer = f"http://127.0.0.1:{env['VPE_ARCGIS_PORT']}{LAYER_PATH}"
        self.archive = f"http://127.0.0.1:{env['VPE_OPEN_METEO_PORT']}"

    def query(self, sql: str, *params: object) -> list[tuple]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(sql, params).fetchall()

    def counts(self) -> dict[str, int]:
        return {table: self.query(f"SELECT count(*) FROM {table}")[0][0] for table in TABLES}

    def pending(self) -> list[tuple]:
        return self.query("SELECT e.catalog_id, p.is_event, p.window_date FROM pending_window p "
                          "JOIN landslide_event e USING (landslide_event_id) ORDER BY 1, 2")

    def watermark(self) -> datetime.datetime | None:
        return self.query("SELECT source_watermark(%s)", self.layer)[0][0]

    def finished(self, run_id: str) -> dict[str, str]:
        """Waits for the run to succeed; returns each task's log."""
        assert self.airflow.wait_for_run(DAG, run_id, timeout=600) == "success", self.airflow.explain(DAG, run_id)
        return {task: self.airflow.task_log(DAG, run_id, task) for task in ("extract", "crawl", "load")}

    def run(self, conf: dict | None = None) -> dict[str, str]:
        return self.finished(self.airflow.trigger(DAG, {"archive_lag_days": 0, **(conf or {})}))

    def first_scheduled_run(self) -> str:
        """Unpausing starts the daily schedule: one run for the latest day, at once (catchup is off)."""
        self.airflow.wait_for_dag(DAG)
        assert self.airflow.request("GET", f"/api/v2/dags/{DAG}")["is_paused"], "the monitor starts paused"
        self.airflow.request("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
        runs: list[dict] = []
        for _ in range(120):
            runs = self.airflow.request("GET", f"/api/v2/dags/{DAG}/dagRuns")["dag_runs"]
            if runs:
                break
            time.sleep(1)
        assert [run["run_type"] for run in runs] == ["scheduled"], runs
        return runs[0]["dag_run_id"]

    def asset_events(self, table: str) -> list[dict]:
        [asset] = [a for a in self.airflow.request("GET", f"/api/v2/assets?name_pattern={table}")["assets"]
                   if a["name"] == f"warehouse.{table}"]
        return self.airflow.request("GET", f"/api/v2/assets/events?asset_id={asset['id']}&order_by=timestamp")[
            "asset_events"]


def test_the_monitor_loads_new_and_edited_reports_and_fetches_pending_windows_once_the_archive_has_them(
        monitor_stack: dict[str, str]) -> None:
    monitor = Monitor(monitor_stack)
    catalog = Path(monitor_stack["VPE_ARCGIS_CATALOG"])

    # 1. The scheduled run (archive lag 5 days): everything; yesterday's event day waits for the archive.
    logs = monitor.finished(monitor.first_scheduled_run())
    assert "no watermark" in logs["extract"] and "read 3 rows = 3 events + 0 rejected" in logs["extract"]
    assert monitor.pending() == [("9003", True, YESTERDAY)]
    assert "1 windows of 1 events wait in the warehouse for the archive" in logs["load"]
    counts = monitor.counts()
    assert (counts["landslide_event"], counts["weather_window"], counts["weather_hour"]) == (3, 5, 5 * 24)
    assert monitor.watermark() == FIRST_EDIT.replace(tzinfo=datetime.timezone.utc)
    [event] = monitor.asset_events("landslide_event")
    assert {key: event["extra"][key] for key in ("database", "changed", "events_added", "windows_pending")} == {
        "database": "warehouse_demo", "changed": True, "events_added": 3, "windows_pending": 1}

    # 2. One report edited, one added: only those two are read; the pending window is asked for again, and the
    #    archive (its end still 5 days back) answers it with null hours: still pending, not failed.
    edited = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=516000, tzinfo=None) \
        - datetime.timedelta(minutes=1)
    write_catalog(catalog, [report(9001, datetime.date(2019, 6, 1), 47.5, 8.5, edited, "Brienz/Brinzauls", "2"),
                            *FIRST[1:], report(9004, datetime.date(2021, 7, 14), 47.4, 8.0, edited, "Aarau")])
    before = monitor.counts()
    logs = monitor.run()
    assert "read 2 rows = 2 events + 0 rejected" in logs["extract"]
    wheres = http(f"http://127.0.0.1:{monitor_stack['VPE_ARCGIS_PORT']}/stats")["wheres"]
    assert any(FIRST_EDIT.strftime("%Y-%m-%d %H:%M:%S") in where for where in wheres), wheres
    assert "the archive has no values yet for 1 place-days" in logs["crawl"]
    assert monitor.pending() == [("9003", True, YESTERDAY)]
    after = monitor.counts()
    assert after["landslide_event"] == before["landslide_event"] + 1
    assert after["landslide_event_history"] == before["landslide_event_history"] + 1
    assert monitor.query("SELECT title, fatalities FROM landslide_event WHERE catalog_id = '9001'") == [
        ("Brienz/Brinzauls", 2)]
    assert monitor.query("SELECT version->>'title' FROM landslide_event_history WHERE catalog_id = '9001'") == [
        ("Brienz",)]
    assert after["weather_window"] == before["weather_window"] + 2  # the new event's two windows
    assert monitor.watermark() == edited.replace(tzinfo=datetime.timezone.utc), "to the millisecond"

    # 3. The archive reaches yesterday: the pending window is fetched and leaves pending.
    assert http(f"{monitor.archive}/admin/archive-end", {"archive_end": TODAY.isoformat()}) == {
        "archive_end": TODAY.isoformat()}
    before = monitor.counts()
    logs = monitor.run()
    assert "read 0 rows" in logs["extract"]
    assert monitor.pending() == []
    assert "no windows wait for the archive" in logs["load"]
    after = monitor.counts()
    assert (after["landslide_event"], after["weather_window"], after["weather_hour"]) == (
        before["landslide_event"], before["weather_window"] + 1, before["weather_hour"] + 24)
    assert monitor.query("SELECT count(*) FROM weather_window w JOIN landslide_event e USING (landslide_event_id) "
                         "WHERE e.catalog_id = '9003' AND w.is_event AND w.window_date = %s", YESTERDAY) == [(1,)]

    # 4. Nothing new: nothing added, the watermark stays. The layer's answer for the watermark's second (the
    #    where says whole seconds) holds the two reports edited in it, dropped on their milliseconds.
    mark = monitor.watermark()
    logs = monitor.run()
    assert "read 0 rows = 0 events + 0 rejected; 2 more not created or edited since" in logs["extract"]
    assert f"nothing edited since {edited.replace(tzinfo=datetime.timezone.utc).isoformat()}" in logs["extract"]
    assert monitor.counts() == after and monitor.watermark() == mark
    events = monitor.asset_events("landslide_event")
    assert len(events) == 4 and {event["source_dag_id"] for event in events} == {DAG}
    assert events[-1]["extra"]["changed"] is False and events[-1]["extra"]["events_added"] == 0
