#!/usr/bin/env python3
"""extract: NASA Global Landslide Catalog -> events, weather windows, rejects.

The catalog comes as a file (CSV or XLSX, path or URL) in either export format,
recognised by its header: the legacy 2007-2016 export (id, date, time, ...) or
the current COOLR export (event_id, event_date, ..., last_edited_date); or live,
from NASA's ArcGIS layer (a URL ending in /FeatureServer/<n>, or `live` for
$VPE_GLC_LAYER_URL), read page by page through its query API. Both formats map
onto one set of event columns (common.EVENT_COLUMNS); the catalog's own key
(`id` in the legacy export, `event_id` in the current one and the layer) is
renamed to catalog_id here, once, and goes by that name from here on.

Every data row becomes an event or a rejected row with its reason; the counts are
printed and add up (with --since, rows not created or edited after it are
skipped and counted as such; --since warehouse takes the warehouse's watermark
for the source, the newest edit loaded from it, and reads everything when there
is none). Each event gets two one-day windows at its
location: the event day, and the same calendar day one year earlier (the
non-event sample). Writes events-NAME.csv, windows-NAME.csv and
rejects-NAME.jsonl into the workspace (NAME from --name), so extracts of several
catalogs can run at the same time into one workspace; crawl and load read all.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import random
import re
import time as clock_time
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from codes import code
from common import (EVENT_COLUMNS, EVENTS, EXTRACT_NAME, REJECTS, REPO, WINDOW_COLUMNS, WINDOWS, Progress,
                    StepFailed, add_run_arguments, atomic_write, log, query_warehouse, run_step,
                    warehouse_dsn, workspace, write_csv)

REAL_LAYER_URL = "https://gis.earthdata.nasa.gov/gis01/rest/services/Landslides/COOLR_Reports_Points/FeatureServer/0"
LAYER_URL = re.compile(r"/FeatureServer/\d+/?$", re.IGNORECASE)
SINCE_WAREHOUSE = "warehouse"  # --since warehouse: the watermark the warehouse keeps for the source
ARCHIVE_START = date(1940, 1, 1)
EXCEL_EPOCH = date(1899, 12, 30)
WHEN = re.compile(r"(?:(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})|(?P<iy>\d{4})-(?P<im>\d{2})-(?P<id>\d{2}))"
                  r"(?:[ T]+(?P<clock>\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:\s*[AP]M)?))?", re.IGNORECASE)
CLOCK_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\.(\d+))?(?:\s*([AP]M))?", re.IGNORECASE)
CATALOG_CLOCK = "%I:%M:%S %p"  # how the current export writes times: 12:00:00 AM
CATALOG_DATETIME = f"%m/%d/%Y {CATALOG_CLOCK}"
CONTINENTS = Path(__file__).with_name("country_continent.csv")


@dataclass
class Row:
    number: int  # spreadsheet row number (the header is row 1); for the ArcGIS layer, the report's objectid
    values: dict[str, str]


@dataclass(frozen=True)
class CatalogFormat:
    """One export format: the columns that identify it and how its row becomes the shared event columns."""
    name: str
    required: tuple[str, ...]
    id_column: str
    shared: Callable[[dict[str, str]], dict[str, str]]


class Rejected(Exception):
    """A row that cannot become an event; the message is the reason stored with it."""


@dataclass
class Event:
    row: Row
    catalog_id: str
    day: date
    latitude: float
    longitude: float
    values: dict[str, str]  # the shared columns as text

    def record(self, source: str) -> tuple:
        fixed = {"source": source, "row_number": self.row.number, "catalog_id": self.catalog_id,
                 "event_date": self.day.isoformat(), "latitude": self.latitude, "longitude": self.longitude}
        return tuple(fixed[name] if name in fixed else self.values.get(name) or None for name in EVENT_COLUMNS)

    def windows(self) -> list[tuple]:
        return [(self.catalog_id, "true", self.latitude, self.longitude, self.day.isoformat()),
                (self.catalog_id, "false", self.latitude, self.longitude, one_year_earlier(self.day).isoformat())]


def one_year_earlier(day: date) -> date:
    try:
        return day.replace(year=day.year - 1)
    except ValueError:  # 29 February
        return day.replace(year=day.year - 1, day=28)


# ------------------------------------------------------------------ the two formats, mapped once

def location_accuracy(text: str) -> str:
    """Both spellings on one scale: legacy Known_within_5km / Known_within_5_km and current 5km ->
    known_within_5_km; Exact_Location and exact -> exact_location."""
    value = code(text)
    if match := re.fullmatch(r"(?:known_within_)?(\d+)_?km", value):
        return f"known_within_{match[1]}_km"
    return "exact_location" if value in ("exact", "exact_location") else value


def whole_number(text: str, name: str) -> str:
    """Counts as integer text: '43.0' -> '43'; blank stays blank."""
    text = text.strip()
    if not text:
        return ""
    try:
        value = float(text)
    except ValueError:
        raise Rejected(f"unparseable {name}: {text!r}") from None
    if not value.is_integer() or value < 0:
        raise Rejected(f"{name} is not a whole number >= 0: {text!r}")
    return str(int(value))


def catalog_id(text: str) -> str:
    return re.sub(r"\.0+$", "", text.strip())


def stripped(values: dict[str, str], name: str) -> str:
    """A column's text without surrounding blanks; '' if the file has no such column."""
    return values.get(name, "").strip()


