"""Shared fixtures: throwaway VPE stacks brought up by bootstrap.sh itself.

Tests use the real bootstrap path (the same initdb, pg_ctl and psql calls a user
gets), each stack with its own VPE_HOME and free loopback ports, sharing the
venv the tests run in.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
from executor import free_port  # noqa: E402  (the tests import it from here, with the rest of the harness)


def pid_alive(pid: int) -> bool:
    """Zombies count as dead: they run nothing, and PID 1 here may not reap them."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def bootstrap(*args: str, env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs ./bootstrap.sh; on an unexpected exit the failure shows its output."""
    result = subprocess.run(
        [str(ROOT / "bootstrap.sh"), *args], env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"./bootstrap.sh {' '.join(args)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
    return result


def stack_parent(prefix: str) -> Path:
    """A world-traversable folder for stacks' state: PostgreSQL runs as another
    account when bootstrap runs as root, and pytest's own tmp dirs are private."""
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    parent.chmod(0o755)
    return parent


@pytest.fixture(scope="session")
def stack_home() -> Iterator[Path]:
    parent = stack_parent("vpe-tests-")
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


def stack_config(home: Path) -> dict[str, str]:
    """Environment for a stack of its own: state in `home`, fresh ports, the tests' venv."""
    home.mkdir(parents=True)
    return {
        "VPE_HOME": str(home),
        "VPE_VENV": sys.prefix,
        "VPE_PG_PORT": str(free_port()),
        "VPE_EXECUTOR_PORT": str(free_port()),
        "VPE_AIRFLOW_PORT": str(free_port()),
        # Throwaway clusters need no crash safety; the user's warehouse keeps fsync.
        "VPE_PG_OPTIONS": "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
    }


def read_secrets(home: Path) -> dict[str, str]:
    lines = (home / "secrets.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def warehouse_dsn(env: dict[str, str], database: str | None = None) -> str:
    password = read_secrets(Path(env["VPE_HOME"]))["VPE_PG_PASSWORD"]
    database = database or env.get("VPE_WAREHOUSE_DB", "warehouse")
    return f"postgresql://postgres:{password}@127.0.0.1:{env['VPE_PG_PORT']}/{database}"


def wait_for_envs(env: dict[str, str], timeout: float = 600) -> None:
    """The executor builds the pipelines' envs in the background after start-up."""
    token = read_secrets(Path(env["VPE_HOME"]))["VPE_EXECUTOR_TOKEN"]
    cli_env = {**os.environ, **env, "VPE_EXECUTOR_TOKEN": token}
    deadline = time.monotonic() + timeout
    while True:
        envs = subprocess.run([sys.executable, str(ROOT / "executor.py"), "envs"], env=cli_env,
                              capture_output=True, text=True, timeout=30)
        if envs.returncode == 0:
            return
        assert time.monotonic() < deadline and "failed" not in envs.stdout, envs.stdout + envs.stderr
        time.sleep(2)


def offline_demo_stack(stack_home: Path, name: str, files: dict[str, str],
                       settings: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """The whole platform in offline-demo mode on a repo-shaped copy of dags/ and tasks/ plus `files` (paths in
    that copy, e.g. "dags/x.py"), for a module-scoped fixture to `yield from`; `settings`: more of .env's
    variables (e.g. VPE_AIRFLOW_EXECUTOR)."""
    env = {**repo_copy_stack_config(stack_home, name, files), **(settings or {})}
    bootstrap("--offline-demo", "up", env=env)
    wait_for_envs(env)
    yield env
    bootstrap("down", env=env, check=False)


def repo_copy_stack_config(stack_home: Path, name: str, files: dict[str, str]) -> dict[str, str]:
    """A stack's environment (not yet up) on a repo-shaped copy of dags/ and tasks/ plus `files`."""
    env = stack_config(stack_home / f"{name}-stack")
    # A repo-shaped copy: the DAG's default catalog path is relative to the folder holding tasks/.
    repo = stack_home / f"{name}-repo"
    for folder in ("dags", "tasks"):
        shutil.copytree(ROOT / folder, repo / folder)
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    env.update(VPE_DAGS_DIR=str(repo / "dags"), VPE_TASKS_DIR=str(repo / "tasks"),
               VPE_OPEN_METEO_PORT=str(free_port()), VPE_ARCGIS_PORT=str(free_port()),
               VPE_REDIS_PORT=str(free_port()))
    return env


@pytest.fixture(scope="session")
def pg_env(stack_home: Path) -> Iterator[dict[str, str]]:
    """A stack with only PostgreSQL up (warehouse schema applied), shared by the session."""
    env = stack_config(stack_home / "pg-stack")
    bootstrap("up", "postgres", env=env)
    env["VPE_WAREHOUSE_DSN"] = warehouse_dsn(env)
    yield env
    bootstrap("down", env=env, check=False)


@pytest.fixture
def empty_db(pg_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A new, empty database on the session's server; `bootstrap("migrate", env=env)` applies the schema."""
    return new_database(pg_env)


@pytest.fixture(scope="session")
def warehouse_template(pg_env: dict[str, str]) -> str:
    """A migrated warehouse that tests copy (CREATE DATABASE … TEMPLATE: much faster than migrating each)."""
    _, env = new_database(pg_env)
    bootstrap("migrate", env=env)
    return env["VPE_WAREHOUSE_DB"]


def new_database(pg_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(its DSN, the stack's env naming it as the warehouse) of a new, empty database on pg_env's server."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(warehouse_dsn(pg_env, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = warehouse_dsn(pg_env, name)
    return dsn, {**pg_env, "VPE_WAREHOUSE_DB": name, "VPE_WAREHOUSE_DSN": dsn}


class AirflowAPI:
    """Airflow's REST API v2 as a user drives it: token, trigger, poll, read logs."""

    def __init__(self, env: dict[str, str]) -> None:
        self.base = f"http://{env.get('VPE_AIRFLOW_HOST', '127.0.0.1')}:{env['VPE_AIRFLOW_PORT']}"
        if env.get("VPE_AIRFLOW_EXECUTOR") == "CeleryExecutor":  # the FAB auth manager's admin
            password = read_secrets(Path(env["VPE_HOME"]))["VPE_AIRFLOW_ADMIN_PASSWORD"]
        else:
            passwords = Path(env["VPE_HOME"]) / "airflow" / "simple_auth_manager_passwords.json.generated"
            password = json.loads(passwords.read_text())["admin"]
        self.token = self.request("POST", "/auth/token", {"username": "admin", "password": password})["access_token"]

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if getattr(self, "token", None):
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{method} {path} -> {err.code}: {err.read().decode()}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        self.wait_for_dag(dag_id)
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        """The dag-processor parses new files a few seconds after start-up."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("GET", f"/api/v2/dags/{dag_id}")
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(1)
        raise AssertionError(f"{dag_id} run {run_id} still {state} after {timeout}s")

    def explain(self, dag_id: str, run_id: str) -> str:
        """Each task's state and the end of each unsuccessful task's log, for failure messages."""
        tis = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        lines = []
        for ti in tis:
            lines.append(f"{ti['task_id']}: {ti['state']} (try {ti['try_number']})")
            if ti["state"] not in ("success", None) and ti["try_number"]:
                lines.append(self.task_log(dag_id, run_id, ti["task_id"], ti["try_number"],
                                           ti.get("map_index", -1))[-3000:])
        return "\n".join(lines)

    def task_state(self, dag_id: str, run_id: str, task_id: str) -> str | None:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")["state"]

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int | None = None,
                 map_index: int = -1) -> str:
        """One try's log; by default the latest try's, as the UI shows it (a retried or resumed task's
        first try need not be the one that did the work)."""
        instance = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        if try_number is None:
            try_number = self.request("GET", instance + (f"/{map_index}" if map_index >= 0 else ""))["try_number"]
        return json.dumps(self.request("GET", f"{instance}/logs/{try_number}?map_index={map_index}"))
