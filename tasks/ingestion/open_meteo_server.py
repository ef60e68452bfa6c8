#!/usr/bin/env python3
"""A local stand-in for the Open-Meteo historical archive API (/v1/archive).

SYNTHETIC weather data: every value is computed from the coordinates and the
hour, so it is deterministic and plausible, never observed. It exists for tests,
the crawl benchmark and offline demos. Same request and response shapes as the
real API: GET or POST (form body), comma lists for several locations answered
by a JSON array, HTTP 400 {"error": true, "reason": ...}. Faults can be
injected (latency, every-Nth-call 429/500/garbage, a daily quota).

Like the real archive it lags real time: hours after its "archive end" (the
UTC day today minus 5 days, or --archive-end) are answered with null values, and days
after today anywhere on earth are out of the allowed range (HTTP 400). Tests
move the archive end at runtime: POST /admin/archive-end with {"archive_end":
"YYYY-MM-DD"} (from loopback only).

Standard library only, so it runs with any python3.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import threading
import time
import zoneinfo
from datetime import date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOURLY_UNITS = {
    "temperature_2m": "°C",
    "relative_humidity_2m": "%",
    "precipitation": "mm",
    "rain": "mm",
    "soil_temperature_0_to_7cm": "°C",
    "soil_temperature_7_to_28cm": "°C",
    "soil_temperature_28_to_100cm": "°C",
    "soil_temperature_100_to_255cm": "°C",
    "soil_moisture_0_to_7cm": "m³/m³",
    "soil_moisture_7_to_28cm": "m³/m³",
    "soil_moisture_28_to_100cm": "m³/m³",
    "soil_moisture_100_to_255cm": "m³/m³",
}
# Soil layer mid-depths in metres: deeper layers follow the air more slowly.
SOIL_DEPTHS = {"0_to_7cm": 0.035, "7_to_28cm": 0.175, "28_to_100cm": 0.64, "100_to_255cm": 1.775}
ARCHIVE_START = date(1940, 1, 1)
ARCHIVE_DELAY_DAYS = 5
LOOPBACK = ("127.0.0.1", "::1")
MAX_LOCATIONS = 1000
BANNER = "SYNTHETIC weather data: this server invents deterministic values; they are NOT observations."


class BadRequest(Exception):
    """Answered as HTTP 400 {"error": true, "reason": ...}, like the real API."""


def noise(*key: object) -> float:
    """A deterministic pseudo-random number in [0, 1) for the given key."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def grid(value: float) -> float:
    """The real API answers with its grid cell's coordinates; ours is 0.1°."""
    return round(round(value * 10) / 10, 4)


def elevation_at(lat: float, lon: float) -> float:
    return round(50 + 2500 * noise("elevation", grid(lat), grid(lon)) ** 2, 1)


def utc_offset(timezone: str, lat: float, lon: float, day: date) -> tuple[int, str, str]:
    """(offset seconds, timezone name, abbreviation) for the requested timezone."""
    if timezone.upper() in ("GMT", "UTC"):
        return 0, "GMT", "GMT"
    if timezone == "auto":
        hours = max(-12, min(14, round(lon / 15)))
        return hours * 3600, f"Etc/GMT{-hours:+d}" if hours else "GMT", f"GMT{hours:+d}" if hours else "GMT"
    try:
        zone = zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"Invalid timezone {timezone!r}") from None
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=zone)
    return int(noon.utcoffset().total_seconds()), timezone, noon.tzname() or timezone


