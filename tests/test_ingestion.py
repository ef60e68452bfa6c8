"""The ingestion steps (extract, crawl, load) as real subprocesses in the ingestion env, against the local
Open-Meteo-compatible server and a real PostgreSQL warehouse; a DAG-shaped run (two extracts at once into one
workspace, then crawl, then load) goes through a real executor."""
from __future__ import annotations

import csv
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from conftest import ROOT, SHARED_DATA, bootstrap, free_port, read_secrets, warehouse_dsn

TASKS = ROOT / "tasks" / "ingestion"
SERVER = TASKS / "open_meteo_server.py"
DEMO = TASKS / "demo_catalog.csv"
DEMO_XLSX = TASKS / "demo_catalog.xlsx"  # the same rows, with the real export's cell types (dates as date cells)
DEMO_ROWS, DEMO_EVENTS, DEMO_REJECTS = 21, 15, 6
# Built ingestion envs survive between sessions here (keyed by the yml's hash, like the executor's own).
ENV_CACHE = ROOT / ".vpe" / "test-envs"
QUICK_RETRIES = ["--retries", "2", "--backoff", "0.01"]


@pytest.fixture(scope="session")
def ingestion_python() -> str:
    """The python of envs/ingestion.yml, built with the executor's own build commands."""
    sys.path.insert(0, str(ROOT))
    import executor

    spec = executor.parse_env_yml(ROOT / "envs" / "ingestion.yml")
    backend = executor.detect_backend("auto")
    prefix = ENV_CACHE / f"ingestion-{spec.digest(backend)}"
    if not (prefix / executor.READY_MARKER).exists():
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for command in executor.build_commands(backend, spec, prefix):
            subprocess.run(command, check=True, env=executor.build_environment(), capture_output=True, timeout=900)
        (prefix / executor.READY_MARKER).write_text(f"{spec.path}\n")
    return str(prefix / "bin" / "python")


@contextmanager
def archive_server(*args: str, port: int = 0) -> Iterator[str]:
    """The local Open-Meteo stand-in on loopback; yields its /v1/archive URL."""
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        banner, address = proc.stdout.readline(), proc.stdout.readline()
        assert "SYNTHETIC weather data" in banner, banner + address
        yield re.search(r"http://\S+/v1/archive", address).group(0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        proc.stdout.close()


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    with archive_server() as url:
        yield url


def api_calls(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/v1/archive", "/stats"), timeout=10) as response:
        return json.load(response)


def own_warehouse(folder: Path, pg_env: dict[str, str], template: str) -> str:
    """A new warehouse database for the user's folder `folder`, its DSN as the tasks' role (vpe_loader) kept in
    folder/warehouse.dsn for `step` (as a user's shell exports VPE_WAREHOUSE_DSN): the crawl's answer cache of
    one test, which no other test's crawl reads."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(warehouse_dsn(pg_env, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    password = read_secrets(Path(pg_env["VPE_HOME"]))["VPE_LOADER_PASSWORD"]
    dsn = f"postgresql://vpe_loader:{password}@127.0.0.1:{pg_env['VPE_PG_PORT']}/{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "warehouse.dsn").write_text(dsn)
    return dsn


@pytest.fixture
def workdir(tmp_path: Path, pg_env: dict[str, str], warehouse_template: str) -> Path:
    """A user's folder: run/ is the workspace, buffer/ the steps' buffer, and a warehouse of its own."""
    (tmp_path / "run").mkdir()
    own_warehouse(tmp_path, pg_env, warehouse_template)
    return tmp_path


def step(python: str, script: str, *args: str, workdir: Path, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs one step by hand, the way a user would, in its own buffer and workspace, with the user's warehouse
    (workdir/warehouse.dsn, if it has one) exported."""
    return subprocess.run([python, str(TASKS / script), *args], env=step_env(workdir, env), capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=cwd)


def step_env(workdir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("VPE_WORKSPACE", "VPE_RUN_ID", "VPE_WAREHOUSE_DSN", "OPEN_METEO_ARCHIVE_URL")}
    dsn = workdir / "warehouse.dsn"
    shell = {"VPE_WAREHOUSE_DSN": dsn.read_text()} if dsn.is_file() else {}
    return {**base, **shell, "VPE_BUFFER": str(workdir / "buffer"), "VPE_WORKSPACE": str(workdir / "run"),
            **(env or {})}


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result.stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_counts(stdout: str) -> dict[str, tuple[int, int, int, int]]:
    """load's table: target -> (inserted, updated, already_present, rejected)."""
    rows = re.findall(r"load: +(\w+) +(\d+) +(\d+) +(\d+) +(\d+)$", stdout, re.MULTILINE)
    return {target: tuple(map(int, counts)) for target, *counts in rows}


def query(dsn: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


# ------------------------------------------------------------------ end to end on the demo catalog

def test_every_step_and_the_server_have_help(ingestion_python: str, workdir: Path) -> None:
    for script in ("extract.py", "crawl.py", "load.py"):
        assert "usage:" in ok(step(ingestion_python, script, "--help", workdir=workdir))
    server_help = subprocess.run([sys.executable, str(SERVER), "--help"], capture_output=True, text=True, timeout=30)
    assert server_help.returncode == 0 and "SYNTHETIC" in server_help.stdout


def test_log_lines_carry_the_time_by_hand_but_not_under_the_executor(ingestion_python: str, workdir: Path) -> None:
    """The executor stamps each line it streams, and Airflow each line of its task log: a step run by the
    executor (which sets VPE_RUN_ID) leaves its own time out."""
    by_hand = ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir)).splitlines()
    assert by_hand and all(re.match(r"\d\d:\d\d:\d\d extract: ", line) for line in by_hand), by_hand
    executed = ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir, env={"VPE_RUN_ID": "run-1"}))
    assert executed.splitlines() and all(line.startswith("extract: ") for line in executed.splitlines()), executed


