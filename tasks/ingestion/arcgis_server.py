#!/usr/bin/env python3
"""A local stand-in for NASA's ArcGIS layer COOLR_Reports_Points (FeatureServer/0) and its `query` operation.

Serves the reports of a catalog file in the current COOLR export format (CSV,
--catalog) the way the real layer does: GET .../FeatureServer/0/query with
where, outFields=*, orderByFields=objectid, resultOffset/resultRecordCount paging
capped at maxRecordCount (exceededTransferLimit says whether more follow),
returnCountOnly, f=json; dates as epoch milliseconds (the export's wall-clock
text taken as UTC), ids and counts as numbers, blanks as null. Errors come as
HTTP 200 with {"error": {"code", "message", "details"}}, like ArcGIS. `where`
understands only what extract sends: 1=1, and `<date field> > timestamp
'yyyy-mm-dd hh:mm:ss'` (or date 'yyyy-mm-dd') joined by OR; anything else is
refused with code 400, as the real service refuses an invalid where.

The file is read again whenever it changes, so a test adds or edits reports by
rewriting it (objectid: the file's objectid column, else the row's position).
Faults can be injected: every Nth call an HTTP 500, or a 200-with-error.
GET /stats tells the calls, statuses and where clauses seen.

Standard library only (and open_meteo_server.py beside it), so it runs with any python3.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from open_meteo_server import StandinHandler, add_listen_arguments, serve

LAYER_PATH = "/arcgis/rest/services/Landslides/COOLR_Reports_Points/FeatureServer/0"
DATE_FIELDS = ("event_date", "submitted_date", "created_date", "last_edited_date")
INTEGER_FIELDS = ("event_id", "event_import_id")
DOUBLE_FIELDS = ("fatality_count", "injury_count", "admin_division_population", "gazeteer_distance", "longitude",
                 "latitude")
EXPORT_DATETIME = "%m/%d/%Y %I:%M:%S %p"
COMPARISON = re.compile(r"\s*(\w+)\s*>\s*(timestamp|date)\s*'([^']*)'\s*", re.IGNORECASE)


class QueryError(Exception):
    """Answered as HTTP 200 {"error": {"code": ..., "message": ..., "details": [...]}}, like ArcGIS."""

    def __init__(self, details: str, code: int = 400, message: str = "Unable to complete operation.") -> None:
        super().__init__(details)
        self.code, self.message = code, message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "details": [str(self)]}}


def field_type(name: str) -> str:
    if name == "objectid":
        return "esriFieldTypeOID"
    if name in DATE_FIELDS:
        return "esriFieldTypeDate"
    if name in INTEGER_FIELDS:
        return "esriFieldTypeInteger"
    return "esriFieldTypeDouble" if name in DOUBLE_FIELDS else "esriFieldTypeString"


def epoch_ms(text: str) -> int:
    """The export's 'MM/DD/YYYY hh:mm:ss AM' as epoch milliseconds, taking the wall-clock text as UTC. A
    catalog file for the stand-in may give milliseconds, as the real layer has them: 'hh:mm:ss.fff AM'."""
    layout = EXPORT_DATETIME.replace("%S", "%S.%f") if "." in text else EXPORT_DATETIME
    moment = datetime.strptime(text.strip(), layout).replace(tzinfo=timezone.utc)
    return round(moment.timestamp() * 1000)


def attribute(name: str, text: str) -> object:
    text = text.strip()
    if not text:
        return None
    try:
        if name in DATE_FIELDS:
            return epoch_ms(text)
        if name in INTEGER_FIELDS or name == "objectid":
            return int(float(text))
        if name in DOUBLE_FIELDS:
            return float(text)
    except ValueError:
        return None  # a value the layer's typed field could not hold
    return text


class Catalog:
    """The served reports, read again from the file whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.stamp: tuple[float, int] | None = None
        self.fields: list[str] = []
        self.features: list[dict] = []

    def current(self) -> tuple[list[str], list[dict]]:
        with self.lock:
            status = self.path.stat()
            if self.stamp != (status.st_mtime, status.st_size):
                self.fields, self.features = self.read()
                self.stamp = (status.st_mtime, status.st_size)
            return self.fields, self.features

    def read(self) -> tuple[list[str], list[dict]]:
        with self.path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            names = [name.strip().lower() for name in reader.fieldnames or []]
            fields = names if "objectid" in names else ["objectid", *names]
            features = []
            for position, row in enumerate(reader, start=1):
                values = {name.strip().lower(): text for name, text in row.items() if name is not None}
                values.setdefault("objectid", str(position))
                features.append({name: attribute(name, values.get(name) or "") for name in fields})
        return fields, sorted(features, key=lambda feature: feature["objectid"])


