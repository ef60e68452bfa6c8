"""Both catalog export formats, the live ArcGIS layer (against its local stand-in), and crawl's handling of
request-wide refusals, the API key and windows the archive cannot serve yet. Extract's outputs are checked
directly (files, counts, values); loading them is test_ingestion.py's business."""
from __future__ import annotations

import csv
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from conftest import ROOT, bootstrap
from test_ingestion import (DEMO, TASKS, api_calls, archive_server, ingestion_python, ok, read_csv,  # noqa: F401
                            read_rejects, step, workdir, write_windows)

sys.path.insert(0, str(TASKS))
from common import HOURLY_COLUMNS  # noqa: E402 (the contract, from the steps' own module)

CURRENT = ROOT / "tests" / "fixtures" / "catalogs" / "coolr_export.csv"
CURRENT_ROWS, CURRENT_EVENTS, CURRENT_REJECTS = 12, 7, 5
STANDIN = TASKS / "arcgis_server.py"
LAYER_PATH = "/arcgis/rest/services/Landslides/COOLR_Reports_Points/FeatureServer/0"
QUICK = ["--retries", "3", "--backoff", "0.01"]


def counts_line(rows: int, events: int, rejects: int) -> str:
    return f"read {rows} rows = {events} events + {rejects} rejected"


def events_by_id(path: Path) -> dict[str, dict[str, str]]:
    return {event["catalog_id"]: event for event in read_csv(path)}


def without(rows: list[dict[str, str]], *names: str) -> list[dict[str, str]]:
    return [{key: value for key, value in row.items() if key not in names} for row in rows]


# ------------------------------------------------------------------ the current export, CSV and XLSX

def test_current_export_csv_maps_onto_the_shared_columns(ingestion_python: str, workdir: Path) -> None:
    out = ok(step(ingestion_python, "extract.py", str(CURRENT), workdir=workdir))
    assert "the current COOLR export" in out and counts_line(CURRENT_ROWS, CURRENT_EVENTS, CURRENT_REJECTS) in out
    run = workdir / "run"
    events, rejects = read_csv(run / "events-catalog.csv"), read_rejects(run / "rejects-catalog.jsonl")
    with CURRENT.open(newline="", encoding="utf-8") as handle:
        assert len(events) + len(rejects) == CURRENT_ROWS == len(list(csv.DictReader(handle)))
    assert len(read_csv(run / "windows-catalog.csv")) == 2 * len(events)
    by_id = events_by_id(run / "events-catalog.csv")
    sigou = by_id["684"]
    # 12:00:00 AM is the catalog's "time unknown"; the text is kept.
    assert (sigou["event_date"], sigou["event_time"], sigou["time_text"]) == ("2008-08-01", "", "12:00:00 AM")
    assert sigou["last_edited"] == "2018-02-15T15:51:00+00:00" and sigou["continent_code"] == "AS"
    assert (sigou["title"], sigou["near"], sigou["admin_division"]) == (
        "Sigou Village, Loufan County, Shanxi", "Jingyang", "Shanxi")
    assert (sigou["fatalities"], sigou["injuries"], sigou["hazard_type"], sigou["landslide_size"]) == (
        "11", "", "", "large")
    oso = by_id["956"]
    assert (oso["event_time"], oso["time_text"], oso["title"], oso["injuries"]) == (
        "10:37:00", "10:37:00 AM", "Oso, Washington", "10")  # trailing blanks dropped
    assert (oso["landslide_category"], oso["landslide_trigger"], oso["landslide_size"], oso["landslide_setting"],
            oso["location_accuracy"], oso["continent_code"]) == (
        "debris_flow", "continuous_rain", "very_large", "natural_slope", "exact_location", "NA")
    assert (by_id["7301"]["event_time"], by_id["7301"]["time_text"]) == ("", "Overnight")
    cambray = by_id["8802"]  # event_time says otherwise than event_date's 12:00:00 AM
    assert (cambray["event_time"], cambray["time_text"], cambray["fatalities"]) == ("21:30:00", "9:30 PM", "280")
    assert (cambray["landslide_trigger"], cambray["location_accuracy"]) == ("downpour", "known_within_1_km")
    assert (by_id["9120"]["last_edited"], by_id["9120"]["continent_code"]) == ("", "EU")
    assert (by_id["9545"]["event_time"], by_id["9545"]["continent_code"]) == ("12:00:00", "OC")
    assert sorted(r["reason"].split(":")[0] for r in rejects) == [
        "date in the future", "duplicate id", "fatality_count is not a whole number >= 0", "missing latitude",
        "unparseable event_date"]
    assert all(r["raw"]["event_id"] for r in rejects) and {e["source"] for e in events} == {"coolr_export.csv"}