def test_demo_catalog_end_to_end_then_rerun_adds_nothing(ingestion_python: str, api: str, workdir: Path,
                                                         empty_db: tuple[str, dict[str, str]]) -> None:
    dsn, env = empty_db
    bootstrap("migrate", env=env)
    run = workdir / "run"
    out = ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir))
    assert f"read {DEMO_ROWS} rows = {DEMO_EVENTS} events + {DEMO_REJECTS} rejected" in out
    events, rejects = read_csv(run / "events-catalog.csv"), read_rejects(run / "rejects-catalog.jsonl")
    assert len(events) + len(rejects) == DEMO_ROWS == len(read_csv(DEMO))
    by_id = {e["catalog_id"]: e for e in events}
    assert by_id["101"]["continent_code"] == "NA" and by_id["101"]["event_time"] == "10:37:00"
    assert (by_id["103"]["time_text"], by_id["103"]["event_time"]) == ("Overnight", "")
    assert by_id["103"]["near"] == "Kedārnāth" and by_id["101"]["landslide_size"] == "very_large"
    windows = read_csv(run / "windows-catalog.csv")
    assert len(windows) == 2 * len(events)
    assert {(w["is_event"], w["window_date"]) for w in windows if w["catalog_id"] == "106"} == {
        ("true", "2012-02-29"), ("false", "2011-02-28")}

    out = ok(step(ingestion_python, "crawl.py", "--url", api, workdir=workdir))
    assert "SYNTHETIC" in out
    hourly = read_csv(run / "hourly.csv")
    per_window = Counter((h["catalog_id"], h["is_event"]) for h in hourly)
    assert len(per_window) == len(windows) and set(per_window.values()) == {24}
    assert all(h[name] != "" for h in hourly for name in h), "every variable has a value"
    assert read_csv(run / "failed_windows.csv") == []
    calls = api_calls(api)["calls"]

    result = step(ingestion_python, "load.py", workdir=workdir, env={"VPE_WAREHOUSE_DSN": dsn})
    assert result.returncode == 1 and "SYNTHETIC" in result.stderr and "--allow-synthetic" in result.stderr
    assert query(dsn, "SELECT count(*) FROM landslide_event") == [(0,)]
    counts = load_counts(ok(step(ingestion_python, "load.py", "--allow-synthetic", workdir=workdir,
                                 env={"VPE_WAREHOUSE_DSN": dsn})))
    assert sum(counts["landslide_event"]) == DEMO_EVENTS and counts["landslide_event"][0] == DEMO_EVENTS
    assert query(dsn, "SELECT count(*) FROM weather_window")[0][0] == len(windows)
    assert query(dsn, "SELECT every(last_hour - first_hour = interval '23 hours') FROM weather_window")[0][0]
    assert query(dsn, "SELECT count(*) FROM weather_data")[0][0] == len(hourly)
    assert query(dsn, "SELECT count(DISTINCT depth_top_cm), min(n), max(n) FROM soil JOIN (SELECT location_id, "
                      "observed_at, count(*) AS n FROM soil GROUP BY 1, 2) per USING (location_id, observed_at)"
                 )[0] == (4, 4, 4)
    # The stand-in names a zone of whole hours from the longitude (Oso, Washington: UTC-8); the event's local
    # 10:37 is 18:37 UTC, and its hour is a row of its window.
    assert query(dsn, "SELECT timezone, instant, event_hour FROM event_weather_daily WHERE catalog_id = '101'") == [
        ("Etc/GMT+8", datetime.datetime(2014, 3, 22, 18, 37, tzinfo=datetime.timezone.utc),
         datetime.datetime(2014, 3, 22, 18, tzinfo=datetime.timezone.utc))]
    assert query(dsn, "SELECT l.continent_code, e.time_text, e.event_time FROM landslide_event e "
                      "JOIN location l USING (location_id) WHERE catalog_id IN ('101', '103') ORDER BY catalog_id"
                 ) == [("NA", "10:37", datetime.time(10, 37)), ("AS", "Overnight", None)]
    assert query(dsn, "SELECT count(*) FROM rejected_rows WHERE source = 'demo_catalog.csv'")[0][0] == DEMO_REJECTS
    totals = query(dsn, "SELECT (SELECT count(*) FROM landslide_event), (SELECT count(*) FROM weather_data), "
                        "(SELECT count(*) FROM soil), (SELECT count(*) FROM rejected_rows)")

    ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir))
    ok(step(ingestion_python, "crawl.py", "--url", api, workdir=workdir))
    assert api_calls(api)["calls"] == calls, "the rerun is served from the cache"
    counts = load_counts(ok(step(ingestion_python, "load.py", workdir=workdir,
                                 env={"VPE_WAREHOUSE_DSN": dsn, "VPE_ALLOW_SYNTHETIC_WEATHER": "1"})))
    assert counts and all(inserted == updated == 0 for inserted, updated, _, _ in counts.values()), counts
    assert query(dsn, "SELECT (SELECT count(*) FROM landslide_event), (SELECT count(*) FROM weather_data), "
                      "(SELECT count(*) FROM soil), (SELECT count(*) FROM rejected_rows)") == totals