def parse_where(where: str, fields: list[str]) -> list[tuple[str, int]]:
    """[(date field, epoch ms)]: a report matches if any field is later; [] for 1=1."""
    if re.fullmatch(r"\s*1\s*=\s*1\s*", where):
        return []
    comparisons = []
    for part in re.split(r"\s+OR\s+", where, flags=re.IGNORECASE):
        match = COMPARISON.fullmatch(part)
        if not match or match[1].lower() not in fields or field_type(match[1].lower()) != "esriFieldTypeDate":
            raise QueryError("'where' parameter is invalid")
        try:
            literal = match[3] if match[2].lower() == "timestamp" else f"{match[3]} 00:00:00"
            moment = datetime.strptime(literal, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
        except ValueError:
            raise QueryError("'where' parameter is invalid") from None
        comparisons.append((match[1].lower(), int(moment.timestamp() * 1000)))
    return comparisons


def matches(feature: dict, comparisons: list[tuple[str, int]]) -> bool:
    return not comparisons or any((feature.get(name) or -2**62) > bound for name, bound in comparisons)


def integer(params: dict[str, str], name: str, default: int) -> int:
    try:
        value = int(params.get(name) or default)
    except ValueError:
        raise QueryError(f"'{name}' parameter is invalid") from None
    if value < 0:
        raise QueryError(f"'{name}' parameter is invalid")
    return value


def query(params: dict[str, str], catalog: Catalog, max_records: int) -> dict:
    """The answer to one query request."""
    if params.get("f") not in ("json", "pjson"):
        raise QueryError("this stand-in answers f=json only")
    fields, features = catalog.current()
    comparisons = parse_where(params.get("where") or "", fields)
    chosen = [feature for feature in features if matches(feature, comparisons)]
    if (params.get("returnCountOnly") or "").lower() == "true":
        return {"count": len(chosen)}
    if (params.get("outFields") or "*") != "*":
        raise QueryError("this stand-in answers outFields=* only")
    order = (params.get("orderByFields") or "objectid ASC").split()
    if order[0].lower() != "objectid" or len(order) > 2 or (len(order) == 2 and order[1].upper() not in ("ASC", "DESC")):
        raise QueryError("'orderByFields' parameter is invalid")
    if len(order) == 2 and order[1].upper() == "DESC":
        chosen.reverse()
    offset = integer(params, "resultOffset", 0)
    count = min(integer(params, "resultRecordCount", max_records) or max_records, max_records)
    page = chosen[offset:offset + count]
    geometry = (params.get("returnGeometry") or "true").lower() != "false"
    return {
        "objectIdFieldName": "objectid",
        "geometryType": "esriGeometryPoint",
        "spatialReference": {"wkid": 4326, "latestWkid": 4326},
        "fields": [{"name": name, "type": field_type(name), "alias": name} for name in fields],
        "exceededTransferLimit": offset + len(page) < len(chosen),
        "features": [{"attributes": feature, **({"geometry": {"x": feature.get("longitude"),
                                                                 "y": feature.get("latitude")}} if geometry else {})}
                     for feature in page],
    }


def layer_info(catalog: Catalog, max_records: int) -> dict:
    fields, _ = catalog.current()
    return {"id": 0, "name": "COOLR_Reports_Points", "type": "Feature Layer", "objectIdField": "objectid",
            "maxRecordCount": max_records, "supportsPagination": True,
            "advancedQueryCapabilities": {"supportsPagination": True, "useStandardizedQueries": True},
            "fields": [{"name": name, "type": field_type(name), "alias": name} for name in fields]}


class Faults:
    """Injected failures, counted per call; thread-safe."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.calls = 0
        self.by_status: dict[str, int] = {}
        self.wheres: list[str] = []

    def next_call(self, where: str | None) -> int:
        with self.lock:
            self.calls += 1
            if where is not None:
                self.wheres.append(where)
            return self.calls

    def record(self, status: str) -> None:
        with self.lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def injected(self, call: int) -> tuple[int, dict | str] | None:
        opts = self.options
        if opts.fail_500_every and call % opts.fail_500_every == 0:
            return 500, "<html><body>500 Internal Server Error</body></html>"
        if opts.error_every and call % opts.error_every == 0:
            return 200, QueryError("Injected failure (arcgis_server.py --error-every)", opts.error_code).body()
        return None

    def stats(self) -> dict:
        with self.lock:
            return {"calls": self.calls, "by_status": dict(self.by_status), "wheres": list(self.wheres)}


class LayerHandler(StandinHandler):
    server_version = "vpe-arcgis-standin/1"
    faults: Faults
    catalog: Catalog
    max_records: int

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        params = {name: values[-1] for name, values in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path.rstrip("/")
        if path == "/stats":
            self.answer(200, self.faults.stats())
        elif path in (LAYER_PATH, f"{LAYER_PATH}/query"):
            self.serve(path, params)
        else:
            self.answer(404, {"error": {"code": 404, "message": f"No route for {url.path}; try {LAYER_PATH}/query",
                                        "details": []}})

    def serve(self, path: str, params: dict[str, str]) -> None:
        is_query = path.endswith("/query")
        call = self.faults.next_call(params.get("where") if is_query else None)
        injected = self.faults.injected(call)
        if injected:
            status, body = injected
            self.faults.record(f"{status}" if status != 200 else "200-error")
            self.answer(status, body)
            return
        try:
            body = query(params, self.catalog, self.max_records) if is_query else layer_info(self.catalog,
                                                                                             self.max_records)
        except QueryError as error:
            self.faults.record("200-error")
            self.answer(200, error.body())
            return
        self.faults.record("200")
        self.answer(200, body)

    def answer(self, status: int, body: dict | str) -> None:
        if isinstance(body, str):
            self.send_body(status, body, "text/html; charset=utf-8")
        else:
            self.send_body(status, json.dumps(body, separators=(",", ":")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Local stand-in for NASA's COOLR_Reports_Points ArcGIS layer, serving a current-format catalog "
                    f"file. Endpoints: GET {LAYER_PATH}[/query], GET /stats.")
    parser.add_argument("--catalog", type=Path, required=True,
                        help="the reports to serve: a CSV in the current COOLR export format (re-read when it changes)")
    add_listen_arguments(parser, 8766)
    parser.add_argument("--max-record-count", type=int, default=2000,
                        help="most reports per page, like the layer's maxRecordCount (default: %(default)s)")
    parser.add_argument("--fail-500-every", type=int, default=0, metavar="N", help="answer every Nth call with HTTP 500")
    parser.add_argument("--error-every", type=int, default=0, metavar="N",
                        help="answer every Nth call with HTTP 200 and an ArcGIS error body")
    parser.add_argument("--error-code", type=int, default=400, help="the injected error's code (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if not options.catalog.is_file():
        print(f"arcgis_server: {options.catalog} does not exist: pass --catalog with a current-format export CSV",
              file=sys.stderr)
        return 1
    handler = type("Handler", (LayerHandler,), {"faults": Faults(options), "catalog": Catalog(options.catalog),
                                                "max_records": options.max_record_count, "quiet": options.quiet})
    return serve("arcgis_server", handler, options.host, options.port,
                 f"serving {options.catalog} as an ArcGIS layer", LAYER_PATH)


if __name__ == "__main__":
    sys.exit(main())