def legacy_shared(v: dict[str, str]) -> dict[str, str]:
    """The legacy 2007-2016 export's names for the shared columns (CONTRACTS C1)."""
    get = functools.partial(stripped, v)
    return {
        "catalog_id": catalog_id(v["id"]), "title": get("nearest_places"),
        "country": get("countryname") or get("country"), "country_code": get("countrycode").upper(),
        "admin_division": get("adminname1"), "near": get("near"),
        "continent_code": v["continentcode"].strip(),  # as written: "NA" is North America, not a null
        "location_accuracy": location_accuracy(get("location_accuracy")),
        "hazard_type": code(get("hazard_type"), "hazard_type"),
        "landslide_category": code(get("landslide_type"), "landslide_category"),
        "landslide_trigger": code(get("trigger"), "landslide_trigger"),
        "landslide_size": code(get("landslide_size"), "landslide_size"), "landslide_setting": "",
        "fatalities": whole_number(get("fatalities"), "fatalities"),
        "injuries": whole_number(get("injuries"), "injuries"), "source_link": get("source_link"),
        **legacy_when(v["date"], v["time"]),
    }


def current_shared(v: dict[str, str]) -> dict[str, str]:
    """The current COOLR export's (and the ArcGIS layer's) names for the shared columns (CONTRACTS C1)."""
    get = functools.partial(stripped, v)
    country_code = get("country_code").upper()
    return {
        "catalog_id": catalog_id(v["event_id"]), "title": get("event_title"), "country": get("country_name"),
        "country_code": country_code, "admin_division": get("admin_division_name"),
        "near": get("gazeteer_closest_point"), "continent_code": continent_of(country_code),
        "location_accuracy": location_accuracy(get("location_accuracy")), "hazard_type": "",
        "landslide_category": code(get("landslide_category"), "landslide_category"),
        "landslide_trigger": code(get("landslide_trigger"), "landslide_trigger"),
        "landslide_size": code(get("landslide_size"), "landslide_size"),
        "landslide_setting": code(get("landslide_setting"), "landslide_setting"),
        "fatalities": whole_number(get("fatality_count"), "fatality_count"),
        "injuries": whole_number(get("injury_count"), "injury_count"), "source_link": get("source_link"),
        "last_edited": utc_timestamp(get("last_edited_date"), "last_edited_date"),
        **current_when(v["event_date"], get("event_time")),
    }


LEGACY = CatalogFormat(
    "legacy 2007-2016 export",
    ("id", "date", "time", "country", "near", "continentcode", "hazard_type", "landslide_type", "landslide_size",
     "latitude", "longitude"),
    "id", legacy_shared)
CURRENT = CatalogFormat(
    "current COOLR export",
    ("event_id", "event_date", "event_time", "event_title", "country_name", "country_code", "landslide_category",
     "landslide_trigger", "landslide_size", "last_edited_date", "latitude", "longitude"),
    "event_id", current_shared)