def weather_hour(lat: float, lon: float, moment: datetime) -> dict[str, float]:
    """Plausible values for one place and local hour: season, latitude, a daily cycle, deterministic noise."""
    season = math.cos(2 * math.pi * (moment.timetuple().tm_yday - 196) / 365.25)
    season = season if lat >= 0 else -season
    annual_mean = 27 - 0.45 * abs(lat) - elevation_at(lat, lon) * 0.0065
    amplitude = 1 + 0.12 * abs(lat)
    day_key = (grid(lat), grid(lon), moment.date().isoformat())
    daily_anomaly = 6 * (noise("anomaly", *day_key) - 0.5)
    diurnal = math.sin(2 * math.pi * (moment.hour - 9) / 24)
    air = annual_mean + amplitude * season + daily_anomaly + 4 * diurnal
    wet_day = noise("wet", *day_key) < 0.35
    shower = noise("shower", *day_key, moment.hour)
    precipitation = round(max(0.0, 8 * shower**3 - 0.4), 1) if wet_day else 0.0
    humidity = min(100.0, 55 + 30 * noise("humidity", *day_key) - 10 * diurnal + (15 if precipitation else 0))
    values = {
        "temperature_2m": round(air, 1),
        "relative_humidity_2m": round(humidity),
        "precipitation": precipitation,
        "rain": precipitation if air > 0.5 else 0.0,
    }
    wetness = 0.15 + 0.2 * noise("soil", grid(lat), grid(lon)) + (0.08 if wet_day else 0.0)
    for layer, depth in SOIL_DEPTHS.items():
        damping = math.exp(-depth / 0.5)
        soil = annual_mean + 1.5 + amplitude * season * damping + (daily_anomaly + 4 * diurnal) * damping**3
        values[f"soil_temperature_{layer}"] = round(soil, 1)
        values[f"soil_moisture_{layer}"] = round(wetness * (0.6 + 0.4 * damping) + 0.05 * (1 - damping), 3)
    return values


def as_list(params: dict[str, list[str]], name: str, required: bool = True) -> list[str]:
    raw = params.get(name, [])
    if not raw or not raw[0].strip():
        if required:
            raise BadRequest(f"Parameter '{name}' is required")
        return []
    return [item.strip() for item in ",".join(raw).split(",")]


def parse_float(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"Parameter '{name}' must be a number, got {text!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"Latitude must be in range of -90 to 90°. Given: {value}." if name == "latitude"
                         else f"Longitude must be in range of -180 to 180°. Given: {value}.")
    return value


def latest_day_on_earth() -> date:
    """The calendar day it is somewhere already (UTC+14)."""
    return (datetime.now(timezone.utc) + timedelta(hours=14)).date()


def parse_day(text: str, name: str, last: date) -> date:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"Parameter '{name}' must be a date in the format yyyy-mm-dd, got {text!r}") from None
    if not ARCHIVE_START <= day <= last:
        raise BadRequest(f"Parameter '{name}' is out of allowed range from {ARCHIVE_START} to {last}")
    return day