def write_current_xlsx(python: str, path: Path) -> None:
    """The fixture as an XLSX the way a spreadsheet export holds it: date cells, number cells, text elsewhere."""
    script = ("import csv, sys, datetime, openpyxl\n"
              "book = openpyxl.Workbook(); sheet = book.active\n"
              "rows = list(csv.reader(open(sys.argv[2], encoding='utf-8', newline='')))\n"
              "sheet.append(rows[0])\n"
              "def cell(name, text):\n"
              "    if name.endswith('_date'):\n"
              "        try: return datetime.datetime.strptime(text, '%m/%d/%Y %I:%M:%S %p')\n"
              "        except ValueError: return text or None\n"
              "    if name in ('event_id', 'fatality_count', 'injury_count', 'latitude', 'longitude'):\n"
              "        try: return float(text) if '.' in text else int(text)\n"
              "        except ValueError: return text or None\n"
              "    return text or None\n"
              "for row in rows[1:]:\n"
              "    sheet.append([cell(name, text) for name, text in zip(rows[0], row)])\n"
              "book.save(sys.argv[1])\n")
    subprocess.run([python, "-c", script, str(path), str(CURRENT)], check=True, timeout=120)


def test_current_export_xlsx_gives_the_same_events_as_the_csv(ingestion_python: str, workdir: Path) -> None:
    book = workdir / "coolr_export.xlsx"
    write_current_xlsx(ingestion_python, book)
    for name, catalog in (("csv", CURRENT), ("xlsx", book)):
        out = ok(step(ingestion_python, "extract.py", "--name", name, str(catalog), workdir=workdir))
        assert counts_line(CURRENT_ROWS, CURRENT_EVENTS, CURRENT_REJECTS) in out, out
    run = workdir / "run"
    assert without(read_csv(run / "events-csv.csv"), "source") == without(read_csv(run / "events-xlsx.csv"), "source")
    assert read_csv(run / "windows-csv.csv") == read_csv(run / "windows-xlsx.csv")
    assert [r["reason"] for r in read_rejects(run / "rejects-csv.jsonl")] == \
        [r["reason"] for r in read_rejects(run / "rejects-xlsx.jsonl")]


def test_a_file_of_neither_format_names_the_columns_of_both(ingestion_python: str, workdir: Path) -> None:
    bad = workdir / "half.csv"
    bad.write_text("event_id,id,event_date\n1,1,01/01/2020 12:00:00 AM\n")
    result = step(ingestion_python, "extract.py", str(bad), workdir=workdir)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "legacy 2007-2016 export it lacks catalog column(s) date, time" in result.stderr
    assert "current COOLR export it lacks catalog column(s) event_time, event_title" in result.stderr
    assert not list((workdir / "run").glob("*.csv"))


def test_since_needs_edit_dates_the_legacy_export_lacks(ingestion_python: str, workdir: Path) -> None:
    result = step(ingestion_python, "extract.py", str(DEMO), "--since", "2020-01-01", workdir=workdir)
    assert result.returncode == 1 and "--since cannot apply" in result.stderr and "no edit dates" in result.stderr


def test_since_on_a_current_export_file_skips_older_reports(ingestion_python: str, workdir: Path) -> None:
    out = ok(step(ingestion_python, "extract.py", str(CURRENT), "--since", "2023-01-01", workdir=workdir))
    assert counts_line(2, 2, 0) in out and "10 more not created or edited since 2023-01-01" in out
    assert sorted(events_by_id(workdir / "run" / "events-catalog.csv")) == ["9544", "9545"]
    # An edit in the watermark's own second is read again, not lost: the file's times have whole seconds.
    out = ok(step(ingestion_python, "extract.py", str(CURRENT), "--since", "2023-02-04T10:00:00+00:00",
                  workdir=workdir))
    assert counts_line(1, 1, 0) in out and sorted(events_by_id(workdir / "run" / "events-catalog.csv")) == ["9545"]


# ------------------------------------------------------------------ the live layer, against its stand-in