FORMATS = (LEGACY, CURRENT)


def detect_format(path: str | Path, header: list[str]) -> CatalogFormat:
    """The format whose columns the header has; else an error naming what each format lacks."""
    for catalog in FORMATS:
        if set(catalog.required) <= set(header):
            return catalog
    shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
    lacks = "; ".join(f"as the {catalog.name} it lacks catalog column(s) "
                      f"{', '.join(name for name in catalog.required if name not in header)}" for catalog in FORMATS)
    raise StepFailed(f"{path} is neither NASA Global Landslide Catalog export: {lacks} (found: {shown})")


@functools.cache
def continents() -> dict[str, str]:
    """country_continent.csv: ISO 3166-1 alpha-2 code -> continent code (its comment lines say where from)."""
    with CONTINENTS.open(encoding="utf-8", newline="") as handle:
        return {row["country_code"]: row["continent_code"]
                for row in csv.DictReader(line for line in handle if not line.startswith("#"))}


def continent_of(country_code: str) -> str:
    return continents().get(country_code, "")


# ------------------------------------------------------------------ dates and times

def parse_when(text: str, name: str) -> tuple[date, time | None]:
    """A date, with the clock time written in it or None: MM/DD/YYYY[ hh:mm:ss AM], YYYY-MM-DD[ HH:MM:SS]
    (an XLSX date cell) or an Excel serial day number."""
    text = text.strip()
    if not text:
        raise Rejected(f"missing {name}")
    try:
        if match := WHEN.fullmatch(text):
            if match["y"]:
                day = date(int(match["y"]), int(match["m"]), int(match["d"]))
            else:
                day = date(int(match["iy"]), int(match["im"]), int(match["id"]))
            written = parse_clock(match["clock"] or "")
            if match["clock"] and written is None:
                raise ValueError(match["clock"])
            return day, written
        if text.isdigit() and len(text) == 5:
            return EXCEL_EPOCH + timedelta(days=int(text)), None
    except ValueError:
        pass
    raise Rejected(f"unparseable {name}: {text!r} (expected MM/DD/YYYY)")


def parse_clock(text: str) -> time | None:
    """HH:MM[:SS[.fff]] or hh:mm:ss[.fff] AM|PM (the fraction kept to the microsecond); free text ('night',
    'Overnight', ...) means the time is unknown."""
    match = CLOCK_TIME.fullmatch(text.strip())
    if not match:
        return None
    hour, minute, second = (int(part or 0) for part in match.groups()[:3])
    microsecond = int((match[4] or "")[:6].ljust(6, "0"))
    if meridiem := (match[5] or "").upper():
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if meridiem == "PM" else 0)
    return time(hour, minute, second, microsecond) if hour < 24 and minute < 60 and second < 60 else None


def legacy_when(date_text: str, time_text: str) -> dict[str, str]:
    day, _ = parse_when(date_text, "date")  # an XLSX date cell's 00:00:00 is no time of day
    written = parse_clock(time_text)
    return {"event_date": day.isoformat(), "event_time": written.isoformat() if written else "",
            "time_text": time_text}


def current_when(date_text: str, time_text: str) -> dict[str, str]:
    """The current export writes the time into event_date; 12:00:00 AM there means 'unknown' unless
    event_time says otherwise. time_text is event_time as written, else event_date's time part in the
    catalog's own 12-hour form (the same for the CSV, an XLSX date cell and the ArcGIS layer)."""
    day, written = parse_when(date_text, "event_date")
    midnight = written == time(0, 0)
    known = parse_clock(time_text) if time_text else None
    known = known or (None if midnight else written)
    text = time_text or (written.strftime(CATALOG_CLOCK) if written is not None else "")
    return {"event_date": day.isoformat(), "event_time": known.isoformat() if known else "", "time_text": text}