def spread(values: list[str], count: int, name: str) -> list[str]:
    """A single value applies to every location; a list must pair one-to-one."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise BadRequest(f"Parameter '{name}' must have the same number of elements as latitude and longitude")
    return values


def archive(params: dict[str, list[str]], archive_end: date) -> list[dict] | dict:
    """The answer to one /v1/archive request: an object for one location, an array for several. Hours of days
    after `archive_end` are null."""
    started = time.perf_counter()
    lats, lons = as_list(params, "latitude"), as_list(params, "longitude")
    if len(lats) != len(lons):
        raise BadRequest("Parameter 'latitude' and 'longitude' must have the same number of elements")
    if len(lats) > MAX_LOCATIONS:
        raise BadRequest(f"Only up to {MAX_LOCATIONS} locations can be requested at once")
    variables = as_list(params, "hourly", required=False)
    for variable in variables:
        if variable not in HOURLY_UNITS:
            raise BadRequest(f"Cannot initialize WeatherVariable from invalid String value {variable} for key hourly")
    last = latest_day_on_earth()
    starts = spread(as_list(params, "start_date"), len(lats), "start_date")
    ends = spread(as_list(params, "end_date"), len(lats), "end_date")
    zones = spread(as_list(params, "timezone", required=False) or ["GMT"], len(lats), "timezone")
    answers = []
    for lat_text, lon_text, start_text, end_text, zone in zip(lats, lons, starts, ends, zones):
        lat = parse_float(lat_text, "latitude", -90, 90)
        lon = parse_float(lon_text, "longitude", -180, 180)
        start, end = parse_day(start_text, "start_date", last), parse_day(end_text, "end_date", last)
        if end < start:
            raise BadRequest("Parameter 'end_date' must be greater or equal to 'start_date'")
        answers.append(location_answer(lat, lon, start, end, zone, variables, archive_end))
    elapsed_ms = (time.perf_counter() - started) * 1000
    for answer in answers:
        answer["generationtime_ms"] = round(elapsed_ms / len(answers), 4)
    return answers[0] if len(answers) == 1 else answers


def location_answer(lat: float, lon: float, start: date, end: date, zone: str, variables: list[str],
                    archive_end: date) -> dict:
    offset, zone_name, abbreviation = utc_offset(zone, lat, lon, start)
    hours = [datetime(start.year, start.month, start.day) + timedelta(hours=h)
             for h in range(((end - start).days + 1) * 24)]
    # The archive grows by UTC days: a local day can end after its last hour, half in and half not yet.
    not_yet = dict.fromkeys(HOURLY_UNITS)
    rows = [weather_hour(lat, lon, moment) if (moment - timedelta(seconds=offset)).date() <= archive_end
            else not_yet for moment in hours]
    answer = {
        "latitude": grid(lat), "longitude": grid(lon), "generationtime_ms": 0.0,
        "utc_offset_seconds": offset, "timezone": zone_name, "timezone_abbreviation": abbreviation,
        "elevation": elevation_at(lat, lon),
    }
    if variables:
        answer["hourly_units"] = {"time": "iso8601", **{v: HOURLY_UNITS[v] for v in variables}}
        answer["hourly"] = {"time": [m.strftime("%Y-%m-%dT%H:%M") for m in hours],
                            **{v: [row[v] for row in rows] for v in variables}}
    return answer


class ArchiveEnd:
    """The archive's last day with values; thread-safe. Without a fixed day, it follows the clock."""

    def __init__(self, fixed: date | None) -> None:
        self.lock = threading.Lock()
        self.fixed = fixed

    def day(self) -> date:
        with self.lock:
            return self.fixed or date.today() - timedelta(days=ARCHIVE_DELAY_DAYS)

    def move(self, day: date) -> None:
        with self.lock:
            self.fixed = day