@contextmanager
def layer(catalog: Path, *args: str) -> Iterator[str]:
    """The ArcGIS stand-in on loopback serving `catalog`; yields the layer URL."""
    proc = subprocess.Popen([sys.executable, str(STANDIN), "--catalog", str(catalog), "--port", "0", "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        proc.stdout.readline()
        address = proc.stdout.readline()
        found = re.search(r"http://\S+/FeatureServer/0", address)
        assert found, address
        yield found.group(0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdout.close()


def layer_stats(url: str) -> dict:
    base = url[:url.index("/arcgis/")]
    with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
        return json.load(response)


def layer_query(url: str, **params: str) -> dict:
    query = "&".join(f"{key}={urllib.request.quote(value)}" for key, value in params.items())
    with urllib.request.urlopen(f"{url}/query?{query}", timeout=10) as response:
        assert response.status == 200
        return json.load(response)


@pytest.fixture
def served(tmp_path: Path) -> Path:
    """A copy of the fixture the test may rewrite while the stand-in serves it."""
    copy = tmp_path / "served.csv"
    copy.write_bytes(CURRENT.read_bytes())
    return copy


def test_standin_answers_like_the_real_layer(served: Path) -> None:
    with layer(served, "--max-record-count", "5") as url:
        assert layer_query(url, where="1=1", returnCountOnly="true", f="json") == {"count": CURRENT_ROWS}
        page = layer_query(url, where="1=1", outFields="*", orderByFields="objectid ASC", resultOffset="10",
                           resultRecordCount="100", f="json")
        assert page["exceededTransferLimit"] is False and len(page["features"]) == 2
        first = layer_query(url, where="1=1", outFields="*", resultRecordCount="100", f="json")
        assert first["exceededTransferLimit"] is True and len(first["features"]) == 5  # capped at maxRecordCount
        sigou = first["features"][0]["attributes"]
        assert sigou["event_date"] == 1217548800000 and sigou["event_id"] == 684 and sigou["fatality_count"] == 11.0
        assert sigou["injury_count"] is None
        refused = layer_query(url, where="event_id = 684", f="json")
        assert refused["error"]["code"] == 400 and "'where' parameter is invalid" in refused["error"]["details"]


def test_layer_read_pages_through_and_matches_the_export(ingestion_python: str, workdir: Path, served: Path) -> None:
    with layer(served, "--max-record-count", "5") as url:
        out = ok(step(ingestion_python, "extract.py", url, "--name", "live", workdir=workdir))
        stats = layer_stats(url)
    assert counts_line(CURRENT_ROWS, CURRENT_EVENTS, CURRENT_REJECTS) in out
    assert stats["calls"] == 1 + 3 and stats["wheres"] == ["1=1"] * 4  # the count, then 5 + 5 + 2 reports
    ok(step(ingestion_python, "extract.py", str(CURRENT), "--name", "file", workdir=workdir))
    run = workdir / "run"
    live = read_csv(run / "events-live.csv")
    assert {e["source"] for e in live} == {url}
    assert without(live, "source", "row_number") == without(read_csv(run / "events-file.csv"), "source", "row_number")
    by_id = events_by_id(run / "events-live.csv")
    assert (by_id["684"]["event_date"], by_id["684"]["time_text"], by_id["684"]["catalog_id"]) == (
        "2008-08-01", "12:00:00 AM", "684")


def test_live_keyword_reads_the_configured_layer(ingestion_python: str, workdir: Path, served: Path) -> None:
    with layer(served) as url:
        out = ok(step(ingestion_python, "extract.py", "live", workdir=workdir, env={"VPE_GLC_LAYER_URL": url}))
    assert counts_line(CURRENT_ROWS, CURRENT_EVENTS, CURRENT_REJECTS) in out


def test_since_reads_only_reports_created_or_edited_after_it(ingestion_python: str, workdir: Path,
                                                             served: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    with layer(served) as url:
        ok(step(ingestion_python, "extract.py", url, "--name", "first", workdir=workdir))
        watermark = now.replace(microsecond=0).isoformat()
        later = (now + datetime.timedelta(minutes=5)).strftime("%m/%d/%Y %I:%M:%S %p")
        with served.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = rows[0]
        edited = rows[1]  # report 684 gets an edit
        edited[header.index("fatality_count")] = "12"
        edited[header.index("last_edited_date")] = later
        added = list(rows[2])  # and a new report appears
        for name, value in (("event_id", "20001"), ("event_date", "05/01/2024 12:00:00 AM"),
                            ("created_date", later), ("last_edited_date", later)):
            added[header.index(name)] = value
        with served.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([*rows, added])
        out = ok(step(ingestion_python, "extract.py", url, "--name", "since", "--since", watermark, workdir=workdir))
        stats = layer_stats(url)
    assert counts_line(2, 2, 0) in out
    sent = f"last_edited_date > timestamp '{now:%Y-%m-%d %H:%M:%S}' OR created_date > timestamp '{now:%Y-%m-%d %H:%M:%S}'"
    assert stats["wheres"][-2:] == [sent, sent]  # the count and the one page
    by_id = events_by_id(workdir / "run" / "events-since.csv")
    assert sorted(by_id) == ["20001", "684"] and by_id["684"]["fatalities"] == "12"
    assert by_id["20001"]["event_date"] == "2024-05-01"


def test_the_watermark_keeps_the_layers_milliseconds_so_a_run_right_after_keeps_nothing(
        ingestion_python: str, workdir: Path, served: Path, empty_db: tuple[str, dict[str, str]]) -> None:
    dsn, env = empty_db
    bootstrap("migrate", env=env)
    warehouse = {"VPE_WAREHOUSE_DSN": dsn}
    with served.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    edits = {"956": "02/04/2024 10:00:14.516 AM", "9544": "02/04/2024 10:00:14.200 AM"}  # one second, two edits
    for row in rows:
        row["last_edited_date"] = edits.get(row["event_id"], row["last_edited_date"])
    with served.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (workdir / "run" / "hourly.csv").write_text(",".join(HOURLY_COLUMNS) + "\n")
    newest = datetime.datetime(2024, 2, 4, 10, 0, 14, 516000, datetime.timezone.utc)

    with layer(served) as url:
        ok(step(ingestion_python, "extract.py", url, "--since", "warehouse", workdir=workdir, env=warehouse))
        ok(step(ingestion_python, "load.py", workdir=workdir, env=warehouse))
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT source_watermark(%s)", (url,)).fetchone() == (newest,)
            assert conn.execute("SELECT catalog_id, last_edited FROM landslide_event WHERE catalog_id IN "
                                "('956', '9544') ORDER BY 1").fetchall() == [
                ("9544", newest.replace(microsecond=200000)), ("956", newest)]

        # The layer's where says whole seconds: both edits of the watermark's second come back, and are dropped.
        out = ok(step(ingestion_python, "extract.py", url, "--since", "warehouse", workdir=workdir, env=warehouse))
        assert layer_stats(url)["wheres"][-1] == ("last_edited_date > timestamp '2024-02-04 10:00:14' OR "
                                                  "created_date > timestamp '2024-02-04 10:00:14'")
    assert f"{counts_line(0, 0, 0)}; 2 more not created or edited since {newest.isoformat()}, skipped" in out
    assert f"nothing edited since {newest.isoformat()}" in out
    assert read_csv(workdir / "run" / "events-catalog.csv") == []


def test_an_arcgis_error_in_a_200_answer_fails_clearly(ingestion_python: str, workdir: Path, served: Path) -> None:
    with layer(served, "--error-every", "1") as url:
        result = step(ingestion_python, "extract.py", url, *QUICK, workdir=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ArcGIS error 400" in result.stderr and "Injected failure" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list((workdir / "run").glob("events-*.csv")), "never read as zero rows"


def test_a_5xx_from_the_layer_is_retried(ingestion_python: str, workdir: Path, served: Path) -> None:
    with layer(served, "--fail-500-every", "2", "--max-record-count", "5") as url:
        out = ok(step(ingestion_python, "extract.py", url, *QUICK, workdir=workdir))
        stats = layer_stats(url)
    assert "HTTP 500" in out and "retry 1/3" in out
    assert stats["by_status"] == {"200": 4, "500": 3}  # each page's first try fails once
    assert counts_line(CURRENT_ROWS, CURRENT_EVENTS, CURRENT_REJECTS) in out


def test_a_layer_that_keeps_failing_gives_up_with_the_reason(ingestion_python: str, workdir: Path,
                                                             served: Path) -> None:
    with layer(served, "--error-every", "1", "--error-code", "503") as url:
        result = step(ingestion_python, "extract.py", url, *QUICK, workdir=workdir)
        assert layer_stats(url)["calls"] == 4
    assert result.returncode == 1 and "no answer after 4 attempts" in result.stderr
    assert "ArcGIS error 503" in result.stderr


# ------------------------------------------------------------------ crawl

def test_a_request_wide_refusal_stops_after_two_calls(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, [f"2019-05-{d:02d}" for d in range(1, 9)])
    with archive_server() as url:
        result = step(ingestion_python, "crawl.py", "--url", url, "--timezone", "Mars/Base", "--batch-size", "8",
                      workdir=workdir)
        calls = api_calls(url)["calls"]
    assert result.returncode == 1 and "refuses the request as a whole" in result.stderr, result.stderr
    assert "Invalid timezone" in result.stderr
    assert calls == 2, "the batch, then one known-good window; halving would have made 15"
    assert len(read_csv(workdir / "run" / "failed_windows.csv")) == 8


def test_a_refused_window_still_costs_only_the_halving(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, ["2019-05-01", "1939-06-01", "2019-05-03", "2019-05-04"])
    with archive_server() as url:
        result = step(ingestion_python, "crawl.py", "--url", url, "--max-failed-ratio", "0.5", workdir=workdir)
        calls = api_calls(url)["calls"]
    out = ok(result)
    assert "the request itself is fine" in out
    assert calls == 1 + 1 + 4  # the batch, the check, then halves [2 | 2] and [1 | 1] of the refused one
    [failed] = read_csv(workdir / "run" / "failed_windows.csv")
    assert failed["window_date"] == "1939-06-01"


def test_windows_the_archive_cannot_serve_yet_are_pending(ingestion_python: str, workdir: Path) -> None:
    today = datetime.datetime.now(datetime.timezone.utc).date()
    days = ["2019-05-01", (today - datetime.timedelta(days=2)).isoformat(), today.isoformat(), "2019-05-02"]
    write_windows(workdir, days)
    with archive_server() as url:
        out = ok(step(ingestion_python, "crawl.py", "--url", url, workdir=workdir))
        assert api_calls(url)["locations"] == 2, "pending windows are not asked for"
    run = workdir / "run"
    with (run / "pending_windows.csv").open(newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == ["catalog_id", "is_event", "latitude", "longitude", "window_date"]
    assert [w["window_date"] for w in read_csv(run / "pending_windows.csv")] == days[1:3]
    assert read_csv(run / "failed_windows.csv") == [] and len(read_csv(run / "hourly.csv")) == 2 * 24
    summary = json.loads((run / "crawl_summary.json").read_text())
    assert (summary["windows_pending"], summary["windows_failed"], summary["windows_with_data"]) == (2, 0, 2)
    assert "+ 2 pending" in out


class KeyRecorder(BaseHTTPRequestHandler):
    """An archive that refuses every key, remembering what it was sent."""
    seen: list[dict[str, list[str]]] = []

    def do_GET(self) -> None:
        self.seen.append(parse_qs(urlsplit(self.path).query))
        body = json.dumps({"error": True, "reason": "API key is invalid"}).encode()
        self.send_response(400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_api_key_goes_with_every_call(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, ["2019-05-01", "2019-05-02", "2019-05-03"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeyRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/archive"
        result = step(ingestion_python, "crawl.py", "--url", url, workdir=workdir,
                      env={"OPEN_METEO_API_KEY": "sekrit-123"})
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1 and "API key is invalid" in result.stderr, result.stderr
    assert [query["apikey"] for query in KeyRecorder.seen] == [["sekrit-123"], ["sekrit-123"]]
    assert "sekrit-123" not in result.stdout + result.stderr


def test_with_an_api_key_the_customer_endpoint_and_its_limits_apply(ingestion_python: str, workdir: Path) -> None:
    (workdir / "run" / "windows-catalog.csv").write_text("catalog_id,is_event,latitude,longitude,window_date\n")
    out = ok(step(ingestion_python, "crawl.py", workdir=workdir, env={"OPEN_METEO_API_KEY": "k"}))
    assert "from https://customer-archive-api.open-meteo.com/v1/archive with the API key" in out
    help_text = ok(step(ingestion_python, "crawl.py", "--help", workdir=workdir))
    assert "with an API key, none" in help_text


# ------------------------------------------------------------------ the DAG's sources

DAG_PROBE = """
import json, sys
from airflow.dag_processing.dagbag import BundleDagBag
bag = BundleDagBag(dag_folder=sys.argv[1], bundle_path=sys.argv[1])
dag = bag.dags["ingestion"]
make_args = dag.get_task("extract_args").python_callable
print(json.dumps({"default": dag.params["sources"], "csv_only": make_args(params={"sources": ["only.csv"]}),
                  "two": make_args(params={"sources": ["a.csv", "live"]})}))
"""


def test_the_dag_maps_one_extract_per_listed_source() -> None:
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run([sys.executable, "-c", DAG_PROBE, str(ROOT / "dags")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["default"] == ["tasks/ingestion/demo_catalog.csv", "tasks/ingestion/demo_catalog.xlsx"]
    assert answer["csv_only"] == [["--name", "source-0", "only.csv"]]
    assert answer["two"] == [["--name", "source-0", "a.csv"], ["--name", "source-1", "live"]]
