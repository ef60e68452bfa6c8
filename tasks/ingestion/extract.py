#!/usr/bin/env python3
"""extract: NASA Global Landslide Catalog (CSV or XLSX, path or URL) -> events, weather windows, rejects.

Every data row becomes an event or a rejected row with its reason; the counts are
printed and add up. Each event gets two one-day windows at its location: the event
day, and the same calendar day one year earlier (the non-event sample).
Writes events-NAME.csv, windows-NAME.csv and rejects-NAME.jsonl into the run folder
(NAME from --name), so extracts of several catalogs (say the CSV and the XLSX export)
can run at the same time into one run folder; crawl and load read all of them.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from common import (EVENT_COLUMNS, EVENTS, EXTRACT_NAME, REJECTS, REPO, WINDOW_COLUMNS, WINDOWS, StepFailed,
                    add_run_arguments, atomic_write, log, run_folder, run_step, write_csv)

REQUIRED_COLUMNS = ("id", "date", "time", "country", "near", "continentcode", "hazard_type", "landslide_type",
                    "landslide_size", "latitude", "longitude")
ARCHIVE_START = date(1940, 1, 1)
EXCEL_EPOCH = date(1899, 12, 30)
US_DATE = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})(?:\s+\d{1,2}:\d{2}(?::\d{2})?(?:\s*[AP]M)?)?", re.IGNORECASE)
ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[ T]\d{2}:\d{2}(?::\d{2})?)?")  # Excel date cells
CLOCK_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")


@dataclass
class Row:
    number: int  # spreadsheet row number: the header is row 1
    values: dict[str, str]


@dataclass
class Event:
    row: Row
    event_id: str
    day: date
    clock: time | None
    latitude: float
    longitude: float

    def record(self, source: str) -> tuple:
        """The row in EVENT_COLUMNS (contract C1), mapped from the legacy export's columns."""
        v = self.row.values
        return (source, self.row.number, self.event_id, self.day.isoformat(), self.clock.isoformat() if self.clock else None,
                field(v, "time"), None, field(v, "nearest_places"), field(v, "countryname") or field(v, "country"),
                field(v, "countrycode"), field(v, "adminname1"), field(v, "near"), field(v, "continentcode"),
                code(v, "location_accuracy"), code(v, "hazard_type"), code(v, "landslide_type"), code(v, "trigger"),
                code(v, "landslide_size"), None, whole_number(v.get("fatalities", "")),
                whole_number(v.get("injuries", "")), field(v, "source_link"), self.latitude, self.longitude, None)

    def windows(self) -> list[tuple]:
        return [(self.event_id, "true", self.latitude, self.longitude, self.day.isoformat()),
                (self.event_id, "false", self.latitude, self.longitude, one_year_earlier(self.day).isoformat())]


class Rejected(Exception):
    """A row that cannot become an event; the message is the reason stored with it."""


def blank_to_none(text: str) -> str | None:
    # Only blanks are missing: "NA" is North America's continent code, not a null.
    return text if text.strip() else None


def field(values: dict[str, str], name: str) -> str | None:
    return blank_to_none(values.get(name, ""))


def code(values: dict[str, str], name: str) -> str | None:
    """A category as a lowercase code: 'Very_large' -> 'very_large'."""
    return blank_to_none(values.get(name, "").strip().lower().replace(" ", "_"))


def whole_number(text: str) -> str | None:
    """'43.0' -> '43'; blank or not a count -> None."""
    try:
        return str(int(float(text)))
    except (ValueError, OverflowError):
        return None