class Faults:
    """Injected failures, counted per /v1/archive call; thread-safe."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.lock = threading.Lock()
        self.calls = 0
        self.locations = 0
        self.by_status: dict[str, int] = {}
        self.by_method: dict[str, int] = {}

    def next_call(self, method: str) -> int:
        with self.lock:
            self.by_method[method] = self.by_method.get(method, 0) + 1
            self.calls += 1
            return self.calls

    def record(self, status: int, locations: int) -> None:
        with self.lock:
            self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1
            if status == 200:
                self.locations += locations

    def injected(self, call: int) -> tuple[int, str] | None:
        """(status, body) to answer instead of the real thing, or None."""
        opts = self.options
        if opts.daily_quota and self.locations >= opts.daily_quota:
            return 429, json.dumps({"error": True, "reason": "Daily API request limit exceeded. Please try again tomorrow."})
        for every, status, body in (
            (opts.fail_429_every, 429, json.dumps({"error": True, "reason": "Minutely API request limit exceeded. Please try again in one minute."})),
            (opts.fail_500_every, 500, "<html><body>502 Bad Gateway</body></html>"),
            (opts.garbage_every, 200, '{"latitude": 52.5, "hourly": {"time": ["2020-01-01T00:00", '),
        ):
            if every and call % every == 0:
                return status, body
        return None

    def stats(self) -> dict:
        with self.lock:
            return {"calls": self.calls, "locations": self.locations, "by_status": dict(self.by_status),
                    "by_method": dict(self.by_method), "synthetic": True}


class StandinHandler(BaseHTTPRequestHandler):
    """What the local stand-ins share: HTTP/1.1 answers with a length, log lines unless --quiet."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes; no 40 ms delayed-ACK stalls
    extra_headers: dict[str, str] = {}
    quiet = False

    def send_body(self, status: int, body: str, content_type: str = "application/json; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        if not self.quiet:
            super().log_message(format, *args)


class ArchiveHandler(StandinHandler):
    server_version = "vpe-open-meteo-synthetic/1"
    extra_headers = {"X-Synthetic-Data": "true"}
    faults: Faults
    archive_end: ArchiveEnd

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/stats":
            self.answer(200, json.dumps({**self.faults.stats(), "archive_end": self.archive_end.day().isoformat()}))
        elif url.path == "/v1/archive":
            self.serve_archive(parse_qs(url.query, keep_blank_values=True))
        else:
            self.answer(404, json.dumps({"error": True, "reason": f"No route for {url.path}; try /v1/archive or /stats"}))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        if url.path == "/admin/archive-end":
            self.move_archive_end(body)
            return
        if url.path != "/v1/archive":
            self.answer(404, json.dumps({"error": True, "reason": f"No route for POST {url.path}"}))
            return
        params = parse_qs(url.query, keep_blank_values=True)
        for key, values in parse_qs(body, keep_blank_values=True).items():
            params.setdefault(key, []).extend(values)
        self.serve_archive(params)

    def serve_archive(self, params: dict[str, list[str]]) -> None:
        call = self.faults.next_call(self.command)
        if self.faults.options.latency_ms:
            time.sleep(self.faults.options.latency_ms / 1000)
        injected = self.faults.injected(call)
        if injected:
            self.faults.record(injected[0], 0)
            self.answer(*injected)
            return
        try:
            result = archive(params, self.archive_end.day())
        except BadRequest as error:
            self.faults.record(400, 0)
            self.answer(400, json.dumps({"error": True, "reason": str(error)}))
            return
        self.faults.record(200, len(result) if isinstance(result, list) else 1)
        self.answer(200, json.dumps(result, separators=(",", ":")))

    def move_archive_end(self, body: str) -> None:
        if self.client_address[0] not in LOOPBACK:
            self.answer(403, json.dumps({"error": True, "reason": "the archive end can be moved from loopback only"}))
            return
        try:
            day = date.fromisoformat(json.loads(body)["archive_end"])
        except (ValueError, KeyError, TypeError):
            self.answer(400, json.dumps({"error": True, "reason": 'send {"archive_end": "YYYY-MM-DD"}'}))
            return
        self.archive_end.move(day)
        self.answer(200, json.dumps({"archive_end": day.isoformat()}))

    def answer(self, status: int, body: str) -> None:
        self.send_body(status, body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Local Open-Meteo-compatible archive server serving SYNTHETIC (invented, deterministic) weather "
                    "data for tests and offline demos. Endpoints: GET/POST /v1/archive, GET /stats (call counts), "
                    "POST /admin/archive-end {\"archive_end\": \"YYYY-MM-DD\"} (loopback only).")
    add_listen_arguments(parser, 8765)
    parser.add_argument("--latency-ms", type=float, default=0, help="delay added to every archive call")
    parser.add_argument("--fail-429-every", type=int, default=0, metavar="N", help="answer every Nth call with 429 (minutely limit)")
    parser.add_argument("--fail-500-every", type=int, default=0, metavar="N", help="answer every Nth call with 500")
    parser.add_argument("--garbage-every", type=int, default=0, metavar="N", help="answer every Nth call with truncated JSON")
    parser.add_argument("--archive-end", type=date.fromisoformat, metavar="YYYY-MM-DD",
                        help=f"last UTC day with values; later hours are answered with null values (default: today "
                             f"minus {ARCHIVE_DELAY_DAYS} days)")
    parser.add_argument("--daily-quota", type=int, default=0, metavar="LOCATIONS",
                        help="after this many locations served, answer 429 'Daily API request limit exceeded'")
    return parser.parse_args(argv)


def add_listen_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=port, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")


def serve(name: str, handler: type[BaseHTTPRequestHandler], host: str, port: int, banner: str, path: str) -> int:
    """Runs a stand-in until interrupted; prints `banner`, then the address (tests read both lines)."""
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        print(f"{name}: cannot listen on {host}:{port} ({error}); pick another --port", file=sys.stderr)
        return 1
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(banner, flush=True)
    print(f"listening on http://{host}:{port}{path} (stats: http://{host}:{port}/stats)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    handler = type("Handler", (ArchiveHandler,), {"faults": Faults(options), "quiet": options.quiet,
                                                  "archive_end": ArchiveEnd(options.archive_end)})
    return serve("open_meteo_server", handler, options.host, options.port, f"*** {BANNER} ***", "/v1/archive")


if __name__ == "__main__":
    sys.exit(main())