def test_by_hand_the_later_steps_find_extracts_workspace(ingestion_python: str, api: str, workdir: Path) -> None:
    env = {"VPE_WORKSPACE": ""}
    out = ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir, env=env))
    folder = re.search(r"workspace (\S+) \(run id", out).group(1)
    assert Path(folder).parent == workdir / "buffer" and Path(folder).name.startswith("manual-")
    assert f"workspace {folder}" in ok(step(ingestion_python, "crawl.py", "--url", api, workdir=workdir, env=env))


def test_demo_csv_and_xlsx_give_identical_events_and_relative_paths_fall_back_to_the_repo(
        ingestion_python: str, workdir: Path) -> None:
    elsewhere = workdir / "cwd"
    elsewhere.mkdir()
    for name, catalog in (("csv", DEMO), ("xlsx", DEMO_XLSX)):
        out = ok(step(ingestion_python, "extract.py", "--name", name, str(catalog.relative_to(ROOT)), workdir=workdir,
                      cwd=elsewhere))
        assert f"read {DEMO_ROWS} rows = {DEMO_EVENTS} events + {DEMO_REJECTS} rejected" in out
    run = workdir / "run"
    assert sorted(path.name for path in run.iterdir()) == [
        "events-csv.csv", "events-xlsx.csv", "rejects-csv.jsonl", "rejects-xlsx.jsonl", "windows-csv.csv",
        "windows-xlsx.csv"]
    csv_events, xlsx_events = read_csv(run / "events-csv.csv"), read_csv(run / "events-xlsx.csv")
    assert {e["source"] for e in csv_events} == {"demo_catalog.csv"}
    assert {e["source"] for e in xlsx_events} == {"demo_catalog.xlsx"}
    assert [{**e, "source": ""} for e in csv_events] == [{**e, "source": ""} for e in xlsx_events]
    assert read_csv(run / "windows-csv.csv") == read_csv(run / "windows-xlsx.csv")
    assert [(r["row_key"], r["reason"]) for r in read_rejects(run / "rejects-csv.jsonl")] == \
        [(r["row_key"], r["reason"]) for r in read_rejects(run / "rejects-xlsx.jsonl")]


def cell_types(python: str, path: Path) -> dict[str, set[str]]:
    """Column name -> the Python types openpyxl reads from its data cells."""
    script = ("import json, sys, openpyxl\n"
              "header, *rows = openpyxl.load_workbook(sys.argv[1]).active.iter_rows(values_only=True)\n"
              "print(json.dumps({name: sorted({type(r[i]).__name__ for r in rows}) for i, name in enumerate(header)}))")
    result = subprocess.run([python, "-c", script, str(path)], capture_output=True, text=True, check=True, timeout=120)
    return {name: set(types) for name, types in json.loads(result.stdout).items()}


