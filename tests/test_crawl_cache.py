"""The crawl's answer cache and daily call count in the warehouse, shared by crawls on several hosts: real crawl
processes, each "host" with its own buffer and workspace (no shared disk), one real PostgreSQL, the real Open-Meteo
stand-in counting the calls it serves (/stats)."""
from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import psycopg
import pytest

from test_ingestion import (TASKS, api_calls, archive_server, ingestion_python, ok, read_csv,  # noqa: F401
                            step, step_env, workdir, write_windows)

sys.path.insert(0, str(TASKS))
from common import HOURLY_VARIABLES  # noqa: E402 (the steps' own module)

WEIGHT = 1.2  # weighted calls per window: 12 variables


def days(count: int, month: int = 5) -> list[str]:
    return [(datetime.date(2019, month, 1) + datetime.timedelta(days=i)).isoformat() for i in range(count)]


def write_numbered(folder: Path, numbers: range) -> None:
    """Window i: its own place and day, the same on every host."""
    rows = [f"e{i},true,{10 + i * 0.5},{20 + i * 0.25},{datetime.date(2019, 5, 1) + datetime.timedelta(days=i)}"
            for i in numbers]
    (folder / "run" / "windows-catalog.csv").write_text("catalog_id,is_event,latitude,longitude,window_date\n"
                                                        + "\n".join(rows) + "\n")


def host(workdir: Path, name: str) -> Path:
    """Another host's folder: its own buffer and workspace, the same warehouse as `workdir`."""
    folder = workdir / name
    (folder / "run").mkdir(parents=True)
    (folder / "warehouse.dsn").write_text((workdir / "warehouse.dsn").read_text())
    return folder