def utc_timestamp(text: str, name: str) -> str:
    """The export's edit times are UTC: '02/15/2018 03:51:00 PM' -> 2018-02-15T15:51:00+00:00; the layer's keep
    their milliseconds: '02/15/2018 03:51:00.516 PM' -> 2018-02-15T15:51:00.516000+00:00."""
    if not text.strip():
        return ""
    day, written = parse_when(text, name)
    return datetime.combine(day, written or time(0), timezone.utc).isoformat()


def parse_since(text: str) -> datetime | str:
    """--since: an ISO date or timestamp, UTC without an offset; or `warehouse` (resolved per source)."""
    if text.strip() == SINCE_WAREHOUSE:
        return SINCE_WAREHOUSE
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use an ISO date or timestamp, e.g. 2024-05-01 or "
                                         f"2024-05-01T12:00:00+00:00") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def resolve_since(since: datetime | str | None, source: str) -> datetime | None:
    """--since warehouse: the warehouse's watermark for `source` (None: nothing loaded from it yet)."""
    if since != SINCE_WAREHOUSE:
        return since
    [(mark,)] = query_warehouse(warehouse_dsn("--since warehouse"), f"the watermark of {source}",
                                "SELECT source_watermark(%s)", source)
    if mark is None:
        log.info("the warehouse has no watermark for %s yet: reading every report", source)
    else:
        log.info("the warehouse's watermark for %s: %s; reading what was created or edited after it",
                 source, mark.isoformat())
    return mark


def epoch_text(milliseconds: float) -> str:
    """An ArcGIS date (epoch ms, UTC) as the export writes it, with the milliseconds when there are any
    (12:00:00.516 AM). The layer stores the catalog's local wall-clock date and time as if it were UTC (the
    export's 08/01/2008 12:00:00 AM is 1217548800000), so the UTC calendar day and clock ARE the catalog's
    local ones."""
    moment = datetime(1970, 1, 1) + timedelta(milliseconds=round(milliseconds))
    if not moment.microsecond:
        return moment.strftime(CATALOG_DATETIME)
    return f"{moment:%m/%d/%Y %I:%M:%S}.{moment.microsecond // 1000:03d} {moment:%p}"


# ------------------------------------------------------------------ files: CSV and XLSX

def cell_text(value: object) -> str:
    """Spreadsheet cells as the text a CSV would hold."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def fetch(source: str, folder: Path, name: str) -> Path:
    """A local path as is; an http(s) URL downloaded into the workspace."""
    if urlsplit(source).scheme not in ("http", "https"):
        return local_path(source)
    import requests

    target = folder / f"download-{name}-{Path(urlsplit(source).path).name or 'catalog'}"
    log.info("downloading %s", source)
    try:
        with requests.get(source, timeout=60, stream=True) as response:
            response.raise_for_status()
            with atomic_write(target, binary=True) as handle:
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)
    except requests.RequestException as error:
        raise StepFailed(f"cannot download {source}: {error}") from None
    return target


def local_path(source: str) -> Path:
    """Relative paths that are not under the working dir are taken from the repo: a task run by the executor
    works in its workspace, yet `tasks/ingestion/demo_catalog.csv` should still name the demo."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_absolute() and (REPO / path).is_file():
        return REPO / path
    where = "" if path.is_absolute() else f" (looked in {Path.cwd()} and in the repo {REPO})"
    raise StepFailed(f"input file {source} does not exist{where}")


def read_rows(path: Path, sheet: str | None, encoding: str) -> tuple[list[str], Iterator[Row]]:
    data = path.read_bytes()
    if not data.strip():
        raise StepFailed(f"{path} is empty: expected the Global Landslide Catalog as CSV or XLSX")
    if data[:4] == b"PK\x03\x04":
        return read_xlsx(path, data, sheet)
    if sheet:
        raise StepFailed(f"--sheet given but {path} is not an XLSX workbook")
    return read_csv(path, data, encoding)