def test_demo_xlsx_has_the_real_exports_cell_types(ingestion_python: str) -> None:
    demo = cell_types(ingestion_python, DEMO_XLSX)
    assert list(demo) == list(read_csv(DEMO)[0]), "same columns as the CSV"
    assert demo["date"] == {"datetime", "str"}  # one row's date (31/12/2019) is no date: text, as exported
    assert demo["id"] == {"int"} and demo["latitude"] <= {"float", "int", "NoneType"}
    assert demo["time"] == {"str", "NoneType"}
    real_sample = SHARED_DATA / "glc_sample.xlsx"
    if real_sample.exists():
        real = cell_types(ingestion_python, real_sample)
        assert real["date"] == {"datetime"}
        for column in set(demo) & set(real) - {"date"}:  # no cell type the real export does not have
            assert demo[column] <= real[column] | {"NoneType"}, (column, demo[column], real[column])


def test_extract_names_must_be_safe_file_name_parts(ingestion_python: str, workdir: Path) -> None:
    for bad in ("a/b", "..", "", "x y"):
        result = step(ingestion_python, "extract.py", "--name", bad, str(DEMO), workdir=workdir)
        assert result.returncode == 2 and "--name" in result.stderr, (bad, result.stderr)
    assert not list((workdir / "run").iterdir())


def test_load_refuses_a_workspace_with_an_unfinished_extract(ingestion_python: str, workdir: Path) -> None:
    run = workdir / "run"
    ok(step(ingestion_python, "extract.py", "--name", "csv", str(DEMO), workdir=workdir))
    ok(step(ingestion_python, "extract.py", "--name", "xlsx", str(DEMO_XLSX), workdir=workdir))
    (run / "rejects-xlsx.jsonl").unlink()
    (run / "hourly.csv").write_text("")
    closed = f"postgresql://postgres:x@127.0.0.1:{free_port()}/warehouse"
    result = step(ingestion_python, "load.py", "--dsn", closed, workdir=workdir)
    assert result.returncode == 1 and "extract --name xlsx did not finish" in result.stderr, result.stderr


# ------------------------------------------------------------------ the real sample

@pytest.mark.parametrize("name", ["glc_sample.csv", "glc_sample.xlsx"])
def test_real_sample_counts_add_up_and_values_survive(ingestion_python: str, workdir: Path, name: str) -> None:
    sample = SHARED_DATA / name
    if not sample.exists():
        pytest.skip(f"{sample} is absent")
    out = ok(step(ingestion_python, "extract.py", str(sample), workdir=workdir))
    run = workdir / "run"
    events, rejects = read_csv(run / "events-catalog.csv"), read_rejects(run / "rejects-catalog.jsonl")
    total = int(re.search(r"read (\d+) rows", out).group(1))
    assert len(events) + len(rejects) == total == {"glc_sample.csv": 956, "glc_sample.xlsx": 169}[name]
    assert len(read_csv(run / "windows-catalog.csv")) == 2 * len(events)
    assert all(r["reason"] and r["raw"] for r in rejects)
    # Continent codes arrive exactly as written ("NA" stays "NA", blanks stay blank), free-text times are kept.
    source = source_rows(ingestion_python, sample)
    for event in events:
        row = source[int(event["row_number"])]
        assert event["continent_code"] == row["continentcode"].strip()
        assert event["time_text"] == row["time"]
        assert event["event_time"] == clock(row["time"])
    free_text = [e for e in events if e["time_text"] and not e["event_time"]]
    assert free_text and {"night", "morning"} & {e["time_text"] for e in free_text}


def clock(text: str) -> str:
    """HH:MM:SS for a clock time, '' for anything else."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text.strip())
    return f"{int(match[1]):02d}:{match[2]}:{match[3] or '00'}" if match else ""


def source_rows(python: str, path: Path) -> dict[int, dict[str, str]]:
    """The sample read independently of extract: CSV with the csv module, XLSX through the ingestion env."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return {n: row for n, row in enumerate(csv.DictReader(handle), start=2)}
    script = ("import json, sys, openpyxl\n"
              "rows = list(openpyxl.load_workbook(sys.argv[1], read_only=True).active.iter_rows(values_only=True))\n"
              "print(json.dumps([dict(zip(rows[0], ['' if v is None else str(v) for v in r])) for r in rows[1:]]))")
    rows = json.loads(subprocess.run([python, "-c", script, str(path)], capture_output=True, text=True,
                                     check=True, timeout=120).stdout)
    return {n: row for n, row in enumerate(rows, start=2)}


