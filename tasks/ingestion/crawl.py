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
answer per location). Every answer is cached on disk first, so a rerun or a
resumed run asks only for windows it does not have. 429/5xx/timeouts are retried
with backoff; a rate limit keeps weighted calls under the free tier's limits.
A 400 that refuses the request as a whole (a bad variable, timezone or API key)
stops the crawl with its reason after two calls; a 400 for some windows only is
narrowed down to those windows by halving the batch.
With OPEN_METEO_API_KEY set, calls go to Open-Meteo's customer endpoint with the
key, and the free tier's local limits are off unless --calls-per-* set them.

Exit codes: 0 done; 1 failed (reason on stderr); 75 daily quota reached (rerun later to resume).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode, urlsplit

import requests

from common import (CRAWL_SUMMARY, FAILED_COLUMNS, FAILED_WINDOWS, HOURLY, HOURLY_COLUMNS, HOURLY_VARIABLES,
                    PENDING_WINDOWS, WINDOW_COLUMNS, WINDOWS, Progress, StepFailed, add_run_arguments, buffer_dir,
                    extract_files, log, query_warehouse, run_step, warehouse_dsn, workspace, write_csv)

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
    """Sliding-window limits on weighted calls, remembered on disk so that reruns on the same day count too."""

    def __init__(self, limits: list[tuple[float, float]], ledger: Path) -> None:
        self.limits = sorted((span, limit) for span, limit in limits if limit > 0)
        self.ledger = ledger
        self.calls: deque[tuple[float, float]] = deque()
        if self.limits and ledger.is_file():
            horizon = time.time() - self.limits[-1][0]
            for line in ledger.read_text().splitlines():
                try:
                    moment, weight = map(float, line.split())
                except ValueError:  # a line cut short by a crash
                    continue
                if moment > horizon:
                    self.calls.append((moment, weight))
            ledger.write_text("".join(f"{moment:.3f} {weight}\n" for moment, weight in self.calls))

    def largest_batch(self, wanted: int) -> int:
        """Batch size capped so that one call's weight fits the tightest limit."""
        tightest = min((limit for _, limit in self.limits), default=None)
        return wanted if tightest is None else max(1, min(wanted, int(tightest // call_weight(1))))

    def acquire(self, weight: float) -> None:
        """Waits until `weight` fits every limit; raises QuotaExhausted if the daily one does not."""
        while self.limits:
            now = time.time()
            while self.calls and self.calls[0][0] <= now - self.limits[-1][0]:
                self.calls.popleft()
            wake = self.wake_time(now, weight)
            if wake is None:
                break
            if wake - now > 3600:
                resume = datetime.fromtimestamp(wake, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                raise QuotaExhausted(f"the local rate limit's daily budget is used up until {resume}")
            if wake - now >= 1:
                log.info("rate limit: waiting %.1fs", wake - now)
            time.sleep(wake - now)
        self.calls.append((time.time(), weight))
        if self.limits:
            with self.ledger.open("a") as handle:
                handle.write(f"{self.calls[-1][0]:.3f} {weight}\n")

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
    """One JSON file per (place, day), under a folder per API URL and timezone: synthetic answers never stand in
    for real ones."""

    def __init__(self, root: Path, url: str, zone: str) -> None:
        source = re.sub(r"[^A-Za-z0-9.-]+", "_", urlsplit(url).netloc + urlsplit(url).path).strip("_")
        self.folder = root / source / f"tz-{zone.replace('/', '_')}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: Key) -> Path:
        lat, lon, day = key
        return self.folder / day / f"{lat:.6f}_{lon:.6f}.json"

    def get(self, key: Key) -> dict | None:
        """An entry written before answers' zone names were kept counts as missing: the warehouse needs the name."""
        try:
            entry = json.loads(self.path(key).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return entry if "timezone" in entry else None

    def put(self, key: Key, entry: dict) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(entry))
        partial.replace(path)


@dataclass
class Crawl:
    archive: Archive
    cache: Cache
    limit: RateLimit
    batch_size: int
    retries: int
    backoff: float

    probed: bool = False  # a refused batch has shown that the request itself is fine
    # Keys the archive has not got yet, with how it said so; the caller decides whether they wait or fail.
    not_in_archive: dict[Key, str] = field(default_factory=dict)

    def run(self, keys: list[Key]) -> tuple[dict[Key, str], QuotaExhausted | Retryable | RefusedWhole | None]:
        """Fetches and caches `keys`; returns failures by key and, if it stopped early, why."""
        failed: dict[Key, str] = {}
        queue = deque(keys[i:i + self.batch_size] for i in range(0, len(keys), self.batch_size))
        progress = Progress("windows fetched", len(keys))
        failed_in_a_row = 0
        while queue:
            batch = queue.popleft()
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
            for key, answer in zip(batch, answers):
                try:
                    self.cache.put(key, {**cache_entry(answer), "synthetic": self.archive.synthetic})
                except NotInArchiveYet as reason:
                    self.not_in_archive[key] = str(reason)
                except ValueError as reason:
                    failed[key] = f"incomplete answer: {reason}"
            progress.advance(len(batch))
        return failed, None

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
    entries = {key: cache.get(key) for key in {w.key for w in windows} if key not in failed}
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
    parser.add_argument("--cache-dir", type=Path, help="answer cache (default: <buffer>/cache/open-meteo)")
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
    archive = Archive(args.url, args.timezone, args.timeout, args.api_key)
    cache_root = args.cache_dir or buffer_dir() / "cache" / "open-meteo"
    cache = Cache(cache_root, args.url, args.timezone)
    limit = RateLimit([(60, args.calls_per_minute), (3600, args.calls_per_hour), (86400, args.calls_per_day)],
                      cache.folder.parent / "calls.log")
    batch_size = limit.largest_batch(args.batch_size)
    today = datetime.now(timezone.utc).date()
    last_day = (today - timedelta(days=args.archive_lag_days)).isoformat()
    recent = (today - timedelta(days=args.recent_days)).isoformat()
    keys = sorted({w.key for w in windows})
    uncached = [key for key in keys if cache.get(key) is None]
    missing = [key for key in uncached if key[2] <= last_day]
    log.info("%d windows (%d distinct place-days): %d cached, %d to fetch from %s%s in batches of %d; %d pending "
             "(after %s, the archive's last day with --archive-lag-days %d)", len(windows), len(keys),
             len(keys) - len(uncached), len(missing), args.url, " with the API key" if args.api_key else "",
             batch_size, len(uncached) - len(missing), last_day, args.archive_lag_days)
    started = time.monotonic()
    crawl = Crawl(archive, cache, limit, batch_size, args.retries, args.backoff)
    failed, stopped = crawl.run(missing)
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
