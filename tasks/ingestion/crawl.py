#!/usr/bin/env python3
"""crawl: hourly weather and soil for every window from the Open-Meteo historical archive API.

Reads every extract's windows-*.csv in the workspace (a window that several
extracts list, e.g. the same catalog as CSV and XLSX, counts once); writes
hourly.csv (24 rows per window), failed_windows.csv (each with its reason),
pending_windows.csv and crawl_summary.json. A window whose day the archive does
not serve yet is pending, listed in pending_windows.csv for a later crawl, and no
failure: a day newer than today minus --archive-lag-days is not asked for, and a
day of the last --recent-days that the archive answers with hours of no values
(or as out of its range) has not reached it yet. --pending-from-warehouse adds the windows
still pending in the warehouse (table pending_window) to this run's.
Windows go to the API in batches (comma lists of coordinates and dates, one
answer per location). Every answer is cached in the warehouse first (schema crawl,
reached through $VPE_WAREHOUSE_DSN), so no crawl on any host asks again for a
window one of them has: a rerun or a resumed run asks only for windows none has.
Concurrent crawls split the windows: each takes a session-level advisory lock on
the windows of the batch it fetches; a window another crawl holds is read from the
cache once that crawl releases it (a killed crawl's locks go with its connection).
An on-disk cache of earlier versions (--import-cache) is imported once.
429/5xx/timeouts are retried with backoff; a rate limit keeps weighted calls under
the free tier's limits, the daily one counted in the warehouse for all crawls.
A 400 that refuses the request as a whole (a bad variable, timezone or API key)
stops the crawl with its reason after two calls; a 400 for some windows only is
narrowed down to those windows by halving the batch.
With OPEN_METEO_API_KEY set, calls go to Open-Meteo's customer endpoint with the
key, and the free tier's local limits are off unless --calls-per-* set them.

Exit codes: 0 done; 1 failed (reason on stderr); 75 daily quota reached (rerun later to resume).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import re
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode, urlsplit

import psycopg
import requests

from common import (CRAWL_SUMMARY, FAILED_COLUMNS, FAILED_WINDOWS, HOURLY, HOURLY_COLUMNS, HOURLY_VARIABLES,
                    PENDING_WINDOWS, WINDOW_COLUMNS, WINDOWS, Progress, StepFailed, add_run_arguments, buffer_dir,
                    connect_warehouse, extract_files, log, query_warehouse, run_step, warehouse_dsn, workspace,
                    write_csv)

REAL_ARCHIVE_URL = "https://archive-api.open-meteo.com/v1/archive"
CUSTOMER_ARCHIVE_URL = "https://customer-archive-api.open-meteo.com/v1/archive"
FREE_TIER = {"minute": 600, "hour": 5000, "day": 10000}  # weighted calls; a customer key's plan sets its own
# A window the archive certainly serves: if the API refuses it too, it refuses the request, not some windows.
PROBE: Key = (47.0, 8.0, "2000-01-01")
EXIT_QUOTA = 75  # EX_TEMPFAIL: nothing is wrong, the rest has to wait for tomorrow's quota
MAX_GET_QUERY = 2000  # longer coordinate lists go in a POST body
HOURS_PER_WINDOW = 24
MAX_FAILED_BATCHES_IN_A_ROW = 3
# The archive's refusal of a day it does not serve (yet): "Parameter 'start_date' is out of allowed range from
# 1940-01-01 to 2026-11-24".
OUT_OF_RANGE = re.compile(r"out of allowed range")


Key = tuple[float, float, str]  # latitude, longitude, day: what the API is asked and the cache is keyed by


@dataclass(frozen=True)
class Window:
    catalog_id: str
    is_event: str
    latitude: float
    longitude: float
    day: str

    @property
    def key(self) -> Key:
        return self.latitude, self.longitude, self.day


class Retryable(Exception):
    """429 (not daily), 5xx, timeouts, garbage: worth another try after a pause."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Refused(Exception):
    """HTTP 400: the API will not serve this request as asked."""


class RefusedWhole(Exception):
    """HTTP 400 even for a window the archive certainly has: the request itself is wrong, not a window."""


class NotInArchiveYet(Exception):
    """An answer with hours of no values (or a day out of the archive's range): the archive has not got it yet."""


class QuotaExhausted(Exception):
    """No more calls today: stop, keep what is cached, resume tomorrow."""


def call_weight(locations: int) -> float:
    """Open-Meteo counts more than 10 variables as a fraction of an extra call, per location (one-day windows)."""
    return locations * max(1.0, len(HOURLY_VARIABLES) / 10)