def read_csv(path: Path, data: bytes, encoding: str) -> tuple[list[str], Iterator[Row]]:
    if b"\x00" in data[:65536]:
        raise StepFailed(f"{path} is binary, not CSV text or an XLSX workbook: export the catalog as CSV or XLSX")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise StepFailed(f"{path} is not {encoding} text (byte {data[error.start]:#04x} at offset {error.start}): "
                         f"re-save it as UTF-8 CSV or pass --encoding (e.g. latin-1)") from None
    except LookupError:
        raise StepFailed(f"unknown --encoding {encoding!r}") from None
    records = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in next(records)]
    except StopIteration:
        raise StepFailed(f"{path} is empty") from None

    def rows() -> Iterator[Row]:
        try:
            for number, record in enumerate(records, start=2):
                if record:  # a blank line is not a row
                    yield record_row(number, header, record)
        except csv.Error as error:
            raise StepFailed(f"{path}: malformed CSV near record {records.line_num}: {error}") from None

    return header, rows()


def record_row(number: int, header: list[str], record: list[str]) -> Row:
    values = dict(zip(header, record))
    if len(record) != len(header):
        values["__fields__"] = f"{len(record)} fields, header has {len(header)}"
    return Row(number, values)


def read_xlsx(path: Path, data: bytes, sheet: str | None) -> tuple[list[str], Iterator[Row]]:
    import openpyxl

    try:  # from memory: openpyxl would refuse a downloaded file without an .xlsx name
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
        raise StepFailed(f"{path} looks like XLSX but cannot be opened ({error}): re-save it as .xlsx or CSV") from None
    names = [sheet] if sheet else [name for name in book.sheetnames if has_catalog_header(book[name])]
    if sheet and sheet not in book.sheetnames:
        raise StepFailed(f"{path} has no sheet {sheet!r}; sheets: {', '.join(book.sheetnames)}")
    if not names:
        expected = " or ".join(f"{catalog.name} ({', '.join(catalog.required)})" for catalog in FORMATS)
        raise StepFailed(f"no sheet of {path} has the catalog columns of the {expected}; "
                         f"sheets: {', '.join(book.sheetnames)}")
    if len(names) > 1:
        raise StepFailed(f"several sheets of {path} look like the catalog ({', '.join(names)}): pass --sheet NAME")
    if len(book.sheetnames) > 1:
        log.info("using sheet %r of %s", names[0], ", ".join(book.sheetnames))
    cells = book[names[0]].iter_rows(values_only=True)
    header = [cell_text(value).strip().lower() for value in next(cells, ())]

    def rows() -> Iterator[Row]:
        for number, record in enumerate(cells, start=2):
            if any(value is not None and str(value).strip() for value in record):
                yield record_row(number, header, [cell_text(value) for value in record][:len(header)])

    return header, rows()


def has_catalog_header(worksheet) -> bool:
    first = {cell_text(value).strip().lower() for value in next(worksheet.iter_rows(max_row=1, values_only=True), ())}
    return any(set(catalog.required) <= first for catalog in FORMATS)


# ------------------------------------------------------------------ the live catalog: an ArcGIS layer

class LayerUnavailable(Exception):
    """A timeout, an HTTP 5xx or an ArcGIS error with a 5xx code: worth another try after a pause."""


