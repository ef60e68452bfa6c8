"""Shared fixtures: throwaway VPE stacks brought up by bootstrap.sh itself.

Tests use the real bootstrap path (the same initdb, pg_ctl and psql calls a user
gets), each stack with its own VPE_HOME and free loopback ports, sharing the
venv the tests run in.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def stack_config(home: Path) -> dict[str, str]:
    """Environment for a stack of its own: state in `home`, fresh ports, the tests' venv."""
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


@pytest.fixture(scope="session")
def pg_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A stack with only PostgreSQL up (warehouse schema applied), shared by the session."""
    env = stack_config(tmp_path_factory.mktemp("pg-stack") / "vpe")
    bootstrap("up", "postgres", env=env)
    env["VPE_WAREHOUSE_DSN"] = warehouse_dsn(env)
    yield env
    bootstrap("down", env=env, check=False)


@pytest.fixture
def empty_db(pg_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A new, empty database on the session's server; `bootstrap("migrate", env=env)` applies the schema."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(warehouse_dsn(pg_env, "postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = warehouse_dsn(pg_env, name)
    return dsn, {**pg_env, "VPE_WAREHOUSE_DB": name, "VPE_WAREHOUSE_DSN": dsn}
