#!/usr/bin/env python3
"""VPE executor: runs task scripts from tasks/ inside isolated Python envs (envs/*.yml), over gRPC.

The wire contract is ping.proto (loaded at run time; nothing generated is committed).
Server:  python executor.py serve
Client:  python executor.py ping | envs | run ENV TASK [--workspace W] [-- ARGS...] | attach RUN_ID | cancel RUN_ID
Library: ExecutorClient(channel, token=None) with .ping(), .list_envs(), .run(...), .attach(run_id), .cancel(run_id);
         open_channel(...) builds a channel from the same settings as the CLI.

A task runs as `<env>/bin/python tasks/<task> ARGS...` in its own session and cage (a cgroup per run, or
/proc tracking: every descendant is stopped with it), within its limits (RunLimits), with working dir
$VPE_HOME/buffer/<workspace> (the request's workspace, default its run_id; runs of one pipeline run share it),
and only this environment: PATH (the env's bin first, then /usr/local/bin:/usr/bin:/bin), HOME (its own,
<workspace>/.home/<run_id>), LANG (default C.UTF-8), TZ (default UTC), PYTHONUNBUFFERED=1, VPE_ENV, VPE_RUN_ID,
VPE_WORKSPACE, VPE_BUFFER, the executor's own values of the names in VPE_TASK_ENV_PASSTHROUGH (default:
VPE_WAREHOUSE_DSN OPEN_METEO_ARCHIVE_URL OPEN_METEO_API_KEY VPE_GLC_LAYER_URL), then the request's env vars
whose names VPE_TASK_ENV_ALLOW allows (never a reserved name: PATH, HOME, BASH_ENV, PYTHON*, LD_*, proxies, CA bundles, the VPE_* above, ...).
Each run's events go to $VPE_HOME/logs/runs/<run_id>.jsonl (read_run_events replays them). With
VPE_EXECUTOR_WORKSPACE_STORE, workspaces are shared by replicas through PostgreSQL (WorkspaceStore).

Contents, in order: configuration (SETTINGS: every setting once; Config); the service (ExecutorServicer:
ping.proto's RPCs, and the checks of a request); runs (processes, cages, event logs, retention, the workspace
store, runs that outlive their client); environments (env ymls, builds, the conda-to-PyPI tables); the server (auth, TLS,
serve, shut down); the client (ExecutorClient, channels, replicas); the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as dt
import fnmatch
import functools
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import queue
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

__version__ = "0.4.0"

HERE = Path(__file__).resolve().parent
# Where the state, envs and tasks folders are by default: beside executor.py in a checkout, the working
# directory when it runs from the installed package (vpe-executor), whose folder is in site-packages.
PACKAGED = (HERE / "__init__.py").exists()
DEFAULT_BASE, SHOWN_BASE = (Path(), "the working directory") if PACKAGED else (HERE, "the folder of executor.py")
PROTO_FILE = "ping.proto"
SERVICE_NAME = "vpe.Executor"

log = logging.getLogger("vpe.executor")


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(folder))


def _load_proto():
    with _on_sys_path(HERE):
        return grpc.protos_and_services(PROTO_FILE)


pb2, pb2_grpc = _load_proto()


# ---------------------------------------------------------------- configuration

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ARGS = 1024
MAX_ENV_VARS = 256
MAX_STRING_BYTES = 64 * 1024  # one arg or env var, UTF-8 (the kernel takes up to 128 KiB a string)
MAX_EXEC_BYTES = 1024 * 1024  # argv + environment with separators, UTF-8 (Linux takes ~2 MiB with an 8 MiB stack)
MAX_PATH_SEGMENT_BYTES = 255
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_LINE_CHARS = 16 * 1024
MAX_BUFFERED_EVENTS = 10_000
MAX_BUFFERED_TEXT = 16 * 1024 * 1024  # characters of output lines waiting for a client
CENSUS_INTERVAL = 0.2  # seconds between looks at which processes of a run are left
FOLDER_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # run ids and workspaces: one safe path segment
ENV_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ENV_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Never taken from a request, whatever VPE_TASK_ENV_ALLOW says: they change which code runs, where a task's
# traffic goes or which certificates it trusts, or they are the executor's own values.
RESERVED_ENV_VARS = {"PATH", "HOME", "PYTHONUNBUFFERED", "VPE_RUN_ID", "VPE_WORKSPACE", "VPE_BUFFER", "VPE_ENV",
                     "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH", "TMPDIR", "GCONV_PATH",
                     "LOCPATH", "NODE_OPTIONS", "PERL5LIB", "PERL5OPT", "RUBYOPT", "SSL_CERT_FILE", "SSL_CERT_DIR",
                     "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
RESERVED_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON", "BASH_FUNC_", "PIP_", "UV_", "CONDA")
RESERVED_ENV_SUFFIX = "_PROXY"  # any case: http_proxy, HTTPS_PROXY, no_proxy, ...


GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A target with several replicas (a multi-address target, a name with several addresses) spreads new
    # runs over all of them; gRPC's default, pick_first, would send every run to the first.
    ("grpc.lb_policy_name", "round_robin"),
    # A replica whose host goes silent (no reset, e.g. powered off) is noticed within 40 s by a client
    # following a quiet run: pings every 30 s, also on a stream with no data (max_pings_without_data 0),
    # and the server accepts them that often.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
]


# Per-run resource limits (RunLimits fields): the setting's name after VPE_EXECUTOR_RUN_, its default, its cap.
# A request may ask for any value up to the cap; 0 or unset takes the default.
LIMIT_SETTINGS = {
    "memory_bytes": ("MEMORY", "4G", "16G"),
    "cpu_seconds": ("CPU_SECONDS", "21600", "604800"),
    "processes": ("PROCESSES", "512", "4096"),
    "open_files": ("OPEN_FILES", "4096", "65536"),
    "output_bytes": ("OUTPUT", "1G", "16G"),
}
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def parse_size(text: str) -> int:
    """'4G', '512M', '64KiB' or a number of bytes."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(text)
    return int(match[1]) * SIZE_UNITS[match[2].upper()]


def format_size(size: float) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = SIZE_UNITS[unit[0]]
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} bytes"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def words(text: str) -> tuple[str, ...]:
    """A list setting: names separated by spaces or commas."""
    return tuple(re.findall(r"[^\s,]+", text))


def variable_names(text: str) -> tuple[str, ...]:
    """words() that are environment variable names: a task's start script exports them."""
    names = words(text)
    if bad := [name for name in names if not ENV_VAR_NAME_RE.fullmatch(name)]:
        raise SystemExit(f"executor.py: VPE_TASK_ENV_PASSTHROUGH: {bad[0]!r} is no environment variable name; use "
                         f"letters, digits and _, not starting with a digit")
    return names


def folder(text: str) -> Path:
    return Path(text).resolve()


def event_seq(text: str) -> int:
    """A position in a run's event log, as AttachRequest.from_seq (int64) takes it."""
    if not re.fullmatch(r"\d+", text) or int(text) >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text!r} is no event seq: use 0 (the start) or the last seq seen + 1")
    return int(text)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One executor setting: its Config field, environment variable, default (as the variable would spell it),
    how its text is read, the least value allowed, the values allowed, where it is a flag, and its help."""
    field: str
    env: str
    default: str
    kind: Callable[[str], Any] = str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    flag: str = ""          # "all": --field-name on every command; "serve": on serve only; "": the variable only
    help: str = ""
    shown_default: str = ""  # the default as help tells it, where the value itself would mislead

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")

    def read(self, args: argparse.Namespace | None) -> Any:
        """The flag's value if given, else the variable's, else the default; a bad one ends the program with a
        one-line message naming the setting."""
        given = getattr(args, self.field, None) if self.flag else None
        text = str(given) if given is not None else _env(self.env, self.default)
        option = f" ({self.option})" if self.flag else ""
        if self.choices and text not in self.choices:
            raise SystemExit(f"executor.py: {self.env}{option} must be one of {', '.join(self.choices)}, "
                             f"not {text!r}")
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if self.minimum is not None and (value is None or not self.minimum <= value < math.inf):
            what = {int: "a whole number", float: "a number", parse_size: "a size such as 512M or 4G"}[self.kind]
            raise SystemExit(f"executor.py: {self.env}{option} must be {what} >= {self.minimum}, not {text!r}")
        return value

    @property
    def value(self) -> Any:
        """The default, read as the setting would be."""
        return self.kind(self.default)

    def add_flag(self, parser: argparse.ArgumentParser) -> None:
        kind = self.kind if self.kind in (int, float) else None
        default = self.shown_default or self.default or "empty"
        parser.add_argument(self.option, type=kind, choices=self.choices or None,
                            help=f"{self.help} (env {self.env}, default {default})")


# Every executor setting, once: Config's defaults, config_from and the serve/connection flags all come from here.
SETTINGS = (
    Setting("host", "VPE_EXECUTOR_HOST", "127.0.0.1", flag="all", help="address to bind / connect to"),
    Setting("port", "VPE_EXECUTOR_PORT", "3170", int, 1, flag="all", help="port"),
    Setting("token", "VPE_EXECUTOR_TOKEN", "", flag="all",
            help="bearer token, empty = no auth; prefer the env variable, as flags show in ps"),
    Setting("tls_cert", "VPE_EXECUTOR_TLS_CERT", "", flag="all",
            help="PEM certificate; client: trusted if no CA given"),
    Setting("tls_key", "VPE_EXECUTOR_TLS_KEY", "", flag="all", help="PEM private key"),
    Setting("tls_ca", "VPE_EXECUTOR_TLS_CA", "", flag="all", help="PEM CA; server: require client certs signed by it"),
    Setting("advertise", "VPE_EXECUTOR_ADVERTISE", "", flag="serve",
            help="host:port clients reach this replica at, named in Started.replica for Attach and Cancel",
            shown_default="this host's address and --port"),
    Setting("home", "VPE_HOME", str(DEFAULT_BASE / ".vpe"), folder, flag="serve",
            help="state dir: envs/, buffer/, logs/executor/, logs/runs/, run/executor/",
            shown_default=f".vpe in {SHOWN_BASE}"),
    Setting("envs_dir", "VPE_EXECUTOR_ENVS_DIR", str(DEFAULT_BASE / "envs"), folder, flag="serve",
            help="folder of env ymls", shown_default=f"envs in {SHOWN_BASE}"),
    Setting("tasks_dir", "VPE_EXECUTOR_TASKS_DIR", str(DEFAULT_BASE / "tasks"), folder, flag="serve",
            help="folder of task scripts", shown_default=f"tasks in {SHOWN_BASE}"),
    Setting("max_concurrent", "VPE_EXECUTOR_MAX_CONCURRENT", str(os.cpu_count() or 1), int, 1, flag="serve",
            help="runs at once", shown_default="cores"),
    Setting("max_queue", "VPE_EXECUTOR_MAX_QUEUE", "32", int, 0, flag="serve", help="runs waiting for a slot"),
    Setting("kill_grace", "VPE_EXECUTOR_KILL_GRACE", "1", float, 0, flag="serve",
            help="seconds between SIGTERM and SIGKILL"),
    Setting("shutdown_grace", "VPE_EXECUTOR_SHUTDOWN_GRACE", "10", float, 0, flag="serve",
            help="seconds running tasks get on SIGTERM"),
    Setting("containment", "VPE_EXECUTOR_CONTAINMENT", "auto", choices=("auto", "cgroup", "subreaper"), flag="serve",
            help="how runs are contained", shown_default="auto: a cgroup per run where the executor may create "
                                                         "them, else subreaper + /proc tracking"),
    Setting("env_protection", "VPE_EXECUTOR_ENV_PROTECTION", "auto", choices=("auto", "mount", "watch"),
            flag="serve", help="how tasks are kept from changing their env",
            shown_default="auto: read-only mounts for tasks without capabilities where the executor may make "
                          "them, else a watch on every file of each env"),
    Setting("backend", "VPE_EXECUTOR_ENV_BACKEND", "auto", choices=("auto", "conda", "venv"), flag="serve",
            help="env backend", shown_default="auto: conda-family if on PATH, else venv"),
    Setting("passthrough", "VPE_TASK_ENV_PASSTHROUGH",
            "VPE_WAREHOUSE_DSN OPEN_METEO_ARCHIVE_URL OPEN_METEO_API_KEY VPE_GLC_LAYER_URL", variable_names,
            help="the executor's variables every task gets"),
    Setting("env_allow", "VPE_TASK_ENV_ALLOW", "VPE_ALLOW_SYNTHETIC_WEATHER", words,
            help="names (or fnmatch patterns) a request may set"),
    Setting("run_log_max_bytes", "VPE_EXECUTOR_RUN_LOG_MAX", "64M", parse_size, 4096,
            help="size of one run's event log"),
    Setting("keep_days", "VPE_EXECUTOR_KEEP_DAYS", "14", float, 0, help="days logs and workspaces are kept"),
    Setting("keep_log_bytes", "VPE_EXECUTOR_KEEP_LOGS", "2G", parse_size, 0, help="size the logs are pruned to"),
    Setting("keep_buffer_bytes", "VPE_EXECUTOR_KEEP_BUFFER", "20G", parse_size, 0,
            help="size the buffer is pruned to"),
    Setting("workspace_store", "VPE_EXECUTOR_WORKSPACE_STORE", "",
            help="PostgreSQL URL of the workspace store the replicas share (ddl.sql's schema workspace); "
                 "empty = workspaces on this replica's disk only"),
)


def limit_settings(name: str) -> tuple[Setting, Setting]:
    """The default and the cap of one per-run limit (LIMIT_SETTINGS), as settings."""
    suffix, default, cap = LIMIT_SETTINGS[name]
    kind = float if name == "cpu_seconds" else parse_size
    var = f"VPE_EXECUTOR_RUN_{suffix}"
    return Setting(name, var, default, kind, 1), Setting(name, f"{var}_CAP", cap, kind, 1)


@dataclasses.dataclass
class ConfigBase:
    """Config without the fields of SETTINGS: the per-run limits' defaults and caps, and what follows from both."""
    limit_defaults: dict[str, float] = dataclasses.field(
        default_factory=lambda: {name: float(limit_settings(name)[0].value) for name in LIMIT_SETTINGS})
    limit_caps: dict[str, float] = dataclasses.field(
        default_factory=lambda: {name: float(limit_settings(name)[1].value) for name in LIMIT_SETTINGS})

    @property
    def built_envs_dir(self) -> Path:
        return self.home / "envs"

    @property
    def buffer_dir(self) -> Path:
        return self.home / "buffer"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs" / "executor"

    @property
    def run_logs_dir(self) -> Path:
        return self.home / "logs" / "runs"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def replica(self) -> str:
        """This executor's address as others reach it (Started.replica): where Attach and Cancel must go."""
        return self.advertise or advertised_address(self)


# The executor's settings: a field per row of SETTINGS, its default the row's, plus ConfigBase's.
Config = dataclasses.make_dataclass(
    "Config", [(s.field, type(s.value), dataclasses.field(default=s.value)) for s in SETTINGS],
    bases=(ConfigBase,), namespace={"__module__": __name__})


def advertised_address(cfg: Config) -> str:
    """This replica's address as others reach it: the bound host, or this host's address when bound to all."""
    host = cfg.host
    if host in ("0.0.0.0", "::", ""):
        with contextlib.suppress(OSError):
            host = socket.gethostbyname(socket.gethostname())
    return f"[{host}]:{cfg.port}" if ":" in host else f"{host}:{cfg.port}"


def config_from(args: argparse.Namespace) -> Config:
    """Environment variables first, flags override."""
    limit_defaults, limit_caps = {}, {}
    for name in LIMIT_SETTINGS:
        default, cap = limit_settings(name)
        limit_caps[name] = float(cap.read(args))
        limit_defaults[name] = float(default.read(args))
        if limit_defaults[name] > limit_caps[name]:
            raise SystemExit(f"executor.py: {default.env}={limit_defaults[name]:g} is above "
                             f"{cap.env}={limit_caps[name]:g}; lower the default or raise the cap")
    return Config(**{setting.field: setting.read(args) for setting in SETTINGS},
                  limit_defaults=limit_defaults, limit_caps=limit_caps)


# ---------------------------------------------------------------- the service: ping.proto's RPCs, request checks

class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class ExecutorServicer(pb2_grpc.ExecutorServicer):
    def __init__(self, cfg: Config, envs: EnvManager, containment: Containment, store: WorkspaceStore | None):
        self._cfg = cfg
        self._envs = envs
        self._containment = containment
        self.store = store
        self._slots = Slots(cfg.max_concurrent, cfg.max_queue)
        self._runs: dict[str, ActiveRun] = {}
        self._runs_lock = threading.Lock()
        self._kept = KeepAlive()
        self.shutting_down = threading.Event()

    def Ping(self, request, context):
        return pb2.PingReply(message="pong", version=__version__, envs=self._envs.statuses(),
                             containment=self._containment.mechanism,
                             workspace_store=self.store.name if self.store else "")

    def ListEnvs(self, request, context):
        return pb2.ListEnvsReply(envs=self._envs.statuses())

    def Run(self, request, context):
        try:
            keep_alive = validate_timeout(request.keep_alive_seconds, "keep_alive_seconds")
            run = self._admit(request)
        except Exception as exc:
            abort_with(context, exc, f"Run {request.run_id[:128]!r}")
        if keep_alive:
            self._kept.keep(run, keep_alive)
            yield from self._follow(run.plan.run_id, 0, run, context)
            return
        if not context.add_callback(lambda: run.cancel("client went away")):
            run.cancel("client went away")
        try:
            while True:
                try:
                    event = run.events.get(timeout=1)
                except queue.Empty:
                    if context.is_active():
                        continue
                    return  # the call is over (client gone, server stopping): never block this thread for good
                yield event
                if event.HasField("status"):
                    return
        finally:
            run.cancel("RPC ended")

    def Cancel(self, request, context):
        try:
            return self._cancel(request)
        except Exception as exc:
            abort_with(context, exc, f"Cancel {request.run_id[:128]!r}")

    def _cancel(self, request):
        with self._runs_lock:
            run = self._runs.get(request.run_id)
        if run is None:
            return pb2.CancelReply(found=False, message=f"no run {request.run_id!r} is running or queued")
        run.cancel("Cancel RPC")
        return pb2.CancelReply(found=True, message=f"run {request.run_id!r} is being stopped")

    def Attach(self, request, context):
        try:
            run = self._attachable(request)
        except Exception as exc:
            abort_with(context, exc, f"Attach {request.run_id[:128]!r}")
        yield from self._follow(request.run_id, request.from_seq, run, context)

    def _attachable(self, request) -> ActiveRun | None:
        """The live run Attach is after, or None for a finished one; refuses what cannot be attached to."""
        run_id = validate_folder_name("run_id", request.run_id)
        if request.from_seq < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"from_seq={request.from_seq}; use 0 (the start) or the seq of the last event seen + 1")
        with self._runs_lock:
            run = self._runs.get(run_id)
        if run is None and request.running_only:
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"no run {run_id!r} is running on this executor ({self._cfg.replica})")
        if run is None and not final_status_logged(self._cfg, run_id):
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"run {run_id!r} is not held by this executor ({self._cfg.replica}) and no finished run of "
                          "that id is logged here: it never ran here, runs on another replica (attach there: "
                          "Started.replica), or the executor that ran it stopped before it ended")
        return run

    def _follow(self, run_id: str, from_seq: int, run: ActiveRun | None, context) -> Iterator[Any]:
        """The run's events from its run log, from `from_seq` on: replayed, then (for a live `run`) followed until
        it ends, ending with its status. The client counts as attached to a keep-alive run while it reads."""
        if run is not None and self._kept.join(run):
            if not context.add_callback(lambda: self._kept.leave(run)):
                self._kept.leave(run)
            self._kept.wait_until_logging(run, context.is_active)

        def live() -> bool:
            return context.is_active() and not run.over()

        next_seq = from_seq
        # The second reading catches a status written between the follower's last read and the run's end.
        for follow in (live if run is not None else None, None):
            try:
                for seq, event in read_run_events(self._cfg, run_id, next_seq, follow=follow):
                    next_seq = seq + 1
                    yield event
                    if event.HasField("status"):
                        return
            except Exception as exc:
                abort_with(context, exc, f"Attach {run_id[:128]!r}")
        if context.is_active():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"run {run_id!r} ended without a final status in its log; "
                                                       f"see the executor's log on {self._cfg.replica}")

    def active_runs(self) -> list[ActiveRun]:
        with self._runs_lock:
            return list(self._runs.values())

    def paths_in_use(self) -> set[Path]:
        return {path for run in self.active_runs() for path in (run.plan.log_path, run.plan.workspace_dir)}

    def _admit(self, request) -> ActiveRun:
        if self.shutting_down.is_set():
            raise Refused(grpc.StatusCode.UNAVAILABLE, "executor is shutting down; retry against the restarted executor")
        plan = self._plan(request)
        run = ActiveRun(plan, self._slots, self._cfg, self._containment, self.store, self._forget)
        with self._runs_lock:
            if plan.run_id in self._runs:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                              f"run {plan.run_id!r} is still running (or some of its processes are); "
                              f"use another run_id, or Cancel it and wait for its final status")
            position = self._slots.reserve(run)
            self._runs[plan.run_id] = run
        run.start(position)
        return run

    def _forget(self, run: ActiveRun) -> None:
        with self._runs_lock:
            if self._runs.get(run.plan.run_id) is run:
                del self._runs[run.plan.run_id]

    def _plan(self, request) -> RunPlan:
        prefix = self._ready_env(request.env)
        script = resolve_task(self._cfg.tasks_dir, request.task)
        validate_args(request.args)
        extra = validate_env_vars(request.env_vars, self._cfg)
        timeout = validate_timeout(request.timeout_seconds)
        run_id = validate_folder_name("run_id", request.run_id) if request.run_id else new_run_id()
        workspace = validate_folder_name("workspace", request.workspace) if request.workspace else run_id
        workspace_dir = self._cfg.buffer_dir / workspace
        env = task_environment(self._cfg, request.env, prefix, run_id, workspace_dir, extra)
        argv = [str(prefix / "bin" / "python"), str(script), *request.args]
        validate_exec_size(argv, env)
        limits = validate_limits(request.limits, self._cfg)
        return RunPlan(run_id, request.env, argv, env, workspace_dir, run_log_path(self._cfg, run_id), timeout, limits)

    def _ready_env(self, name: str) -> Path:
        record = self._envs.lookup(name) if ENV_NAME_RE.fullmatch(name) else None
        if record is None:
            known = ", ".join(self._envs.names()) or "none"
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"unknown env {name[:128]!r}; known envs: {known} (one per {self._cfg.envs_dir}/<name>.yml)")
        if record.state != pb2.ENV_READY or record.prefix is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"env {name!r} is not ready: {record.detail}; "
                          f"check `executor.py envs` and {self._envs.build_log(name)}")
        if not (record.prefix / "bin" / "python").exists():  # else the run would fail like a task, with 127
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"env {name!r} has no interpreter at {record.prefix / 'bin' / 'python'} (removed by hand?); "
                          f"restart the executor to rebuild it")
        return record.prefix