def start(python: str, folder: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([python, str(TASKS / "crawl.py"), *args], env=step_env(folder), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def finish(crawl: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    out, err = crawl.communicate(timeout=300)
    return subprocess.CompletedProcess(crawl.args, crawl.returncode, out, err)


def until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def cache(workdir: Path, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect((workdir / "warehouse.dsn").read_text()) as conn:
        return conn.execute(sql, params).fetchall()


def summary(folder: Path) -> dict:
    return json.loads((folder / "run" / "crawl_summary.json").read_text())


def test_two_crawls_at_once_on_two_hosts_fetch_each_window_once(ingestion_python: str, workdir: Path) -> None:
    a, b = host(workdir, "a"), host(workdir, "b")
    write_numbered(a, range(0, 80))
    write_numbered(b, range(40, 120))
    # Slow enough answers that the second crawl starts while the first has most of its batches ahead.
    with archive_server("--latency-ms", "500") as url:
        args = ("--url", url, "--batch-size", "10", "--calls-per-minute", "0")
        first = start(ingestion_python, a, *args)
        until(lambda: api_calls(url)["calls"] >= 1, "host a's first call")
        second = start(ingestion_python, b, *args)
        results = {"a": finish(first), "b": finish(second)}
        stats = api_calls(url)
    for result in results.values():
        ok(result)
    assert stats["locations"] == 120, "each of the 120 windows fetched exactly once, by one of the two crawls"
    assert cache(workdir, "SELECT count(*), count(DISTINCT (latitude, longitude, day)) FROM crawl.answer") == [
        (120, 120)]
    assert len(read_csv(a / "run" / "hourly.csv")) == len(read_csv(b / "run" / "hourly.csv")) == 80 * 24
    assert summary(a)["api_calls"] + summary(b)["api_calls"] == stats["calls"]
    shared = [line for result in results.values() for line in result.stdout.splitlines()
              if "fetched by another crawl meanwhile" in line]
    assert shared, "the crawls overlapped: one read windows the other fetched while it ran"
    assert cache(workdir, "SELECT weighted_calls FROM crawl.api_calls") == [(pytest.approx(120 * WEIGHT),)], \
        "both crawls' calls counted, none lost"


def test_a_window_another_crawl_is_fetching_is_waited_for_then_read_from_the_cache(
        ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, days(5))
    b = host(workdir, "b")
    write_windows(b, days(5))
    with archive_server("--latency-ms", "20000") as url:
        first = start(ingestion_python, workdir, "--url", url)
        until(lambda: api_calls(url)["calls"] >= 1, "the first crawl's call")
        impatient = step(ingestion_python, "crawl.py", "--url", url, "--lock-wait", "0.5", workdir=b)
        assert impatient.returncode == 1, impatient.stdout + impatient.stderr
        assert ("5 windows were still being fetched by another crawl after --lock-wait 0.5s; rerun to read them "
                "from the cache") in impatient.stderr
        waiting = ok(step(ingestion_python, "crawl.py", "--url", url, workdir=b))
        ok(finish(first))
        assert api_calls(url)["calls"] == 1, "only the first crawl asked the API"
    assert "waiting for 5 windows another crawl is fetching" in waiting
    assert "5 of the windows to fetch were fetched by another crawl meanwhile" in waiting
    assert read_csv(b / "run" / "hourly.csv") == read_csv(workdir / "run" / "hourly.csv")


def test_a_crawl_killed_mid_way_is_resumed_on_another_host_fetching_only_what_was_not_cached(
        ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, days(40))
    b = host(workdir, "b")
    write_windows(b, days(40))
    with archive_server("--latency-ms", "300") as url:
        killed = start(ingestion_python, workdir, "--url", url, "--batch-size", "5")
        until(lambda: api_calls(url)["locations"] >= 10, "two batches served")
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=60)
        until(lambda: cache(workdir, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND pid <> pg_backend_pid()") == [(0,)],
              "the killed crawl's session (and its window locks) gone")
        [(kept,)] = cache(workdir, "SELECT count(*) FROM crawl.answer")
        assert 5 <= kept < 40, "the first batch is cached before the second is asked for"
        out = ok(step(ingestion_python, "crawl.py", "--url", url, "--batch-size", "5", "--lock-wait", "60",
                      workdir=b))
        served = api_calls(url)["locations"]
    assert f"{kept} cached, {40 - kept} to fetch" in out
    assert summary(b)["api_calls"] == -(-(40 - kept) // 5)
    assert served - 40 in (0, 5), "each window fetched once, but for the one call in flight when the crawl died"
    assert cache(workdir, "SELECT count(*) FROM crawl.answer") == [(40,)]
    assert len(read_csv(b / "run" / "hourly.csv")) == 40 * 24


def stand_in_answers(url: str, keys: list[tuple[float, float, str]]) -> list[dict]:
    query = urlencode({"latitude": ",".join(str(k[0]) for k in keys), "longitude": ",".join(str(k[1]) for k in keys),
                       "start_date": ",".join(k[2] for k in keys), "end_date": ",".join(k[2] for k in keys),
                       "hourly": ",".join(HOURLY_VARIABLES), "timezone": "auto"})
    with urllib.request.urlopen(f"{url}?{query}", timeout=30) as response:
        body = json.load(response)
    return body if isinstance(body, list) else [body]


def write_legacy_cache(root: Path, url: str, zone: str, answers: dict[tuple[float, float, str], dict]) -> Path:
    """What earlier crawls left in <buffer>/cache/open-meteo: a folder per endpoint and timezone, a file per day
    and place, and the endpoint's calls.log of (time, weight) lines."""
    source = root / (urlsplit(url).netloc + urlsplit(url).path).replace(":", "_").replace("/", "_")
    for (lat, lon, day), answer in answers.items():
        path = source / f"tz-{zone}" / day / f"{lat:.6f}_{lon:.6f}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        hourly = {name: answer["hourly"][name] for name in ("time", *HOURLY_VARIABLES)}
        path.write_text(json.dumps({"elevation": answer["elevation"], "utc_offset_seconds": answer["utc_offset_seconds"],
                                    "timezone": answer["timezone"], "hourly": hourly, "synthetic": True}))
    return source


def test_the_old_on_disk_cache_is_imported_once_and_its_spent_calls_count(ingestion_python: str,
                                                                          workdir: Path) -> None:
    write_windows(workdir, days(10))
    places = [(10 + i * 0.5, 20 + i * 0.25, day) for i, day in enumerate(days(10))]
    root = workdir / "buffer" / "cache" / "open-meteo"
    with archive_server() as url:
        legacy = write_legacy_cache(root, url, "auto", dict(zip(places[:6], stand_in_answers(url, places[:6]))))
        write_legacy_cache(root, url, "GMT", {places[0]: stand_in_answers(url, places[:1])[0]})
        now, yesterday = time.time(), time.time() - 86400 * 2
        (legacy / "calls.log").write_text(f"{yesterday:.3f} 7.2\n{now - 60:.3f} 3.6\n{now - 30:.3f} 1.2\n")
        before = api_calls(url)["locations"]
        out = ok(step(ingestion_python, "crawl.py", "--url", url, workdir=workdir))
        assert api_calls(url)["locations"] - before == 4, "the 6 imported windows are not fetched again"
        assert "imported 6 answers and today's 4.8 weighted calls from the on-disk cache" in out
        assert "6 cached, 4 to fetch" in out
        assert not (legacy / "tz-auto").exists() and not (legacy / "calls.log").exists()
        assert list((legacy / "tz-GMT").rglob("*.json")), "another timezone's answers wait for a crawl in it"

        again = ok(step(ingestion_python, "crawl.py", "--url", url, workdir=workdir))
        assert api_calls(url)["locations"] - before == 4 and "imported" not in again and "10 cached, 0 to fetch" in again
        assert "holds no answers for" in again and "in timezone auto" in again
        elsewhere = step(ingestion_python, "crawl.py", "--url", url, "--import-cache", str(workdir / "nowhere"),
                         workdir=workdir)
        assert elsewhere.returncode == 1 and "--import-cache" in elsewhere.stderr and "no such folder" in elsewhere.stderr
    assert cache(workdir, "SELECT count(*), every(synthetic) FROM crawl.answer") == [(10, True)]
    assert cache(workdir, "SELECT weighted_calls FROM crawl.api_calls") == [(pytest.approx(4.8 + 4 * WEIGHT),)]
    assert len(read_csv(workdir / "run" / "hourly.csv")) == 10 * 24


def test_the_daily_budget_is_shared_by_the_crawls_of_every_host(ingestion_python: str, workdir: Path) -> None:
    write_windows(workdir, days(2))
    b = host(workdir, "b")
    write_windows(b, days(4, month=6))
    budget = ("--calls-per-day", "5", "--batch-size", "1")  # 4 windows of 1.2 weighted calls fit, not 5
    with archive_server() as url:
        ok(step(ingestion_python, "crawl.py", "--url", url, *budget, workdir=workdir))
        result = step(ingestion_python, "crawl.py", "--url", url, *budget, workdir=b)
        assert api_calls(url)["locations"] == 4
    assert result.returncode == 75, result.stdout + result.stderr
    assert "daily quota reached" in result.stderr and "(4.8 spent by all crawls)" in result.stderr
    assert "rerun the same command tomorrow" in result.stderr
    assert len(read_csv(b / "run" / "hourly.csv")) == 2 * 24


def test_the_tasks_role_adds_answers_but_cannot_change_or_delete_them(workdir: Path) -> None:
    with psycopg.connect((workdir / "warehouse.dsn").read_text(), autocommit=True) as loader:
        assert loader.execute("SELECT current_user").fetchone() == ("vpe_loader",)
        loader.execute("INSERT INTO crawl.answer VALUES ('h/v1/archive', 'auto', 1, 2, '2019-05-01', '{}', true)")
        loader.execute("INSERT INTO crawl.api_calls VALUES ('h/v1/archive', '2019-05-01', 1.2) ON CONFLICT "
                       "(source, day) DO UPDATE SET weighted_calls = crawl.api_calls.weighted_calls + 1")
        for statement in ("DELETE FROM crawl.answer", "UPDATE crawl.answer SET synthetic = false",
                          "TRUNCATE crawl.answer", "DROP TABLE crawl.api_calls", "UPDATE crawl.api_calls SET day = "
                          "'2000-01-01'", "DELETE FROM crawl.api_calls", "CREATE TABLE crawl.mine (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                loader.execute(statement)