@dataclass
class Layer:
    """An ArcGIS FeatureServer layer read through its REST `query` operation."""
    url: str
    page_size: int
    retries: int
    backoff: float
    timeout: float
    calls: int = 0

    def query(self, params: dict[str, str]) -> dict:
        attempt = 0
        while True:
            try:
                return self.query_once(params)
            except LayerUnavailable as reason:
                if attempt == self.retries:
                    raise StepFailed(f"the ArcGIS layer {self.url} gave no answer after {attempt + 1} attempts: "
                                     f"{reason}; try again later") from None
                delay = self.backoff * 2**attempt * (0.5 + random.random())
                attempt += 1
                log.warning("%s; retry %d/%d in %.1fs", reason, attempt, self.retries, delay)
                clock_time.sleep(delay)

    def query_once(self, params: dict[str, str]) -> dict:
        import requests

        self.calls += 1
        try:
            response = requests.get(f"{self.url.rstrip('/')}/query", params={**params, "f": "json"},
                                    timeout=self.timeout)
        except requests.RequestException as error:
            raise LayerUnavailable(f"no answer from {self.url}: {type(error).__name__}: {error}") from None
        if response.status_code >= 500:
            raise LayerUnavailable(f"HTTP {response.status_code} from {self.url}")
        if response.status_code != 200:
            raise StepFailed(f"the ArcGIS layer {self.url} answered HTTP {response.status_code}: "
                             f"check the layer URL (VPE_GLC_LAYER_URL)")
        try:
            body = response.json()
        except ValueError:
            raise LayerUnavailable(f"invalid JSON from {self.url}: {response.text[:60]!r}") from None
        if not isinstance(body, dict):
            raise LayerUnavailable(f"unexpected answer from {self.url}: {response.text[:60]!r}")
        if "error" in body:  # ArcGIS reports errors as HTTP 200 with an error object
            error = body["error"] if isinstance(body["error"], dict) else {"message": str(body["error"])}
            details = "; ".join(str(d) for d in error.get("details") or [])
            reason = f"ArcGIS error {error.get('code', '?')}: {error.get('message', '')}" + (
                f" ({details})" if details else "")
            if isinstance(error.get("code"), int) and error["code"] >= 500:
                raise LayerUnavailable(reason)
            raise StepFailed(f"the ArcGIS layer {self.url} refused the query: {reason}")
        return body

    def read(self, where: str) -> tuple[list[str], Iterator[Row]]:
        """Every report matching `where`, page by page in objectid order, as rows the export would hold."""
        total = self.query({"where": where, "returnCountOnly": "true"}).get("count")
        if not isinstance(total, int):
            raise StepFailed(f"the ArcGIS layer {self.url} answered no count: is it a FeatureServer layer?")
        log.info("%d reports to read from %s (where %s)", total, self.url, where)
        first = self.page(where, 0)
        header = [field["name"].lower() for field in first.get("fields") or []]
        return header, self.rows(where, first, total)

    def page(self, where: str, offset: int) -> dict:
        body = self.query({"where": where, "outFields": "*", "orderByFields": "objectid ASC",
                           "returnGeometry": "false", "resultOffset": str(offset),
                           "resultRecordCount": str(self.page_size)})
        if not isinstance(body.get("features"), list):
            raise StepFailed(f"the ArcGIS layer {self.url} answered without features: {str(body)[:120]}")
        return body

    def rows(self, where: str, page: dict, total: int) -> Iterator[Row]:
        progress = Progress("reports read", total)
        offset = 0
        while True:
            dates = {f["name"].lower() for f in page.get("fields") or [] if f.get("type") == "esriFieldTypeDate"}
            for feature in page["features"]:
                attributes = {name.lower(): value for name, value in (feature.get("attributes") or {}).items()}
                values = {name: epoch_text(value) if name in dates and isinstance(value, (int, float))
                          else cell_text(value) for name, value in attributes.items()}
                yield Row(int(attributes.get("objectid") or 0), values)
            offset += len(page["features"])
            progress.advance(len(page["features"]))
            # A server without the flag (before ArcGIS 10.3.1) has more while it sends full pages.
            if not page.get("exceededTransferLimit", len(page["features"]) >= self.page_size):
                if offset < total:
                    log.warning("read %d reports of the %d the layer counted: reports were deleted during the "
                                "read, or the layer stopped paging early; rerun to compare", offset, total)
                return
            if not page["features"]:
                raise StepFailed(f"the ArcGIS layer {self.url} says there is more but sent no reports at "
                                 f"offset {offset}")
            page = self.page(where, offset)


def since_where(since: datetime | None) -> str:
    """The standardized-SQL filter the layer accepts: a timestamp literal, not an epoch number, in whole seconds.
    So the reports edited in `since`'s own second come back too; changed_since() drops those not after it."""
    if since is None:
        return "1=1"
    moment = since.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"last_edited_date > timestamp '{moment}' OR created_date > timestamp '{moment}'"


def changed_since(values: dict[str, str], since: datetime | None, exact: bool) -> bool:
    """Whether a current-format row was created or last edited after `since`. `exact`: the times are the
    layer's, to the millisecond, as the watermark is. Else they are a file's, in whole seconds: an edit at
    the watermark's own second is read again rather than lost. A row whose dates cannot be read is kept, to be
    rejected (or not) on its own merits."""
    if since is None:
        return True
    try:
        stamps = [utc_timestamp(values.get(name, ""), name) for name in ("last_edited_date", "created_date")]
    except Rejected:
        return True
    return any(datetime.fromisoformat(stamp) > since or (not exact and datetime.fromisoformat(stamp) == since)
               for stamp in stamps if stamp)