def abort_with(context, exc: Exception, call: str):
    """A refusal keeps its code; anything else is a bug: logged once with its traceback, answered INTERNAL."""
    if isinstance(exc, Refused):
        context.abort(exc.code, str(exc))
    log.exception("%s: unexpected error", call)
    context.abort(grpc.StatusCode.INTERNAL, f"executor error ({type(exc).__name__}: {str(exc)[:200]}); "
                                            f"the executor log has the details")


def resolve_task(tasks_dir: Path, task: str) -> Path:
    def refuse(why: str) -> Refused:
        return Refused(grpc.StatusCode.INVALID_ARGUMENT,
                       f"task {task[:200]!r} {why}; give a .py path relative to {tasks_dir}, e.g. ingestion/extract.py")

    if not task:
        raise refuse("is empty")
    if "\0" in task or len(task) > 1024:
        raise refuse("is not a valid path")
    if task.startswith("/") or task.startswith("~"):
        raise refuse("is absolute")
    if ".." in Path(task).parts:
        raise refuse("contains '..'")
    if not task.endswith(".py"):
        raise refuse("is not a .py script")
    if any(len(part.encode()) > MAX_PATH_SEGMENT_BYTES for part in task.split("/")):
        raise refuse(f"has a path segment longer than {MAX_PATH_SEGMENT_BYTES} bytes")
    root = tasks_dir.resolve()
    try:
        script = (root / task).resolve()
        if not script.is_relative_to(root):
            raise refuse("resolves outside the tasks dir (symlink)")
        if not script.is_file():
            raise refuse("does not exist")
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name the file system refuses
        raise refuse(f"cannot be resolved ({exc.strerror if isinstance(exc, OSError) else exc})") from None
    return script


def validate_args(args: Sequence[str]) -> None:
    if len(args) > MAX_ARGS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{len(args)} args; at most {MAX_ARGS} are accepted")
    for i, arg in enumerate(args):
        if "\0" in arg or len(arg.encode()) > MAX_STRING_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"args[{i}] contains a NUL byte or is longer than {MAX_STRING_BYTES} bytes (UTF-8); "
                          f"pass data through a file in the workspace")


def validate_env_vars(env_vars, cfg: Config) -> dict[str, str]:
    """Only names on the allowlist, never a reserved one or one the executor passes through itself."""
    if len(env_vars) > MAX_ENV_VARS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{len(env_vars)} env vars; at most {MAX_ENV_VARS} are accepted")
    for name, value in env_vars.items():
        if not ENV_VAR_NAME_RE.fullmatch(name):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"env var name {name[:130]!r} is invalid; use letters, digits and _, not starting with a digit")
        if (name in RESERVED_ENV_VARS or name.startswith(RESERVED_ENV_PREFIXES)
                or name.upper().endswith(RESERVED_ENV_SUFFIX) or name in cfg.passthrough):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"env var {name!r} is the executor's to set and cannot come from a request "
                          f"(reserved: {', '.join(sorted(RESERVED_ENV_VARS))}, "
                          f"{', '.join(p + '*' for p in RESERVED_ENV_PREFIXES)}, *{RESERVED_ENV_SUFFIX}, "
                          f"and VPE_TASK_ENV_PASSTHROUGH: {' '.join(cfg.passthrough) or 'none'})")
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.env_allow):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"env var {name!r} is not on the executor's allowlist "
                          f"(VPE_TASK_ENV_ALLOW: {' '.join(cfg.env_allow) or 'empty'}); add it there to pass it")
        if "\0" in value or len(value.encode()) > MAX_STRING_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"env var {name!r}: value contains a NUL byte or is longer than {MAX_STRING_BYTES} bytes (UTF-8)")
    return dict(env_vars)


def validate_exec_size(argv: Sequence[str], env: dict[str, str]) -> None:
    """What execve would refuse with E2BIG is refused here, before the run takes a slot."""
    size = sum(len(arg.encode()) + 1 for arg in argv) + sum(len(f"{k}={v}".encode()) + 1 for k, v in env.items())
    if size > MAX_EXEC_BYTES:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"args and env vars take {size} bytes; at most {MAX_EXEC_BYTES} are accepted in all; "
                      f"pass data through a file in the workspace")


def validate_limits(requested, cfg: Config) -> dict[str, float]:
    """The request's limits, its 0s replaced by the executor's defaults; above a cap is refused."""
    limits = {}
    for name, (setting, _, _) in LIMIT_SETTINGS.items():
        value = getattr(requested, name)
        if not math.isfinite(value) or value < 0 or value > cfg.limit_caps[name]:
            show = format_size if name.endswith("_bytes") else "{:g}".format
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"limits.{name}={value:g} is invalid: use 0 (the default, {show(cfg.limit_defaults[name])}) "
                          f"or up to the executor's cap {show(cfg.limit_caps[name])} (VPE_EXECUTOR_RUN_{setting}_CAP)")
        limits[name] = float(value) or cfg.limit_defaults[name]
    return limits


def validate_timeout(seconds: float, field: str = "timeout_seconds") -> float:
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_TIMEOUT_SECONDS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{field}={seconds} is invalid; use 0 (none) or a number of seconds up to {MAX_TIMEOUT_SECONDS}")
    return seconds


def validate_folder_name(field: str, value: str) -> str:
    """run_id and workspace name a folder under the buffer: one path segment, never '.', '..' or absolute."""
    if not FOLDER_NAME_RE.fullmatch(value):
        default = "a generated one" if field == "run_id" else "the run_id"
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{field} {value[:140]!r} is invalid; use 1-128 of A-Z a-z 0-9 _ . - (not starting with '.' or '-'), "
                      f"or leave it empty for {default}")
    return value


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------- runs: processes, cages, event logs, retention

def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def task_environment(cfg: Config, env_name: str, prefix: Path, run_id: str, workspace_dir: Path,
                     extra: dict[str, str]) -> dict[str, str]:
    """Minimal and explicit: nothing else of the executor's environment reaches a task."""
    env = {
        "PATH": f"{prefix / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(task_home(workspace_dir, run_id)),
        "LANG": _env("LANG", "C.UTF-8"),
        "TZ": _env("TZ", "UTC"),
        "PYTHONUNBUFFERED": "1",
        "VPE_ENV": env_name,
        "VPE_RUN_ID": run_id,
        "VPE_WORKSPACE": str(workspace_dir),
        "VPE_BUFFER": str(cfg.buffer_dir),
    }
    env.update({name: os.environ[name] for name in cfg.passthrough if name in os.environ})
    env.update(extra)
    return env


def task_home(workspace_dir: Path, run_id: str) -> Path:
    """Each run's own HOME, inside its workspace: dotfiles and caches a task writes die with the workspace."""
    return workspace_dir / ".home" / run_id


def _now_timestamp() -> Timestamp:
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)  # Timestamp.GetCurrentTime goes through datetime
    return Timestamp(seconds=seconds, nanos=nanos)


def run_log_path(cfg: Config, run_id: str) -> Path:
    return cfg.run_logs_dir / f"{run_id}.jsonl"


class RunLog:
    """A run's events as JSON lines, in the order its Run stream carries them, e.g.
        {"seq": 3, "time": "2026-11-27T16:00:00.1Z", "kind": "line",
         "line": {"stream": "STDOUT", "text": "hello", "timestamp": "2026-11-27T16:00:00.1Z"}}
    `kind` names the RunEvent field that is set (queued, started, line, status) and holds that message in proto
    JSON. `seq` counts every event of the run from 0, lines kept out by the size cap too, so a reader can resume
    from a position. Lines beyond max_bytes are not written; one last stderr line says how many were dropped."""

    def __init__(self, path: Path, max_bytes: int, append: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._next_seq = last_seq(path) + 1 if append else 0
        self._file = path.open("ab" if append else "wb")
        if append and not ends_a_line(path):  # a record torn by a crash must not swallow the next one
            self._file.write(b"\n")
        self._max_bytes = max_bytes
        self._written = self._file.tell()
        self.dropped_lines = self.dropped_bytes = 0

    def write(self, event, capped: bool = True) -> int:
        """Appends `event`; returns its seq."""
        kind = event.WhichOneof("event")
        record = {"seq": self._next_seq, "time": _now_timestamp().ToJsonString(), "kind": kind,
                  kind: json_format.MessageToDict(getattr(event, kind), preserving_proto_field_name=True)}
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        self._next_seq += 1
        if capped and kind == "line" and self._written + len(data) > self._max_bytes:
            self.dropped_lines += 1
            self.dropped_bytes += len(event.line.text.encode()) + 1
        else:
            self._file.write(data)
            self._written += len(data)
        return record["seq"]

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def ends_a_line(path: Path) -> bool:
    """Whether the file is empty or ends with a newline."""
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def last_seq(path: Path) -> int:
    """The seq of a run log's last complete record; -1 if it has none."""
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - MAX_LINE_CHARS * 8))
        for line in reversed(f.read().split(b"\n")):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return int(json.loads(line)["seq"])
    return -1


def read_run_events(cfg: Config, run_id: str, from_seq: int = 0,
                    follow: Callable[[], bool] | None = None) -> Iterator[tuple[int, Any]]:
    """(seq, RunEvent) pairs of run `run_id` from position `from_seq` on, as its run log holds them, ending with
    its status (sent again when `from_seq` is past it). Without `follow` it stops at the end of what is written
    so far; with it, it waits for more while follow() is true (e.g. context.is_active). Refuses at once (not at
    the first next()): INVALID_ARGUMENT for a malformed run id, NOT_FOUND when no log exists (unknown run, or
    pruned by retention)."""
    validate_folder_name("run_id", run_id)
    try:
        log_file = run_log_path(cfg, run_id).open("rb")
    except FileNotFoundError:
        raise Refused(grpc.StatusCode.NOT_FOUND,
                      f"no run {run_id!r} is known: no log in {cfg.run_logs_dir} (never run here, or pruned)") from None
    return _replay(log_file, from_seq, follow)


def _replay(log_file, from_seq: int, follow: Callable[[], bool] | None) -> Iterator[tuple[int, Any]]:
    with log_file:
        pending = b""
        while True:
            pending += log_file.readline()
            if not pending.endswith(b"\n"):  # the end of what is written so far
                if follow is None or not follow():
                    return
                time.sleep(0.1)
                continue
            line, pending = pending, b""
            try:
                record = json.loads(line)
            except ValueError:  # a record torn by a crash; the log goes on after it
                continue
            kind = record["kind"]
            # The status comes even from a position past it: a resuming client must learn how the run ended.
            if record["seq"] >= from_seq or kind == "status":
                event = json_format.ParseDict({kind: record[kind], "seq": record["seq"]}, pb2.RunEvent(),
                                              ignore_unknown_fields=True)
                yield record["seq"], event
            if kind == "status":
                return


class Slots:
    """At most `limit` runs at once; up to `max_queue` more wait in FIFO order."""

    def __init__(self, limit: int, max_queue: int):
        self._limit, self._max_queue = limit, max_queue
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: deque[object] = deque()

    def reserve(self, ticket: object) -> int:
        """0 = may start now; n > 0 = queued at position n. Refuses when the queue is full."""
        with self._cond:
            if self._running < self._limit and not self._waiting:
                self._running += 1
                return 0
            if len(self._waiting) >= self._max_queue:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self._running} runs are running and {len(self._waiting)} are queued (the limit); "
                              f"retry later or raise --max-queue / --max-concurrent")
            self._waiting.append(ticket)
            return len(self._waiting)

    def wait_turn(self, ticket: object, cancelled: threading.Event) -> bool:
        with self._cond:
            while not cancelled.is_set():
                if self._waiting[0] is ticket and self._running < self._limit:
                    self._waiting.popleft()
                    self._running += 1
                    self._cond.notify_all()
                    return True
                self._cond.wait(0.5)
            self._waiting.remove(ticket)
            self._cond.notify_all()
            return False

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()


@dataclasses.dataclass(frozen=True)
class RunPlan:
    run_id: str
    env_name: str
    argv: list[str]
    env: dict[str, str]
    workspace_dir: Path
    log_path: Path
    timeout: float
    limits: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: with the pid, it names one process even after its pid is reused
    rss_bytes: int
    zombie: bool


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def proc_info(pid: int) -> ProcInfo | None:
    try:
        fields = kernel_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return ProcInfo(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), int(fields[21]) * PAGE_SIZE,
                    fields[0] in ("Z", "X"))