def one_year_earlier(day: date) -> date:
    try:
        return day.replace(year=day.year - 1)
    except ValueError:  # 29 February
        return day.replace(year=day.year - 1, day=28)


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
    """A local path as is; an http(s) URL downloaded into the run folder."""
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
    works in its run folder, yet `tasks/ingestion/demo_catalog.csv` should still name the demo."""
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
        raise StepFailed(f"no sheet of {path} has the catalog columns ({', '.join(REQUIRED_COLUMNS)}); "
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
    first = next(worksheet.iter_rows(max_row=1, values_only=True), ())
    return set(REQUIRED_COLUMNS) <= {cell_text(value).strip().lower() for value in first}


def check_columns(path: Path, header: list[str]) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
        raise StepFailed(f"{path} lacks catalog column(s) {', '.join(missing)} (found: {shown}): "
                         f"is it the NASA Global Landslide Catalog export?")


def parse_date(text: str) -> date:
    text = text.strip()
    if not text:
        raise Rejected("missing date")
    try:
        if match := US_DATE.fullmatch(text):
            month, day, year = map(int, match.groups())
            return date(year, month, day)
        if match := ISO_DATE.fullmatch(text):
            return date(*map(int, match.groups()))
        if text.isdigit() and len(text) == 5:  # an Excel serial day number
            return EXCEL_EPOCH + timedelta(days=int(text))
    except ValueError:
        pass
    raise Rejected(f"unparseable date: {text!r} (expected MM/DD/YYYY)")


def parse_clock(text: str) -> time | None:
    """HH:MM or HH:MM:SS; free text ('night', 'Overnight', ...) means the time is unknown."""
    match = CLOCK_TIME.fullmatch(text.strip())
    if not match:
        return None
    hour, minute, second = (int(part or 0) for part in match.groups())
    return time(hour, minute, second) if hour < 24 and minute < 60 and second < 60 else None


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


def to_event(row: Row, archive_end: date) -> Event:
    v = row.values
    if "__fields__" in v:
        raise Rejected(f"wrong number of fields: {v['__fields__']}")
    event_id = re.sub(r"\.0$", "", v["id"].strip())
    if not event_id:
        raise Rejected("missing id")
    day = parse_date(v["date"])
    if one_year_earlier(day) < ARCHIVE_START:
        raise Rejected(f"date before archive: {day} (weather starts {ARCHIVE_START}; the non-event sample "
                       f"needs the day one year earlier too)")
    if day > archive_end:
        raise Rejected(f"date after archive: {day} (the archive's last complete day is {archive_end})")
    latitude = parse_coordinate(v["latitude"], "latitude", 90)
    longitude = parse_coordinate(v["longitude"], "longitude", 180)
    return Event(row, event_id, day, parse_clock(v["time"]), latitude, longitude)


def split_rows(rows: Iterator[Row], archive_end: date, source: str) -> tuple[list[Event], list[dict]]:
    events: list[Event] = []
    rejects: list[dict] = []
    first_row_of: dict[str, int] = {}
    for count, row in enumerate(rows, start=1):
        try:
            event = to_event(row, archive_end)
            if event.event_id in first_row_of:
                raise Rejected(f"duplicate id: {event.event_id} (first in row {first_row_of[event.event_id]})")
            first_row_of[event.event_id] = row.number
            events.append(event)
        except Rejected as reason:
            raw = {key: value for key, value in row.values.items() if key != "__fields__"}
            row_key = f"row {row.number}, id {row.values.get('id', '').strip()}"
            rejects.append({"source": source, "row_key": row_key, "row_number": row.number, "raw": raw,
                            "reason": str(reason)})
        if count % 5000 == 0:
            log.info("rows read: %d", count)
    return events, rejects


def write_outputs(folder: Path, name: str, source: str, events: list[Event], rejects: list[dict]) -> int:
    write_csv(folder / EVENTS.format(name=name), EVENT_COLUMNS, (event.record(source) for event in events))
    windows = write_csv(folder / WINDOWS.format(name=name), WINDOW_COLUMNS,
                        (window for event in events for window in event.windows()))
    with atomic_write(folder / REJECTS.format(name=name)) as handle:
        for reject in rejects:
            handle.write(json.dumps(reject, ensure_ascii=False) + "\n")
    return windows


def extract_name(text: str) -> str:
    if not EXTRACT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, _ and - only")
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the catalog: a .csv or .xlsx path, or an http(s) URL; a relative path "
                                       "not found under the working dir is taken relative to the repo (so "
                                       "tasks/ingestion/demo_catalog.csv works from any run folder)")
    parser.add_argument("--name", default="catalog", type=extract_name,
                        help="names this extract's files (events-NAME.csv, windows-NAME.csv, rejects-NAME.jsonl); "
                             "give each extract into one run folder its own (letters, digits, _ and -; "
                             "default: %(default)s)")
    parser.add_argument("--sheet", help="XLSX sheet to read (default: the one sheet with the catalog columns)")
    parser.add_argument("--encoding", default="utf-8-sig", help="CSV text encoding (default: %(default)s)")
    parser.add_argument("--archive-delay-days", type=int, default=7,
                        help="events newer than today minus this many days are rejected: the archive lags "
                             "(default: %(default)s)")
    add_run_arguments(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    folder, _ = run_folder(args, create=True, needs=EVENTS.format(name="*"))
    path = fetch(args.source, folder, args.name)
    source = Path(urlsplit(args.source).path).name or path.name
    header, rows = read_rows(path, args.sheet, args.encoding)
    check_columns(path, header)
    archive_end = date.today() - timedelta(days=args.archive_delay_days)
    events, rejects = split_rows(rows, archive_end, source)
    total = len(events) + len(rejects)
    if total == 0:
        raise StepFailed(f"{path} has a header but no data rows")
    windows = write_outputs(folder, args.name, source, events, rejects)
    log.info("read %d rows = %d events + %d rejected; %d windows (event day + one year earlier)",
             total, len(events), len(rejects), windows)
    for kind, count in Counter(reject["reason"].split(":")[0] for reject in rejects).most_common():
        log.info("  rejected, %s: %d", kind, count)
    log.info("wrote %s in %s", ", ".join(template.format(name=args.name) for template in (EVENTS, WINDOWS, REJECTS)),
             folder)
    return 0


if __name__ == "__main__":
    run_step("extract", main)