# ------------------------------------------------------------------ bad catalogs

BAD_CATALOGS = {
    "empty.csv": (b"", "is empty"),
    "header_only.csv": (DEMO.read_bytes().splitlines(keepends=True)[0], "no data rows"),
    "wrong_columns.csv": (b"name,value\nfoo,1\nbar,2\n", "lacks catalog column(s) id, date"),
    "garbage.csv": (bytes(range(256)) * 40, "is binary"),
    "latin1.csv": (DEMO.read_text(encoding="utf-8").encode("latin-1", "replace").replace(b"?", b"\xe9"),
                   "re-save it as UTF-8"),
    "broken.xlsx": (b"PK\x03\x04" + b"\x00" * 300, "cannot be opened"),
}


@pytest.mark.parametrize("name", sorted(BAD_CATALOGS))
def test_bad_catalog_fails_with_a_clear_reason_and_writes_nothing(ingestion_python: str, workdir: Path,
                                                                  name: str) -> None:
    data, reason = BAD_CATALOGS[name]
    (workdir / name).write_bytes(data)
    result = step(ingestion_python, "extract.py", str(workdir / name), workdir=workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    assert reason in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not list((workdir / "run").glob("*.csv")), "nothing half-written"


def test_missing_input_file_is_a_clear_error(ingestion_python: str, workdir: Path) -> None:
    result = step(ingestion_python, "extract.py", str(workdir / "nope.csv"), workdir=workdir)
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_catalog_from_a_url_is_downloaded_into_the_workspace(ingestion_python: str, workdir: Path) -> None:
    shutil.copy(DEMO, workdir / "catalog.csv")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=workdir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(base, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        out = ok(step(ingestion_python, "extract.py", f"{base}/catalog.csv", workdir=workdir))
        assert f"read {DEMO_ROWS} rows" in out and (workdir / "run" / "download-catalog-catalog.csv").is_file()
        assert read_csv(workdir / "run" / "events-catalog.csv")[0]["source"] == "catalog.csv"
        result = step(ingestion_python, "extract.py", f"{base}/missing.csv", workdir=workdir)
        assert result.returncode == 1 and "cannot download" in result.stderr and "404" in result.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


def write_workbook(python: str, path: Path, sheets: list[str]) -> None:
    """An XLSX with the demo catalog on every sheet named in `sheets` that starts with 'Catalog', notes elsewhere."""
    script = ("import csv, sys, openpyxl\n"
              "book = openpyxl.Workbook(); book.remove(book.active)\n"
              "rows = list(csv.reader(open(sys.argv[2], encoding='utf-8', newline='')))\n"
              "for name in sys.argv[3:]:\n"
              "    sheet = book.create_sheet(name)\n"
              "    for row in (rows if name.startswith('Catalog') else [['About'], ['demo export']]):\n"
              "        sheet.append(row)\n"
              "book.save(sys.argv[1])\n")
    subprocess.run([python, "-c", script, str(path), str(DEMO), *sheets], check=True, timeout=120)


def test_xlsx_with_an_extra_sheet_reads_the_catalog_sheet(ingestion_python: str, workdir: Path) -> None:
    book = workdir / "catalog.xlsx"
    write_workbook(ingestion_python, book, ["Notes", "Catalog"])
    out = ok(step(ingestion_python, "extract.py", str(book), workdir=workdir))
    assert "using sheet 'Catalog'" in out
    assert f"read {DEMO_ROWS} rows = {DEMO_EVENTS} events + {DEMO_REJECTS} rejected" in out


def test_xlsx_with_two_catalog_sheets_asks_which(ingestion_python: str, workdir: Path) -> None:
    book = workdir / "catalog.xlsx"
    write_workbook(ingestion_python, book, ["Catalog 2014", "Catalog 2015"])
    result = step(ingestion_python, "extract.py", str(book), workdir=workdir)
    assert result.returncode == 1 and "pass --sheet NAME" in result.stderr
    out = ok(step(ingestion_python, "extract.py", str(book), "--sheet", "Catalog 2015", workdir=workdir))
    assert f"read {DEMO_ROWS} rows" in out


# ------------------------------------------------------------------ an API that misbehaves

def write_windows(workdir: Path, days: list[str]) -> None:
    rows = [f"e{i},true,{10 + i * 0.5},{20 + i * 0.25},{day}" for i, day in enumerate(days)]
    (workdir / "run" / "windows-catalog.csv").write_text("catalog_id,is_event,latitude,longitude,window_date\n"
                                                  + "\n".join(rows) + "\n")


def test_batched_answers_match_single_calls_window_by_window(ingestion_python: str, api: str, tmp_path: Path,
                                                             pg_env: dict[str, str], warehouse_template: str) -> None:
    """Long coordinate lists go by POST and the answers are matched to windows by position."""
    hourly = {}
    for batch_size in ("1", "60"):
        workdir = tmp_path / batch_size
        (workdir / "run").mkdir(parents=True)
        own_warehouse(workdir, pg_env, warehouse_template)
        write_windows(workdir, [f"20{10 + i % 12}-0{1 + i % 9}-{1 + i % 28:02d}" for i in range(60)])
        before = api_calls(api)["by_method"]
        ok(step(ingestion_python, "crawl.py", "--url", api, "--batch-size", batch_size, workdir=workdir))
        after = api_calls(api)["by_method"]
        used = {m: after.get(m, 0) - before.get(m, 0) for m in after if after.get(m, 0) != before.get(m, 0)}
        assert used == ({"GET": 60} if batch_size == "1" else {"POST": 1}), used
        hourly[batch_size] = read_csv(workdir / "run" / "hourly.csv")
    assert len(hourly["1"]) == 60 * 24 and hourly["1"] == hourly["60"]


def test_500_429_and_garbage_json_are_retried(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, [f"2019-05-{d:02d}" for d in range(1, 21)])
    with archive_server("--fail-500-every", "2", "--fail-429-every", "3", "--garbage-every", "5") as url:
        # Calls 24-28 all fail: six attempts get every batch through.
        out = ok(step(ingestion_python, "crawl.py", "--url", url, "--batch-size", "4", "--retries", "5",
                      "--backoff", "0.01", workdir=workdir))
        stats = api_calls(url)
    assert "20 windows = 20 with 24 hourly rows + 0 failed" in out
    assert stats["by_status"]["500"] and stats["by_status"]["429"] and "retry" in out
    assert len(read_csv(workdir / "run" / "hourly.csv")) == 20 * 24


def test_garbage_json_every_time_fails_the_step_with_the_reason(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, ["2019-05-01", "2019-05-02"])
    with archive_server("--garbage-every", "1") as url:
        result = step(ingestion_python, "crawl.py", "--url", url, *QUICK_RETRIES, workdir=workdir)
    assert result.returncode == 1 and "2 of 2 windows failed" in result.stderr
    assert all("invalid JSON" in w["reason"] for w in read_csv(workdir / "run" / "failed_windows.csv"))
    assert read_csv(workdir / "run" / "hourly.csv") == []


def test_a_window_the_api_refuses_is_recorded_and_the_rest_fetched(ingestion_python: str, api: str,
                                                                     workdir: Path) -> None:
    write_windows(workdir, ["2019-05-01", "1939-06-01", "2019-05-03", "2019-05-04"])
    result = step(ingestion_python, "crawl.py", "--url", api, workdir=workdir)
    assert result.returncode == 1 and "1 of 4 windows failed" in result.stderr, result.stderr
    [failed] = read_csv(workdir / "run" / "failed_windows.csv")
    assert failed["window_date"] == "1939-06-01" and "out of allowed range" in failed["reason"]
    assert len(read_csv(workdir / "run" / "hourly.csv")) == 3 * 24
    ok(step(ingestion_python, "crawl.py", "--url", api, "--max-failed-ratio", "0.5", workdir=workdir))


def test_daily_quota_stops_cleanly_and_a_rerun_resumes(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, [f"2019-05-{d:02d}" for d in range(1, 13)])
    port = free_port()
    with archive_server("--daily-quota", "5", port=port) as url:
        result = step(ingestion_python, "crawl.py", "--url", url, "--batch-size", "5", workdir=workdir)
    assert result.returncode == 75, result.stdout + result.stderr
    assert "daily quota reached" in result.stderr and "rerun the same command" in result.stderr
    assert len(read_csv(workdir / "run" / "hourly.csv")) == 5 * 24
    with archive_server(port=port) as url:
        out = ok(step(ingestion_python, "crawl.py", "--url", url, "--batch-size", "5", workdir=workdir))
        assert api_calls(url)["locations"] == 7, "only the windows still missing are fetched"
    assert "5 cached, 7 to fetch" in out and len(read_csv(workdir / "run" / "hourly.csv")) == 12 * 24


def test_local_rate_limit_budget_is_kept_across_runs(ingestion_python: str, api: str, workdir: Path) -> None:
    write_windows(workdir, [f"2019-06-{d:02d}" for d in range(1, 11)])
    budget = ["--calls-per-day", "5", "--url", api]  # 12 variables weigh 1.2 calls per window
    result = step(ingestion_python, "crawl.py", *budget, workdir=workdir)
    assert result.returncode == 75 and "daily budget" in result.stderr, result.stderr
    fetched = len(read_csv(workdir / "run" / "hourly.csv")) // 24
    assert fetched == 4
    calls = api_calls(api)["calls"]
    assert step(ingestion_python, "crawl.py", *budget, workdir=workdir).returncode == 75
    assert api_calls(api)["calls"] == calls, "the budget used by the first run still counts"


def test_unreachable_api_stops_after_a_few_failed_batches(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, [f"2019-05-{d:02d}" for d in range(1, 11)])
    url = f"http://127.0.0.1:{free_port()}/v1/archive"
    result = step(ingestion_python, "crawl.py", "--url", url, "--batch-size", "1", *QUICK_RETRIES, workdir=workdir)
    assert result.returncode == 1 and "batches in a row failed" in result.stderr and "no answer" in result.stderr
    assert len(read_csv(workdir / "run" / "failed_windows.csv")) == 10


# ------------------------------------------------------------------ load: all or nothing

def test_load_of_a_corrupt_file_commits_nothing(ingestion_python: str, api: str, workdir: Path,
                                                empty_db: tuple[str, dict[str, str]]) -> None:
    dsn, env = empty_db
    bootstrap("migrate", env=env)
    ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir))
    ok(step(ingestion_python, "crawl.py", "--url", api, workdir=workdir))
    hourly = workdir / "run" / "hourly.csv"
    lines = hourly.read_text().splitlines()
    lines[-1] = lines[-1].rsplit(",", 1)[0] + ",not-a-number"
    hourly.write_text("\n".join(lines) + "\n")
    result = step(ingestion_python, "load.py", "--allow-synthetic", workdir=workdir, env={"VPE_WAREHOUSE_DSN": dsn})
    assert result.returncode == 1 and "nothing committed" in result.stderr and "not-a-number" in result.stderr
    assert query(dsn, "SELECT (SELECT count(*) FROM landslide_event), (SELECT count(*) FROM rejected_rows), "
                      "(SELECT count(*) FROM staging.landslide_event), (SELECT count(*) FROM staging.weather_hourly)"
                 ) == [(0, 0, 0, 0)]