def all_processes() -> list[ProcInfo]:
    infos = (proc_info(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return [info for info in infos if info is not None]


def environ_has(pid: int, entries: frozenset[bytes]) -> bool:
    if not entries:
        return False
    try:
        return entries <= set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    except OSError:
        return False


def same_process(pid: int, start: int) -> bool:
    info = proc_info(pid)
    return info is not None and info.start == start and not info.zombie


def _write(path: Path, value: object) -> None:
    """One write to a cgroup file: without Python's buffered I/O, half the syscalls."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)


def kernel_text(path: Path | str) -> str:
    """A small /proc or cgroup file: without Python's buffered I/O, half the syscalls."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")  # a process may name itself in any bytes
    finally:
        os.close(fd)


def _counter(path: Path, name: str) -> int:
    """A 'name N' line of a cgroup file such as memory.oom_control or pids.events; 0 if absent."""
    with contextlib.suppress(OSError):
        for line in kernel_text(path).splitlines():
            key, _, value = line.partition(" ")
            if key == name and value.strip().isdigit():
                return int(value)
    return 0


# A run's first process: a shell that does nothing until it has read its start script (start_script) from stdin,
# then becomes the task. The executor puts it into the run's cgroups before it sends the script, from outside: in
# the tasks' mount namespace /sys is read-only. Not preexec_fn, which may crash a child forked by a threaded
# server; and a shell, not Python, because it costs a millisecond rather than an interpreter start.
WAITING_SHELL = """\
. /dev/stdin
exit 126
"""


def waiting_shell() -> subprocess.Popen:
    return subprocess.Popen(["/bin/sh", "-c", WAITING_SHELL, "vpe-task"], env={}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def start_script(argv: Sequence[str], env: dict[str, str], cwd: Path, rlimits: tuple[int, int, int]) -> bytes:
    """What a waiting shell runs to become the task: Popen(argv, env=env, cwd=cwd, stdin=DEVNULL) with the
    run's rlimits (CPU seconds soft and hard, open files)."""
    cpu, cpu_hard, files = rlimits
    lines = [f"ulimit -t {cpu_hard} && ulimit -S -t {cpu} && ulimit -n {files} || {{",
             "  echo \"[executor] cannot set the run's limits\" >&2; exit 126; }",
             f"cd -- {shlex.quote(str(cwd))} || exit 126",
             *(f"export {name}={shlex.quote(value)}" for name, value in env.items()),
             "unset PWD OLDPWD",
             "exec </dev/null " + " ".join(map(shlex.quote, argv))]
    return ("\n".join(lines) + "\n").encode()


def hand_over(proc: subprocess.Popen, script: bytes) -> None:
    """Sends a waiting shell its start script; one that has ended says why in its exit status and stderr."""
    try:
        proc.stdin.write(script)
        proc.stdin.flush()
    except BrokenPipeError:
        pass
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()


def within_hard_limit(kind: int, value: int) -> int:
    """What a child may set: an unprivileged process cannot raise its hard limit (children inherit the executor's)."""
    ceiling = resource.getrlimit(kind)[1]
    return value if ceiling == resource.RLIM_INFINITY else min(value, ceiling)


class Cage:
    """Every process of one run. With cgroups: the run's cgroup in the pids, memory and freezer hierarchies, which
    the task joins before it runs and no descendant can leave. Without: what /proc shows, i.e. the task's process
    group and session, its descendants, and every process whose environment carries the run's marker (its
    VPE_RUN_ID and VPE_BUFFER), which children inherit through setsid and double forks."""

    def __init__(self, run_id: str, marker: frozenset[bytes], cgroups: dict[str, Path], thorough: bool = False):
        self.run_id = run_id
        self.marker = marker
        self.cgroups = cgroups
        self.thorough = thorough  # cgroups and /proc both: for runs a dead executor left
        self.leader: tuple[int, int] | None = None  # (pid, start)
        self._seen: dict[int, int] = {}  # pid -> start of members found by tracking, so their zombies get reaped
        self.killed = False  # its freezer may have been left frozen

    def record(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "marker": sorted(m.decode() for m in self.marker),
                "cgroups": {name: str(path) for name, path in self.cgroups.items()}, "leader": self.leader}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Cage":
        cage = cls(record["run_id"], frozenset(m.encode() for m in record["marker"]),
                   {name: Path(path) for name, path in record["cgroups"].items()}, thorough=True)
        cage.leader = tuple(record["leader"]) if record.get("leader") else None
        return cage

    def create(self, limits: dict[str, float]) -> None:
        for folder in self.cgroups.values():
            folder.mkdir(exist_ok=True)
        self.set_limits(limits)

    def set_limits(self, limits: dict[str, float]) -> None:
        if memory := self.cgroups.get("memory"):
            _write(memory / "memory.limit_in_bytes", int(limits["memory_bytes"]))
            if (memory / "memory.memsw.limit_in_bytes").exists():  # swap must not stretch the limit
                _write(memory / "memory.memsw.limit_in_bytes", int(limits["memory_bytes"]))
        if pids := self.cgroups.get("pids"):
            _write(pids / "pids.max", int(limits["processes"]))

    @staticmethod
    def rlimits(limits: dict[str, float]) -> tuple[int, int, int]:
        """CPU seconds (soft, hard) and open files. The CPU hard limit is 5 s above the soft one, so SIGXCPU (named
        in the status) comes before SIGKILL."""
        cpu = math.ceil(limits["cpu_seconds"])
        return (within_hard_limit(resource.RLIMIT_CPU, cpu), within_hard_limit(resource.RLIMIT_CPU, cpu + 5),
                within_hard_limit(resource.RLIMIT_NOFILE, int(limits["open_files"])))

    def join(self, pid: int) -> None:
        """Moves a waiting shell into the run's cgroups, before it has run anything of the task."""
        for folder in self.cgroups.values():
            _write(folder / "cgroup.procs", pid)

    def reusable(self) -> bool:
        """Whether the next run may have these cgroups: never killed (frozen), none of its processes left, no
        limit hit (the counters verdict reads start at 0) and little memory still charged (its page cache)."""
        memory, pids = self.cgroups.get("memory"), self.cgroups.get("pids")
        try:
            return (not self.killed and not self._cgroup_members()
                    and not (memory and (_counter(memory / "memory.oom_control", "oom_kill")
                                         or int(kernel_text(memory / "memory.usage_in_bytes")) > REUSE_CHARGED_BYTES))
                    and not (pids and _counter(pids / "pids.events", "max")))
        except (OSError, ValueError):
            return False

    def set_leader(self, pid: int) -> None:
        info = proc_info(pid)
        self.leader = (pid, info.start if info else 0)

    def members(self) -> set[int]:
        found = self._cgroup_members() if self.cgroups else set()
        if self.thorough or not self.cgroups:
            found |= {info.pid for info in self.tracked()}
        return found

    def _cgroup_members(self) -> set[int]:
        if not self.cgroups:
            return set()
        with contextlib.suppress(FileNotFoundError):
            return {int(pid) for pid in kernel_text(next(iter(self.cgroups.values())) / "cgroup.procs").split()}
        return set()

    def tracked(self) -> list[ProcInfo]:
        """The run's live processes as /proc shows them; reaps the zombies among them that are the executor's
        (as child subreaper it inherits orphans) and not the task's first process, which its Popen reaps."""
        me = os.getpid()
        leader_pid = self._leader_group()
        born_after = self.leader[1] if self.leader else 0  # nothing older than the task can descend from it
        procs = [p for p in all_processes() if p.pid != me and p.start >= born_after]
        children: dict[int, list[ProcInfo]] = {}
        for p in procs:
            children.setdefault(p.ppid, []).append(p)
        found = {p.pid: p for p in procs if p.pgid == leader_pid or p.sid == leader_pid or p.pid == leader_pid
                 or self._seen.get(p.pid) == p.start or (not p.zombie and environ_has(p.pid, self.marker))}
        todo = list(found)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child.pid not in found:
                    found[child.pid] = child
                    todo.append(child.pid)
        live = []
        for p in found.values():
            if not p.zombie:
                self._seen[p.pid] = p.start
                live.append(p)
            elif p.ppid == me and p.pid != leader_pid and self._seen.pop(p.pid, None) == p.start:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, os.WNOHANG)
        return live

    def _leader_group(self) -> int:
        """The task's group and session id while its first process exists (a zombie too): only then can that id
        not have been handed to an unrelated process. -1 otherwise."""
        info = proc_info(self.leader[0]) if self.leader else None
        return info.pid if info and info.start == self.leader[1] else -1

    def signal(self, sig: int) -> None:
        if (group := self._leader_group()) > 0:
            kill_group(group, sig)  # reaches the task even before it has joined its cgroup
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL for every process; with a freezer they are frozen first, so none can fork a child that misses it."""
        self.killed = True
        freezer = self.cgroups.get("freezer")
        if freezer:
            with contextlib.suppress(OSError):
                _write(freezer / "freezer.state", "FROZEN")
                deadline = time.monotonic() + 1
                while kernel_text(freezer / "freezer.state").strip() != "FROZEN" and time.monotonic() < deadline:
                    time.sleep(0.01)
        self.signal(signal.SIGKILL)
        if freezer:
            with contextlib.suppress(OSError):
                _write(freezer / "freezer.state", "THAWED")

    def kill_all(self, within: float = 5.0) -> int:
        """Kills until no process is left (or `within` seconds pass); returns how many there were at first."""
        count = len(self.members())
        deadline = time.monotonic() + within
        while self.members() and time.monotonic() < deadline:
            self.kill()
            time.sleep(0.05)
        return count

    def census(self, limits: dict[str, float]) -> tuple[bool, str]:
        """(whether any process of the run is left, the limit it is over or ''). With cgroups the kernel
        enforces the limits; without, the executor checks memory and process count from /proc."""
        if self.cgroups:
            return bool(self._cgroup_members()), ""
        live = self.tracked()
        if sum(p.rss_bytes for p in live) > limits["memory_bytes"]:
            return True, f"killed: memory limit {format_size(limits['memory_bytes'])}"
        if len(live) > limits["processes"]:
            return True, f"killed: process limit {limits['processes']:.0f}"
        return bool(live), ""

    def verdict(self, limits: dict[str, float], returncode: int) -> str:
        """Which limit ended the run, as the kernel saw it ('' for none)."""
        if (memory := self.cgroups.get("memory")) and _counter(memory / "memory.oom_control", "oom_kill"):
            return f"killed: memory limit {format_size(limits['memory_bytes'])}"
        if returncode == -signal.SIGXCPU:
            return f"killed: cpu time limit {limits['cpu_seconds']:g} s"
        if (pids := self.cgroups.get("pids")) and returncode and _counter(pids / "pids.events", "max"):
            return f"failed: process limit {limits['processes']:.0f} reached (a fork was refused)"
        return ""

    def remove(self) -> None:
        for folder in self.cgroups.values():
            with contextlib.suppress(OSError):
                folder.rmdir()


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("pids", "memory", "freezer")
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 36, 24, 38
CLONE_NEWNS, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20000, 1, 32, 4096, 16384, 1 << 18
MOUNT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "nosymfollow": 256, "noatime": 1024, "nodiratime": 2048,
               "relatime": 1 << 21, "strictatime": 1 << 24}  # per-mount options a read-only remount keeps
# Root-owned files a task without capabilities could still write (the owner's permission bits suffice): cgroup
# files (its limits, leaving its cgroup), sysctls such as kernel.core_pattern (a program the kernel runs as root
# with every capability), the magic SysRq key.
SYSTEM_READ_ONLY = (Path("/sys"), Path("/proc/sys"), Path("/proc/sysrq-trigger"))
REUSE_CHARGED_BYTES = 4 * 1024 * 1024  # memory a finished run may leave charged to cgroups the next run gets
# A run's parked process is replaced only after the run (see Containment._park_soon), so with one per slot a client
# starting its next run the moment the last one ended found none about a fifth of the time and waited for its join.
PARKED_PER_SLOT = 2
JOURNAL_COMPACT_BYTES = 64 * 1024


def libc_call(name: str, *args: Any) -> int:
    result = getattr(LIBC, name)(*args)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")
    return result


def mounts() -> list[tuple[Path, int]]:
    """(mount point, its MOUNT_FLAGS) of the calling thread's mount namespace."""
    found = []
    for line in Path("/proc/thread-self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda octal: chr(int(octal[1], 8)), fields[4])
        found.append((Path(point), sum(MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))))
    return found


def base_prefix(interpreter: Path) -> Path | None:
    """Where the base interpreter and standard library of a venv's `<venv>/bin/python` live (the folder above
    pyvenv.cfg's `home`); None for an env that holds its own (conda)."""
    with contextlib.suppress(OSError):
        for line in (interpreter.parent.parent / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                return Path(value.strip()).resolve().parent
    return None


class TaskLauncher:
    """Starts every task. Where the executor may (root with CAP_SYS_ADMIN and CAP_SETPCAP), it starts them from one
    thread of its own that has entered a mount namespace of its own, in which the built envs, each env's base
    interpreter, the task scripts and SYSTEM_READ_ONLY are read-only bind mounts, and whose children get an empty
    capability bounding set and no_new_privs. A task is then root without capabilities: it can neither write there
    nor remount, unmount, chmod or chown its way back (mounts it would copy into a user namespace of its own are
    locked). Mount namespaces, capability bounding sets and no_new_privs are per thread, and fork copies the calling
    thread's: the executor's other threads (env builds, cgroup work) are untouched, and starting a task costs
    nothing more than a hand-over to this thread. Elsewhere tasks start as they are, and EnvManager watches every
    env's files instead."""

    def __init__(self, cfg: Config):
        self._keep_writable = cfg.buffer_dir.resolve()
        self._protected: set[Path] = set()
        self._interpreters: set[Path] = set()  # those whose base is protected
        self._thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-launcher")
        self.read_only = False
        reason = "VPE_EXECUTOR_ENV_PROTECTION=watch"
        if cfg.env_protection in ("auto", "mount"):
            try:
                self.call(self._enter_task_namespace, (cfg.built_envs_dir, cfg.tasks_dir))
                self.read_only = True
            except OSError as exc:
                self._thread.shutdown()  # its half-made namespace dies with it
                self._thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-launcher")
                if cfg.env_protection == "mount":
                    raise SystemExit(f"executor.py: VPE_EXECUTOR_ENV_PROTECTION=mount, but the executor cannot make "
                                     f"read-only mounts for its tasks ({exc}); run as root with CAP_SYS_ADMIN or "
                                     f"use auto") from None
                reason = f"no read-only mounts here ({exc})"
        self.mechanism = (
            "envs, their base interpreters and the task scripts read-only in the tasks' own mount namespace, and "
            "/sys, /proc/sys and /proc/sysrq-trigger; tasks without capabilities (empty bounding set, "
            "no_new_privs)" if self.read_only else
            f"envs watched (inotify on every file; a change is refused before the next run and rebuilt): {reason}")

    def _enter_task_namespace(self, paths: Sequence[Path]) -> None:
        libc_call("unshare", CLONE_NEWNS)
        libc_call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing made here reaches the host
        for path in (*paths, *(path for path in SYSTEM_READ_ONLY if path.exists())):  # no SysRq on some kernels
            self._make_read_only(path)
        for cap in range(int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1):
            libc_call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
        libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

    def _make_read_only(self, path: Path) -> None:
        path = path.resolve()
        if path in self._protected:
            return
        if path == self._keep_writable or path in self._keep_writable.parents:
            log.warning("%s holds the tasks' workspaces (%s), so it stays writable for tasks", path,
                        self._keep_writable)
        else:
            target = str(path).encode()
            libc_call("mount", target, target, None, MS_BIND | MS_REC, None)
            below = {point: flags for point, flags in mounts() if point == path or path in point.parents}
            for point, flags in below.items():  # the topmost mount at each point: what a task sees
                libc_call("mount", None, str(point).encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
            log.info("read-only for tasks: %s", path)
        self._protected.add(path)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the launcher thread, whose children are started the tasks' way."""
        return self._thread.submit(fn, *args).result()

    def protect_interpreter(self, interpreter: Path) -> None:
        """Makes the base of a venv's interpreter read-only for tasks, before its first task."""
        if self.read_only and interpreter not in self._interpreters:
            if (base := base_prefix(interpreter)) is not None:
                self.call(self._make_read_only, base)
            self._interpreters.add(interpreter)

    def stop(self) -> None:
        self._thread.shutdown()


class Containment:
    """Keeps each run's processes together, records live runs in $VPE_HOME/run/executor/<executor>.jsonl and, at
    start, kills what executors that died without stopping (kill -9, OOM killer, power loss) left running.

    A cgroup per run where the executor may create them (v1 pids, memory and freezer hierarchies, e.g. as root),
    else the executor becomes child subreaper and tracks descendants through /proc."""

    def __init__(self, cfg: Config):
        self._cfg = cfg
        me = proc_info(os.getpid())
        self.identity = f"{me.pid}-{me.start}"
        self._records_root = cfg.home / "run" / "executor"
        self._bases = self._cgroup_bases() if cfg.containment in ("auto", "cgroup") else {}
        if cfg.containment == "cgroup" and not self._bases:
            raise SystemExit("executor.py: VPE_EXECUTOR_CONTAINMENT=cgroup, but no writable pids, memory and freezer "
                             "cgroup (v1) hierarchies are mounted; run as root or use auto")
        if self._bases:
            self.mechanism = ("cgroup: one per run in the pids, memory and freezer hierarchies (a later run's "
                              "once a run leaves it clean)")
        else:
            LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            self.mechanism = ("subreaper: no writable cgroups, descendants tracked through /proc "
                              "(a process that clears its environment and leaves the run's session can escape)")
        self.launcher = TaskLauncher(cfg)
        self.mechanism += f"; {self.launcher.mechanism}"
        self._records_root.mkdir(parents=True, exist_ok=True)
        self._journal = RunJournal(self._records_root / f"{self.identity}.jsonl")
        self._parked: deque[tuple[subprocess.Popen, dict[str, Path]]] = deque()
        self._clean: deque[dict[str, Path]] = deque()  # cgroups finished runs left clean, for the next ones
        self._parked_lock = threading.Lock()
        # cgroup work (creating, joining, removing) off the runs' path and outside the tasks' mount namespace
        self._keeper = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cgroup-keeper")
        self._park_numbers = itertools.count()
        self._owed = 0  # parked processes taken by runs still going: each is replaced when its run ends
        self._stopping = False
        for _ in range(PARKED_PER_SLOT * cfg.max_concurrent):
            self._park_soon()

    def start(self, cage: Cage, argv: list[str], env: dict[str, str], cwd: Path,
              limits: dict[str, float]) -> subprocess.Popen:
        """The run's first process, in its cage: a parked one (its cgroups joined ahead of the run) where there is
        one, else one that joins them now."""
        self.launcher.protect_interpreter(Path(argv[0]))
        parked = self._take_parked()
        if parked is not None:
            with self._parked_lock:
                self._owed += 1
            proc, cage.cgroups = parked
        else:
            proc, cage.cgroups = self._new_parked() if self._bases else (self.launcher.call(waiting_shell), {})
        if limits != self._cfg.limit_defaults:  # parked cgroups have the default limits
            try:
                cage.set_limits(limits)
            except BaseException:
                self._unpark(proc, cage.cgroups)
                raise
        hand_over(proc, start_script(argv, env, cwd, Cage.rlimits(limits)))
        return proc

    def _park_soon(self) -> None:
        """Parks a process, soon and on the keeper thread, not while a run starts: the new process's joining
        would hold up the run's own process starting and exiting."""
        if self._bases and not self._stopping:
            self._keeper.submit(self._park)

    def _park(self) -> None:
        if self._stopping:
            return
        try:
            parked = self._new_parked()
        except (OSError, RuntimeError) as exc:  # RuntimeError: the launcher has stopped with the executor
            log.warning("cannot park a process for a future run (%s); runs start without", exc)
            return
        with self._parked_lock:
            self._parked.append(parked)

    def _new_parked(self) -> tuple[subprocess.Popen, dict[str, Path]]:
        """A waiting shell in cgroups of its own with the default limits: ones a finished run left clean, else
        new ones."""
        with self._parked_lock:
            folders = self._clean.popleft() if self._clean else None
        if folders is None:
            folders = {name: base / f"parked-{next(self._park_numbers)}" for name, base in self._bases.items()}
            try:
                Cage("parked", frozenset(), folders).create(self._cfg.limit_defaults)
            except BaseException:
                remove_if_empty(folders.values())
                raise
        try:
            proc = self.launcher.call(waiting_shell)
        except BaseException:
            remove_if_empty(folders.values())
            raise
        try:
            Cage("parked", frozenset(), folders).join(proc.pid)
        except BaseException:
            self._unpark(proc, folders)
            raise
        return proc, folders

    def _take_parked(self) -> tuple[subprocess.Popen, dict[str, Path]] | None:
        while True:
            with self._parked_lock:
                if not self._parked:
                    return None
                proc, folders = self._parked.popleft()
            if proc.poll() is None:
                return proc, folders
            log.warning("a parked process ended before its run (exit %s): %s", proc.returncode,
                        proc.stderr.read().decode(errors="replace").strip())
            self._unpark(proc, folders)

    @staticmethod
    def _unpark(proc: subprocess.Popen, folders: dict[str, Path]) -> None:
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        remove_if_empty(folders.values())

    def _cgroup_bases(self) -> dict[str, Path]:
        bases = {}
        for controller in CGROUP_CONTROLLERS:
            home = home_cgroup(self._cfg.home, controller)
            try:
                if home is None:
                    raise OSError(f"no {controller} hierarchy")
                for _ in range(3):  # another executor's sweep may remove `home` between the two mkdirs
                    with contextlib.suppress(FileNotFoundError):
                        (home / self.identity).mkdir(parents=True, exist_ok=True)
                        break
                else:
                    raise OSError(f"{home} keeps disappearing")
                bases[controller] = home / self.identity
            except OSError as exc:
                log.info("no per-run cgroups (%s): tracking descendants through /proc instead", exc)
                for base in bases.values():
                    with contextlib.suppress(OSError):
                        base.rmdir()
                return {}
        return bases

    def cage(self, run_id: str, env: dict[str, str]) -> Cage:
        """The run's cage; start() gives it its cgroups."""
        marker = frozenset(f"{name}={env[name]}".encode() for name in ("VPE_RUN_ID", "VPE_BUFFER"))
        return Cage(run_id, marker, {})

    def remember(self, cage: Cage, log_path: Path) -> None:
        self._journal.started({**cage.record(), "log_path": str(log_path)})

    def forget(self, cage: Cage, limits: dict[str, float]) -> None:
        """The run is over: its record goes; on the keeper thread, while the run's status goes out, its cgroups
        are kept for a later run if it left them clean (else removed), and the parked process it took is
        replaced."""
        self._journal.ended(cage.run_id)
        with self._parked_lock:
            owed, self._owed = self._owed > 0, max(0, self._owed - 1)
        try:
            self._keeper.submit(self._retire, cage, limits, owed)
        except RuntimeError:  # the keeper has stopped with the executor
            cage.remove()

    def _retire(self, cage: Cage, limits: dict[str, float], owed: bool) -> None:
        """Creating and removing a run's cgroups costs the kernel more than emptying them: clean ones are kept."""
        try:
            clean = bool(cage.cgroups) and not self._stopping and cage.reusable()
            if clean and limits != self._cfg.limit_defaults:
                cage.set_limits(self._cfg.limit_defaults)
        except OSError:
            clean = False
        with self._parked_lock:
            clean = clean and len(self._clean) < PARKED_PER_SLOT * self._cfg.max_concurrent
            if clean:
                self._clean.append(cage.cgroups)
        if not clean:
            cage.remove()
        if owed:
            self._park()

    def stop(self) -> None:
        """Leaves the records of runs still alive (none, unless killing failed) for the next start to find."""
        self._stopping = True
        self._keeper.shutdown()
        self.launcher.stop()
        with self._parked_lock:
            parked, self._parked = list(self._parked), deque()
            clean, self._clean = list(self._clean), deque()
        for proc, folders in parked:
            self._unpark(proc, folders)
        remove_if_empty(folder for folders in clean for folder in folders.values())
        self._journal.close()
        remove_if_empty([*self._bases.values(), *(base.parent for base in self._bases.values())])

    def recover(self) -> list[str]:
        """Kills every process of the runs that dead executors of this VPE_HOME left behind, reports each such run
        as lost in its run log, and removes their records and cgroups. Returns the lost runs' ids."""
        lost = []
        for journal in self._records_root.glob("*-*"):
            identity = journal.name.split(".")[0]
            if identity == self.identity or self._executor_alive(identity):
                continue
            if journal.suffix == ".tmp":  # a compaction cut short: the journal it was to replace is still there
                journal.unlink(missing_ok=True)
                continue
            for record in RunJournal.live_runs(journal):
                try:
                    cage = Cage.from_record(record)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("%s: unreadable run record (%s); its cgroups, if any, are cleaned up below", journal, exc)
                    continue
                killed = cage.kill_all()
                cage.remove()
                report_lost(record, identity.split("-")[0], killed)
                lost.append(record["run_id"])
            if journal.is_dir():
                shutil.rmtree(journal, ignore_errors=True)
            else:
                journal.unlink(missing_ok=True)
        self._remove_dead_cgroups()
        return lost

    def _remove_dead_cgroups(self) -> None:
        """Cgroups of dead executors that no record names (it died between creating one and recording the run),
        then the empty ones that dead executors of other VPE_HOMEs left (killed, or from before executors removed
        their home's folder on stopping): those are only removed, their processes left to their own home."""
        homes = {controller: base.parent for controller, base in self._bases.items()}
        for home in homes.values():
            for executor in self._dead_executors(home):
                for run in subfolders(executor):
                    cage = Cage(run.name, frozenset(), {c: h / executor.name / run.name for c, h in homes.items()})
                    cage.kill_all()
                    cage.remove()
                with contextlib.suppress(OSError):
                    executor.rmdir()
            for other in subfolders(home.parent):
                if other != home and CGROUP_HOME_RE.fullmatch(other.name):
                    dead = self._dead_executors(other)
                    remove_if_empty([*(run for executor in dead for run in subfolders(executor)), *dead, other])

    def _dead_executors(self, home: Path) -> list[Path]:
        return [p for p in subfolders(home) if EXECUTOR_IDENTITY_RE.fullmatch(p.name) and p.name != self.identity
                and not self._executor_alive(p.name)]

    @staticmethod
    def _executor_alive(identity: str) -> bool:
        pid, _, start = identity.partition("-")
        return pid.isdigit() and start.isdigit() and same_process(int(pid), int(start))


class RunJournal:
    """The runs an executor has alive, as JSON lines appended to a file of its own: {"started": record} once a run's
    first process exists, {"ended": run_id} once its last one is gone. An append per event, where a file per run
    cost creating, renaming and removing one (and a new inode costs ext4 a search). Emptied whenever no run is alive,
    rewritten with only the live runs once it grows past JOURNAL_COMPACT_BYTES, removed when the executor stops with
    none alive. A line torn by a crash is skipped."""

    def __init__(self, path: Path):
        self.path = path
        self._live: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._fd = self._open(path, os.O_TRUNC)
        self._size = 0

    @staticmethod
    def _open(path: Path, flags: int) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | flags, 0o600)

    def started(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._live[record["run_id"]] = record
            self._append({"started": record})

    def ended(self, run_id: str) -> None:
        with self._lock:
            if self._live.pop(run_id, None) is None:
                return
            if not self._live:
                os.ftruncate(self._fd, 0)
                self._size = 0
            elif self._size > JOURNAL_COMPACT_BYTES:
                self._compact()
            else:
                self._append({"ended": run_id})

    def _append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry) + "\n").encode()
        os.write(self._fd, line)
        self._size += len(line)

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = self._open(tmp, os.O_TRUNC)
        os.close(self._fd)
        self._fd, self._size = fd, 0
        for record in self._live.values():
            self._append({"started": record})
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Keeps the file only while runs are alive (none, unless killing them failed) for the next start."""
        with self._lock:
            os.close(self._fd)
            if not self._live:
                self.path.unlink(missing_ok=True)

    @staticmethod
    def live_runs(path: Path) -> list[dict[str, Any]]:
        """The records of the runs a journal shows alive: started and not ended. `path` may also be the folder
        executors kept before this journal, with a JSON file per live run."""
        try:
            lines = ([b'{"started": %s}' % record.read_bytes() for record in sorted(path.glob("*.json"))]
                     if path.is_dir() else path.read_bytes().splitlines())
        except OSError as exc:
            log.warning("%s: unreadable (%s)", path, exc)
            return []
        live: dict[str, dict[str, Any]] = {}
        for line in lines:
            try:
                entry = json.loads(line)
                if "started" in entry:
                    live[entry["started"]["run_id"]] = entry["started"]
                else:
                    live.pop(entry["ended"], None)
            except (ValueError, KeyError, TypeError):
                log.warning("%s: skipping a torn or unreadable record", path)
        return list(live.values())


def subfolders(path: Path) -> list[Path]:
    """[] for a folder gone meanwhile (another executor's clean-up)."""
    with contextlib.suppress(OSError):
        return [p for p in path.iterdir() if p.is_dir()]
    return []


def remove_if_empty(cgroups: Iterable[Path]) -> None:
    """rmdir, in order; the kernel refuses for a cgroup that still has processes or children, and that one stays."""
    for folder in cgroups:
        with contextlib.suppress(OSError):
            folder.rmdir()


CGROUP_HOME_RE = re.compile(r"vpe-[0-9a-f]{12}")  # home_cgroup's folder of one VPE_HOME
EXECUTOR_IDENTITY_RE = re.compile(r"[0-9]+-[0-9]+")  # Containment.identity: <pid>-<start>


def home_cgroup(home: Path, controller: str) -> Path | None:
    """<controller mount>/<this process's cgroup>/vpe-<hash of VPE_HOME>: where the executors of `home` keep their
    runs' cgroups, one folder per executor (<pid>-<start>)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mount = CGROUP_ROOT / controller
        if controller in controllers.split(",") and (mount / "cgroup.procs").exists():
            return mount / path.lstrip("/") / f"vpe-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"
    return None


def report_lost(record: dict[str, Any], executor_pid: str, killed: int) -> None:
    reason = (f"lost: the executor (pid {executor_pid}) stopped while the run went on; "
              f"the next executor killed its {killed} remaining processes")
    log.warning("run %s: %s", record["run_id"], reason)
    log_path = Path(record["log_path"])
    status = pb2.RunStatus(run_id=record["run_id"], log_path=str(log_path), ended_by=reason)
    with contextlib.suppress(OSError):
        run_log = RunLog(log_path, 0, append=True)
        run_log.write(pb2.RunEvent(status=status), capped=False)
        run_log.close()


class EventQueue:
    """A run's events not yet sent to its client. put never blocks: its producer checks over_bound() and stops
    reading the task (or, while the run is being stopped, only logs the lines). One thread puts (the run's
    supervisor) and one takes (its Run call, or KeepAlive): each counts the text on its own side, so neither needs
    a lock beyond SimpleQueue's, which costs a fraction of queue.Queue's."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._chars_put = self._chars_taken = 0

    def put(self, event) -> None:
        self._chars_put += len(event.line.text)
        self._queue.put(event)

    def get(self, timeout: float | None = None):
        event = self._queue.get(timeout=timeout)
        self._chars_taken += len(event.line.text)
        return event

    def over_bound(self) -> bool:
        return (self._queue.qsize() >= MAX_BUFFERED_EVENTS
                or self._chars_put - self._chars_taken >= MAX_BUFFERED_TEXT)


class ActiveRun:
    """One run: a supervisor thread waits for a slot, starts the task in its cage, reads both pipes, enforces
    timeout, cancel and limits, logs every event and queues it for the RPC. The run, with its slot and its id,
    lasts until the task's process has exited and no other process of its cage is left."""

    def __init__(self, plan: RunPlan, slots: Slots, cfg: Config, containment: Containment,
                 store: WorkspaceStore | None, on_end: Callable[["ActiveRun"], None]):
        self.plan = plan
        self._slots = slots
        self._cfg = cfg
        self._containment = containment
        self._store = store
        self._on_end = on_end
        self._run_log: RunLog | None = None  # opened by the supervisor, so a refused run never truncates one
        self.events = EventQueue()
        self.dropped_events = 0
        self._output_left = plan.limits["output_bytes"]  # what the client and the run log may still get of it
        self._output_over = False  # the output limit is reached: the rest of the task's output is discarded
        self._draining = False  # being stopped: output is read without back-pressure
        self._cancel_reason = ""
        self._cancelled = threading.Event()
        self.process_started = threading.Event()
        # Wakes _pump on cancel. It exists only while _pump runs, so a refused or queued run holds no fds;
        # the lock keeps cancel from writing to it after it is closed (fd reuse).
        self._wake_lock = threading.Lock()
        self._wake_w: int | None = None
        self._thread = threading.Thread(target=self._supervise, name=f"run-{plan.run_id}", daemon=True)

    def start(self, position: int) -> None:
        self._position = position
        self._thread.start()

    def over(self) -> bool:
        """The supervisor is done: the final status is in the run log (unless writing it failed)."""
        return not self._thread.is_alive()

    def cancel(self, reason: str) -> None:
        with self._wake_lock:
            if self._cancelled.is_set():
                return
            self._cancel_reason = reason
            self._draining = True
            self._cancelled.set()
            if self._wake_w is not None:
                os.write(self._wake_w, b"c")
        self._slots.wake()

    def _emit(self, capped: bool = True, **fields) -> None:
        event = pb2.RunEvent(**fields)
        seq = self._log(lambda run_log: run_log.write(event, capped))
        if seq is not None:
            event.seq = seq
        if not event.HasField("line"):
            self._log(RunLog.flush)
        # A run being stopped has its output drained without back-pressure, and its client may be gone:
        # lines beyond the bound are only logged.
        if event.HasField("line") and self._draining and self.events.over_bound():
            self.dropped_events += 1
        else:
            self.events.put(event)

    def _log(self, action: Callable[[RunLog], Any]) -> Any:
        """`action`'s result on the run log, or None: a run log that cannot be written (a full disk) is given up;
        the stream goes on."""
        if self._run_log is None:
            return None
        try:
            return action(self._run_log)
        except OSError as exc:
            log.error("run %s: cannot write its log %s (%s); streaming on without it", self.plan.run_id,
                      self.plan.log_path, exc)
            with contextlib.suppress(OSError):
                self._run_log.close()
            self._run_log = None

    def _supervise(self) -> None:
        started = time.monotonic()
        status = pb2.RunStatus(run_id=self.plan.run_id, log_path=str(self.plan.log_path))
        holds_slot = self._position == 0  # admitted straight into a free slot
        try:
            self._run_log = RunLog(self.plan.log_path, self._cfg.run_log_max_bytes)
            holds_slot = holds_slot or self._wait_for_slot()
            if holds_slot:
                self._run_in_workspace(status)
            else:
                status.cancelled = True
        except Exception as exc:  # the stream must still end with a status
            log.exception("run %s: supervisor failed", self.plan.run_id)
            status.ended_by = f"executor error: {exc}"
        finally:
            if holds_slot:
                self._slots.release()
            status.duration_seconds = time.monotonic() - started
            self._on_end(self)  # the run id is free again before its client hears that the run is over
            self._finish(status)

    def _finish(self, status) -> None:
        if self._run_log is not None and self._run_log.dropped_lines:
            self._emit(capped=False, line=pb2.OutputLine(
                stream=pb2.STDERR, timestamp=_now_timestamp(),
                text=f"[executor] the run log keeps {format_size(self._cfg.run_log_max_bytes)}: "
                     f"{self._run_log.dropped_lines} later lines ({format_size(self._run_log.dropped_bytes)}) "
                     f"were streamed but not logged"))
        if self.dropped_events:
            log.info("run %s: %d lines only logged, not queued for its client (the run was being stopped)",
                     self.plan.run_id, self.dropped_events)
        self._emit(status=status)
        self._log(RunLog.close)

    def _wait_for_slot(self) -> bool:
        self._emit(queued=pb2.Queued(
            position=self._position,
            message=f"queued at position {self._position}: all run slots are busy; starts when one frees up"))
        return self._slots.wait_turn(self, self._cancelled)

    def _run_in_workspace(self, status) -> None:
        """With a workspace store: the run starts on the store's files and, only when it exits 0, sends back what
        it changed; a run whose workspace cannot be brought here does not start."""
        if self._store is None:
            return self._run_process(status)
        workspace_dir = self.plan.workspace_dir
        try:
            before = self._store.check_out(workspace_dir)
        except WorkspaceStoreError as exc:
            log.warning("run %s: %s", self.plan.run_id, exc)
            status.ended_by = f"{exc}; the run did not start"
            return
        succeeded = False
        try:
            self._run_process(status)
            succeeded = (status.WhichOneof("outcome") == "exit_code" and status.exit_code == 0
                         and not (status.timed_out or status.cancelled or status.ended_by))
        finally:
            try:
                self._store.check_in(workspace_dir, before, upload=succeeded)
            except WorkspaceStoreError as exc:
                log.warning("run %s: %s", self.plan.run_id, exc)
                status.ended_by = f"{exc}; the run's files were not saved"

    def _run_process(self, status) -> None:
        plan = self.plan
        task_home(plan.workspace_dir, plan.run_id).mkdir(parents=True, exist_ok=True)
        cage = self._containment.cage(plan.run_id, plan.env)
        try:
            started = time.monotonic()
            proc = self._containment.start(cage, plan.argv, plan.env, plan.workspace_dir, plan.limits)
            try:
                cage.set_leader(proc.pid)
                self._containment.remember(cage, plan.log_path)
                self.process_started.set()
                self._emit(started=pb2.Started(run_id=plan.run_id, pid=proc.pid, log_path=str(plan.log_path),
                                               workspace_dir=str(plan.workspace_dir), replica=self._cfg.replica))
                log.info("run %s: started pid %d: %s", plan.run_id, proc.pid, " ".join(plan.argv))
                status.timed_out, status.ended_by = self._pump(proc, cage, started)
            except BaseException:  # e.g. the run log's disk is full: no process may outlive its supervisor
                cage.kill_all()
                proc.wait()
                raise
            rc = proc.wait()
            status.ended_by = status.ended_by or cage.verdict(plan.limits, rc)
        finally:
            self._containment.forget(cage, plan.limits)
        status.cancelled = self._cancelled.is_set()
        if rc < 0:
            status.signal = -rc
        else:
            status.exit_code = rc
        extra = (" (timed out)" if status.timed_out else f" (cancelled: {self._cancel_reason})" if status.cancelled
                 else f" ({status.ended_by})" if status.ended_by else "")
        log.info("run %s: %s%s after %.3fs", plan.run_id, f"signal {-rc}" if rc < 0 else f"exit {rc}", extra,
                 time.monotonic() - started)

    def _pump(self, proc: subprocess.Popen, cage: Cage, started: float) -> tuple[bool, str]:
        """Forwards output until the task's process has exited, both pipes are closed and no other process of
        the run is left. Returns (timed_out, ended_by)."""
        deadline = started + self.plan.timeout if self.plan.timeout else math.inf
        limits = self.plan.limits
        timed_out, ended_by = False, ""
        stopping, kill_at = False, math.inf
        exited, exited_at = False, math.inf
        others_left, census_at = True, started + CENSUS_INTERVAL
        partial = {pb2.STDOUT: b"", pb2.STDERR: b""}
        pidfd = os.pidfd_open(proc.pid)
        wake_r, wake_w = os.pipe()
        with self._wake_lock:
            self._wake_w = wake_w
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, pb2.STDOUT)
        sel.register(proc.stderr, selectors.EVENT_READ, pb2.STDERR)
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        open_pipes = 2
        try:
            while True:  # ends at a census that finds the task exited, its pipes closed and no process left
                now = time.monotonic()
                if now >= census_at:
                    census_at = now + CENSUS_INTERVAL
                    others_left, over = cage.census(limits)
                    ended_by = ended_by or over
                    if exited and not open_pipes and not others_left:
                        break
                    if exited and not others_left and open_pipes and now > exited_at + self._cfg.kill_grace + 1:
                        log.warning("run %s: its pipes stay open with none of its processes left; closing them",
                                    self.plan.run_id)
                        break
                timed_out = timed_out or now >= deadline
                stop_reason = ("timeout" if timed_out else "cancel" if self._cancelled.is_set() else
                               "limit" if ended_by else
                               "leftover" if exited and others_left and now >= exited_at + 0.05 else "")
                if stop_reason and not stopping:
                    if stop_reason == "leftover":
                        log.info("run %s: its task exited; stopping the processes it left", self.plan.run_id)
                    stopping = self._draining = True
                    cage.signal(signal.SIGTERM)
                    kill_at = now + self._cfg.kill_grace
                if now >= kill_at:
                    cage.kill()
                    kill_at = now + CENSUS_INTERVAL  # again, until none is left
                # A slow client: stop reading, so the task blocks on write. Not while stopping it: the client may be
                # gone, and the pipes must be drained to see them close.
                if self.events.over_bound() and not stopping and not self._cancelled.is_set():
                    time.sleep(0.05)
                    continue
                due = min(census_at, kill_at, deadline if not timed_out else math.inf,
                          exited_at + 0.05 if not stopping else math.inf)
                for key, _ in sel.select(max(0.0, due - now)):
                    if key.data == "exit":
                        sel.unregister(pidfd)
                        exited, exited_at = True, time.monotonic()
                        census_at = 0.0  # who is left decides whether the run is over: look now
                    elif key.data == "wake":
                        os.read(wake_r, 64)
                    else:
                        chunk = os.read(key.fd, 65536)
                        if not chunk:
                            sel.unregister(key.fileobj)
                            open_pipes -= 1
                            census_at = 0.0 if exited else census_at
                            chunk = b"\n" if partial[key.data] else b""
                        self._forward(key.data, partial, chunk)
                        if self._output_over and not ended_by:
                            ended_by = f"killed: output limit {format_size(limits['output_bytes'])}"
        finally:
            with self._wake_lock:
                self._wake_w = None
            sel.close()
            os.close(wake_r)
            os.close(wake_w)
            os.close(pidfd)
            proc.stdout.close()
            proc.stderr.close()
        return timed_out, ended_by

    def _forward(self, stream: int, partial: dict[int, bytes], chunk: bytes) -> None:
        """Sends the complete lines of `chunk` (very long ones split), keeps the rest for the next one. Past the
        output limit the task's output is still read, so that it never blocks on a full pipe, but discarded."""
        if self._output_over:
            return
        data = partial[stream] + chunk
        *lines, partial[stream] = data.split(b"\n")
        if len(partial[stream]) > MAX_LINE_CHARS:
            lines.append(partial[stream])
            partial[stream] = b""
        timestamp = _now_timestamp()
        texts = (raw.decode("utf-8", "replace") for raw in lines)
        for piece in (text[start:start + MAX_LINE_CHARS] for text in texts
                      for start in range(0, max(len(text), 1), MAX_LINE_CHARS)):
            if not self._send_output(stream, piece, timestamp):
                break
        self._log(RunLog.flush)

    def _send_output(self, stream: int, text: str, timestamp: Timestamp) -> bool:
        """Sends one output line within the output limit, counted as the client prints it (UTF-8 and a newline).
        The line that crosses the limit still goes, cut to MAX_LINE_CHARS bytes, then a line saying the limit is
        reached, and False says that nothing more may go."""
        size = len(text.encode()) + 1
        if size <= self._output_left:
            self._output_left -= size
            self._emit(line=pb2.OutputLine(stream=stream, text=text, timestamp=timestamp))
            return True
        self._output_over = True
        crossing = text.encode()[:MAX_LINE_CHARS - 1].decode("utf-8", "ignore")
        self._emit(line=pb2.OutputLine(stream=stream, text=crossing, timestamp=timestamp))
        self._emit(capped=False, line=pb2.OutputLine(
            stream=pb2.STDERR, timestamp=_now_timestamp(),
            text=f"[executor] output limit {format_size(self.plan.limits['output_bytes'])} reached: "
                 f"the run is stopped and the rest of its output discarded (RunLimits.output_bytes, run --output)"))
        return False


# buffer/cache: the crawl's answer cache of earlier versions (now the warehouse's), quota already spent: kept
# until a crawl imports it (tasks/ingestion/crawl.py --import-cache), which then removes what it imported.
CRAWL_CACHE = "cache"
RETENTION_INTERVAL = 3600.0


def tree_usage(path: Path) -> tuple[int, float]:
    """(bytes, newest mtime) of a file or folder tree."""
    try:
        top = path.lstat()
    except OSError:
        return 0, 0.0
    size, newest = top.st_size, top.st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    info = os.lstat(os.path.join(folder, name))
                    size += info.st_size
                    newest = max(newest, info.st_mtime)
    return size, newest


def prune(paths: list[Path], keep_days: float, keep_bytes: int) -> tuple[int, int]:
    """Deletes those of `paths` older than keep_days, then the oldest until the rest fit in keep_bytes.
    Returns (how many, bytes) were deleted."""
    usage = sorted(((tree_usage(p), p) for p in paths), key=lambda item: item[0][1])  # oldest first
    total = sum(size for (size, _), _ in usage)
    cutoff = time.time() - keep_days * 86400
    count = freed = 0
    for (size, newest), path in usage:
        if newest >= cutoff and total <= keep_bytes:
            break
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        total, count, freed = total - size, count + 1, freed + size
    return count, freed


def apply_retention(cfg: Config, busy: Callable[[], set[Path]], store: WorkspaceStore | None = None) -> None:
    """Run logs and workspaces: by age and total size, never what a live run uses, never an old crawl cache; the
    store's workspaces by age."""
    in_use = busy()
    logs = [p for p in cfg.run_logs_dir.glob("*.jsonl") if p not in in_use]
    workspaces = [p for p in cfg.buffer_dir.iterdir() if p.is_dir() and p.name != CRAWL_CACHE and p not in in_use]
    for what, paths, keep_bytes in (("run logs", logs, cfg.keep_log_bytes),
                                     ("workspaces", workspaces, cfg.keep_buffer_bytes)):
        count, freed = prune(paths, cfg.keep_days, keep_bytes)
        if count:
            log.info("retention: removed %d %s (%s): older than %g days or beyond %s", count, what,
                     format_size(freed), cfg.keep_days, format_size(keep_bytes))
    if store:
        count, files = store.prune(cfg.keep_days, {path.name for path in in_use if path.parent == cfg.buffer_dir})
        if count:
            log.info("retention: removed %d workspaces (%d files) from the workspace store: untouched for %g days",
                     count, files, cfg.keep_days)


# ---------------------------------------------------------------- workspaces shared through PostgreSQL

STORE_MANIFEST = ".vpe-store"  # in a workspace: its files as this replica last had them from or sent to the store
LOCAL_ONLY = {".home", STORE_MANIFEST, f"{STORE_MANIFEST}.partial"}  # top-level names never stored
STORE_CONNECT_TIMEOUT = 10
STORE_IDLE_CONNECTIONS = 4  # kept open: a new login costs tens of ms (SCRAM), twice per run


class WorkspaceStoreError(Exception):
    """The workspace store could not be reached, or refused what was asked of it."""


def redacted_url(url: str) -> str:
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1@", url)


def workspace_files(workspace_dir: Path) -> dict[str, tuple[int, int]]:
    """The workspace's regular files that the store shares, by path relative to it: (size, mtime in ns)."""
    files = {}
    for folder, dirs, names in os.walk(workspace_dir):
        relative = os.path.relpath(folder, workspace_dir)
        prefix = "" if relative == "." else relative + "/"
        if not prefix:
            dirs[:] = [name for name in dirs if name not in LOCAL_ONLY]
        for name in names:
            with contextlib.suppress(OSError):  # removed meanwhile
                info = os.lstat(os.path.join(folder, name))
                if stat.S_ISREG(info.st_mode) and prefix + name not in LOCAL_ONLY:
                    files[prefix + name] = (info.st_size, info.st_mtime_ns)
    return files


def stored_path(workspace_dir: Path, path: str) -> Path:
    """Where a stored file goes in the workspace; a path that would leave it, or land in what stays local, is
    refused (the store is shared: what one host wrote there must not reach beyond another's workspace)."""
    parts = path.split("/")
    if path.startswith("/") or {"", ".", ".."} & set(parts) or parts[0] in LOCAL_ONLY:
        raise ValueError(f"refusing the stored file {path!r}: not a plain path inside the workspace")
    return workspace_dir / path


class WorkspaceStore:
    """The workspaces' files in PostgreSQL (ddl.sql's workspace.file), the truth for every replica: a run starts on
    this replica's copy brought to what the store holds, and a run that exits 0 sends back what it changed, file by
    file. Each copy's manifest (STORE_MANIFEST: path -> sha256, size, mtime) says which local files are the stored
    ones, so only files whose content differs travel, and only changed files are hashed. Runs of one workspace on
    this replica share its folder: a lock orders their check-outs and check-ins."""

    def __init__(self, url: str):
        try:
            import psycopg2
        except ImportError:
            raise SystemExit("executor.py: VPE_EXECUTOR_WORKSPACE_STORE needs psycopg2 in the executor's Python: "
                             "pip install 'vpe-executor[store]' (or psycopg2-binary)") from None
        self._connect = functools.partial(psycopg2.connect, url, connect_timeout=STORE_CONNECT_TIMEOUT,
                                          application_name="vpe-executor")
        self._failures = (psycopg2.Error, OSError, ValueError)  # ValueError: UnicodeError, a refused path
        self._connection_errors = psycopg2.Error
        self.name = redacted_url(url)
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._workspace_locks: dict[str, threading.Lock] = {}
        self._running: dict[str, int] = {}  # workspace -> its runs here between check-out and check-in

    @contextlib.contextmanager
    def _guarded(self, workspace: str, doing: str) -> Iterator[None]:
        """Holds the workspace's lock; a failure becomes a WorkspaceStoreError naming the store and what failed."""
        with self._lock:
            lock = self._workspace_locks.setdefault(workspace, threading.Lock())
        with lock:
            try:
                yield
            except self._failures as exc:
                raise WorkspaceStoreError(f"workspace store {self.name}: cannot {doing}: "
                                          f"{' '.join(str(exc).split())}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        conn = self._idle_connection() or self._connect()
        try:
            with conn, conn.cursor() as cur:
                yield cur
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < STORE_IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _idle_connection(self) -> Any:
        """An idle connection that still answers (the server may have restarted since), or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            try:
                with conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                return conn
            except self._connection_errors:
                conn.close()

    def check_out(self, workspace_dir: Path) -> dict[str, tuple[int, int]]:
        """Brings this replica's copy of the workspace to what the store holds and returns its files as the run
        starts. Local files the store lacks are removed (left by a run that failed, or deleted elsewhere), except,
        while another run of the workspace runs here, the ones it may be writing."""
        workspace = workspace_dir.name
        with self._guarded(workspace, f"bring workspace {workspace!r} here"):
            others = self._running.get(workspace, 0) > 0
            workspace_dir.mkdir(parents=True, exist_ok=True)
            manifest = read_manifest(workspace_dir)
            local = workspace_files(workspace_dir)
            with self._transaction() as cur:
                cur.execute("SELECT path, sha256 FROM workspace.file WHERE workspace = %s", (workspace,))
                stored = dict(cur.fetchall())
                if local and not stored and not (workspace_dir / STORE_MANIFEST).exists():
                    stored = self._adopt(cur, workspace_dir, local, manifest)
                for path in local.keys() - stored.keys():
                    if path in manifest or not others:
                        (workspace_dir / path).unlink(missing_ok=True)
                for path in manifest.keys() - stored.keys():
                    del manifest[path]
                for path, sha in stored.items():
                    mine = manifest.get(path)
                    if mine and mine[0] == sha and (tuple(mine[1:]) == local.get(path) or others and path in local):
                        continue  # the stored content, or being changed by a run here
                    self._download(cur, workspace_dir, path, manifest)
            write_manifest(workspace_dir, manifest)
            self._running[workspace] = self._running.get(workspace, 0) + 1
            return workspace_files(workspace_dir)

    def _adopt(self, cur, workspace_dir: Path, local: dict[str, tuple[int, int]],
               manifest: dict[str, list]) -> dict[str, str]:
        """A workspace written here before the store was turned on: its files become the stored ones, so a step
        cleared and run again after the upgrade still finds what the earlier steps wrote."""
        log.info("workspace %s predates the store: storing its %d files", workspace_dir.name, len(local))
        for path, state in local.items():
            self._upload(cur, workspace_dir, path, state, manifest)
        return {path: entry[0] for path, entry in manifest.items()}

    def _download(self, cur, workspace_dir: Path, path: str, manifest: dict[str, list]) -> None:
        target = stored_path(workspace_dir, path)
        cur.execute("SELECT sha256, mode, content FROM workspace.file WHERE workspace = %s AND path = %s",
                    (workspace_dir.name, path))
        row = cur.fetchone()
        if row is None:  # deleted since the listing
            return
        sha, mode, content = row
        if target.parent.resolve() != workspace_dir.resolve() / Path(path).parent:
            raise ValueError(f"refusing the stored file {path!r}: a symlink in the workspace is in its way")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.vpe-download")
        partial.write_bytes(content)
        partial.chmod(mode & 0o777)
        partial.replace(target)
        info = target.stat()
        manifest[path] = [sha, info.st_size, info.st_mtime_ns]

    def check_in(self, workspace_dir: Path, before: dict[str, tuple[int, int]], upload: bool) -> None:
        """Ends a run's use of the workspace. With `upload`, in one transaction: stores the files the run created
        or changed (only those whose content differs from the stored one) and deletes the ones it removed."""
        workspace = workspace_dir.name
        with self._guarded(workspace, f"save the files of workspace {workspace!r}"):
            self._running[workspace] -= 1
            if not upload:
                return
            manifest = read_manifest(workspace_dir)
            after = workspace_files(workspace_dir)
            removed = sorted(before.keys() - after.keys())
            with self._transaction() as cur:
                for path, state in after.items():
                    if before.get(path) != state:
                        self._upload(cur, workspace_dir, path, state, manifest)
                if removed:
                    cur.execute("DELETE FROM workspace.file WHERE workspace = %s AND path = ANY(%s)",
                                (workspace, removed))
            for path in removed:
                manifest.pop(path, None)
            write_manifest(workspace_dir, manifest)

    def _upload(self, cur, workspace_dir: Path, path: str, state: tuple[int, int], manifest: dict[str, list]) -> None:
        fd = os.open(workspace_dir / path, os.O_RDONLY | os.O_NOFOLLOW)  # a symlink put there meanwhile: refused
        with open(fd, "rb") as source:
            content, mode = source.read(), stat.S_IMODE(os.fstat(fd).st_mode)
        sha = hashlib.sha256(content).hexdigest()
        if manifest.get(path, [None])[0] != sha:
            cur.execute("INSERT INTO workspace.file (workspace, path, sha256, mode, content) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (workspace, path) DO UPDATE "
                        "SET sha256 = excluded.sha256, mode = excluded.mode, content = excluded.content, "
                        "updated_at = now()",
                        (workspace_dir.name, path, sha, mode, content))
        manifest[path] = [sha, *state]

    def prune(self, keep_days: float, busy: set[str]) -> tuple[int, int]:
        """Deletes the workspaces untouched for keep_days, but those runs here use. Returns (workspaces, files)."""
        with self._guarded("", "prune old workspaces"), self._transaction() as cur:
            cur.execute("WITH old AS (SELECT workspace FROM workspace.file GROUP BY workspace "
                        "                 HAVING max(updated_at) < now() - make_interval(secs => %s)), "
                        "     gone AS (DELETE FROM workspace.file WHERE workspace IN (TABLE old) "
                        "                AND workspace <> ALL(%s) RETURNING workspace) "
                        "SELECT count(DISTINCT workspace), count(*) FROM gone", (keep_days * 86400, sorted(busy)))
            return cur.fetchone()


def read_manifest(workspace_dir: Path) -> dict[str, list]:
    """The workspace's manifest; a missing or damaged one is empty (every file is then fetched again)."""
    try:
        manifest = json.loads((workspace_dir / STORE_MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(workspace_dir: Path, manifest: dict[str, list]) -> None:
    partial = workspace_dir / f"{STORE_MANIFEST}.partial"
    partial.write_text(json.dumps(manifest))
    partial.replace(workspace_dir / STORE_MANIFEST)


# ---------------------------------------------------------------- runs that outlive their client

@dataclasses.dataclass(eq=False)
class KeptRun:
    seconds: float
    clients: int = 0
    timer: threading.Timer | None = None
    # Set at the run's first event: its run log is open. Before that, the log of an earlier run of the same id
    # (an Airflow retry reuses it) may still be on disk.
    logging: threading.Event = dataclasses.field(default_factory=threading.Event)


class KeepAlive:
    """Runs whose Run asked for keep_alive_seconds: their clients (the Run caller, Attach callers) read the run
    log, while a keeper thread drains the run's event queue (nobody else reads it, so a lost client never stalls
    the task). When the last client has gone, the run is cancelled after its keep-alive unless one attaches first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[ActiveRun, KeptRun] = {}

    def keep(self, run: ActiveRun, seconds: float) -> None:
        with self._lock:
            self._runs[run] = KeptRun(seconds)
        threading.Thread(target=self._drain, args=(run,), name=f"keep-{run.plan.run_id}", daemon=True).start()

    def join(self, run: ActiveRun) -> bool:
        """Counts a client in; False if `run` is not kept alive (its Run client alone decides)."""
        with self._lock:
            kept = self._runs.get(run)
            if kept is None:
                return False
            kept.clients += 1
            timer, kept.timer = kept.timer, None
        if timer:
            timer.cancel()
        return True

    def leave(self, run: ActiveRun) -> None:
        with self._lock:
            kept = self._runs.get(run)
            if kept is None:
                return
            kept.clients -= 1
            if kept.clients:
                return
            kept.timer = threading.Timer(kept.seconds, self._expire, (run,))
            kept.timer.daemon = True
            kept.timer.start()

    def _expire(self, run: ActiveRun) -> None:
        with self._lock:
            kept = self._runs.get(run)
            # A client may have attached (and gone again, arming a newer timer) while this one fired.
            if kept is None or kept.clients or kept.timer is not threading.current_thread():
                return
        log.info("run %s: no client for %.0fs (its keep_alive_seconds): cancelling it", run.plan.run_id, kept.seconds)
        run.cancel(f"no client attached for {kept.seconds:g}s (keep_alive_seconds)")

    def wait_until_logging(self, run: ActiveRun, waiting: Callable[[], bool]) -> None:
        with self._lock:
            kept = self._runs.get(run)
        while kept and waiting() and not kept.logging.wait(0.5):
            pass

    def _drain(self, run: ActiveRun) -> None:
        with self._lock:
            logging_started = self._runs[run].logging
        event = run.events.get()
        logging_started.set()
        while not event.HasField("status"):
            event = run.events.get()
        with self._lock:
            kept = self._runs.pop(run)
        if kept.timer:
            kept.timer.cancel()


def final_status_logged(cfg: Config, run_id: str) -> bool:
    """Whether the run log of `run_id` ends with its final status (the status is always its last record)."""
    if not FOLDER_NAME_RE.fullmatch(run_id):
        return False
    try:
        with run_log_path(cfg, run_id).open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    except OSError:
        return False
    with contextlib.suppress(ValueError):
        return json.loads(last).get("kind") == "status"
    return False


# ---------------------------------------------------------------- environments

class EnvSpecError(Exception):
    """The yml cannot be built as written; the message says what to change."""


class EnvBuildError(Exception):
    """Building failed; the message says why and where the log is."""


CONDA_BACKENDS = ("micromamba", "mamba", "conda")

# Without conda, a yml's conda dependencies are translated for a venv. Data, not code: edit these tables.
# conda name -> PyPI name: grayskull's curated conda-forge table (NAMES_FILE beside this file, read at run
# time), and ours, which wins over it, for what it lacks or settles otherwise.
NAMES_FILE = "conda_pypi_names.yaml"
CONDA_TO_PYPI = {
    "psycopg2": "psycopg2-binary",  # our choice: the same module as a wheel, so no libpq headers or compiler
    "py-opencv": "opencv-python",   # conda-forge's Python half of opencv; grayskull maps only `opencv`
    "opencv": "opencv-python",      # grayskull maps three PyPI names to it; this one is the full build, as conda's
    "brotli-python": "Brotli",      # conda-forge's Python half of brotli (import brotli)
    "py-xgboost": "xgboost",        # conda-forge's Python half of xgboost
    "ruamel_yaml": "ruamel.yaml",   # defaults' old name for it
}
# Conda packages a venv does without, by why: what `conda env export` lists for a Python env on linux-64
# and win-64 besides the Python packages (names starting with "_" are conda metapackages and skipped too).
CONDA_SKIPPED = {
    "installer: the venv has its own": ("pip", "setuptools", "wheel"),
    "conda metapackage or namespace, no code of its own": (
        "backports", "python_abi", "cpython", "python-gil", "nomkl", "conda-forge-pinning"),
    "system library: the OS has it, wheels bundle theirs": (
        "openssl", "ca-certificates", "sqlite", "libsqlite", "zlib", "libzlib", "xz", "liblzma", "bzip2", "tk",
        "ncurses", "readline", "libffi", "tzdata", "libuuid", "libnsl", "libxcrypt", "expat", "libexpat", "icu",
        "krb5", "libedit", "libcurl", "zstd", "lz4-c", "leveldb", "snappy", "libdeflate", "libssh2", "libnghttp2",
        "libev", "keyutils", "c-ares", "libiconv", "libxml2", "libpng", "jpeg", "libjpeg-turbo", "freetype"),
    "C/C++ runtime: the OS has it": (
        "libgcc-ng", "libgcc", "libstdcxx-ng", "libstdcxx", "libgomp", "ld_impl_linux-64", "libgfortran-ng",
        "libgfortran5", "llvm-openmp"),
    "the C/C++ half of a Python package, which its PyPI wheel bundles": (
        "libopencv", "libxgboost", "liblightgbm", "libtorch", "libarrow", "arrow-cpp", "libprotobuf", "grpc-cpp",
        "libgrpc", "libboost-python"),
    "Windows C/C++ runtime": (
        "vc", "vc14_runtime", "vs2015_runtime", "ucrt", "msys2-conda-epoch", "m2w64-gcc-libs",
        "m2w64-gcc-libs-core", "m2w64-gmp", "m2w64-libwinpthread-git"),
    "BLAS: numpy and scipy wheels bundle OpenBLAS": (
        "mkl", "intel-openmp", "tbb", "blas", "libblas", "libcblas", "liblapack", "openblas", "libopenblas",
        "mkl-service", "mkl_fft", "mkl_random"),
    "compiler: wheels need none": (
        "gcc", "gxx", "gfortran", "gcc_linux-64", "gxx_linux-64", "gfortran_linux-64", "c-compiler",
        "cxx-compiler", "fortran-compiler", "compilers", "binutils", "make"),
}
# Parts of CPython's standard library that conda packages on their own (or backports of them): conda name ->
# the module the interpreter must have. Skipped when the chosen interpreter has it; refused when none has.
CONDA_STDLIB = {"tkinter": "_tkinter", "typing": "typing", "enum34": "enum", "dataclasses": "dataclasses",
                "futures": "concurrent.futures", "contextvars": "contextvars"}
# Python packages for one platform only (sys.platform prefix): skipped on any other.
CONDA_PLATFORM_ONLY = {
    "win": ("pywin32", "pywin32-on-windows", "pywin32-ctypes", "pywinpty", "winpty", "wincertstore",
            "win_inet_pton", "win32_setctime", "menuinst"),
    "darwin": ("appnope", "pyobjc-core", "pyobjc-framework-cocoa", "libcxx"),
}
PLATFORM_NAMES = {"win": "Windows", "darwin": "macOS"}
# Programs a task calls (perl, R, bioconda's tools), not libraries: an env that lists one is refused, since a
# venv cannot have them. The evidence, any of: the name (this list; perl, perl-*, r, r-*, mro-base), a build
# against perl 5 or R 3/4 (pl5321h…, r43h…), or a `bioconda::` channel prefix on a line that is not a py* build.
CONDA_PROGRAMS = (
    "perl", "r", "r-base", "mro-base", "krona", "muscle", "mafft", "clustalo", "blast", "diamond", "hmmer",
    "samtools", "bcftools", "bedtools", "bwa", "bowtie2", "hisat2", "minimap2", "star", "salmon",
    "kallisto", "subread", "fastqc", "trimmomatic", "spades", "megahit", "prokka",
    "prodigal", "kraken2", "seqkit", "fasttree", "iqtree", "raxml-ng", "cd-hit", "picard", "gatk4", "openjdk",
    "nodejs")
PROGRAM_NAME_RE = re.compile(r"(?:perl|r)-.+")
PROGRAM_BUILD_RE = re.compile(r"(?:pl5|r[34])\d")
CUDA_WHY = ("conda-only CUDA; PyPI wheels that use CUDA (torch, jax, cupy-cuda12x) bundle their own: "
            "list those under pip:")
GDAL_WHY = ("PyPI has only GDAL's source, which needs the system's libgdal: install libgdal-dev, "
            "list GDAL==<version> under pip:")
# Conda packages with no PyPI counterpart a venv could use: a venv build that meets one fails, naming it.
CONDA_REFUSED = {
    "cudatoolkit": CUDA_WHY, "cudnn": CUDA_WHY, "nccl": CUDA_WHY,
    "gdal": GDAL_WHY, "libgdal": GDAL_WHY,
}
SKIP_WHY = {name: why for why, names in CONDA_SKIPPED.items() for name in names}
METAPACKAGE_WHY = "conda metapackage"
C_LIBRARY_WHY = "C/C++ library (not a py* build): a venv does not need it"
PROGRAM_WHY = "a conda program a task may call, not a Python library"

INSTALLED, SKIPPED, REFUSED = "installed as", "skipped", "refused"

MATCH_SPEC_RE = re.compile(r"(?:(?P<channel>[^\s:]+)::)?(?P<name>[A-Za-z0-9_][A-Za-z0-9_.+-]*)\s*"
                           r"(?:\[(?P<brackets>[^\]]*)\])?\s*(?P<rest>.*)")
BRACKET_FIELD_RE = re.compile(r"(\w+)\s*=\s*(?:'([^']*)'|\"([^\"]*)\"|([^,\s]*))")
PYTHON_VERSION_RE = re.compile(r"=?=?(\d+\.\d+)(\.\d+)?(?:\.?\*)?")
VERSION_OPERATORS = ("==", "!=", ">=", "<=", ">", "<", "~=")


@dataclasses.dataclass(frozen=True)
class CondaDep:
    spec: str       # as written in the yml
    name: str       # lower case, without its channel
    version: str    # conda's version spec ("2.1.4", "1.2.*", ">=1.2,<2"), "" for any
    fuzzy: bool     # `pkg=1.2` means 1.2.*; `pkg=1.2=build` and `pkg 1.2` mean exactly 1.2
    build: str      # the conda build string, "" when not given (e.g. `conda env export --from-history`)
    channel: str = ""  # from `channel::name`, lower case

    def pip_specifier(self, yml: Path) -> str:
        """The version as a PEP 440 specifier."""
        parts = []
        for part in filter(None, (p.strip() for p in self.version.split(","))):
            if "|" in part:
                raise EnvSpecError(f"{yml}: {self.spec!r}: pip has no 'or' between versions; pin one version")
            if part.startswith(VERSION_OPERATORS):
                parts.append(part)
            elif part.endswith("*"):
                parts.append("==" + part.rstrip(".*") + ".*")
            else:
                parts.append(f"=={part}.*" if self.fuzzy else f"=={part}")
        return ",".join(parts)


def parse_match_spec(text: str, yml: Path) -> CondaDep:
    """conda's match specs: pkg, pkg=1.2 (any 1.2.*), pkg=1.2.3=build, pkg==1.2, pkg>=1.2,<2, pkg 1.2 build,
    channel::pkg, pkg[version='>=1.2', build=py*]."""
    m = MATCH_SPEC_RE.fullmatch(text.strip())
    if not m:
        raise EnvSpecError(f"{yml}: {text!r} is not a conda package spec; "
                           f"write name, name=version or name=version=build")
    rest, build, fuzzy = m["rest"].strip(), "", False
    if m["brackets"]:
        fields = {key: single or double or bare
                  for key, single, double, bare in BRACKET_FIELD_RE.findall(m["brackets"])}
        rest, build = rest or fields.get("version", ""), fields.get("build", "")
    if rest.startswith("=") and not rest.startswith("=="):
        rest, _, build = rest[1:].partition("=")
        fuzzy = not build
    elif " " in rest:
        rest, _, build = rest.partition(" ")
    build = build.strip()
    return CondaDep(text.strip(), m["name"].lower(), rest.strip(), fuzzy, "" if build.startswith("*") else build,
                    (m["channel"] or "").lower())


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    name: str
    path: Path
    content: bytes
    python: str | None                 # "3.12" or "3.12.2"; None: the executor's own Python
    conda_deps: tuple[CondaDep, ...]   # every dependency outside pip:, python excluded
    pip_packages: tuple[str, ...]

    def digest(self, backend: str, plan: VenvPlan | None = None) -> str:
        """Content, backend and, for a venv, the interpreter actually used and the translated requirements."""
        key = backend.encode() + b"\0" + self.content + (b"\0" + plan.key().encode() if plan else b"")
        return hashlib.sha256(key).hexdigest()[:12]


def load_env_doc(path: Path) -> dict:
    import yaml  # only the server needs it

    try:
        doc = yaml.safe_load(path.read_bytes()) or {}
    except yaml.YAMLError as exc:
        raise EnvSpecError(f"{path}: not valid YAML ({exc}); fix the file") from exc
    if not isinstance(doc, dict):
        raise EnvSpecError(f"{path}: expected a mapping with 'name', 'channels', 'dependencies'")
    return doc


def env_name_of(doc: dict, path: Path) -> str:
    """conda's rule: the yml's `name:`, else (our addition) the file name. `prefix:` is ignored."""
    return str(doc.get("name") or path.stem)


def declared_env_name(path: Path) -> str:
    try:
        return env_name_of(load_env_doc(path), path)
    except (EnvSpecError, OSError):
        return path.stem  # the build reports what is wrong with the file


def parse_python_request(dep: CondaDep, yml: Path) -> str | None:
    """X.Y[.Z]; a build names CPython (h2755cc3_0, hab00c5b_0_cpython) unless it ends in _pypy."""
    if dep.build.endswith("_pypy"):
        raise EnvSpecError(f"{yml}: {dep.spec!r} is PyPy; a venv here is built on CPython: write python=X.Y "
                           f"without the build, or install micromamba to build it as it is")
    if not dep.version:
        return None
    m = PYTHON_VERSION_RE.fullmatch(dep.version)
    if not m:
        raise EnvSpecError(f"{yml}: {dep.spec!r}: say which Python with python=X.Y or python=X.Y.Z (e.g. python=3.12)")
    return m[1] + (m[2] or "")


def parse_env_yml(path: Path) -> EnvSpec:
    content = path.read_bytes()
    doc = load_env_doc(path)
    name = env_name_of(doc, path)
    if not ENV_NAME_RE.fullmatch(name):
        raise EnvSpecError(f"{path}: env name {name[:130]!r} must be 1-128 of A-Z a-z 0-9 _ . - (not starting "
                           f"with . or -); change name:")
    python: str | None = None
    conda_deps: list[CondaDep] = []
    pip_packages: list[str] = []
    for dep in doc.get("dependencies") or []:
        if isinstance(dep, dict) and set(dep) == {"pip"}:
            for item in dep["pip"] or []:
                item = str(item).strip()
                if item.startswith("-"):
                    raise EnvSpecError(f"{path}: pip option {item!r} is not supported; list package requirements only")
                pip_packages.append(item)
        elif isinstance(dep, (str, int, float)):
            parsed = parse_match_spec(str(dep), path)
            if parsed.name == "python":
                python = parse_python_request(parsed, path)
            else:
                conda_deps.append(parsed)
        else:
            raise EnvSpecError(f"{path}: dependency {dep!r} is neither a conda package spec nor a pip: list")
    return EnvSpec(name, path, content, python, tuple(conda_deps), tuple(pip_packages))


def pypi_name(requirement: str) -> str:
    """PEP 503 normalized project name of a requirement (a path or URL stays as it is)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", m[1]).lower() if m else requirement


@dataclasses.dataclass(frozen=True)
class TranslatedDep:
    outcome: str   # INSTALLED, SKIPPED or REFUSED
    spec: str      # the conda line
    name: str      # its conda package name
    target: str    # INSTALLED: the pip requirement; otherwise why


@dataclasses.dataclass(frozen=True)
class Translation:
    """What a venv build makes of a yml's conda dependencies, line by line."""
    rows: tuple[TranslatedDep, ...]
    pip_packages: tuple[str, ...]

    @property
    def requirements(self) -> list[str]:
        return [r.target for r in self.rows if r.outcome == INSTALLED] + list(self.pip_packages)

    @property
    def seed_pip(self) -> bool:
        return any(r.name == "pip" for r in self.rows)

    def of(self, outcome: str) -> list[TranslatedDep]:
        return [r for r in self.rows if r.outcome == outcome]

    @property
    def stdlib_modules(self) -> dict[str, str]:
        """module -> the conda line that needs the interpreter to have it."""
        return {CONDA_STDLIB[r.name]: r.spec for r in self.of(SKIPPED) if r.name in CONDA_STDLIB}

    def log_lines(self) -> list[str]:
        width = max((len(r.spec) for r in self.rows), default=0)
        return ([f"  {r.spec:<{width}}  {r.outcome} {r.target}" for r in self.rows] +
                [f"  pip: {' '.join(self.pip_packages) or '(none)'}"])

    def summary_lines(self) -> list[str]:
        lines = []
        if self.of(INSTALLED):
            lines.append("conda packages installed from PyPI as: " + ", ".join(
                r.target + ("" if pypi_name(r.target) == pypi_name(r.name) else f" ({r.name})")
                for r in self.of(INSTALLED)))
        by_reason: dict[str, list[str]] = {}
        for r in self.of(SKIPPED):
            by_reason.setdefault(r.target, []).append(r.name)
        lines += [f"skipped, {why}: {', '.join(names)}" for why, names in by_reason.items()]
        lines += [f"refused: {r.spec} ({r.target})" for r in self.of(REFUSED)]
        lines.append(f"pip: {', '.join(self.pip_packages) or '(none)'}")
        return lines


@functools.lru_cache(maxsize=1)
def grayskull_names() -> dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """conda name -> [(PyPI name, versions from, versions below)] from NAMES_FILE; () bounds: any version."""
    import yaml  # only the server needs it

    table: dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]] = {}
    for pypi, entry in (yaml.safe_load((HERE / NAMES_FILE).read_text()) or {}).items():
        if isinstance(entry, dict) and entry.get("conda_forge"):
            bounds = tuple(version_key(str(entry.get(key, ""))) for key in ("delimiter_min", "delimiter_max"))
            table.setdefault(str(entry["conda_forge"]).lower(), []).append((str(pypi), *bounds))
    return table


def pypi_name_of(dep: CondaDep) -> str:
    """Ours first; then grayskull's. Where several PyPI names map to one conda name, the pinned version picks
    by grayskull's ranges (pyqt 4.x -> pyqt4, 5.x -> pyqt5); among those left, the newest range, then the
    first by name. Otherwise the conda name, without a -base suffix (numpy-base is numpy)."""
    if dep.name in CONDA_TO_PYPI:
        return CONDA_TO_PYPI[dep.name]
    candidates = grayskull_names().get(dep.name, [])
    pinned = version_key(dep.version.lstrip("=<>!~"))
    fitting = [c for c in candidates
               if not pinned or ((not c[1] or c[1] <= pinned) and (not c[2] or pinned < c[2]))] or candidates
    if not fitting:
        return dep.name.removesuffix("-base")
    newest = max(c[2] or (math.inf,) for c in fitting)
    return min(c[0] for c in fitting if (c[2] or (math.inf,)) == newest)


def is_program(dep: CondaDep) -> bool:
    """perl, R and bioconda's tools: the evidence CONDA_PROGRAMS' comment lists."""
    return (dep.name in CONDA_PROGRAMS or bool(PROGRAM_NAME_RE.fullmatch(dep.name))
            or bool(PROGRAM_BUILD_RE.match(dep.build))
            or (dep.channel == "bioconda" and not dep.build.startswith("py")))


def platform_only(name: str) -> str:
    """The platform a package is for, when that is not this one ("" otherwise)."""
    return next((PLATFORM_NAMES[p] for p, names in CONDA_PLATFORM_ONLY.items()
                 if name in names and not sys.platform.startswith(p)), "")


def classify_conda_dep(dep: CondaDep, listed: set[str]) -> tuple[str, str]:
    """(outcome, PyPI name or why). Programs and the tables first; then a full export's build string tells a
    Python package (py312h06a4308_0, pyhd3eb1b0_1) from a C/C++ library (h5eee18b_0, 1_gnu); without one
    (--from-history), a package is assumed to be on PyPI."""
    if is_program(dep):
        return REFUSED, PROGRAM_WHY
    if dep.name in CONDA_REFUSED:
        return REFUSED, CONDA_REFUSED[dep.name]
    if dep.name.startswith("_"):
        return SKIPPED, METAPACKAGE_WHY
    if dep.name in CONDA_STDLIB:
        return SKIPPED, f"part of CPython (module {CONDA_STDLIB[dep.name]}), which the interpreter has"
    if platform := platform_only(dep.name):
        return SKIPPED, f"{platform} only"
    if dep.name in SKIP_WHY:
        return SKIPPED, SKIP_WHY[dep.name]
    base_of = dep.name.removesuffix("-base")
    if base_of != dep.name and base_of in listed:
        return SKIPPED, f"part of {base_of}, which is installed"
    if dep.build and not dep.build.startswith("py"):
        return SKIPPED, C_LIBRARY_WHY
    return INSTALLED, pypi_name_of(dep)


def translate(spec: EnvSpec) -> Translation:
    listed = {d.name for d in spec.conda_deps}
    pinned_by_pip = {pypi_name(p) for p in spec.pip_packages}
    rows: list[TranslatedDep] = []
    for dep in spec.conda_deps:
        outcome, target = classify_conda_dep(dep, listed)
        earlier = [r.name for r in rows if r.outcome == INSTALLED and pypi_name(r.target) == pypi_name(target)]
        if outcome == INSTALLED and pypi_name(target) in pinned_by_pip:
            outcome, target = SKIPPED, "the pip: list pins it"
        elif outcome == INSTALLED and earlier:  # opencv and py-opencv are both opencv-python
            outcome, target = SKIPPED, f"the same PyPI package as {earlier[0]}"
        elif outcome == INSTALLED:
            target += dep.pip_specifier(spec.path)
        rows.append(TranslatedDep(outcome, dep.spec, dep.name, target))
    return Translation(tuple(rows), spec.pip_packages)


@dataclasses.dataclass(frozen=True)
class Interpreter:
    path: str      # a real interpreter, not a venv's
    version: str   # "3.12.1"
    source: str    # where it was found, for the build log


PYTHON_PROBE = ("import importlib, platform, sys\n"
                "print(platform.python_version()); print(getattr(sys, '_base_executable', sys.executable))\n"
                "for module in sys.argv[1:]:\n"
                "    try: importlib.import_module(module)\n"
                "    except ImportError: print(module)\n")


def probe_python(path: str, modules: Sequence[str] = ()) -> tuple[str, str, list[str]]:
    """(version, real interpreter, which of `modules` it lacks) or EnvBuildError with the first line it printed."""
    try:
        result = subprocess.run([path, "-c", PYTHON_PROBE, *modules], capture_output=True, text=True, timeout=60,
                                env=build_environment(), stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise EnvBuildError(f"{path}: {exc.strerror}") from exc
    lines = result.stdout.split("\n")
    if result.returncode != 0 or len(lines) < 2:
        raise EnvBuildError(f"{path}: {(result.stderr.strip().splitlines() or ['exit %d' % result.returncode])[0]}")
    return lines[0], lines[1], [line for line in lines[2:] if line]


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def python_candidates(minor: str, uv: str | None) -> Iterator[tuple[str, str]]:
    """Where people keep interpreters, in this order: PATH (pyenv's shims there refuse versions not
    selected), the executor's own, pyenv's versions folder, uv's managed Pythons."""
    for folder in _env("PATH").split(os.pathsep):
        path = Path(folder or ".") / f"python{minor}"
        if path.is_file() and os.access(path, os.X_OK):
            yield str(path), "PATH"
    yield getattr(sys, "_base_executable", sys.executable), "the executor's own Python"
    versions = Path(_env("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    installed = [v for v in versions.glob(f"{minor}.*") if re.fullmatch(r"\d+\.\d+\.\d+", v.name)]
    for folder in sorted(installed, key=lambda v: version_key(v.name), reverse=True):
        yield str(folder / "bin" / f"python{minor}"), "pyenv"
    if uv and (managed := uv_managed_python(uv, minor)):
        yield managed, "uv's managed Pythons"


def uv_managed_python(uv: str, version: str) -> str | None:
    found = subprocess.run([uv, "python", "find", "--no-config", "--python-preference", "only-managed", version],
                           capture_output=True, text=True, timeout=60, env=build_environment())
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else None


def download_python(request: str, uv: str | None, log: Any, modules: Sequence[str] = ()) -> Interpreter | str:
    """uv's download (its default where the machine has internet), or why there is none."""
    if not uv:
        return "no uv to download it with"
    if _env("UV_PYTHON_DOWNLOADS") == "never":
        return "UV_PYTHON_DOWNLOADS=never"
    env = {k: v for k, v in build_environment().items() if k != "UV_PYTHON_DOWNLOADS"}
    result = subprocess.run([uv, "python", "install", "--no-config", request], capture_output=True, text=True,
                            timeout=900, env=env, stdin=subprocess.DEVNULL)
    log(f"$ uv python install {request}\n{result.stdout}{result.stderr}".rstrip())
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")] or ["error: ?"]
        return "uv could not download it: " + errors[0].removeprefix("error: ")
    managed = uv_managed_python(uv, request)
    if managed is None:
        return "uv installed it but cannot find it"
    version, real, lacking = probe_python(managed, modules)
    if lacking:
        return f"uv's download has no {', '.join(lacking)}"
    return Interpreter(real, version, "uv's managed Pythons (downloaded now)")


def find_python(version: str | None, yml: Path, uv: str | None = None, log: Any = lambda line: None,
                needs: dict[str, str] | None = None) -> Interpreter:
    """The interpreter for `python=X.Y[.Z]`: the exact version if one is found, else the same X.Y; in either
    case one that has the modules `needs` names (module -> the yml line that needs it)."""
    needs = needs or {}
    if version is None:
        version = "%d.%d" % sys.version_info[:2]
        if not needs:
            own = getattr(sys, "_base_executable", sys.executable)
            return Interpreter(own, "%d.%d.%d" % sys.version_info[:3], "the executor's own Python (the yml pins none)")
    minor = ".".join(version.split(".")[:2])
    nearest: Interpreter | None = None
    tried: list[str] = []
    lacking: dict[str, list[str]] = {}
    for path, source in python_candidates(minor, uv):
        try:
            found, real, missing = probe_python(path, list(needs))
        except EnvBuildError as exc:
            tried.append(str(exc))
            continue
        if not found.startswith(minor + "."):
            tried.append(f"{path}: Python {found}")
        elif missing:
            lacking.setdefault(real, missing)
        elif found == version or version == minor:
            return Interpreter(real, found, source)
        elif nearest is None:
            nearest = Interpreter(real, found, f"{source} (the yml pins {version}; the patch level differs)")
    if nearest:
        return nearest
    downloaded = download_python(version, uv, log, list(needs))
    if isinstance(downloaded, Interpreter):
        return downloaded
    if lacking:
        absent = sorted({m for missing in lacking.values() for m in missing})
        found_without = "; ".join(f"{path}: no {', '.join(missing)}" for path, missing in lacking.items())
        raise EnvSpecError(
            f"{yml}: {', '.join(needs[m] for m in absent)}: part of CPython, but no Python {minor} here has "
            f"{', '.join(absent)} ({found_without}; {downloaded}). Install a Python {minor} built with it (e.g. "
            f"`pyenv install {minor}` with Tk's headers present, or `uv python install {minor}`), or remove the line.")
    raise EnvBuildError(
        f"Python {version} is not available (not on PATH, in pyenv's versions or among uv's managed Pythons; "
        f"{downloaded}; tried: {'; '.join(dict.fromkeys(tried)) or 'nothing'}). Install it (`pyenv install {version}` "
        f"or `uv python install {version}`), or change 'python={version}' in {yml}.")


def find_uv() -> str | None:
    beside_python = Path(sys.executable).parent / "uv"
    return shutil.which("uv") or (str(beside_python) if beside_python.exists() else None)


def detect_backend(choice: str) -> str:
    if choice in ("auto", "conda"):
        for tool in CONDA_BACKENDS:
            if shutil.which(tool):
                return tool
        if choice == "conda":
            raise SystemExit("--backend conda: none of micromamba, mamba, conda is on PATH")
    return "venv+uv" if find_uv() else "venv+pip"


@dataclasses.dataclass(frozen=True)
class VenvPlan:
    """How a venv backend builds a yml: which interpreter, which requirements."""
    python: Interpreter
    translation: Translation

    def key(self) -> str:
        return "\n".join([self.python.path, self.python.version, f"seed_pip={self.translation.seed_pip}",
                          *self.translation.requirements])

    def python_line(self) -> str:
        return f"Python {self.python.version} from {self.python.source}: {self.python.path}"

    def summary(self) -> str:
        return "\n".join([self.python_line(), *self.translation.summary_lines()])

    def short(self) -> str:
        t = self.translation
        return (f"Python {self.python.version}; conda: {len(t.of(INSTALLED))} from PyPI, {len(t.of(SKIPPED))} skipped; "
                f"pip: {len(t.pip_packages)}")


def plan_venv(spec: EnvSpec, uv: str | None, log: Any = lambda line: None) -> VenvPlan:
    """Translate the conda dependencies (refusing those a venv cannot have), then find the interpreter."""
    translation = translate(spec)
    log("conda dependencies, translated for a venv (no conda/mamba/micromamba on PATH):")
    for line in translation.log_lines():
        log(line)
    refused = translation.of(REFUSED)
    if programs := [r.name for r in refused if r.target == PROGRAM_WHY]:
        raise EnvSpecError(
            f"{spec.path}: {', '.join(programs)} {'is a conda program' if len(programs) == 1 else 'are conda programs'}"
            f" a task may call, which a venv cannot have: use the conda backend (install micromamba and restart "
            f"the executor) or remove {'it' if len(programs) == 1 else 'them'}.")
    if refused:
        raise EnvSpecError(
            f"{spec.path}: {'; '.join(f'{r.spec} ({r.target})' for r in refused)}: no PyPI counterpart, and no "
            f"conda/mamba/micromamba is on PATH. Remove {'it' if len(refused) == 1 else 'them'}, list a PyPI "
            f"equivalent under pip:, or install micromamba.")
    plan = VenvPlan(find_python(spec.python, spec.path, uv, log, translation.stdlib_modules), translation)
    log(plan.python_line())
    return plan


# ---- asking the package index, before anything is installed

def uv_compile(uv: str, python: str, requirements: Sequence[str], *options: str) -> subprocess.CompletedProcess:
    """`uv pip compile` of `requirements` for `python`: resolves against the index, installs nothing."""
    return subprocess.run([uv, "pip", "compile", "--no-config", "--no-header", "--no-annotate", "--quiet",
                           "--python", python, *options, "-"], input="\n".join(requirements), capture_output=True,
                          text=True, timeout=900, env=build_environment())


def unresolvable(result: subprocess.CompletedProcess, names: set[str]) -> set[str] | None:
    """The project names among `names` that uv's "no solution" names; None when uv failed otherwise (the
    index could not be reached, ...)."""
    if "No solution found" not in result.stderr:
        return None
    return {pypi_name(word) for word in re.findall(r"[A-Za-z0-9][A-Za-z0-9._-]*", result.stderr)} & names


def index_failure(result: subprocess.CompletedProcess) -> EnvBuildError:
    first = next((line for line in result.stderr.splitlines() if line.strip()), f"exit {result.returncode}")
    return EnvBuildError(f"could not ask the package index ({first.strip()}); the build is tried again at the "
                         f"executor's next start")


EXACT_PIN_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\d+(?:\.\d+)*)")  # a release: no pre, post or local part


def pins_by_index(translation: Translation, uv: str, python: str,
                  log: Any) -> tuple[dict[str, str], list[TranslatedDep]]:
    """For each conda line installed from PyPI: its requirement as PyPI can meet it (`==X.Y.Z` when PyPI has
    X.Y.Z, `==X.Y.Z.*` when it has only X.Y.Z.N, as opencv-python's 4.6.0.66 for conda's 4.6.0), and the lines
    PyPI cannot meet at all. One lowest-version resolve without dependencies asks the index for all of them."""
    asked = {}
    for row in translation.of(INSTALLED):
        exact = EXACT_PIN_RE.fullmatch(row.target)
        asked[row] = f"{exact[1]}=={exact[2]}.*" if exact else row.target
    missing: list[TranslatedDep] = []
    while asked:
        result = uv_compile(uv, python, list(asked.values()), "--no-deps", "--resolution", "lowest-direct")
        if result.returncode == 0:
            break
        log(f"$ uv pip compile --no-deps --resolution lowest-direct (conda lines)\n{result.stderr.rstrip()}")
        named = unresolvable(result, {pypi_name(r) for r in asked.values()})
        if not named:
            raise index_failure(result)
        missing += [row for row, req in asked.items() if pypi_name(req) in named]
        asked = {row: req for row, req in asked.items() if pypi_name(req) not in named}
    found = dict(line.split("==", 1) for line in result.stdout.split() if "==" in line) if asked else {}
    found = {pypi_name(name): version for name, version in found.items()}
    pins = {}
    for row in asked:
        exact = EXACT_PIN_RE.fullmatch(row.target)
        has = found.get(pypi_name(row.target), "")
        longer = exact and has.startswith(exact[2] + ".") and has[len(exact[2]) + 1:].isdigit()
        pins[row.spec] = f"{exact[1]}=={exact[2]}.*" if longer else row.target
    return pins, missing


def settle_with_index(spec: EnvSpec, plan: VenvPlan, uv: str, log: Any) -> VenvPlan:
    """The plan with its pins as PyPI has them, checked to resolve as a whole before anything is installed;
    otherwise an EnvSpecError naming the yml lines responsible and what to change."""
    python = plan.python.path
    pins, missing = pins_by_index(plan.translation, uv, python, log)
    where = f"PyPI (for Python {plan.python.version})"
    if missing:
        raise EnvSpecError(
            f"{spec.path}: {', '.join(f'{r.spec} (as {r.target})' for r in missing)}: not on {where} at that "
            f"version: change the version, remove the line, or list the PyPI package that provides it under pip:")
    rows = tuple(dataclasses.replace(r, target=pins.get(r.spec, r.target)) if r.outcome == INSTALLED else r
                 for r in plan.translation.rows)
    translation = dataclasses.replace(plan.translation, rows=rows)
    log("versions as the index has them: " + (", ".join(
        f"{r.spec} -> {r.target}" for r in translation.of(INSTALLED)) or "(no conda lines installed)"))
    result = uv_compile(uv, python, translation.requirements)
    if result.returncode != 0:
        log(f"$ uv pip compile (everything, with dependencies)\n{result.stderr.rstrip()}")
        lines = {pypi_name(r.target): r.spec for r in translation.of(INSTALLED)}
        lines.update({pypi_name(p): f"pip: {p}" for p in translation.pip_packages})
        named = unresolvable(result, set(lines))
        if named is None:
            raise index_failure(result)
        culprits = [line for name, line in lines.items() if name in named] or list(lines.values())
        raise EnvSpecError(
            f"{spec.path}: {', '.join(culprits)}: cannot be installed together from {where}: change "
            f"{'its version' if len(culprits) == 1 else 'their versions so they agree'} (or drop a pin and let the "
            f"others choose); the build log has the resolver's reasoning")
    log("resolved: " + " ".join(result.stdout.split()))
    return dataclasses.replace(plan, translation=translation)


def build_commands(backend: str, spec: EnvSpec, prefix: Path, plan: VenvPlan | None = None) -> list[list[str]]:
    """The commands that build `spec` into `prefix` (which must not exist yet). Conda tools get the file as it is."""
    if backend in CONDA_BACKENDS:
        tool = shutil.which(backend) or backend
        verb = ["create", "--yes"] if backend == "micromamba" else ["env", "create"]
        return [[tool, *verb, "-p", str(prefix), "-f", str(spec.path)]]
    plan = plan or plan_venv(spec, find_uv())
    env_python = str(prefix / "bin" / "python")
    requirements = plan.translation.requirements
    if backend == "venv+uv":
        uv = find_uv() or "uv"
        # Copies, not uv's default hard links into its cache: seal_env's chmod must not reach the cache or
        # other envs that share a file.
        commands = [[uv, "venv", "--no-config", "--link-mode", "copy", "--python", plan.python.path,
                     *(["--seed"] if plan.translation.seed_pip else []), str(prefix)]]
        if requirements:
            commands.append([uv, "pip", "install", "--no-config", "--link-mode", "copy", "--python", env_python,
                             *requirements])
    else:
        commands = [[plan.python.path, "-m", "venv", str(prefix)]]
        if requirements:
            commands.append([env_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                             *requirements])
    return commands


def compile_command(prefix: Path) -> list[str]:
    """Every module compiled at build time, so that no task run writes bytecode into the sealed env."""
    compile_all = "import compileall, sys; compileall.compile_dir(sys.argv[1], quiet=2, workers=0)"
    return [str(prefix / "bin" / "python"), "-c", compile_all, str(prefix / "lib")]


NOT_ON_PYPI_RES = (re.compile(r"Because ([A-Za-z0-9._-]+) was not found in the package registry"),
                   re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)"))


def not_on_pypi(log_text: str, translation: Translation) -> list[str]:
    """The conda lines whose translation the installer could not find on PyPI."""
    missing = {pypi_name(m) for regex in NOT_ON_PYPI_RES for m in regex.findall(log_text)}
    return [r.spec for r in translation.of(INSTALLED) if pypi_name(r.target) in missing]


def tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


READY_MARKER = ".vpe-ready"
MANIFEST = ".vpe-manifest"
SUMMARY_FILE = ".vpe-summary"


def file_table(root: Path, describe: Any) -> dict[str, Any]:
    """relative path -> describe(lstat) of everything under root (symlinks not followed), the manifest excepted."""
    table = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile: then it counts as removed
                if rel != MANIFEST:
                    table[rel] = describe(os.lstat(path), path)
    return table


def manifest_entry(st: os.stat_result, path: str) -> str:
    """What survives a copy into a Docker layer: size, whole-second mtime, mode, symlink target."""
    target = os.readlink(path) if os.path.islink(path) else ""
    return f"{st.st_size}\t{int(st.st_mtime)}\t{st.st_mode:o}\t{target}"


def describe_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    changes = ([f"added {p}" for p in after.keys() - before.keys()] +
               [f"removed {p}" for p in before.keys() - after.keys()] +
               [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]])
    return ", ".join(sorted(changes)[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")


def seal_env(prefix: Path) -> None:
    """Read-only mode bits (they stop a task running as another user) and a manifest of every file.
    Root ignores mode bits, so EnvManager compares the files with the manifest when it reuses a build, and tasks
    get read-only mounts (TaskLauncher) or, where there can be none, the env is watched (EnvWatch)."""
    for folder, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, os.lstat(path).st_mode & ~0o222)
    manifest = file_table(prefix, manifest_entry)
    (prefix / MANIFEST).write_text("".join(f"{rel}\t{entry}\n" for rel, entry in sorted(manifest.items())))
    os.chmod(prefix / MANIFEST, 0o444)
    os.chmod(prefix, prefix.stat().st_mode & ~0o222)


# What a change to an env's files raises: writes, chmod/chown/utime/link count, creation, removal and renames.
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = (
    0x2, 0x4, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800)
IN_Q_OVERFLOW, IN_DONT_FOLLOW = 0x4000, 0x2000000
ENV_CHANGES = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
               | IN_MOVE_SELF | IN_DONT_FOLLOW)
INOTIFY_EVENT = struct.Struct("iIII")


class EnvWatch:
    """An inotify watch on every file and folder of a ready env, for where tasks cannot get read-only mounts. A
    change made through any path, a hard link too, queues an event at once, so whether the env changed since it
    became ready is one read, whatever its size. It sees nothing while the executor is down: the manifest covers
    that."""

    def __init__(self, prefix: Path):
        self._fd = libc_call("inotify_init1", os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()  # runs look at once; close() must not free an fd number a read may use
        self._paths: dict[int, str] = {}
        self.changes_seen: list[str] = []
        try:
            for folder, _, files in os.walk(prefix):
                for path in (folder, *(os.path.join(folder, name) for name in files)):
                    wd = libc_call("inotify_add_watch", self._fd, path.encode(), ENV_CHANGES)
                    self._paths[wd] = os.path.relpath(path, prefix)
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot watch {prefix} ({exc}); if the watches ran out, raise "
                                     f"fs.inotify.max_user_watches") from None

    def changes(self) -> str:
        """What changed since the watch began ("" when nothing did)."""
        with self._lock:
            while self._fd >= 0:
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    break
                self._note(data)
        seen = self.changes_seen
        return ", ".join(f"changed {p}" for p in seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")

    def _note(self, data: bytes) -> None:
        """Adds the paths of a read's events to changes_seen."""
        offset = 0
        while offset < len(data):
            wd, mask, _, size = INOTIFY_EVENT.unpack_from(data, offset)
            name = data[offset + INOTIFY_EVENT.size:offset + INOTIFY_EVENT.size + size].rstrip(b"\0").decode(
                errors="replace")
            offset += INOTIFY_EVENT.size + size
            where = "more than the watch could queue" if mask & IN_Q_OVERFLOW else os.path.normpath(
                os.path.join(self._paths.get(wd, "?"), name))
            if where not in self.changes_seen:
                self.changes_seen.append(where)

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def manifest_changes(prefix: Path) -> str:
    """How the build's files differ from its manifest ("" when they do not)."""
    try:
        lines = (prefix / MANIFEST).read_text().splitlines()
    except OSError:
        return f"no {MANIFEST}"
    recorded = dict(line.split("\t", 1) for line in lines if "\t" in line)
    return describe_changes(recorded, file_table(prefix, manifest_entry))


def remove_tree(path: Path) -> None:
    """rmtree, after giving back the write bits seal_env took (an owner that is not root needs them)."""
    if path.is_symlink() or not path.is_dir():
        return
    for folder, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(folder, os.lstat(folder).st_mode | 0o700)
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class EnvRecord:
    name: str
    yml: Path
    state: int = pb2.ENV_BUILDING
    prefix: Path | None = None       # the ready env in use
    spec_hash: str = ""
    detail: str = "waiting to build"
    stale: bool = False
    refusal: str = ""                # why the yml is not built at all (two files claim its name)
    summary: str = ""                # what a venv build made of the yml
    watch: EnvWatch | None = None    # the ready env's files, where tasks have no read-only mounts


class EnvManager:
    """Builds every envs/*.yml once per content hash into $VPE_HOME/envs/<name>-<hash>, switching the
    $VPE_HOME/envs/<name> symlink only after a complete build, so a failed build keeps the previous env.
    An env is known by its yml's `name:` (else the file name); a built env is sealed, and one whose
    files changed since (a task wrote into it) is rebuilt before the next run. `watch`: tasks have no read-only
    mounts, so every ready env is watched."""

    def __init__(self, cfg: Config, backend: str, watch: bool):
        self._cfg = cfg
        self.backend = backend
        self._watch = watch
        self._lock = threading.Lock()
        self._records: dict[str, EnvRecord] = {}
        self._build_procs: set[subprocess.Popen] = set()
        self._stopping = threading.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="env-build")
        claims: dict[str, list[Path]] = {}
        for yml in sorted(cfg.envs_dir.glob("*.yml")):
            claims.setdefault(declared_env_name(yml), []).append(yml)
        for name, ymls in claims.items():
            if not ENV_NAME_RE.fullmatch(name):  # unsafe as a folder name: known by its file name, the build says why
                self._records.update({yml.stem: EnvRecord(yml.stem, yml) for yml in ymls})
                continue
            duplicated = (f"{' and '.join(map(str, ymls))} all declare name: {name}; an env name must be unique, so "
                          f"none of them is built: change name: in all but one") if len(ymls) > 1 else ""
            self._records[name] = EnvRecord(name, ymls[0], refusal=duplicated)

    def build_log(self, name: str) -> Path:
        return self._cfg.logs_dir / f"env-{name}.log"

    def start_builds(self) -> None:
        if not self._records:
            log.warning("no envs: %s has no *.yml files", self._cfg.envs_dir)
        for record in self._records.values():
            self._pool.submit(self._build, record)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            procs = list(self._build_procs)
        for proc in procs:
            kill_group(proc.pid, signal.SIGKILL)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def statuses(self) -> list:
        with self._lock:
            records = [dataclasses.replace(r) for r in self._records.values()]
        return [self._status(r) for r in records]

    def _status(self, r: EnvRecord):
        show_log = r.state != pb2.ENV_READY or r.stale
        return pb2.EnvStatus(
            name=r.name, state=r.state, spec_hash=r.spec_hash, backend=self.backend, detail=r.detail,
            log_tail=tail(self.build_log(r.name)) if show_log else r.summary, log_path=str(self.build_log(r.name)),
            stale=r.stale)

    def lookup(self, name: str) -> EnvRecord | None:
        """The env by name, checked first where it is watched: a ready env whose files changed since it became
        ready is taken out of service and rebuilt."""
        with self._lock:
            record = self._records.get(name)
            if record is None:
                return None
            prefix, watch = record.prefix, record.watch
        if prefix is not None and watch is not None and (changes := watch.changes()):
            self._rebuild_changed(record, prefix, changes)
        with self._lock:
            return dataclasses.replace(record)

    def names(self) -> list[str]:
        return sorted(self._records)

    def _update(self, record: EnvRecord, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(record, key, value)

    def _rebuild_changed(self, record: EnvRecord, prefix: Path, changes: str) -> None:
        with self._lock:
            if record.prefix != prefix or self._stopping.is_set():
                return  # another run noticed first, or the executor is stopping
            watch = record.watch
            record.state, record.prefix, record.watch, record.stale = pb2.ENV_BUILDING, None, None, False
            record.detail = (f"rebuilding: its files changed after the build ({changes}); a task wrote into "
                             f"{prefix}, and nothing may")
        log.warning("env %s: files changed after the build (%s); removing %s and rebuilding",
                    record.name, changes, prefix)
        watch.close()
        remove_tree(prefix)
        self._pool.submit(self._build, record)

    def _build(self, record: EnvRecord) -> None:
        link = self._cfg.built_envs_dir / record.name
        resolved = link.resolve()
        previous = resolved if (link / READY_MARKER).exists() and not manifest_changes(resolved) else None
        build_log = self.build_log(record.name)
        try:
            build_log.parent.mkdir(parents=True, exist_ok=True)
            with build_log.open("w") as out:
                self._build_logged(record, out)
        except (EnvSpecError, EnvBuildError, OSError, subprocess.SubprocessError) as exc:
            self._fail(record, previous, str(exc))
        except Exception as exc:  # a bug must not leave the env "building" forever: say so and keep going
            log.exception("env %s: build crashed", record.name)
            self._fail(record, previous, f"internal error {exc!r}; see the executor log")

    def _build_logged(self, record: EnvRecord, out) -> None:
        def note(line: str) -> None:
            out.write(line + "\n")
            out.flush()

        if record.refusal:
            raise EnvSpecError(record.refusal)
        spec = parse_env_yml(record.yml)
        note(f"# env {spec.name} from {spec.path} with {self.backend}")
        plan = None if self.backend in CONDA_BACKENDS else plan_venv(spec, find_uv(), note)
        digest = spec.digest(self.backend, plan)
        prefix = self._cfg.built_envs_dir / f"{record.name}-{digest}"
        about = f"; {plan.short()}" if plan else ""
        if (prefix / READY_MARKER).exists():
            changed = manifest_changes(prefix)
            if not changed:
                note(f"# cached build {digest}: ready")
                self._activate(record, prefix, digest, f"ready (cached build {digest}){about}", plan)
                log.info("env %s: ready, cached build %s", record.name, digest)
                return
            note(f"# cached build {digest} changed since it was built ({changed}); rebuilding")
        self._update(record, detail=f"building {digest} with {self.backend} (log: {self.build_log(record.name)})")
        log.info("env %s: building %s with %s; log %s", record.name, digest, self.backend, self.build_log(record.name))
        started = time.monotonic()
        if plan and (uv := find_uv()):
            plan = settle_with_index(spec, plan, uv, note)
        self._build_into(spec, plan, prefix, out)
        took = time.monotonic() - started
        self._activate(record, prefix, digest, f"ready (built {digest} in {took:.1f}s){about}", plan)
        log.info("env %s: ready, built %s in %.1fs", record.name, digest, took)

    def _build_into(self, spec: EnvSpec, plan: VenvPlan | None, prefix: Path, out) -> None:
        remove_tree(prefix)  # a half-built leftover from a crash, or a cached build that was changed
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for command in build_commands(self.backend, spec, prefix, plan):
            self._run_build_step(command, out, spec, plan, prefix)
        if (prefix / "bin" / "python").exists():  # a conda env may have no Python
            self._run_build_step(compile_command(prefix), out, spec, plan, prefix)
        (prefix / READY_MARKER).write_text(f"{spec.path}\n")
        if plan:  # what the index made of the pins, for `envs` when a later start reuses this build
            (prefix / SUMMARY_FILE).write_text(plan.summary())
        seal_env(prefix)

    def _run_build_step(self, command: list[str], out, spec: EnvSpec, plan: VenvPlan | None, prefix: Path) -> None:
        if self._stopping.is_set():
            raise EnvBuildError("executor is shutting down")
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=build_environment(), cwd=prefix.parent, start_new_session=True)
        with self._lock:
            self._build_procs.add(proc)
        if self._stopping.is_set():  # stop() may have collected the build processes just before the add
            kill_group(proc.pid, signal.SIGKILL)
        try:
            code = proc.wait()
        finally:
            with self._lock:
                self._build_procs.discard(proc)
        if code != 0:
            remove_tree(prefix)
            missing = not_on_pypi(tail(self.build_log(spec.name), 200), plan.translation) if plan else []
            raise EnvBuildError(
                (f"{', '.join(missing)}: not on PyPI under the translated name; " if missing else "") +
                f"`{Path(command[0]).name} {command[1]}` exited with {code}; "
                f"see {self.build_log(spec.name)} and fix {spec.path}")

    def _activate(self, record: EnvRecord, prefix: Path, digest: str, detail: str, plan: VenvPlan | None) -> None:
        link = prefix.parent / record.name
        tmp_link = prefix.parent / f".{record.name}.{os.getpid()}.link"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(prefix.name)
        os.replace(tmp_link, link)
        for old in prefix.parent.glob(f"{record.name}-*"):
            if old != prefix and re.fullmatch(rf"{re.escape(record.name)}-[0-9a-f]{{12}}", old.name):
                remove_tree(old)
        summary = ""
        if plan:
            with contextlib.suppress(OSError):
                summary = (prefix / SUMMARY_FILE).read_text()
        self._update(record, state=pb2.ENV_READY, prefix=prefix, spec_hash=digest, detail=detail, stale=False,
                     summary=summary or (plan.summary() if plan else ""), watch=self._watch_of(record, prefix))

    def _watch_of(self, record: EnvRecord, prefix: Path) -> EnvWatch | None:
        """A new watch on `prefix` where envs are watched (the record's old one is closed)."""
        if record.watch is not None:
            record.watch.close()
        return EnvWatch(prefix) if self._watch else None

    def _fail(self, record: EnvRecord, previous: Path | None, reason: str) -> None:
        log.error("env %s: build failed: %s", record.name, reason)
        watch = None
        if previous is not None:
            try:
                watch = self._watch_of(record, previous)
            except OSError as exc:
                previous, reason = None, f"{reason}; the previous build cannot serve either: {exc}"
        if previous is not None:
            digest = previous.name.rsplit("-", 1)[-1]
            self._update(record, state=pb2.ENV_READY, prefix=previous, spec_hash=digest, stale=True, watch=watch,
                         detail=f"rebuild failed, still running the previous build {digest}: {reason}")
        else:
            self._update(record, state=pb2.ENV_FAILED, prefix=None, watch=None, detail=f"build failed: {reason}")


# What an env build gets of the executor's environment: where to find tools, and what pip, uv and conda
# need to reach their index (proxies, CA bundles, index and cache settings). Never the token, DSN or secrets.
BUILD_ENV_NAMES = (
    "PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYENV_ROOT", "XDG_CACHE_HOME", "XDG_DATA_HOME",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_FIND_LINKS", "PIP_CERT", "PIP_CACHE_DIR",
    "PIP_DEFAULT_TIMEOUT", "UV_INDEX", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS",
    "UV_CACHE_DIR", "UV_NATIVE_TLS", "UV_HTTP_TIMEOUT", "UV_PYTHON_INSTALL_DIR",
    "MAMBA_ROOT_PREFIX", "MAMBA_EXE", "CONDA_PKGS_DIRS", "CONDARC", "MAMBARC",
)


def build_environment() -> dict[str, str]:
    env = {name: os.environ[name] for name in BUILD_ENV_NAMES if name in os.environ}
    env.setdefault("LANG", "C.UTF-8")
    env["UV_PYTHON_DOWNLOADS"] = "never"  # a download is its own, logged step (download_python)
    env["UV_NO_PROGRESS"] = "1"
    env["CONDA_ALWAYS_COPY"] = env["MAMBA_ALWAYS_COPY"] = "true"  # as --link-mode copy for uv (build_commands)
    return env


# ---------------------------------------------------------------- the server: auth, TLS, serve, shut down

class TokenAuth(grpc.ServerInterceptor):
    """`authorization: Bearer <token>` on every call except the standard health check."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                                 "missing or wrong token: send metadata 'authorization: Bearer <VPE_EXECUTOR_TOKEN>'")


def _refusing_handler(handler, code: grpc.StatusCode, message: str):
    def refuse(request, context):
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def server_credentials(cfg: Config) -> grpc.ServerCredentials | None:
    if not (cfg.tls_cert or cfg.tls_key):
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise SystemExit("TLS needs both VPE_EXECUTOR_TLS_CERT and VPE_EXECUTOR_TLS_KEY (or --tls-cert/--tls-key)")
    ca = _read(cfg.tls_ca)
    return grpc.ssl_server_credentials([(_read(cfg.tls_key), _read(cfg.tls_cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def serve(cfg: Config) -> int:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    backend = detect_backend(cfg.backend)
    store = WorkspaceStore(cfg.workspace_store) if cfg.workspace_store else None
    for folder in (cfg.built_envs_dir, cfg.buffer_dir, cfg.logs_dir, cfg.run_logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    containment = Containment(cfg)
    lost = containment.recover()
    envs = EnvManager(cfg, backend, watch=not containment.launcher.read_only)
    servicer = ExecutorServicer(cfg, envs, containment, store)
    workers = cfg.max_concurrent + cfg.max_queue + 16  # every streaming Run holds a thread; keep spares for Ping/Cancel
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         options=GRPC_OPTIONS, maximum_concurrent_rpcs=workers,
                         interceptors=[TokenAuth(cfg.token)] if cfg.token else [])
    pb2_grpc.add_ExecutorServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    credentials = server_credentials(cfg)
    try:
        if credentials:
            server.add_secure_port(cfg.target, credentials)
        else:
            server.add_insecure_port(cfg.target)
    except RuntimeError as exc:
        log.error("cannot listen on %s (%s); is another executor running? pick another VPE_EXECUTOR_PORT", cfg.target, exc)
        containment.stop()
        return 1
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.token and credentials):
        log.warning("listening on %s without %s: anyone who can reach it can run the task scripts; "
                    "set VPE_EXECUTOR_TOKEN and VPE_EXECUTOR_TLS_CERT/KEY", cfg.target,
                    "a token or TLS" if not (cfg.token or credentials) else "a token" if not cfg.token else "TLS")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("executor %s listening on %s (%s, %s); envs from %s (backend %s), tasks from %s, home %s",
             __version__, cfg.target, "TLS" if credentials else "plaintext", "token auth" if cfg.token else "no auth",
             cfg.envs_dir, backend, cfg.tasks_dir, cfg.home)
    log.info("workspaces: %s", f"shared through the workspace store {store.name}" if store else
             f"on this replica's disk only ({cfg.buffer_dir})")
    log.info("containment: %s%s", containment.mechanism,
             f"; {len(lost)} runs left by a previous executor were killed and reported lost" if lost else "")
    envs.start_builds()
    threading.Thread(target=keep_pruning, args=(cfg, servicer, stop), name="retention", daemon=True).start()
    # Never an endless wait: the kernel may hand SIGTERM to another thread, and then its handler runs only once
    # the main thread wakes (an executor waiting without a timeout ignored about one SIGTERM in ten).
    while not stop.wait(1.0):
        pass
    log.info("shutting down: no new runs; running tasks get %.0fs to finish", cfg.shutdown_grace)
    health_servicer.enter_graceful_shutdown()
    servicer.shutting_down.set()
    shutdown(servicer, cfg)
    envs.stop()
    server.stop(grace=2).wait()
    containment.stop()
    log.info("stopped")
    return 0


def keep_pruning(cfg: Config, servicer: ExecutorServicer, stop: threading.Event) -> None:
    while True:
        try:
            apply_retention(cfg, servicer.paths_in_use, servicer.store)
        except (OSError, WorkspaceStoreError) as exc:
            log.warning("retention: %s; retrying in %.0f s", exc, RETENTION_INTERVAL)
        if stop.wait(RETENTION_INTERVAL):
            return


def shutdown(servicer: ExecutorServicer, cfg: Config) -> None:
    for run in servicer.active_runs():
        if not run.process_started.is_set():
            run.cancel("executor shutdown before the run left the queue")
    deadline = time.monotonic() + cfg.shutdown_grace
    while servicer.active_runs() and time.monotonic() < deadline:
        time.sleep(0.1)
    for run in servicer.active_runs():
        log.info("run %s: killing its processes (shutdown grace over)", run.plan.run_id)
        run.cancel("executor shutdown")
    deadline = time.monotonic() + cfg.kill_grace + 2
    while servicer.active_runs() and time.monotonic() < deadline:
        time.sleep(0.05)
    for run in servicer.active_runs():
        log.warning("run %s: processes still left after the kill; the next executor start kills them", run.plan.run_id)


# ---------------------------------------------------------------- the client

class ExecutorClient:
    """Client for an existing channel (e.g. from Airflow's GrpcHook.get_conn()). No Airflow imports here."""

    def __init__(self, channel: grpc.Channel, token: str | None = None):
        self._stub = pb2_grpc.ExecutorStub(channel)
        self._metadata = auth_metadata(token)

    def ping(self, timeout: float = 5.0):
        return self._stub.Ping(pb2.PingRequest(), timeout=timeout, metadata=self._metadata)

    def list_envs(self, timeout: float = 5.0):
        return self._stub.ListEnvs(pb2.ListEnvsRequest(), timeout=timeout, metadata=self._metadata).envs

    def run(self, env: str, task: str, args: Sequence[str] = (), env_vars: dict[str, str] | None = None,
            timeout_seconds: float = 0.0, run_id: str = "", rpc_timeout: float | None = None, workspace: str = "",
            limits: dict[str, float] | None = None, keep_alive_seconds: float = 0.0):
        """Iterator of RunEvent (line / queued / started, then one status). Call .cancel() on it to stop
        the run (the executor kills all its processes), unless keep_alive_seconds > 0: then the run goes on
        that long without a client, for an Attach to pick up. Runs given the same workspace share its folder.
        `limits` takes RunLimits fields (memory_bytes, cpu_seconds, processes, open_files, output_bytes)."""
        request = pb2.RunRequest(env=env, task=task, args=list(args), env_vars=env_vars or {},
                                 timeout_seconds=timeout_seconds, run_id=run_id, workspace=workspace,
                                 limits=pb2.RunLimits(**(limits or {})), keep_alive_seconds=keep_alive_seconds)
        return self._stub.Run(request, timeout=rpc_timeout, metadata=self._metadata)

    def attach(self, run_id: str, from_seq: int = 0, running_only: bool = False, rpc_timeout: float | None = None):
        """Iterator of the run's RunEvents from `from_seq` on (replayed, then followed live), ending with its
        status. Cancelling this call leaves the run alone."""
        request = pb2.AttachRequest(run_id=run_id, from_seq=from_seq, running_only=running_only)
        return self._stub.Attach(request, timeout=rpc_timeout, metadata=self._metadata)

    def cancel(self, run_id: str, timeout: float = 5.0):
        return self._stub.Cancel(pb2.CancelRequest(run_id=run_id), timeout=timeout, metadata=self._metadata)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries the executor's token."""
    return (("authorization", f"Bearer {token}"),) if token else None


def open_channel(target: str, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 server_name: str = "", aio: bool = False):
    """Plaintext unless a CA (or the server's self-signed cert) is given; cert+key also given = mutual TLS.
    `server_name`: the name the TLS certificate carries when `target` is one replica's address.
    `aio`: a grpc.aio channel, for asyncio code (e.g. an Airflow trigger)."""
    channels = grpc.aio if aio else grpc
    root = _read(tls_ca) or _read(tls_cert)
    if root is None:
        return channels.insecure_channel(target, options=GRPC_OPTIONS)
    client_pair = (_read(tls_key), _read(tls_cert)) if tls_ca and tls_cert and tls_key else (None, None)
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=client_pair[0],
                                               certificate_chain=client_pair[1])
    options = GRPC_OPTIONS + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
    return channels.secure_channel(target, credentials, options=options)


def split_target(target: str) -> tuple[str, int]:
    """(host, port) of `host:port`, `[v6]:port` or `dns:///host:port`."""
    address = re.sub(r"^dns:(//[^/]*/)?", "", target)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"executor address {target!r} is not host:port")
    return host.strip("[]"), int(port)


def listed_addresses(target: str) -> list[str] | None:
    """The replicas of gRPC's own multi-address target, `ipv4:10.0.0.1:3170,10.0.0.2:3170` (or `ipv6:[::1]:3170,...`);
    None for any other target. Each address must be host:port."""
    scheme, colon, rest = target.partition(":")
    if scheme not in ("ipv4", "ipv6") or not colon:
        return None
    addresses = [address.strip() for address in rest.removeprefix("//").split(",")]
    for address in addresses:
        split_target(address)
    return addresses


def free_port() -> int:
    """A loopback port nothing listens on now, for a server started next (the tests' and benchmarks' stacks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replica_targets(target: str) -> list[str]:
    """One address per executor replica behind `target`: the addresses a multi-address target lists, or every
    address its host name resolves to (with `docker compose --scale executor=N`, the service name resolves to
    each replica), or `target` itself when it does not resolve here (gRPC then reports the failure)."""
    listed = listed_addresses(target)
    if listed is not None:
        return listed
    try:
        host, port = split_target(target)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError):
        return [target]
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    # A dual-stack name (localhost) is one server on two addresses; replicas get IPv4 addresses (compose networks).
    ipv4 = [ip for ip in addresses if ":" not in ip]
    return [f"{ip}:{port}" for ip in ipv4] if ipv4 else [f"[{ip}]:{port}" for ip in addresses]


def replica_channels(target: str, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                     aio: bool = False) -> list:
    """A channel to each replica behind `target` (see replica_targets); TLS still checks the name in `target`."""
    return [replica_channel(address, target, tls_ca, tls_cert, tls_key, aio) for address in replica_targets(target)]


def replica_channel(address: str, target: str, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                    aio: bool = False):
    """A channel to one replica's `address`, found behind `target` (whose name its TLS certificate carries;
    a replica listed by address must carry that address)."""
    server_name = split_target(target)[0] if address != target and listed_addresses(target) is None else ""
    return open_channel(address, tls_ca, tls_cert, tls_key, server_name=server_name, aio=aio)


def attach_where_held(clients: Sequence[ExecutorClient], run_id: str, from_seq: int = 0,
                      running_only: bool = False, rpc_timeout: float | None = None):
    """Attach through the first client whose executor holds `run_id` (replicas know only their own live
    runs). Returns (client, call, first event); raises the NOT_FOUND error when none holds it. A replica
    that cannot be reached is passed over (a lost host's runs cannot be followed; a new try starts elsewhere)
    unless no replica answers at all: then its UNAVAILABLE error is raised."""
    not_found: grpc.RpcError | None = None
    unreachable: grpc.RpcError | None = None
    for client in clients:
        call = client.attach(run_id, from_seq, running_only, rpc_timeout)
        try:
            return client, call, next(call)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                unreachable = exc
                continue
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            not_found = exc
    if not_found is None and unreachable is not None:
        raise unreachable
    assert not_found is not None, "attach_where_held needs at least one client"
    raise not_found


def cancel_where_held(clients: Sequence[ExecutorClient], run_id: str, timeout: float = 5.0):
    """Cancel `run_id` on whichever replica holds it; the last CancelReply (found = False) when none does."""
    reply = None
    for client in clients:
        reply = client.cancel(run_id, timeout=timeout)
        if reply.found:
            break
    return reply


def status_exit_code(status) -> int:
    """Shell convention: the task's exit code, 128+N when killed by signal N, 124 when timed out."""
    if status.timed_out:
        return 124
    if status.WhichOneof("outcome") == "signal":
        return 128 + status.signal
    if status.WhichOneof("outcome") != "exit_code" or (status.ended_by and not status.exit_code):
        return 1  # never started, or ended badly after all (e.g. its files were not saved to the workspace store)
    return status.exit_code


def describe_status(status) -> str:
    outcome = status.WhichOneof("outcome")
    ended = f"{outcome}={getattr(status, outcome)}" if outcome else "never started"
    flags = (("timed out; " if status.timed_out else "") + ("cancelled; " if status.cancelled else "")
             + (f"{status.ended_by}; " if status.ended_by else ""))
    return f"{flags}{ended} after {status.duration_seconds:.2f}s; log {status.log_path}"


ENV_STATE_NAMES = {pb2.ENV_READY: "ready", pb2.ENV_BUILDING: "building", pb2.ENV_FAILED: "failed"}


def describe_env(env) -> str:
    state = ENV_STATE_NAMES.get(env.state, "unknown") + (" (stale)" if env.stale else "")
    text = f"{env.name:<16} {state:<16} {env.backend:<10} {env.spec_hash or '-':<12} {env.detail}"
    # A ready env shows what its build made of the yml (a venv's translation), the others their log's tail.
    lines = env.log_tail.splitlines() + ([f"build log: {env.log_path}"] if env.state == pb2.ENV_READY else [])
    return text + "".join("\n    | " + line for line in lines)


# ---------------------------------------------------------------- CLI

def _client(cfg: Config) -> ExecutorClient:
    return ExecutorClient(open_channel(cfg.target, cfg.tls_ca, cfg.tls_cert, cfg.tls_key), cfg.token or None)


def _replica_clients(cfg: Config) -> list[ExecutorClient]:
    return [ExecutorClient(channel, cfg.token or None)
            for channel in replica_channels(cfg.target, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)]


def _rpc_error(exc: grpc.RpcError, cfg: Config) -> str:
    return f"executor at {cfg.target}: {exc.code().name}: {exc.details()}"


def cmd_ping(cfg: Config, args: argparse.Namespace) -> int:
    client = _client(cfg)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            reply = client.ping(timeout=args.timeout)
            break
        except grpc.RpcError as exc:
            if time.monotonic() >= deadline or exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                print(_rpc_error(exc, cfg), file=sys.stderr)
                return 1
            time.sleep(0.2)
    print(f"{reply.message} from executor {reply.version} at {cfg.target}")
    print(f"  containment: {reply.containment}")
    store = reply.workspace_store or "none: workspaces stay on this replica's disk"
    print(f"  workspace store: {store}")
    for env in reply.envs:
        print("  " + describe_env(env))
    return 0


def cmd_envs(cfg: Config, args: argparse.Namespace) -> int:
    try:
        envs = _client(cfg).list_envs(timeout=args.timeout)
    except grpc.RpcError as exc:
        print(_rpc_error(exc, cfg), file=sys.stderr)
        return 1
    print(f"{'ENV':<16} {'STATE':<16} {'BACKEND':<10} {'HASH':<12} DETAIL")
    for env in envs:
        print(describe_env(env))
    return 0 if all(e.state == pb2.ENV_READY for e in envs) else 3


# `run` exits with this when the executor refused the run or could not be reached (like `docker run`'s 125),
# so a task's own exit codes, including 1 and 2, keep their meaning.
EXECUTOR_ERROR_EXIT = 125


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    env_vars = dict(item.split("=", 1) for item in args.env_var)
    limits = {name: getattr(args, name) for name in LIMIT_SETTINGS if getattr(args, name) is not None}
    call = _client(cfg).run(args.env, args.task, args.args, env_vars, args.timeout, args.run_id,
                            workspace=args.workspace, limits=limits, keep_alive_seconds=args.keep_alive)
    return print_events(cfg, call, args.verbose)


def cmd_attach(cfg: Config, args: argparse.Namespace) -> int:
    try:
        _, call, first = attach_where_held(_replica_clients(cfg), args.run_id, args.from_seq)
    except grpc.RpcError as exc:
        print(_rpc_error(exc, cfg), file=sys.stderr)
        return 1
    return print_events(cfg, call, args.verbose, first)


def print_events(cfg: Config, call, verbose: bool, first=None) -> int:
    """Prints a Run or Attach stream like the task's own output; returns the shell exit code of its status."""
    events = call if first is None else itertools.chain([first], call)
    try:
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "line":
                out = sys.stdout if event.line.stream == pb2.STDOUT else sys.stderr
                out.write(event.line.text + "\n")
                out.flush()
            elif kind == "queued":
                print(f"[executor] {event.queued.message}", file=sys.stderr)
            elif kind == "started" and verbose:
                started = event.started
                print(f"[executor] run {started.run_id} pid {started.pid} workspace {started.workspace_dir} "
                      f"log {started.log_path} on {started.replica}", file=sys.stderr)
            elif kind == "status":
                if verbose or event.status.timed_out or event.status.cancelled or event.status.ended_by:
                    print(f"[executor] {describe_status(event.status)}", file=sys.stderr)
                return status_exit_code(event.status)
    except grpc.RpcError as exc:
        print(_rpc_error(exc, cfg), file=sys.stderr)
        return EXECUTOR_ERROR_EXIT
    except KeyboardInterrupt:
        call.cancel()
        return 130
    print("executor: stream ended without a final status", file=sys.stderr)
    return EXECUTOR_ERROR_EXIT


def cmd_cancel(cfg: Config, args: argparse.Namespace) -> int:
    try:
        reply = cancel_where_held(_replica_clients(cfg), args.run_id, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(_rpc_error(exc, cfg), file=sys.stderr)
        return 1
    print(reply.message)
    return 0 if reply.found else 1


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.stdout.reconfigure(line_buffering=True)
    return serve(cfg)


def build_parser() -> argparse.ArgumentParser:
    conn = argparse.ArgumentParser(add_help=False)
    for setting in SETTINGS:
        if setting.flag == "all":
            setting.add_flag(conn)
    client = argparse.ArgumentParser(add_help=False, parents=[conn])
    client.add_argument("--timeout", type=float, default=5.0, help="RPC deadline in seconds (default 5)")

    parser = argparse.ArgumentParser(prog="vpe-executor" if PACKAGED else "executor.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[conn], help="run the gRPC server (logs to stdout)",
                       description="Serve Ping/ListEnvs/Run/Cancel/Attach + grpc.health.v1 + reflection. Envs build in the "
                                   "background at start-up; SIGTERM stops gracefully.")
    for setting in SETTINGS:
        if setting.flag == "serve":
            setting.add_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ping", parents=[client], help="check the server answers; print version and env states",
                       description="Exit 0 when the executor answers Ping, 1 (with the reason) otherwise.")
    p.add_argument("--wait", type=float, default=0.0, help="keep retrying for this many seconds (default 0)")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("envs", parents=[client], help="list envs and their state",
                       description="Exit 0 when every env is ready, 3 when some are building/failed, 1 on RPC error.")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("run", parents=[conn], help="run a task, stream its output, exit with its code",
                       description="Run TASK (path under tasks/) in ENV. Options may come before or after ENV TASK; "
                                   "everything after -- goes to the task unchanged. Exits with the task's exit code, "
                                   "128+N if killed by signal N, 124 on timeout, 125 if the executor refused the run or "
                                   "could not be reached.")
    p.add_argument("env", help="env name, e.g. ingestion")
    p.add_argument("task", help="script relative to tasks/, e.g. ingestion/extract.py")
    p.add_argument("args", nargs="*", help="arguments for the script (after --, so options reach the script)")
    p.add_argument("-e", "--env-var", action="append", default=[], metavar="NAME=VALUE", help="extra env var (repeatable)")
    p.add_argument("--timeout", type=float, default=0.0, help="kill the task after this many seconds (default 0 = none)")
    p.add_argument("--run-id", default="", help="run id (default: generated)")
    p.add_argument("--workspace", default="",
                   help="work in buffer/WORKSPACE, shared with other runs given the same one (default: the run id)")
    p.add_argument("--keep-alive", type=float, default=0.0,
                   help="keep the run going this many seconds after this client is lost, for `attach` (default 0)")
    p.add_argument("--memory", dest="memory_bytes", type=parse_size, metavar="SIZE",
                   help="memory limit of the whole run, e.g. 2G (default and cap: the executor's)")
    p.add_argument("--cpu-seconds", dest="cpu_seconds", type=float, metavar="S", help="CPU time limit of each process")
    p.add_argument("--processes", type=int, metavar="N", help="limit on processes and threads at once")
    p.add_argument("--open-files", dest="open_files", type=int, metavar="N", help="open files limit of each process")
    p.add_argument("--output", dest="output_bytes", type=parse_size, metavar="SIZE",
                   help="limit on the run's stdout + stderr, e.g. 1G")
    p.add_argument("-v", "--verbose", action="store_true", help="print run id, pid, log path and final status")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("attach", parents=[conn], help="replay a run's output from a position, then follow it",
                       description="Print RUN_ID's output from its event log (from --from on), then follow it live "
                                   "until it ends; exit like `run`. Leaving (Ctrl-C) does not stop the run. With "
                                   "replicas behind one name, asks each address it resolves to.")
    p.add_argument("run_id", help="the run's id (given with run --run-id, or printed by run -v)")
    p.add_argument("--from", "--from-seq", dest="from_seq", type=event_seq, default=0, metavar="SEQ",
                   help="first event to print (default: 0, the start); to resume, the last seq seen + 1")
    p.add_argument("-v", "--verbose", action="store_true", help="print run id, pid, log path and final status")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("cancel", parents=[client], help="cancel a running or queued run",
                       description="Exit 0 when the run was found and is being stopped, 1 otherwise.")
    p.add_argument("run_id", help="the run's id (given with run --run-id, or printed by run -v)")
    p.set_defaults(func=cmd_cancel)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but `run` takes its options before or after ENV TASK, and everything after the first
    `--` is the task's, even strings that look like options (or another `--`)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    task_args: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:
        cut = argv.index("--")
        argv, task_args = argv[:cut], argv[cut + 1:]
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        unknown = [item for item in extra if item.startswith("-")]
        if unknown:
            parser.error(f"run: unrecognized arguments: {' '.join(unknown)} (arguments for the task go after --)")
        if any("=" not in item for item in args.env_var):
            parser.error("-e/--env-var takes NAME=VALUE")
        args.args = [*args.args, *extra, *task_args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(config_from(args), args)


if __name__ == "__main__":
    sys.exit(main())