class RateLimit:
    """Limits on weighted calls: per minute and per hour this crawl's own (sliding windows), per UTC day the
    warehouse's, which every crawl on every host spends from."""

    def __init__(self, per_minute: float, per_hour: float, per_day: float, cache: Cache) -> None:
        self.limits = sorted((span, limit) for span, limit in ((60, per_minute), (3600, per_hour)) if limit > 0)
        self.per_day, self.cache = per_day, cache
        self.calls: deque[tuple[float, float]] = deque()

    def largest_batch(self, wanted: int) -> int:
        """Batch size capped so that one call's weight fits the tightest limit."""
        tightest = min([limit for _, limit in self.limits] + ([self.per_day] if self.per_day > 0 else []), default=None)
        return wanted if tightest is None else max(1, min(wanted, int(tightest // call_weight(1))))

    def acquire(self, weight: float) -> None:
        """Waits until `weight` fits the minute and hour limits, then spends it from the day's; raises
        QuotaExhausted if the day's does not have it."""
        while self.limits:
            now = time.time()
            while self.calls and self.calls[0][0] <= now - self.limits[-1][0]:
                self.calls.popleft()
            wake = self.wake_time(now, weight)
            if wake is None:
                break
            if wake - now >= 1:
                log.info("rate limit: waiting %.1fs", wake - now)
            time.sleep(wake - now)
        self.cache.spend(weight, self.per_day)
        self.calls.append((time.time(), weight))

    def wake_time(self, now: float, weight: float) -> float | None:
        """When enough old calls will have left every window for this one to fit; None if it fits now."""
        wake = None
        for span, limit in self.limits:
            inside = [(moment, used) for moment, used in self.calls if moment > now - span]
            excess = sum(used for _, used in inside) + weight - limit
            for moment, used in inside:
                if excess <= 0:
                    break
                excess -= used
                wake = max(wake or 0.0, moment + span)
        return wake


class Archive:
    """One HTTP call for a batch of windows; answers in request order."""

    def __init__(self, url: str, zone: str, timeout: float, api_key: str = "") -> None:
        self.url, self.zone, self.timeout, self.api_key = url, zone, timeout, api_key
        self.session = requests.Session()
        self.calls = 0
        self.synthetic = False

    def fetch(self, keys: list[Key]) -> list[dict]:
        params = {
            "latitude": ",".join(repr(lat) for lat, _, _ in keys),
            "longitude": ",".join(repr(lon) for _, lon, _ in keys),
            "start_date": ",".join(day for _, _, day in keys),
            "end_date": ",".join(day for _, _, day in keys),
            "hourly": ",".join(HOURLY_VARIABLES),
            "timezone": self.zone,
            **({"apikey": self.api_key} if self.api_key else {}),
        }
        self.calls += 1
        try:
            if len(urlencode(params)) > MAX_GET_QUERY:
                response = self.session.post(self.url, data=params, timeout=self.timeout)
            else:
                response = self.session.get(self.url, params=params, timeout=self.timeout)
        except requests.RequestException as error:
            raise Retryable(self.hide_key(f"no answer from {self.url}: {type(error).__name__}: {error}")) from None
        if response.headers.get("X-Synthetic-Data") == "true" and not self.synthetic:
            self.synthetic = True
            log.warning("*** %s serves SYNTHETIC weather data (invented values, not observations) ***", self.url)
        return self.answers(response, len(keys))

    def hide_key(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def answers(self, response: requests.Response, count: int) -> list[dict]:
        status = response.status_code
        if status == 429:
            reason = error_reason(response)
            if "daily" in reason.lower() or "monthly" in reason.lower():
                raise QuotaExhausted(f"the API says: {reason}")
            raise Retryable(f"HTTP 429: {reason}", retry_after=retry_after(response))
        if status >= 500:
            raise Retryable(f"HTTP {status}: {error_reason(response)}")
        if status == 400:
            raise Refused(error_reason(response))
        if status != 200:
            raise StepFailed(f"{self.url} answered HTTP {status} ({error_reason(response)}): "
                             f"check OPEN_METEO_ARCHIVE_URL / --url")
        try:
            body = response.json()
        except ValueError:
            raise Retryable(f"invalid JSON from the API: {response.text[:60]!r}") from None
        body = [body] if isinstance(body, dict) and count == 1 else body
        if not isinstance(body, list) or len(body) != count:
            raise Retryable(f"the API answered {len(body) if isinstance(body, list) else 'one object'} "
                            f"location(s) for {count} requested")
        return body


def error_reason(response: requests.Response) -> str:
    try:
        return str(response.json().get("reason") or response.text[:120])
    except (ValueError, AttributeError):
        return re.sub(r"\s+", " ", response.text[:120])


def retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def cache_entry(answer: dict) -> dict:
    """What the cache keeps of one location's answer; raises ValueError if it is not 24 complete hours,
    NotInArchiveYet if an hour has no value at all (the archive answers so for hours it has not got yet; a
    local day can straddle its last UTC day)."""
    hourly = answer.get("hourly") or {}
    times = hourly.get("time") or []
    if len(times) != HOURS_PER_WINDOW:
        raise ValueError(f"expected {HOURS_PER_WINDOW} hours, got {len(times)}")
    for variable in HOURLY_VARIABLES:
        if len(hourly.get(variable) or []) != HOURS_PER_WINDOW:
            raise ValueError(f"variable {variable} missing or not {HOURS_PER_WINDOW} values")
    empty = sum(all(hourly[variable][hour] is None for variable in HOURLY_VARIABLES)
                for hour in range(HOURS_PER_WINDOW))
    if empty:
        raise NotInArchiveYet(f"the archive answered no values for {empty} of the day's {HOURS_PER_WINDOW} hours")
    return {"elevation": answer.get("elevation"), "utc_offset_seconds": int(answer.get("utc_offset_seconds") or 0),
            "timezone": answer.get("timezone") or "GMT",
            "hourly": {name: hourly[name] for name in ("time", *HOURLY_VARIABLES)}}


class Cache:
    """The answers in the warehouse (crawl.answer), one per archive endpoint, timezone, place and day (synthetic
    answers never stand in for real ones: they come from another endpoint, in another database), and the weighted
    calls spent per endpoint and UTC day (crawl.api_calls). Keys go to PostgreSQL as the text of their 6 decimals,
    so that Python rounds them, as the on-disk cache's file names did."""

    def __init__(self, connection: psycopg.Connection, url: str, zone: str) -> None:
        self.connection, self.zone = connection, zone
        self.source = urlsplit(url).netloc + urlsplit(url).path

    @staticmethod
    def columns(keys: list[Key]) -> tuple[list[str], list[str], list[str]]:
        return [f"{lat:.6f}" for lat, _, _ in keys], [f"{lon:.6f}" for _, lon, _ in keys], [day for *_, day in keys]

    def get(self, keys: list[Key]) -> dict[Key, dict]:
        """The cached entries of `keys` (those it has), each with its synthetic flag."""
        return {key: {**answer, "synthetic": synthetic}
                for key, answer, synthetic in self.find(keys, ", a.answer, a.synthetic")}

    def has(self, keys: list[Key]) -> set[Key]:
        """Those of `keys` it has, without reading their answers."""
        return {key for key, in self.find(keys, "")}

    def find(self, keys: list[Key], more: str) -> Iterator[tuple]:
        """(key, *more) for those of `keys` it has; `more` is a list of crawl.answer's columns after a comma."""
        wanted = dict(zip(zip(*self.columns(keys)), keys))
        rows = self.connection.execute(
            f"SELECT a.latitude::text, a.longitude::text, a.day::text{more} "
            "FROM unnest(%s::numeric[], %s::numeric[], %s::date[]) k(latitude, longitude, day) "
            "JOIN crawl.answer a USING (latitude, longitude, day) WHERE a.source = %s AND a.timezone = %s",
            (*self.columns(keys), self.source, self.zone))
        return ((wanted[lat, lon, day], *rest) for lat, lon, day, *rest in rows)

    def put(self, entries: dict[Key, dict], synthetic: bool) -> None:
        keys = list(entries)
        self.connection.execute(
            "INSERT INTO crawl.answer (source, timezone, latitude, longitude, day, answer, synthetic) "
            "SELECT %s, %s, k.* , %s FROM unnest(%s::numeric[], %s::numeric[], %s::date[], %s::jsonb[]) k "
            "ON CONFLICT DO NOTHING",
            (self.source, self.zone, synthetic, *self.columns(keys), [json.dumps(entries[key]) for key in keys]))

    def lock_names(self, keys: list[Key]) -> list[str]:
        return [f"crawl.answer {self.source} {self.zone} {lat} {lon} {day}" for lat, lon, day in
                zip(*self.columns(keys))]

    def lock(self, keys: list[Key]) -> list[Key]:
        """Those of `keys` this crawl now holds (a session-level advisory lock each); another crawl holds the rest."""
        rows = self.connection.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(name, 0)) FROM unnest(%s::text[]) WITH ORDINALITY n(name, i) "
            "ORDER BY i", (self.lock_names(keys),)).fetchall()
        return [key for key, (held,) in zip(keys, rows) if held]

    def unlock(self, keys: list[Key]) -> None:
        self.connection.execute("SELECT pg_advisory_unlock(hashtextextended(name, 0)) FROM unnest(%s::text[]) name",
                                (self.lock_names(keys),))

    def spend(self, weight: float, per_day: float) -> None:
        """Counts `weight` against the endpoint's budget of the UTC day, atomically for every crawl on every host;
        raises QuotaExhausted if it does not fit (per_day 0 = no budget, counted all the same)."""
        limit = per_day if per_day > 0 else float("inf")
        spent = self.connection.execute(
            "INSERT INTO crawl.api_calls AS c (source, day, weighted_calls) "
            "SELECT %(source)s, (now() AT TIME ZONE 'UTC')::date, %(weight)s WHERE %(weight)s <= %(limit)s "
            "ON CONFLICT (source, day) DO UPDATE SET weighted_calls = c.weighted_calls + excluded.weighted_calls "
            "WHERE c.weighted_calls + excluded.weighted_calls <= %(limit)s RETURNING weighted_calls",
            {"source": self.source, "weight": weight, "limit": limit}).fetchone()
        if spent is None:
            day, used = self.connection.execute(
                "SELECT (now() AT TIME ZONE 'UTC')::date::text, coalesce(sum(weighted_calls), 0) FROM crawl.api_calls "
                "WHERE source = %s AND day = (now() AT TIME ZONE 'UTC')::date", (self.source,)).fetchone()
            raise QuotaExhausted(f"the daily budget of {per_day:g} weighted calls to {self.source} is used up for the "
                                 f"UTC day {day} ({used:g} spent by all crawls); it renews at 00:00 UTC")

    def import_folder(self, root: Path, url: str) -> None:
        """Once: the answers the on-disk cache of earlier versions holds under `root` for this endpoint and
        timezone, and its call log's weighted calls of today (both are quota already spent); then removes them.
        An entry the table has already keeps the table's; an entry without its zone's name was a miss then too."""
        source = root / re.sub(r"[^A-Za-z0-9.-]+", "_", urlsplit(url).netloc + urlsplit(url).path).strip("_")
        folder, ledger = source / f"tz-{self.zone.replace('/', '_')}", source / "calls.log"
        entries: dict[Key, dict] = {}
        for path in sorted(folder.glob("*/*.json")):
            try:
                lat, lon = map(float, path.stem.split("_"))
                entry = json.loads(path.read_text())
            except ValueError:  # a file cut short by a crash
                continue
            if "timezone" in entry:
                entries[lat, lon, path.parent.name] = entry
        today = datetime.now(timezone.utc).date()
        calls = 0.0
        if ledger.is_file():
            for line in ledger.read_text().splitlines():
                try:
                    moment, weight = map(float, line.split())
                except ValueError:
                    continue
                calls += weight if datetime.fromtimestamp(moment, timezone.utc).date() == today else 0
        if not entries and not ledger.is_file():
            if root.is_dir():
                log.info("the on-disk cache %s holds no answers for %s in timezone %s (a crawl with that --url and "
                         "--timezone takes them)", root, self.source, self.zone)
            return
        with self.connection.transaction():
            for synthetic in (False, True):
                chosen = {key: {k: v for k, v in entry.items() if k != "synthetic"}
                          for key, entry in entries.items() if bool(entry.get("synthetic")) == synthetic}
                if chosen:
                    self.put(chosen, synthetic)
            if calls:
                self.connection.execute(
                    "INSERT INTO crawl.api_calls AS c (source, day, weighted_calls) VALUES (%s, %s, %s) "
                    "ON CONFLICT (source, day) DO UPDATE SET weighted_calls = c.weighted_calls + excluded.weighted_calls",
                    (self.source, today, calls))
        shutil.rmtree(folder, ignore_errors=True)
        ledger.unlink(missing_ok=True)
        for empty in (source, root):
            with contextlib.suppress(OSError):
                empty.rmdir()
        log.info("imported %d answers and today's %g weighted calls from the on-disk cache %s into the warehouse's; "
                 "removed them from disk", len(entries), calls, folder)


class Waiting:
    """The bounded wait for windows other crawls hold: polls, logs, and gives up after `limit` seconds in which
    none of them came free."""

    POLL = 1.0

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.since = self.logged = 0.0
        self.done = -1

    def another_round(self, held: list[Key], done: int) -> Retryable | None:
        """Sleeps before the held windows are tried again; returns why to stop once the wait is over."""
        now = time.monotonic()
        if done != self.done:  # some came free (or this is the first wait): the clock starts again
            self.done, self.since = done, now
        if now - self.since >= self.limit:
            return Retryable(f"{len(held)} windows were still being fetched by another crawl after --lock-wait "
                             f"{self.limit:g}s; rerun to read them from the cache once it has them")
        if now - self.logged >= 10:
            self.logged = now
            log.info("waiting for %d windows another crawl is fetching: they are read from the cache once it "
                     "releases them (%.0fs without one, gives up at --lock-wait %gs)", len(held), now - self.since,
                     self.limit)
        time.sleep(self.POLL)
        return None


@dataclass
class Crawl:
    archive: Archive
    cache: Cache
    limit: RateLimit
    batch_size: int
    retries: int
    backoff: float
    lock_wait: float  # seconds to wait for windows another crawl holds, while none of them comes free

    probed: bool = False  # a refused batch has shown that the request itself is fine
    # Keys the archive has not got yet, with how it said so; the caller decides whether they wait or fail.
    not_in_archive: dict[Key, str] = field(default_factory=dict)
    held_elsewhere: list[Key] = field(default_factory=list)  # by another crawl, when this one wanted them
    by_others: int = 0  # windows another crawl fetched while this one ran

    def batches(self, keys: list[Key]) -> list[list[Key]]:
        return [keys[i:i + self.batch_size] for i in range(0, len(keys), self.batch_size)]

    def run(self, keys: list[Key]) -> tuple[dict[Key, str], QuotaExhausted | Retryable | RefusedWhole | None]:
        """Fetches and caches `keys`; returns failures by key and, if it stopped early, why."""
        failed: dict[Key, str] = {}
        queue = deque(self.batches(keys))
        progress = Progress("windows fetched", len(keys))
        failed_in_a_row = 0
        waited = Waiting(self.lock_wait)
        while queue or self.held_elsewhere:
            if not queue:
                stop = waited.another_round(self.held_elsewhere, progress.done)
                if stop:
                    return failed, stop
                queue.extend(self.batches(self.held_elsewhere))
                self.held_elsewhere = []
                continue
            with self.claimed(queue.popleft(), progress) as batch:
                if not batch:
                    continue
                try:
                    answers = self.call(batch)
                except Refused as reason:
                    try:
                        self.check_request(reason)
                    except (RefusedWhole, QuotaExhausted) as stop:
                        return failed, stop
                    except Retryable as stop:
                        return failed, Retryable(f"a batch was refused ({reason}) and the check that followed got "
                                                 f"no answer: {stop}")
                    if len(batch) > 1:  # find the windows the API refuses by halving the batch
                        queue.extendleft([batch[len(batch) // 2:], batch[:len(batch) // 2]])
                        continue
                    if OUT_OF_RANGE.search(str(reason)):
                        self.not_in_archive[batch[0]] = f"API refused: {reason}"
                    else:
                        failed[batch[0]] = f"API refused: {reason}"
                    progress.advance()
                    continue
                except Retryable as reason:
                    failed.update((key, f"gave up after {self.retries + 1} attempts: {reason}") for key in batch)
                    progress.advance(len(batch))
                    failed_in_a_row += 1
                    if failed_in_a_row >= MAX_FAILED_BATCHES_IN_A_ROW:
                        return failed, Retryable(f"{failed_in_a_row} batches in a row failed, last: {reason}")
                    continue
                except QuotaExhausted as reason:
                    return failed, reason
                failed_in_a_row = 0
                self.keep(batch, answers, failed)
                progress.advance(len(batch))
        return failed, None

    @contextlib.contextmanager
    def claimed(self, batch: list[Key], progress: Progress) -> Iterator[list[Key]]:
        """The keys of `batch` this crawl fetches: those it holds the lock of and that no other crawl has fetched
        since this one looked; the locks go when the batch is done (and with the connection, should this crawl
        die). The keys another crawl holds wait in held_elsewhere."""
        mine = self.cache.lock(batch)
        self.held_elsewhere += sorted(set(batch) - set(mine))
        try:
            cached = self.cache.has(mine) if mine else set()
            self.by_others += len(cached)
            progress.advance(len(cached))
            yield [key for key in mine if key not in cached]
        finally:
            if mine:
                self.cache.unlock(mine)

    def keep(self, batch: list[Key], answers: list[dict], failed: dict[Key, str]) -> None:
        """Caches each complete answer of `batch`; the others are failed or not in the archive yet."""
        entries = {}
        for key, answer in zip(batch, answers):
            try:
                entries[key] = cache_entry(answer)
            except NotInArchiveYet as reason:
                self.not_in_archive[key] = str(reason)
            except ValueError as reason:
                failed[key] = f"incomplete answer: {reason}"
        if entries:
            self.cache.put(entries, self.archive.synthetic)

    def check_request(self, reason: Refused) -> None:
        """After a refusal, once per run: asks for a window the archive certainly serves. Refused too, the API
        refuses the request as such (a variable, the timezone, the key), and halving would only waste calls."""
        if self.probed:
            return
        try:
            self.call([PROBE])
        except Refused as again:
            raise RefusedWhole(f"the API refuses the request as a whole, even for a window it certainly has "
                               f"({PROBE[2]} at {PROBE[0]}, {PROBE[1]}): {again}") from None
        self.probed = True
        log.info("a batch was refused (%s); the request itself is fine, so the refused windows are narrowed "
                 "down by halving", reason)

    def call(self, batch: list[Key]) -> list[dict]:
        attempt = 0
        while True:
            self.limit.acquire(call_weight(len(batch)))
            try:
                return self.archive.fetch(batch)
            except Retryable as reason:
                if attempt == self.retries:
                    raise
                delay = reason.retry_after or self.backoff * 2**attempt * (0.5 + random.random())
                attempt += 1
                log.warning("%s; retry %d/%d in %.1fs", reason, attempt, self.retries, delay)
                time.sleep(delay)


def read_windows(path: Path) -> list[Window]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != WINDOW_COLUMNS:
            raise StepFailed(f"{path} has columns {reader.fieldnames}, expected {list(WINDOW_COLUMNS)}: rerun extract")
        try:
            return [Window(r["catalog_id"], r["is_event"], float(r["latitude"]), float(r["longitude"]), r["window_date"])
                    for r in reader]
        except (TypeError, ValueError) as error:
            raise StepFailed(f"{path} line {reader.line_num} is malformed ({error}): rerun extract") from None


def distinct_windows(paths: list[Path]) -> list[Window]:
    """The windows of all files in file order, each once."""
    listed = [window for path in paths for window in read_windows(path)]
    windows = list(dict.fromkeys(listed))
    log.info("%d windows in %s; %d listed again by another file or line, counted once",
             len(windows), ", ".join(path.name for path in paths), len(listed) - len(windows))
    return windows


def warehouse_pending(dsn: str) -> list[Window]:
    """The windows waiting in the warehouse (table pending_window), named by their event's catalog id."""
    rows = query_warehouse(dsn, "the pending windows",
                           "SELECT e.catalog_id, p.is_event, p.latitude, p.longitude, p.window_date "
                           "FROM pending_window p JOIN landslide_event e USING (landslide_event_id) "
                           "ORDER BY p.window_date, e.catalog_id, p.is_event DESC")
    return [Window(catalog_id, "true" if is_event else "false", float(lat), float(lon), day.isoformat())
            for catalog_id, is_event, lat, lon, day in rows]


def with_pending(windows: list[Window], pending: list[Window]) -> list[Window]:
    """This run's windows plus the warehouse's pending ones; an event this run lists again (perhaps edited to
    another place or day) keeps this run's window."""
    listed = {(w.catalog_id, w.is_event) for w in windows}
    added = [w for w in pending if (w.catalog_id, w.is_event) not in listed]
    log.info("%d windows pending in the warehouse: %d added, %d listed by this run already",
             len(pending), len(added), len(pending) - len(added))
    return windows + added


def observed_at(local: str, offset_seconds: int) -> str:
    """The true UTC instant of an answer's hour. Open-Meteo writes every hour of a series as UTC + the one
    utc_offset_seconds valid at request time (no per-day daylight saving), so that same offset, not the zone's
    offset on the day, turns the label back into the instant the values belong to."""
    zone = timezone(timedelta(seconds=offset_seconds))
    return datetime.fromisoformat(local).replace(tzinfo=zone).isoformat()


def window_rows(window: Window, entry: dict) -> Iterator[tuple]:
    hourly = entry["hourly"]
    for hour, local in enumerate(hourly["time"]):
        yield (window.catalog_id, window.is_event, window.latitude, window.longitude, entry["elevation"], window.day,
               observed_at(local, entry["utc_offset_seconds"]), entry["timezone"],
               *(hourly[name][hour] for name in HOURLY_VARIABLES))


def write_outputs(folder: Path, windows: list[Window], cache: Cache, failed: dict[Key, str], not_fetched: str,
                  waiting: set[Key]) -> tuple[int, int, int, bool]:
    """hourly.csv, failed_windows.csv and pending_windows.csv (the windows of `waiting` without data); returns
    (windows with data, failed windows, pending windows, any synthetic)."""
    entries = cache.get([key for key in {w.key for w in windows} if key not in failed])
    done = [w for w in windows if entries.get(w.key)]
    write_csv(folder / HOURLY, HOURLY_COLUMNS, (row for w in done for row in window_rows(w, entries[w.key])))
    pending = [w for w in windows if not entries.get(w.key) and w.key in waiting]
    write_csv(folder / PENDING_WINDOWS, WINDOW_COLUMNS,
              ((w.catalog_id, w.is_event, w.latitude, w.longitude, w.day) for w in pending))
    missing = [w for w in windows if not entries.get(w.key) and w.key not in waiting]
    write_csv(folder / FAILED_WINDOWS, FAILED_COLUMNS,
              ((w.catalog_id, w.is_event, w.latitude, w.longitude, w.day, failed.get(w.key, not_fetched))
               for w in missing))
    return len(done), len(missing), len(pending), any(entries[w.key].get("synthetic") for w in done)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help=f"archive endpoint (default: $OPEN_METEO_ARCHIVE_URL, else {REAL_ARCHIVE_URL}; "
                                      f"with $OPEN_METEO_API_KEY set, {CUSTOMER_ARCHIVE_URL} instead of the former)")
    parser.add_argument("--import-cache", type=Path, metavar="DIR",
                        help="the on-disk answer cache of earlier versions (their --cache-dir), imported once into "
                             "the warehouse's and then removed (default: <buffer>/cache/open-meteo)")
    parser.add_argument("--lock-wait", type=float, default=600,
                        help="seconds to wait for windows another crawl is fetching while none of them comes free, "
                             "then stop (rerun to read them from the cache; default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100, help="windows per call, 1-1000 (default: %(default)s)")
    parser.add_argument("--timezone", default="auto",
                        help="'auto' = each place's local day (default), or GMT, or an IANA name")
    parser.add_argument("--retries", type=int, default=5, help="retries per call on 429/5xx/timeouts (default: 5)")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubling (default: 2)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per HTTP call (default: 60)")
    for span, limit in FREE_TIER.items():
        parser.add_argument(f"--calls-per-{span}", type=float,
                            help=f"weighted-call limit; 0 = none (default: the free tier's {limit}; with an API key, "
                                 f"none: the plan's limits are the server's to enforce)")
    parser.add_argument("--archive-lag-days", type=int, default=5,
                        help="windows after today minus this many days are pending, not fetched: the archive's "
                             "delay (default: %(default)s)")
    parser.add_argument("--recent-days", type=int, default=30,
                        help="a window of the last this many days that the archive answers with hours of no "
                             "values (or as out of its range) is pending, an older one failed (default: %(default)s)")
    parser.add_argument("--pending-from-warehouse", action="store_true",
                        help="also crawl the windows pending in the warehouse (table pending_window; needs "
                             "$VPE_WAREHOUSE_DSN), so that their hours load once the archive has their day")
    parser.add_argument("--max-failed-ratio", type=float, default=0.05,
                        help="fail the step if more than this share of windows could not be fetched (default: 0.05)")
    add_run_arguments(parser)
    args = parser.parse_args()
    if not 1 <= args.batch_size <= 1000:
        parser.error("--batch-size must be between 1 and 1000 (the API's limit per call)")
    args.api_key = os.environ.get("OPEN_METEO_API_KEY", "").strip()
    configured = args.url or os.environ.get("OPEN_METEO_ARCHIVE_URL") or REAL_ARCHIVE_URL
    args.url = CUSTOMER_ARCHIVE_URL if args.api_key and configured == REAL_ARCHIVE_URL else configured
    for span, limit in FREE_TIER.items():
        if getattr(args, f"calls_per_{span}") is None:
            setattr(args, f"calls_per_{span}", 0 if args.api_key else limit)
    return args


def main() -> int:
    args = parse_args()
    folder, _ = workspace(args, create=False, needs=WINDOWS.format(name="*"))
    windows = distinct_windows(list(extract_files(folder, WINDOWS).values()))
    if args.pending_from_warehouse:
        windows = with_pending(windows, warehouse_pending(warehouse_dsn("--pending-from-warehouse")))
    if args.import_cache and not args.import_cache.is_dir():
        raise StepFailed(f"--import-cache {args.import_cache}: no such folder (the --cache-dir of an earlier crawl)")
    archive = Archive(args.url, args.timezone, args.timeout, args.api_key)
    # Autocommit: each answer is kept the moment it is written, and the window locks are the session's.
    connection = connect_warehouse(warehouse_dsn("crawl (its answer cache is the warehouse's)"))
    connection.autocommit = True
    try:
        with connection:
            cache = Cache(connection, args.url, args.timezone)
            cache.import_folder(args.import_cache or buffer_dir() / "cache" / "open-meteo", args.url)
            return crawl_windows(args, folder, windows, archive, cache)
    except psycopg.Error as error:
        raise StepFailed(f"the answer cache in the warehouse failed ({' '.join(str(error).split())}): is the "
                         f"warehouse up and its schema current? (./bootstrap.sh status, ./bootstrap.sh migrate); "
                         f"then rerun: the answers cached so far stay") from None


def crawl_windows(args: argparse.Namespace, folder: Path, windows: list[Window], archive: Archive, cache: Cache) -> int:
    limit = RateLimit(args.calls_per_minute, args.calls_per_hour, args.calls_per_day, cache)
    batch_size = limit.largest_batch(args.batch_size)
    today = datetime.now(timezone.utc).date()
    last_day = (today - timedelta(days=args.archive_lag_days)).isoformat()
    recent = (today - timedelta(days=args.recent_days)).isoformat()
    keys = sorted({w.key for w in windows})
    cached = cache.has(keys)
    uncached = [key for key in keys if key not in cached]
    missing = [key for key in uncached if key[2] <= last_day]
    log.info("%d windows (%d distinct place-days): %d cached, %d to fetch from %s%s in batches of %d; %d pending "
             "(after %s, the archive's last day with --archive-lag-days %d)", len(windows), len(keys),
             len(keys) - len(uncached), len(missing), args.url, " with the API key" if args.api_key else "",
             batch_size, len(uncached) - len(missing), last_day, args.archive_lag_days)
    started = time.monotonic()
    crawl = Crawl(archive, cache, limit, batch_size, args.retries, args.backoff, args.lock_wait)
    failed, stopped = crawl.run(missing)
    if crawl.by_others:
        log.info("%d of the windows to fetch were fetched by another crawl meanwhile: read from the cache",
                 crawl.by_others)
    not_fetched = f"not fetched: {stopped}" if stopped else "not fetched"
    arriving = {key for key in crawl.not_in_archive if key[2] >= recent}
    failed.update((key, f"{reason} (older than --recent-days {args.recent_days})")
                  for key, reason in crawl.not_in_archive.items() if key not in arriving)
    if crawl.not_in_archive:
        log.info("the archive has no values yet for %d place-days: %d of the last %d days wait as pending, %d older "
                 "ones failed", len(crawl.not_in_archive), len(arriving), args.recent_days,
                 len(crawl.not_in_archive) - len(arriving))
    waiting = {key for key in uncached if key[2] > last_day} | arriving
    done, not_done, pending, synthetic = write_outputs(folder, windows, cache, failed, not_fetched, waiting)
    summary = {"url": args.url, "synthetic": synthetic or archive.synthetic, "windows": len(windows),
               "windows_with_data": done, "windows_failed": not_done, "windows_pending": pending,
               "api_calls": archive.calls,
               "seconds": round(time.monotonic() - started, 2), "stopped": str(stopped) if stopped else None}
    (folder / CRAWL_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%d windows = %d with 24 hourly rows + %d failed (see %s) + %d pending (see %s); %d API calls in %.1fs",
             len(windows), done, not_done, FAILED_WINDOWS, pending, PENDING_WINDOWS, archive.calls,
             summary["seconds"])
    if summary["synthetic"]:
        log.warning("*** the weather values of this run are SYNTHETIC (from %s), not observations ***", args.url)
    if isinstance(stopped, QuotaExhausted):
        raise StepFailed(f"daily quota reached ({stopped}): {done} of {len(windows)} windows are fetched and cached; rerun the same "
                         f"command tomorrow to fetch the other {not_done} (cached windows make no new calls)",
                         EXIT_QUOTA)
    if isinstance(stopped, RefusedWhole):
        raise StepFailed(f"{stopped}: check --url, --timezone and OPEN_METEO_API_KEY; {not_done} of "
                         f"{len(windows)} windows not fetched")
    if stopped:
        raise StepFailed(f"stopped: {stopped}; {not_done} of {len(windows)} windows missing; "
                         f"rerun to resume (cached windows make no new calls)")
    due = len(windows) - pending
    if due and not_done / due > args.max_failed_ratio:
        raise StepFailed(f"{not_done} of {due} windows failed ({not_done / due:.1%} > "
                         f"--max-failed-ratio {args.max_failed_ratio:.1%}); reasons in {folder / FAILED_WINDOWS}")
    return 0


if __name__ == "__main__":
    run_step("crawl", main)
