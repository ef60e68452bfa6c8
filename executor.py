#!/usr/bin/env python3
"""VPE executor: runs task scripts from tasks/ inside isolated Python envs (envs/*.yml), over gRPC.

The wire contract is ping.proto (loaded at run time; nothing generated is committed).
Server:  python executor.py serve
Client:  python executor.py ping | envs | run ENV TASK [--workspace W] [-- ARGS...] | cancel RUN_ID
Library: ExecutorClient(channel, token=None) with .ping(), .list_envs(), .run(...), .cancel(run_id);
         open_channel(...) builds a channel from the same settings as the CLI.

A task runs as `<env>/bin/python tasks/<task> ARGS...` in its own process group, with working dir
$VPE_HOME/buffer/<workspace> (the request's workspace, default its run_id; runs of one pipeline run share it), and only this environment: PATH (the env's bin first, then /usr/local/bin:/usr/bin:/bin),
HOME, LANG (default C.UTF-8), TZ (default UTC), PYTHONUNBUFFERED=1, VPE_ENV, VPE_RUN_ID, VPE_RUN_DIR, VPE_BUFFER,
the executor's own values of the names in VPE_TASK_ENV_PASSTHROUGH (default: VPE_WAREHOUSE_DSN
OPEN_METEO_ARCHIVE_URL OPEN_METEO_API_KEY VPE_GLC_LAYER_URL), then the request's env vars (names [A-Za-z_][A-Za-z0-9_]*, not PATH, PYTHON*, LD_*,
DYLD_* or the VPE_* above).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import math
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

__version__ = "0.4.0"

HERE = Path(__file__).resolve().parent
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

DEFAULT_PASSTHROUGH = "VPE_WAREHOUSE_DSN OPEN_METEO_ARCHIVE_URL OPEN_METEO_API_KEY VPE_GLC_LAYER_URL"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ARGS = 1024
MAX_ENV_VARS = 256
MAX_STRING_BYTES = 64 * 1024
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_LINE_CHARS = 16 * 1024
MAX_BUFFERED_EVENTS = 10_000
FOLDER_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # run ids and workspaces: one safe path segment
ENV_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ENV_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Request env vars may not change which code runs or where the executor's own values point.
RESERVED_ENV_VARS = {"PATH", "PYTHONUNBUFFERED", "VPE_RUN_ID", "VPE_RUN_DIR", "VPE_BUFFER", "VPE_ENV"}
RESERVED_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON")


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


@dataclasses.dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 3170
    token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    home: Path = HERE / ".vpe"
    envs_dir: Path = HERE / "envs"
    tasks_dir: Path = HERE / "tasks"
    max_concurrent: int = os.cpu_count() or 1
    max_queue: int = 32
    kill_grace: float = 1.0
    shutdown_grace: float = 10.0
    backend: str = "auto"
    passthrough: tuple[str, ...] = tuple(DEFAULT_PASSTHROUGH.split())

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
    def target(self) -> str:
        return f"{self.host}:{self.port}"


def config_from(args: argparse.Namespace) -> Config:
    """Environment variables first, flags override."""
    def pick(flag: str, var: str, default: str) -> str:
        value = getattr(args, flag, None)
        return str(value) if value is not None else _env(var, default)

    def number(flag: str, var: str, default: str, kind: type[int] | type[float], minimum: float) -> Any:
        text = pick(flag, var, default)
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value < math.inf:
            raise SystemExit(f"executor.py: {var} (--{flag.replace('_', '-')}) must be "
                             f"{'a whole number' if kind is int else 'a number'} >= {minimum}, not {text!r}")
        return value

    home = Path(pick("home", "VPE_HOME", str(HERE / ".vpe"))).resolve()
    return Config(
        host=pick("host", "VPE_EXECUTOR_HOST", "127.0.0.1"),
        port=number("port", "VPE_EXECUTOR_PORT", "3170", int, 1),
        token=pick("token", "VPE_EXECUTOR_TOKEN", ""),
        tls_cert=pick("tls_cert", "VPE_EXECUTOR_TLS_CERT", ""),
        tls_key=pick("tls_key", "VPE_EXECUTOR_TLS_KEY", ""),
        tls_ca=pick("tls_ca", "VPE_EXECUTOR_TLS_CA", ""),
        home=home,
        envs_dir=Path(pick("envs_dir", "VPE_EXECUTOR_ENVS_DIR", str(HERE / "envs"))).resolve(),
        tasks_dir=Path(pick("tasks_dir", "VPE_EXECUTOR_TASKS_DIR", str(HERE / "tasks"))).resolve(),
        max_concurrent=number("max_concurrent", "VPE_EXECUTOR_MAX_CONCURRENT", str(os.cpu_count() or 1), int, 1),
        max_queue=number("max_queue", "VPE_EXECUTOR_MAX_QUEUE", "32", int, 0),
        kill_grace=number("kill_grace", "VPE_EXECUTOR_KILL_GRACE", "1.0", float, 0),
        shutdown_grace=number("shutdown_grace", "VPE_EXECUTOR_SHUTDOWN_GRACE", "10", float, 0),
        backend=pick("backend", "VPE_EXECUTOR_ENV_BACKEND", "auto"),
        passthrough=tuple(re.findall(r"[^\s,]+", _env("VPE_TASK_ENV_PASSTHROUGH", DEFAULT_PASSTHROUGH))),
    )


# ---------------------------------------------------------------- environments

class EnvSpecError(Exception):
    """The yml cannot be built as written; the message says what to change."""


class EnvBuildError(Exception):
    """Building failed; the message says why and where the log is."""


CONDA_BACKENDS = ("micromamba", "mamba", "conda")

# Without conda, a yml's conda dependencies are translated for a venv. Data, not code: edit these tables.
# conda name -> PyPI name where they differ: a subset of conda-forge's PyPI name mapping
# (github.com/regro/cf-graph-countyfair, mappings/pypi/grayskull_pypi_mapping.yaml). psycopg2 ->
# psycopg2-binary is our choice: the same module as a wheel, so no libpq headers or compiler are needed.
CONDA_TO_PYPI = {
    "psycopg2": "psycopg2-binary",
    "pymysql": "PyMySQL",
    "pytorch": "torch",
    "py-opencv": "opencv-python",
    "opencv": "opencv-python",
    "py-xgboost": "xgboost",
    "pytables": "tables",
    "msgpack-python": "msgpack",
    "python-graphviz": "graphviz",
    "pyqt": "PyQt5",
    "ruamel_yaml": "ruamel.yaml",
}
# Conda packages a venv does without, by why: what `conda env export` lists for a Python env on linux-64
# besides the Python packages (names starting with "_" are conda metapackages and skipped too).
CONDA_SKIPPED = {
    "installer: the venv has its own": ("pip", "setuptools", "wheel"),
    "system library: the OS has it, wheels bundle theirs": (
        "openssl", "ca-certificates", "sqlite", "libsqlite", "zlib", "libzlib", "xz", "liblzma", "bzip2", "tk",
        "ncurses", "readline", "libffi", "tzdata", "libuuid", "libnsl", "libxcrypt", "expat", "libexpat", "icu",
        "krb5", "libedit"),
    "C/C++ runtime: the OS has it": (
        "libgcc-ng", "libgcc", "libstdcxx-ng", "libstdcxx", "libgomp", "ld_impl_linux-64", "libgfortran-ng",
        "libgfortran5", "llvm-openmp"),
    "BLAS: numpy and scipy wheels bundle OpenBLAS": (
        "mkl", "intel-openmp", "blas", "libblas", "libcblas", "liblapack", "openblas", "libopenblas"),
    "compiler: wheels need none": (
        "gcc", "gxx", "gfortran", "gcc_linux-64", "gxx_linux-64", "gfortran_linux-64", "c-compiler",
        "cxx-compiler", "fortran-compiler", "compilers", "binutils", "make"),
}
CUDA_WHY = ("conda-only CUDA; PyPI wheels that use CUDA (torch, jax, cupy-cuda12x) bundle their own: "
            "list those under pip:")
GDAL_WHY = ("PyPI has only GDAL's source, which needs the system's libgdal: install libgdal-dev, "
            "list GDAL==<version> under pip:")
# Conda packages with no PyPI counterpart a venv could use: a venv build that meets one fails, naming it.
CONDA_REFUSED = {
    "cudatoolkit": CUDA_WHY, "cudnn": CUDA_WHY, "nccl": CUDA_WHY,
    "gdal": GDAL_WHY, "libgdal": GDAL_WHY,
    "r-base": "R, not a Python package",
}
SKIP_WHY = {name: why for why, names in CONDA_SKIPPED.items() for name in names}
METAPACKAGE_WHY = "conda metapackage"
C_LIBRARY_WHY = "C/C++ library (not a py* build): a venv does not need it"

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
    return CondaDep(text.strip(), m["name"].lower(), rest.strip(), fuzzy, "" if build.startswith("*") else build)


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


def classify_conda_dep(dep: CondaDep, listed: set[str]) -> tuple[str, str]:
    """(outcome, PyPI name or why). The tables first; then a full export's build string tells a Python
    package (py312h06a4308_0, pyhd3eb1b0_1) from a C/C++ library (h5eee18b_0, 1_gnu); without one
    (--from-history), a package is assumed to be on PyPI under its name."""
    if dep.name in CONDA_REFUSED:
        return REFUSED, CONDA_REFUSED[dep.name]
    if dep.name.startswith("_"):
        return SKIPPED, METAPACKAGE_WHY
    if dep.name in SKIP_WHY:
        return SKIPPED, SKIP_WHY[dep.name]
    base_of = dep.name.removesuffix("-base")
    if base_of != dep.name and base_of in listed:
        return SKIPPED, f"part of {base_of}, which is installed"
    if dep.build and not dep.build.startswith("py"):
        return SKIPPED, C_LIBRARY_WHY
    return INSTALLED, CONDA_TO_PYPI.get(dep.name, base_of)


def translate(spec: EnvSpec) -> Translation:
    listed = {d.name for d in spec.conda_deps}
    pinned_by_pip = {pypi_name(p) for p in spec.pip_packages}
    rows = []
    for dep in spec.conda_deps:
        outcome, target = classify_conda_dep(dep, listed)
        if outcome == INSTALLED and pypi_name(target) in pinned_by_pip:
            outcome, target = SKIPPED, "the pip: list pins it"
        elif outcome == INSTALLED:
            target += dep.pip_specifier(spec.path)
        rows.append(TranslatedDep(outcome, dep.spec, dep.name, target))
    return Translation(tuple(rows), spec.pip_packages)


@dataclasses.dataclass(frozen=True)
class Interpreter:
    path: str      # a real interpreter, not a venv's
    version: str   # "3.12.1"
    source: str    # where it was found, for the build log


PYTHON_PROBE = ("import platform, sys; print(platform.python_version()); "
                "print(getattr(sys, '_base_executable', sys.executable))")


def probe_python(path: str) -> tuple[str, str]:
    """(version, real interpreter) or EnvBuildError with the first line it printed."""
    try:
        result = subprocess.run([path, "-c", PYTHON_PROBE], capture_output=True, text=True, timeout=60,
                                env=build_environment(), stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise EnvBuildError(f"{path}: {exc.strerror}") from exc
    lines = result.stdout.split("\n")
    if result.returncode != 0 or len(lines) < 2:
        raise EnvBuildError(f"{path}: {(result.stderr.strip().splitlines() or ['exit %d' % result.returncode])[0]}")
    return lines[0], lines[1]


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


def download_python(request: str, uv: str | None, log: Any) -> Interpreter | str:
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
    version, real = probe_python(managed)
    return Interpreter(real, version, "uv's managed Pythons (downloaded now)")


def find_python(version: str | None, yml: Path, uv: str | None = None, log: Any = lambda line: None) -> Interpreter:
    """The interpreter for `python=X.Y[.Z]`: the exact version if one is found, else the same X.Y."""
    if version is None:
        own = getattr(sys, "_base_executable", sys.executable)
        return Interpreter(own, "%d.%d.%d" % sys.version_info[:3], "the executor's own Python (the yml pins none)")
    minor = ".".join(version.split(".")[:2])
    nearest: Interpreter | None = None
    tried: list[str] = []
    for path, source in python_candidates(minor, uv):
        try:
            found, real = probe_python(path)
        except EnvBuildError as exc:
            tried.append(str(exc))
            continue
        if found == version or (version == minor and found.startswith(minor + ".")):
            return Interpreter(real, found, source)
        if found.startswith(minor + ".") and nearest is None:
            nearest = Interpreter(real, found, f"{source} (the yml pins {version}; the patch level differs)")
        elif not found.startswith(minor + "."):
            tried.append(f"{path}: Python {found}")
    if nearest:
        return nearest
    downloaded = download_python(version, uv, log)
    if isinstance(downloaded, Interpreter):
        return downloaded
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
    if refused := translation.of(REFUSED):
        raise EnvSpecError(
            f"{spec.path}: {'; '.join(f'{r.spec} ({r.target})' for r in refused)}: no PyPI counterpart, and no "
            f"conda/mamba/micromamba is on PATH. Remove {'it' if len(refused) == 1 else 'them'}, list a PyPI "
            f"equivalent under pip:, or install micromamba.")
    plan = VenvPlan(find_python(spec.python, spec.path, uv, log), translation)
    log(plan.python_line())
    return plan


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


def snapshot_entry(st: os.stat_result, path: str) -> tuple[int, ...]:
    """Any write, chmod, rename or utime, by root too, moves ctime (only a clock change could fake it)."""
    return st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def describe_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    changes = ([f"added {p}" for p in after.keys() - before.keys()] +
               [f"removed {p}" for p in before.keys() - after.keys()] +
               [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]])
    return ", ".join(sorted(changes)[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")


def seal_env(prefix: Path) -> None:
    """Read-only mode bits (they stop a task running as another user) and a manifest of every file.
    Root ignores mode bits, so EnvManager compares the files with the manifest when it reuses a build,
    and with a snapshot before every run."""
    for folder, dirs, files in os.walk(prefix):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, os.lstat(path).st_mode & ~0o222)
    manifest = file_table(prefix, manifest_entry)
    (prefix / MANIFEST).write_text("".join(f"{rel}\t{entry}\n" for rel, entry in sorted(manifest.items())))
    os.chmod(prefix / MANIFEST, 0o444)
    os.chmod(prefix, prefix.stat().st_mode & ~0o222)


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
    snapshot: dict | None = None     # the ready env's files when it became ready


class EnvManager:
    """Builds every envs/*.yml once per content hash into $VPE_HOME/envs/<name>-<hash>, switching the
    $VPE_HOME/envs/<name> symlink only after a complete build, so a failed build keeps the previous env.
    An env is known by its yml's `name:` (else the file name); a built env is sealed, and one whose
    files changed since (a task wrote into it) is rebuilt before the next run."""

    def __init__(self, cfg: Config, backend: str):
        self._cfg = cfg
        self.backend = backend
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
        """The env by name, checked first: a ready env whose files changed since it became ready is
        taken out of service and rebuilt."""
        with self._lock:
            record = self._records.get(name)
            if record is None:
                return None
            prefix, snapshot = record.prefix, record.snapshot
        if prefix is not None and snapshot is not None:
            changes = describe_changes(snapshot, file_table(prefix, snapshot_entry))
            if changes:
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
            record.state, record.prefix, record.snapshot, record.stale = pb2.ENV_BUILDING, None, None, False
            record.detail = (f"rebuilding: its files changed after the build ({changes}); a task wrote into "
                             f"{prefix}, and nothing may")
        log.warning("env %s: files changed after the build (%s); removing %s and rebuilding",
                    record.name, changes, prefix)
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
        self._update(record, state=pb2.ENV_READY, prefix=prefix, spec_hash=digest, detail=detail, stale=False,
                     summary=plan.summary() if plan else "", snapshot=file_table(prefix, snapshot_entry))

    def _fail(self, record: EnvRecord, previous: Path | None, reason: str) -> None:
        log.error("env %s: build failed: %s", record.name, reason)
        if previous is not None:
            digest = previous.name.rsplit("-", 1)[-1]
            self._update(record, state=pb2.ENV_READY, prefix=previous, spec_hash=digest, stale=True,
                         snapshot=file_table(previous, snapshot_entry),
                         detail=f"rebuild failed, still running the previous build {digest}: {reason}")
        else:
            self._update(record, state=pb2.ENV_FAILED, prefix=None, snapshot=None, detail=f"build failed: {reason}")


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


# ---------------------------------------------------------------- processes

def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def task_environment(cfg: Config, env_name: str, prefix: Path, run_id: str, run_dir: Path,
                     extra: dict[str, str]) -> dict[str, str]:
    """Minimal and explicit: nothing else of the executor's environment reaches a task."""
    env = {
        "PATH": f"{prefix / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": _env("HOME", str(run_dir)),
        "LANG": _env("LANG", "C.UTF-8"),
        "TZ": _env("TZ", "UTC"),
        "PYTHONUNBUFFERED": "1",
        "VPE_ENV": env_name,
        "VPE_RUN_ID": run_id,
        "VPE_RUN_DIR": str(run_dir),
        "VPE_BUFFER": str(cfg.buffer_dir),
    }
    env.update({name: os.environ[name] for name in cfg.passthrough if name in os.environ})
    env.update(extra)
    return env


def _now_timestamp() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


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
    run_dir: Path
    log_path: Path
    timeout: float


class ActiveRun:
    """One task process: a supervisor thread waits for a slot, starts the process in its own group,
    reads both pipes, enforces timeout/cancel, writes the run log, and queues RunEvents for the RPC."""

    def __init__(self, plan: RunPlan, slots: Slots, kill_grace: float):
        self.plan = plan
        self._slots = slots
        self._kill_grace = kill_grace
        self.events: queue.Queue = queue.Queue()
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

    def cancel(self, reason: str) -> None:
        with self._wake_lock:
            if self._cancelled.is_set():
                return
            self._cancel_reason = reason
            self._cancelled.set()
            if self._wake_w is not None:
                os.write(self._wake_w, b"c")
        self._slots.wake()

    def _emit(self, **event) -> None:
        self.events.put(pb2.RunEvent(**event))

    def _supervise(self) -> None:
        started = time.monotonic()
        try:
            if self._position and not self._wait_for_slot():
                self._emit(status=pb2.RunStatus(run_id=self.plan.run_id, cancelled=True,
                                                duration_seconds=time.monotonic() - started,
                                                log_path=str(self.plan.log_path)))
                return
            try:
                self._run_process()
            finally:
                self._slots.release()
        except Exception as exc:  # the stream must still end with a status
            log.exception("run %s: supervisor failed", self.plan.run_id)
            self._emit(line=pb2.OutputLine(stream=pb2.STDERR, text=f"executor error: {exc}", timestamp=_now_timestamp()))
            self._emit(status=pb2.RunStatus(run_id=self.plan.run_id, exit_code=-1,
                                            duration_seconds=time.monotonic() - started, log_path=str(self.plan.log_path)))

    def _wait_for_slot(self) -> bool:
        self._emit(queued=pb2.Queued(
            position=self._position,
            message=f"queued at position {self._position}: all run slots are busy; starts when one frees up"))
        return self._slots.wait_turn(self, self._cancelled)

    def _run_process(self) -> None:
        plan = self.plan
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        plan.log_path.parent.mkdir(parents=True, exist_ok=True)
        with plan.log_path.open("a", encoding="utf-8") as run_log:
            run_log.write(f"# run {plan.run_id} env={plan.env_name} dir={plan.run_dir} argv={plan.argv}\n")
            started = time.monotonic()
            proc = subprocess.Popen(plan.argv, cwd=plan.run_dir, env=plan.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            self.process_started.set()
            try:
                self._emit(started=pb2.Started(run_id=plan.run_id, pid=proc.pid, log_path=str(plan.log_path),
                                               run_dir=str(plan.run_dir)))
                log.info("run %s: started pid %d: %s", plan.run_id, proc.pid, " ".join(plan.argv))
                timed_out = self._pump(proc, run_log, started)
            except BaseException:  # e.g. the run log's disk is full: no task may outlive its supervisor
                kill_group(proc.pid, signal.SIGKILL)  # not reaped yet, so the group id is still this task's
                proc.wait()
                raise
            rc = proc.wait()
            duration = time.monotonic() - started
            status = pb2.RunStatus(run_id=plan.run_id, timed_out=timed_out, cancelled=self._cancelled.is_set(),
                                   duration_seconds=duration, log_path=str(plan.log_path))
            if rc < 0:
                status.signal = -rc
            else:
                status.exit_code = rc
            outcome = f"signal {-rc}" if rc < 0 else f"exit {rc}"
            extra = " (timed out)" if timed_out else f" (cancelled: {self._cancel_reason})" if status.cancelled else ""
            run_log.write(f"# {outcome}{extra} after {duration:.3f}s\n")
        log.info("run %s: %s%s after %.3fs", plan.run_id, outcome, extra, duration)
        self._emit(status=status)

    def _pump(self, proc: subprocess.Popen, run_log, started: float) -> bool:
        """Forwards output lines until the process has exited and both pipes are closed. Returns timed_out."""
        deadline = started + self.plan.timeout if self.plan.timeout else math.inf
        kill_at = math.inf
        timed_out = exited = False
        exited_at = math.inf
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
            while open_pipes or not exited:
                now = time.monotonic()
                stop_reason = ("timeout" if now >= deadline else
                               "cancel" if self._cancelled.is_set() else
                               "leftover" if exited and now >= exited_at + 0.05 else "")
                if stop_reason and kill_at == math.inf:
                    timed_out = stop_reason == "timeout"
                    if stop_reason == "leftover":
                        log.info("run %s: leader exited, stopping processes left in its group", self.plan.run_id)
                    kill_group(proc.pid, signal.SIGTERM)
                    kill_at = now + self._kill_grace
                if now >= kill_at:
                    kill_group(proc.pid, signal.SIGKILL)
                    kill_at = -math.inf
                if kill_at == math.inf:  # not stopping yet
                    wait_until = min(deadline, exited_at + 0.05)
                else:  # stopping: only the SIGKILL is still due (never wake for a moment already past)
                    wait_until = kill_at if kill_at > 0 else math.inf
                # A slow client: stop reading, so the task blocks on write. Not once cancelled: the client may be
                # gone, and the task's output must be drained for it to die and be reaped.
                if self.events.qsize() > MAX_BUFFERED_EVENTS and not self._cancelled.is_set():
                    time.sleep(0.05)
                    continue
                for key, _ in sel.select(None if wait_until == math.inf else max(0.0, wait_until - now)):
                    if key.data == "exit":
                        sel.unregister(pidfd)
                        exited, exited_at = True, time.monotonic()
                    elif key.data == "wake":
                        os.read(wake_r, 64)
                    else:
                        chunk = os.read(key.fd, 65536)
                        if not chunk:
                            sel.unregister(key.fileobj)
                            open_pipes -= 1
                            chunk = b"\n" if partial[key.data] else b""
                        self._forward(key.data, partial, chunk, run_log)
        finally:
            with self._wake_lock:
                self._wake_w = None
            sel.close()
            os.close(wake_r)
            os.close(wake_w)
            os.close(pidfd)
            proc.stdout.close()
            proc.stderr.close()
        return timed_out

    def _forward(self, stream: int, partial: dict[int, bytes], chunk: bytes, run_log) -> None:
        data = partial[stream] + chunk
        *lines, partial[stream] = data.split(b"\n")
        if len(partial[stream]) > MAX_LINE_CHARS:
            lines.append(partial[stream])
            partial[stream] = b""
        timestamp = _now_timestamp()
        name = "stdout" if stream == pb2.STDOUT else "stderr"
        for raw in lines:
            text = raw.decode("utf-8", "replace")
            for start in range(0, max(len(text), 1), MAX_LINE_CHARS):
                piece = text[start:start + MAX_LINE_CHARS]
                run_log.write(f"{timestamp.ToJsonString()} {name} {piece}\n")
                self._emit(line=pb2.OutputLine(stream=stream, text=piece, timestamp=timestamp))
        run_log.flush()


# ---------------------------------------------------------------- the service

class ExecutorServicer(pb2_grpc.ExecutorServicer):
    def __init__(self, cfg: Config, envs: EnvManager):
        self._cfg = cfg
        self._envs = envs
        self._slots = Slots(cfg.max_concurrent, cfg.max_queue)
        self._runs: dict[str, ActiveRun] = {}
        self._runs_lock = threading.Lock()
        self.shutting_down = threading.Event()

    def Ping(self, request, context):
        return pb2.PingReply(message="pong", version=__version__, envs=self._envs.statuses())

    def ListEnvs(self, request, context):
        return pb2.ListEnvsReply(envs=self._envs.statuses())

    def Run(self, request, context):
        try:
            run = self._admit(request)
        except Refused as refused:
            context.abort(refused.code, str(refused))
        if not context.add_callback(lambda: run.cancel("client went away")):
            run.cancel("client went away")
        try:
            while True:
                event = run.events.get()
                yield event
                if event.HasField("status"):
                    return
        finally:
            run.cancel("RPC ended")
            with self._runs_lock:
                self._runs.pop(run.plan.run_id, None)

    def Cancel(self, request, context):
        with self._runs_lock:
            run = self._runs.get(request.run_id)
        if run is None:
            return pb2.CancelReply(found=False, message=f"no run {request.run_id!r} is running or queued")
        run.cancel("Cancel RPC")
        return pb2.CancelReply(found=True, message=f"run {request.run_id!r} is being stopped")

    def active_runs(self) -> list[ActiveRun]:
        with self._runs_lock:
            return list(self._runs.values())

    def _admit(self, request) -> ActiveRun:
        if self.shutting_down.is_set():
            raise Refused(grpc.StatusCode.UNAVAILABLE, "executor is shutting down; retry against the restarted executor")
        plan = self._plan(request)
        run = ActiveRun(plan, self._slots, self._cfg.kill_grace)
        with self._runs_lock:
            if plan.run_id in self._runs:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                              f"run {plan.run_id!r} is already running; use another run_id or Cancel it first")
            position = self._slots.reserve(run)
            self._runs[plan.run_id] = run
        run.start(position)
        return run

    def _plan(self, request) -> RunPlan:
        prefix = self._ready_env(request.env)
        script = resolve_task(self._cfg.tasks_dir, request.task)
        validate_args(request.args)
        extra = validate_env_vars(request.env_vars)
        timeout = validate_timeout(request.timeout_seconds)
        run_id = validate_folder_name("run_id", request.run_id) if request.run_id else new_run_id()
        workspace = validate_folder_name("workspace", request.workspace) if request.workspace else run_id
        run_dir = self._cfg.buffer_dir / workspace
        env = task_environment(self._cfg, request.env, prefix, run_id, run_dir, extra)
        return RunPlan(run_id, request.env, [str(prefix / "bin" / "python"), str(script), *request.args], env,
                       run_dir, self._cfg.logs_dir / f"{run_id}.log", timeout)

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
        return record.prefix


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
    root = tasks_dir.resolve()
    script = (root / task).resolve()
    if not script.is_relative_to(root):
        raise refuse("resolves outside the tasks dir (symlink)")
    if not script.is_file():
        raise refuse("does not exist")
    return script


def validate_args(args: Sequence[str]) -> None:
    if len(args) > MAX_ARGS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{len(args)} args; at most {MAX_ARGS} are accepted")
    for i, arg in enumerate(args):
        if "\0" in arg or len(arg) > MAX_STRING_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"args[{i}] contains a NUL byte or is longer than {MAX_STRING_BYTES}; pass data through a file in the run dir")


def validate_env_vars(env_vars) -> dict[str, str]:
    if len(env_vars) > MAX_ENV_VARS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{len(env_vars)} env vars; at most {MAX_ENV_VARS} are accepted")
    for name, value in env_vars.items():
        if not ENV_VAR_NAME_RE.fullmatch(name):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"env var name {name[:130]!r} is invalid; use letters, digits and _, not starting with a digit")
        if name in RESERVED_ENV_VARS or name.startswith(RESERVED_ENV_PREFIXES):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"env var {name!r} is set by the executor and cannot be overridden "
                          f"(reserved: {', '.join(sorted(RESERVED_ENV_VARS))}, {', '.join(p + '*' for p in RESERVED_ENV_PREFIXES)})")
        if "\0" in value or len(value) > MAX_STRING_BYTES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"env var {name!r}: value contains a NUL byte or is longer than {MAX_STRING_BYTES}")
    return dict(env_vars)


def validate_timeout(seconds: float) -> float:
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_TIMEOUT_SECONDS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"timeout_seconds={seconds} is invalid; use 0 (none) or a number of seconds up to {MAX_TIMEOUT_SECONDS}")
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


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(cfg: Config) -> grpc.ServerCredentials | None:
    if not (cfg.tls_cert or cfg.tls_key):
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise SystemExit("TLS needs both VPE_EXECUTOR_TLS_CERT and VPE_EXECUTOR_TLS_KEY (or --tls-cert/--tls-key)")
    ca = _read(cfg.tls_ca)
    return grpc.ssl_server_credentials([(_read(cfg.tls_key), _read(cfg.tls_cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def serve(cfg: Config) -> int:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    backend = detect_backend(cfg.backend)
    for folder in (cfg.built_envs_dir, cfg.buffer_dir, cfg.logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    envs = EnvManager(cfg, backend)
    servicer = ExecutorServicer(cfg, envs)
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
    envs.start_builds()
    stop.wait()
    log.info("shutting down: no new runs; running tasks get %.0fs to finish", cfg.shutdown_grace)
    health_servicer.enter_graceful_shutdown()
    servicer.shutting_down.set()
    shutdown(servicer, cfg)
    envs.stop()
    server.stop(grace=2).wait()
    log.info("stopped")
    return 0


def shutdown(servicer: ExecutorServicer, cfg: Config) -> None:
    for run in servicer.active_runs():
        if not run.process_started.is_set():
            run.cancel("executor shutdown before the run left the queue")
    deadline = time.monotonic() + cfg.shutdown_grace
    while servicer.active_runs() and time.monotonic() < deadline:
        time.sleep(0.1)
    for run in servicer.active_runs():
        log.info("run %s: killing its process group (shutdown grace over)", run.plan.run_id)
        run.cancel("executor shutdown")
    deadline = time.monotonic() + cfg.kill_grace + 2
    while servicer.active_runs() and time.monotonic() < deadline:
        time.sleep(0.05)


# ---------------------------------------------------------------- the client

class ExecutorClient:
    """Client for an existing channel (e.g. from Airflow's GrpcHook.get_conn()). No Airflow imports here."""

    def __init__(self, channel: grpc.Channel, token: str | None = None):
        self._stub = pb2_grpc.ExecutorStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def ping(self, timeout: float = 5.0):
        return self._stub.Ping(pb2.PingRequest(), timeout=timeout, metadata=self._metadata)

    def list_envs(self, timeout: float = 5.0):
        return self._stub.ListEnvs(pb2.ListEnvsRequest(), timeout=timeout, metadata=self._metadata).envs

    def run(self, env: str, task: str, args: Sequence[str] = (), env_vars: dict[str, str] | None = None,
            timeout_seconds: float = 0.0, run_id: str = "", rpc_timeout: float | None = None, workspace: str = ""):
        """Iterator of RunEvent (line / queued / started, then one status). Call .cancel() on it to stop
        the run (the executor kills the task's process group). Runs given the same workspace share a run dir."""
        request = pb2.RunRequest(env=env, task=task, args=list(args), env_vars=env_vars or {},
                                 timeout_seconds=timeout_seconds, run_id=run_id, workspace=workspace)
        return self._stub.Run(request, timeout=rpc_timeout, metadata=self._metadata)

    def cancel(self, run_id: str, timeout: float = 5.0):
        return self._stub.Cancel(pb2.CancelRequest(run_id=run_id), timeout=timeout, metadata=self._metadata)


def open_channel(target: str, tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> grpc.Channel:
    """Plaintext unless a CA (or the server's self-signed cert) is given; cert+key also given = mutual TLS."""
    root = _read(tls_ca) or _read(tls_cert)
    if root is None:
        return grpc.insecure_channel(target, options=GRPC_OPTIONS)
    client_pair = (_read(tls_key), _read(tls_cert)) if tls_ca and tls_cert and tls_key else (None, None)
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=client_pair[0],
                                               certificate_chain=client_pair[1])
    return grpc.secure_channel(target, credentials, options=GRPC_OPTIONS)


def status_exit_code(status) -> int:
    """Shell convention: the task's exit code, 128+N when killed by signal N, 124 when timed out."""
    if status.timed_out:
        return 124
    if status.WhichOneof("outcome") == "signal":
        return 128 + status.signal
    return status.exit_code if status.WhichOneof("outcome") == "exit_code" else 1


def describe_status(status) -> str:
    outcome = status.WhichOneof("outcome")
    ended = f"{outcome}={getattr(status, outcome)}" if outcome else "never started"
    flags = ("timed out; " if status.timed_out else "") + ("cancelled; " if status.cancelled else "")
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


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    env_vars = dict(item.split("=", 1) for item in args.env_var)
    call = _client(cfg).run(args.env, args.task, args.args, env_vars, args.timeout, args.run_id,
                            workspace=args.workspace)
    try:
        for event in call:
            kind = event.WhichOneof("event")
            if kind == "line":
                out = sys.stdout if event.line.stream == pb2.STDOUT else sys.stderr
                out.write(event.line.text + "\n")
                out.flush()
            elif kind == "queued":
                print(f"[executor] {event.queued.message}", file=sys.stderr)
            elif kind == "started" and args.verbose:
                print(f"[executor] run {event.started.run_id} pid {event.started.pid} dir {event.started.run_dir} "
                      f"log {event.started.log_path}", file=sys.stderr)
            elif kind == "status":
                if args.verbose or event.status.timed_out or event.status.cancelled:
                    print(f"[executor] {describe_status(event.status)}", file=sys.stderr)
                return status_exit_code(event.status)
    except grpc.RpcError as exc:
        print(_rpc_error(exc, cfg), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        call.cancel()
        return 130
    print("executor: stream ended without a final status", file=sys.stderr)
    return 1


def cmd_cancel(cfg: Config, args: argparse.Namespace) -> int:
    try:
        reply = _client(cfg).cancel(args.run_id, timeout=args.timeout)
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
    conn.add_argument("--host", help="address to bind / connect to (env VPE_EXECUTOR_HOST, default 127.0.0.1)")
    conn.add_argument("--port", type=int, help="port (env VPE_EXECUTOR_PORT, default 3170)")
    conn.add_argument("--token", help="bearer token; prefer env VPE_EXECUTOR_TOKEN (flags show in ps); empty = no auth")
    conn.add_argument("--tls-cert", help="PEM certificate (env VPE_EXECUTOR_TLS_CERT); client: trusted if no CA given")
    conn.add_argument("--tls-key", help="PEM private key (env VPE_EXECUTOR_TLS_KEY)")
    conn.add_argument("--tls-ca", help="PEM CA (env VPE_EXECUTOR_TLS_CA); server: require client certs signed by it")
    client = argparse.ArgumentParser(add_help=False, parents=[conn])
    client.add_argument("--timeout", type=float, default=5.0, help="RPC deadline in seconds (default 5)")

    parser = argparse.ArgumentParser(prog="executor.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[conn], help="run the gRPC server (logs to stdout)",
                       description="Serve Ping/ListEnvs/Run/Cancel + grpc.health.v1 + reflection. Envs build in the "
                                   "background at start-up; SIGTERM stops gracefully.")
    p.add_argument("--home", help="state dir (env VPE_HOME, default .vpe next to executor.py): envs/, buffer/, logs/executor/")
    p.add_argument("--envs-dir", help="folder of env ymls (env VPE_EXECUTOR_ENVS_DIR, default <repo>/envs)")
    p.add_argument("--tasks-dir", help="folder of task scripts (env VPE_EXECUTOR_TASKS_DIR, default <repo>/tasks)")
    p.add_argument("--max-concurrent", type=int, help="runs at once (env VPE_EXECUTOR_MAX_CONCURRENT, default: cores)")
    p.add_argument("--max-queue", type=int, help="runs waiting for a slot (env VPE_EXECUTOR_MAX_QUEUE, default 32)")
    p.add_argument("--kill-grace", type=float, help="seconds between SIGTERM and SIGKILL (env VPE_EXECUTOR_KILL_GRACE, default 1)")
    p.add_argument("--shutdown-grace", type=float,
                   help="seconds running tasks get on SIGTERM (env VPE_EXECUTOR_SHUTDOWN_GRACE, default 10)")
    p.add_argument("--backend", choices=["auto", "conda", "venv"],
                   help="env backend (env VPE_EXECUTOR_ENV_BACKEND, default auto: conda-family if on PATH, else venv)")
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
                                   "128+N if killed by signal N, 124 on timeout, 1 if the executor refused.")
    p.add_argument("env", help="env name, e.g. ingestion")
    p.add_argument("task", help="script relative to tasks/, e.g. ingestion/extract.py")
    p.add_argument("args", nargs="*", help="arguments for the script (after --, so options reach the script)")
    p.add_argument("-e", "--env-var", action="append", default=[], metavar="NAME=VALUE", help="extra env var (repeatable)")
    p.add_argument("--timeout", type=float, default=0.0, help="kill the task after this many seconds (default 0 = none)")
    p.add_argument("--run-id", default="", help="run id (default: generated)")
    p.add_argument("--workspace", default="",
                   help="run dir buffer/WORKSPACE, shared with other runs given the same one (default: the run id)")
    p.add_argument("-v", "--verbose", action="store_true", help="print run id, pid, log path and final status")
    p.set_defaults(func=cmd_run)

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