# ------------------------------------------------------------------ rows -> events

def parse_coordinate(text: str, name: str, limit: float) -> float:
    if not text.strip():
        raise Rejected(f"missing {name}")
    try:
        value = float(text)
    except ValueError:
        raise Rejected(f"unparseable {name}: {text!r}") from None
    if not math.isfinite(value) or abs(value) > limit:
        raise Rejected(f"{name} out of range: {text} (must be within ±{limit:g})")
    return value


def latest_day_on_earth() -> date:
    """Today where it is latest (UTC+14): an event dated after that lies in the future everywhere."""
    return (datetime.now(timezone.utc) + timedelta(hours=14)).date()


def to_event(row: Row, catalog: CatalogFormat, last_day: date) -> Event:
    v = row.values
    if "__fields__" in v:
        raise Rejected(f"wrong number of fields: {v['__fields__']}")
    if not v[catalog.id_column].strip():
        raise Rejected("missing id")
    shared = catalog.shared(v)
    day = date.fromisoformat(shared["event_date"])
    if one_year_earlier(day) < ARCHIVE_START:
        raise Rejected(f"date before archive: {day} (weather starts {ARCHIVE_START}; the non-event sample "
                       f"needs the day one year earlier too)")
    if day > last_day:
        raise Rejected(f"date in the future: {day} (no place on Earth has reached it yet)")
    latitude = parse_coordinate(v["latitude"], "latitude", 90)
    longitude = parse_coordinate(v["longitude"], "longitude", 180)
    return Event(row, shared["catalog_id"], day, latitude, longitude, shared)


@dataclass
class Split:
    events: list[Event]
    rejects: list[dict]
    skipped: int  # not created or edited after --since


def split_rows(rows: Iterator[Row], catalog: CatalogFormat, source: str, since: datetime | None,
               exact_times: bool) -> Split:
    split = Split([], [], 0)
    first_row_of: dict[str, int] = {}
    last_day = latest_day_on_earth()
    for count, row in enumerate(rows, start=1):
        if not changed_since(row.values, since, exact_times):
            split.skipped += 1
            continue
        try:
            event = to_event(row, catalog, last_day)
            if event.catalog_id in first_row_of:
                raise Rejected(f"duplicate id: {event.catalog_id} (first in row {first_row_of[event.catalog_id]})")
            first_row_of[event.catalog_id] = row.number
            split.events.append(event)
        except Rejected as reason:
            raw = {key: value for key, value in row.values.items() if key != "__fields__"}
            row_key = f"row {row.number}, id {row.values.get(catalog.id_column, '').strip()}"
            split.rejects.append({"source": source, "row_key": row_key, "row_number": row.number, "raw": raw,
                                  "reason": str(reason)})
        if count % 5000 == 0:
            log.info("rows read: %d", count)
    return split


def write_outputs(folder: Path, name: str, source: str, split: Split) -> int:
    write_csv(folder / EVENTS.format(name=name), EVENT_COLUMNS, (event.record(source) for event in split.events))
    windows = write_csv(folder / WINDOWS.format(name=name), WINDOW_COLUMNS,
                        (window for event in split.events for window in event.windows()))
    with atomic_write(folder / REJECTS.format(name=name)) as handle:
        for reject in split.rejects:
            handle.write(json.dumps(reject, ensure_ascii=False) + "\n")
    return windows


# ------------------------------------------------------------------ command line

