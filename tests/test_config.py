"""bootstrap.sh's configuration, mode choice and command line, without starting anything."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, bootstrap


def resolved_config(*flags: str, env: dict[str, str] | None = None) -> dict[str, str]:
    out = bootstrap(*flags, "config", env=env).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def fake_docker(tmp_path: Path, engine_answers: bool) -> dict[str, str]:
    """A `docker` CLI stand-in whose `docker info` succeeds or fails like a present or absent engine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(f"#!/bin/sh\nexit {0 if engine_answers else 1}\n")
    docker.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_defaults_come_from_env_file_with_paths_made_absolute() -> None:
    config = resolved_config()
    assert config["VPE_EXECUTOR_PORT"] == "3170"
    assert config["VPE_PG_PORT"] != "5432"
    assert config["VPE_HOME"] == str(ROOT / ".vpe")


def test_environment_overrides_env_file() -> None:
    config = resolved_config(env={"VPE_AIRFLOW_PORT": "18080", "VPE_HOME": "/tmp/elsewhere"})
    assert config["VPE_AIRFLOW_PORT"] == "18080"
    assert config["VPE_HOME"] == "/tmp/elsewhere"


def test_every_env_file_key_is_printed() -> None:
    keys = re.findall(r"^([A-Za-z_]\w*)=", (ROOT / ".env").read_text(), re.M)
    assert set(keys) <= set(resolved_config())


@pytest.mark.parametrize("engine_answers, expected", [(True, "docker"), (False, "local")])
def test_mode_follows_the_docker_engine(tmp_path: Path, engine_answers: bool, expected: str) -> None:
    env = fake_docker(tmp_path, engine_answers)
    assert resolved_config(env=env)["VPE_MODE"] == expected


def test_flags_force_the_mode(tmp_path: Path) -> None:
    assert resolved_config("--local", env=fake_docker(tmp_path, True))["VPE_MODE"] == "local"
    assert resolved_config("--docker")["VPE_MODE"] == "docker"


def test_celery_flag_chooses_airflows_celery_executor() -> None:
    assert resolved_config()["VPE_AIRFLOW_EXECUTOR"] == "LocalExecutor"
    assert resolved_config("--celery")["VPE_AIRFLOW_EXECUTOR"] == "CeleryExecutor"


def test_help_and_unknown_commands() -> None:
    help_run = bootstrap("--help")
    assert "Usage: ./bootstrap.sh" in help_run.stdout
    for bad in (["frobnicate"], ["--frobnicate"], ["logs", "nosuchcomponent"], ["up", "nosuchcomponent"]):
        run = bootstrap(*bad, check=False, env={"VPE_HOME": "/nonexistent/vpe"})
        assert run.returncode == 2, bad
        assert "Usage:" in run.stderr


def test_grpc_pins_agree_between_local_venv_and_executor_env() -> None:
    """Local mode runs the executor from requirements.txt; Docker from envs/grpc.yml."""
    local = dict(re.findall(r"^(grpcio[\w-]*|protobuf|psycopg2-binary)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    spec = yaml.safe_load((ROOT / "envs" / "grpc.yml").read_text())
    pip = next(dep["pip"] for dep in spec["dependencies"] if isinstance(dep, dict))
    executor = dict(pin.split("==", 1) for pin in pip if pin.split("==")[0] in local)
    assert executor == local