def test_load_without_a_warehouse_says_what_to_do(ingestion_python: str, api: str, workdir: Path) -> None:
    ok(step(ingestion_python, "extract.py", str(DEMO), workdir=workdir))
    ok(step(ingestion_python, "crawl.py", "--url", api, workdir=workdir))
    result = step(ingestion_python, "load.py", workdir=workdir, env={"VPE_WAREHOUSE_DSN": ""})
    assert result.returncode == 1 and "VPE_WAREHOUSE_DSN" in result.stderr
    closed = f"postgresql://postgres:x@127.0.0.1:{free_port()}/warehouse"
    result = step(ingestion_python, "load.py", "--dsn", closed, "--allow-synthetic", workdir=workdir)
    assert result.returncode == 1 and "cannot connect to the warehouse" in result.stderr


# ------------------------------------------------------------------ through a real executor

def test_dag_shaped_runs_through_the_executor_two_extracts_at_once_then_crawl_then_load(
        ingestion_python: str, api: str, tmp_path: Path, empty_db: tuple[str, dict[str, str]]) -> None:
    """What dags/ingestion.py does per DAG run: extract_csv and extract_xlsx in parallel, crawl, load, all in one
    workspace (kept in the warehouse's workspace store, as bootstrap sets it up), the catalogs named by repo-relative
    paths; a second DAG run adds nothing."""
    dsn, env = empty_db
    bootstrap("migrate", env=env)
    home, envs = tmp_path / "home", tmp_path / "envs"
    home.mkdir()
    envs.mkdir()
    shutil.copy(ROOT / "envs" / "ingestion.yml", envs)  # only this env: no waiting for the others' builds
    (home / "envs").symlink_to(ENV_CACHE)  # the env built for this session is the executor's cached build
    port = str(free_port())
    store = (f"postgresql://vpe_executor:{read_secrets(Path(env['VPE_HOME']))['VPE_EXECUTOR_DB_PASSWORD']}"
             f"@127.0.0.1:{env['VPE_PG_PORT']}/{env['VPE_WAREHOUSE_DB']}")
    executor_env = {**os.environ, "VPE_HOME": str(home), "VPE_EXECUTOR_PORT": port, "VPE_EXECUTOR_TOKEN": "",
                    "OPEN_METEO_ARCHIVE_URL": api, "VPE_WAREHOUSE_DSN": dsn, "VPE_EXECUTOR_WORKSPACE_STORE": store}
    server = subprocess.Popen([sys.executable, str(ROOT / "executor.py"), "serve", "--envs-dir", str(envs)],
                              env=executor_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        def executor(command: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(ROOT / "executor.py"), command, "--port", port, *args],
                                  env=executor_env, capture_output=True, text=True, timeout=300)

        def task(dag_run: str, task_id: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
            return executor("run", "ingestion", f"ingestion/{script}", "--run-id", f"{dag_run}-{task_id}",
                            "--workspace", dag_run, "-e", "VPE_ALLOW_SYNTHETIC_WEATHER=1", "--", *args)

        def dag_run(name: str) -> dict[str, str]:
            extracts: dict[str, subprocess.CompletedProcess[str]] = {}
            threads = [threading.Thread(target=lambda kind=kind, catalog=catalog: extracts.__setitem__(
                kind, task(name, f"extract_{kind}", "extract.py", "--name", kind, str(catalog.relative_to(ROOT)))))
                for kind, catalog in (("csv", DEMO), ("xlsx", DEMO_XLSX))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            return {**{f"extract_{kind}": ok(result) for kind, result in extracts.items()},
                    "crawl": ok(task(name, "crawl", "crawl.py")), "load": ok(task(name, "load", "load.py"))}

        ok(executor("ping", "--wait", "30"))
        deadline = time.monotonic() + 120
        while executor("envs").returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)

        first = dag_run("dag-1")
        workspace = home / "buffer" / "dag-1"
        for kind in ("csv", "xlsx"):
            assert f"read {DEMO_ROWS} rows = {DEMO_EVENTS} events + {DEMO_REJECTS} rejected" in first[f"extract_{kind}"]
            assert f"workspace {workspace} (run id dag-1-extract_{kind})" in first[f"extract_{kind}"]
        assert not (home / "buffer" / "dag-1-crawl").exists()
        stored = {path for (path,) in query(dsn, "SELECT path FROM workspace.file WHERE workspace = 'dag-1'")}
        assert {"events-csv.csv", "events-xlsx.csv", "windows-csv.csv", "windows-xlsx.csv", "hourly.csv"} <= stored, \
            "both extracts, run at once in one workspace, stored their files"
        windows = 2 * DEMO_EVENTS
        assert f"{windows} windows in windows-csv.csv, windows-xlsx.csv; {windows} listed again" in first["crawl"]
        hourly = read_csv(workspace / "hourly.csv")
        assert len(hourly) == windows * 24 and len({(h["catalog_id"], h["is_event"], h["observed_at"]) for h in hourly}) \
            == len(hourly), "each window's hours once"
        assert load_counts(first["load"])["landslide_event"] == (DEMO_EVENTS, 0, 0, 0)
        assert (f"event rows: {2 * DEMO_EVENTS} in events-csv.csv, events-xlsx.csv = {DEMO_EVENTS} copies of an "
                f"earlier file's row") in first["load"]
        assert (f"+ {DEMO_EVENTS} loaded new + 0 updated (a newer version of the report; the previous one is in "
                "landslide_event_history) + 0 already present + 0 rejected: the counts add up") in first["load"]
        counts = "(SELECT count(*) FROM landslide_event), (SELECT count(*) FROM weather_window), " \
                 "(SELECT count(*) FROM weather_data), (SELECT count(*) FROM soil), (SELECT count(*) FROM rejected_rows)"
        assert query(dsn, f"SELECT {counts}") == [(DEMO_EVENTS, windows, windows * 24, windows * 24 * 4,
                                                   2 * DEMO_REJECTS)]
        assert query(dsn, "SELECT source, count(*) FROM rejected_rows GROUP BY source ORDER BY source") == [
            ("demo_catalog.csv", DEMO_REJECTS), ("demo_catalog.xlsx", DEMO_REJECTS)]
        assert query(dsn, "SELECT DISTINCT source FROM landslide_event") == [("demo_catalog.csv",)]

        second = dag_run("dag-2")
        assert load_counts(second["load"])["landslide_event"] == (0, 0, DEMO_EVENTS, 0)
        assert all(inserted == updated == 0 for inserted, updated, _, _ in load_counts(second["load"]).values())
        assert (f"+ 0 loaded new + 0 updated (a newer version of the report; the previous one is in "
                f"landslide_event_history) + {DEMO_EVENTS} already present + 0 rejected: the counts add up") in second["load"]
        assert query(dsn, f"SELECT {counts}") == [(DEMO_EVENTS, windows, windows * 24, windows * 24 * 4,
                                                   2 * DEMO_REJECTS)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