def extract_name(text: str) -> str:
    if not EXTRACT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, _ and - only")
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the catalog: a .csv or .xlsx path or http(s) URL (either export format); "
                                       "an ArcGIS layer URL ending in /FeatureServer/<n>; or `live` for "
                                       "$VPE_GLC_LAYER_URL (default: NASA's COOLR_Reports_Points layer). A relative "
                                       "path not found under the working dir is taken relative to the repo")
    parser.add_argument("--name", default="catalog", type=extract_name,
                        help="names this extract's files (events-NAME.csv, windows-NAME.csv, rejects-NAME.jsonl); "
                             "give each extract into one workspace its own (letters, digits, _ and -; "
                             "default: %(default)s)")
    parser.add_argument("--since", type=parse_since, metavar="TIMESTAMP",
                        help="only reports created or edited after this ISO date/timestamp, UTC unless it has an "
                             "offset (current format and the ArcGIS layer; the legacy export has no edit dates); "
                             "`warehouse`: after the newest edit loaded from this source (contract C3, "
                             "source_watermark() through $VPE_WAREHOUSE_DSN), everything if none")
    parser.add_argument("--sheet", help="XLSX sheet to read (default: the one sheet with the catalog columns)")
    parser.add_argument("--encoding", default="utf-8-sig", help="CSV text encoding (default: %(default)s)")
    parser.add_argument("--page-size", type=int, default=2000,
                        help="ArcGIS: reports per query page; the layer may send fewer (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=5, help="ArcGIS: retries per query on timeouts and 5xx "
                                                               "(default: %(default)s)")
    parser.add_argument("--backoff", type=float, default=2.0, help="ArcGIS: first retry delay in seconds, doubling "
                                                                   "(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120, help="ArcGIS: seconds per query (default: %(default)s)")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.source == "live":
        args.source = os.environ.get("VPE_GLC_LAYER_URL") or REAL_LAYER_URL
    if not 1 <= args.page_size <= 10000:
        parser.error("--page-size must be between 1 and 10000")
    return args


def is_layer(source: str) -> bool:
    url = urlsplit(source)
    return url.scheme in ("http", "https") and bool(LAYER_URL.search(url.path))


def open_source(args: argparse.Namespace, folder: Path) -> tuple[str, str, list[str], Iterator[Row]]:
    """(what the events' source column says, what to name in messages, header, rows)."""
    if is_layer(args.source):
        layer = Layer(args.source.rstrip("/"), args.page_size, args.retries, args.backoff, args.timeout)
        args.since = resolve_since(args.since, layer.url)
        header, rows = layer.read(since_where(args.since))
        return layer.url, layer.url, header, rows
    path = fetch(args.source, folder, args.name)
    source = Path(urlsplit(args.source).path).name or path.name
    args.since = resolve_since(args.since, source)
    header, rows = read_rows(path, args.sheet, args.encoding)
    return source, str(path), header, rows


def main() -> int:
    args = parse_args()
    folder, _ = workspace(args, create=True, needs=EVENTS.format(name="*"))
    source, shown, header, rows = open_source(args, folder)
    catalog = detect_format(shown, header)
    if args.since and catalog is LEGACY:
        raise StepFailed(f"--since cannot apply to {shown}: the {LEGACY.name} has no edit dates; "
                         f"read it whole (without --since)")
    log.info("%s: the %s", shown, catalog.name)
    split = split_rows(rows, catalog, source, args.since, exact_times=is_layer(args.source))
    total = len(split.events) + len(split.rejects)
    if total + split.skipped == 0 and not args.since:  # with --since, nothing new is an answer
        raise StepFailed(f"{shown} has a header but no data rows")
    windows = write_outputs(folder, args.name, source, split)
    skipped = f"; {split.skipped} more not created or edited since {args.since.isoformat()}, skipped" \
        if args.since else ""
    log.info("read %d rows = %d events + %d rejected%s; %d windows (event day + one year earlier)",
             total, len(split.events), len(split.rejects), skipped, windows)
    if args.since and total == 0:
        log.info("nothing edited since %s: no report to load", args.since.isoformat())
    for kind, count in Counter(reject["reason"].split(":")[0] for reject in split.rejects).most_common():
        log.info("  rejected, %s: %d", kind, count)
    log.info("wrote %s in %s", ", ".join(template.format(name=args.name) for template in (EVENTS, WINDOWS, REJECTS)),
             folder)
    return 0


if __name__ == "__main__":
    run_step("extract", main)
