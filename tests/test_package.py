"""VPE as an installed package (pyproject.toml): the wheel built from this checkout, installed into fresh
venvs that see nothing else of the checkout.

- An executor host: the wheel alone, no Airflow; the executor started by its console script in a folder
  of its own, which holds envs/, tasks/ and (by default) the state folder .vpe.
- Airflow at local mode's pinned version and at the oldest the provider supports, each with the wheel:
  the provider is listed with the executor's version, the connection form has VPE's fields, and a DAG
  runs tasks on that executor host through a vpe_executor connection and a grpc one.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import ROOT, free_port

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PINNED_AIRFLOW = re.search(r"^apache-airflow==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
OLDEST_AIRFLOW = re.fullmatch(r"apache-airflow>=(\S+)", PYPROJECT["project"]["optional-dependencies"]["airflow"][0])[1]
# The oldest Airflow's dependencies as they were on its release day (what its constraint file pinned):
# today's releases of them (structlog, SQLAlchemy) break older Airflows.
RELEASE_DAYS = {"3.1.3": "2025-11-15T00:00:00Z"}
UV = Path(sys.executable).with_name("uv")  # bootstrap installs uv into the venv the tests run in
TOKEN = "package-test-token"

TINY_ENV = "name: tiny\ndependencies:\n  - python=3.11\n"
SAY_TASK = "import sys\nprint('hello from', sys.argv[1:])\n"

PROBE_DAGS = {
    "probe.py": '''
import pendulum
from airflow.sdk import dag
from vpe import ExecutorOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def vpe_package_probe():
    ExecutorOperator(task_id="own_type", env="tiny", script="hello/say.py", args=["own"], grpc_conn_id="vpe_probe")
    ExecutorOperator(task_id="grpc_type", env="tiny", script="hello/say.py", args=["grpc"])
    ExecutorOperator(task_id="deferred", env="tiny", script="hello/say.py", args=["deferred"], deferrable=True)


vpe_package_probe()
''',
    "legacy.py": '''
import pendulum
from airflow.sdk import dag
from executor_operator import ExecutorOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def vpe_legacy_import():
    ExecutorOperator(task_id="say", env="tiny", script="hello/say.py")


vpe_legacy_import()
''',
}

# What the UI's connection form is built from (GET /ui/connections/hook_meta).
HOOK_META = '''
import json
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
meta = {m.connection_type: m.model_dump(mode="json") for m in HookMetaService.hook_meta_data()}
print(json.dumps(meta["vpe_executor"]))
'''


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points at the checkout or its stacks."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("VPE_", "AIRFLOW")) and k != "PYTHONPATH"}
    return {**kept, **extra}


def run(*args: Any, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def make_venv(folder: Path, *requirements: str | Path, options: tuple[str, ...] = ()) -> Path:
    """A new venv holding only `requirements`, installed by uv from its cache where it can."""
    run(UV, "venv", "--quiet", "--python", sys.executable, folder)
    run(UV, "pip", "install", "--quiet", "--python", folder / "bin" / "python", *options, *requirements,
        timeout=1800)
    return folder


def last_json(text: str) -> Any:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it, as a user's `uv build` / `python -m build` makes them."""
    out = tmp_path_factory.mktemp("dist")
    run(UV, "build", "--quiet", "--out-dir", out, ROOT)
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    [found] = dist.glob("*.whl")
    return found


def test_wheel_holds_the_package_and_what_it_reads_but_no_checkout_content(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {n for n in names if ".dist-info/" not in n}
    beside_executor = {f"vpe/{p.name}" for pattern in ("*.proto", "*.yaml") for p in ROOT.glob(pattern)}
    assert "vpe/ping.proto" in beside_executor
    assert code == {"vpe/__init__.py", "vpe/executor.py", "vpe/hooks.py", "vpe/hosts.py", "vpe/operators.py",
                    "vpe/provider.py", "executor_operator.py", *beside_executor}


def test_the_version_is_the_executors_own(wheel: Path) -> None:
    version = re.search(r'^__version__ = "(.+)"$', (ROOT / "executor.py").read_text(), re.M).group(1)
    assert wheel.name.startswith(f"vpe_executor-{version}-")


@pytest.fixture(scope="module")
def executor_host(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`vpe-executor serve` from a venv holding only the wheel, in a folder with one env and one task."""
    base = tmp_path_factory.mktemp("executor-host")
    venv = make_venv(base / "venv", wheel)
    work = base / "work"
    (work / "envs").mkdir(parents=True)
    (work / "tasks" / "hello").mkdir(parents=True)
    (work / "envs" / "tiny.yml").write_text(TINY_ENV)
    (work / "tasks" / "hello" / "say.py").write_text(SAY_TASK)
    port = free_port()
    env = clean_env(VPE_EXECUTOR_TOKEN=TOKEN, VPE_EXECUTOR_PORT=str(port))
    cli = str(venv / "bin" / "vpe-executor")
    with open(base / "serve.log", "w") as log:
        server = subprocess.Popen([cli, "serve"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    try:
        pong = run(cli, "ping", "--wait", "60", cwd=work, env=env).stdout
        deadline = time.monotonic() + 600
        while subprocess.run([cli, "envs"], cwd=work, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, (base / "serve.log").read_text()[-3000:]
            time.sleep(1)
        yield {"venv": venv, "work": work, "env": env, "cli": cli, "port": port,
               "version": re.match(r"pong from executor (\S+) at", pong).group(1), "log": base / "serve.log"}
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_executor_host_needs_no_airflow_and_keeps_its_folders_in_the_working_directory(
        executor_host: dict[str, Any]) -> None:
    python = executor_host["venv"] / "bin" / "python"
    probe = subprocess.run([python, "-c", "import airflow"], capture_output=True, text=True,
                           cwd=executor_host["work"], env=clean_env())
    assert "No module named 'airflow'" in probe.stderr
    said = run(executor_host["cli"], "run", "tiny", "hello/say.py", "--", "x", cwd=executor_host["work"],
               env=executor_host["env"]).stdout
    assert said.strip() == "hello from ['x']"
    work = executor_host["work"]
    assert f"envs from {work / 'envs'}" in executor_host["log"].read_text()
    assert (work / ".vpe" / "logs" / "executor").is_dir()
    assert not list((executor_host["venv"] / "lib").glob("python3*/site-packages/vpe/.vpe"))


@pytest.fixture(scope="module", params=["pinned", "oldest"])
def airflow(request: pytest.FixtureRequest, wheel: Path, executor_host: dict[str, Any],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A venv with only Airflow and the wheel, its metadata database migrated, the probe DAGs in its folder,
    and connections to the executor host: `vpe_probe` of VPE's own type, `grpc_default` of type grpc."""
    if request.param == "pinned":
        version, options = PINNED_AIRFLOW, ("--constraint", str(ROOT / "requirements.txt"))
    else:
        assert OLDEST_AIRFLOW in RELEASE_DAYS, f"add Airflow {OLDEST_AIRFLOW}'s release day to RELEASE_DAYS"
        version, options = OLDEST_AIRFLOW, ("--exclude-newer", RELEASE_DAYS[OLDEST_AIRFLOW])
    base = tmp_path_factory.mktemp(f"airflow-{version}")
    venv = make_venv(base / "venv", f"apache-airflow=={version}", wheel, options=options)
    dags = base / "dags"
    dags.mkdir()
    for name, text in PROBE_DAGS.items():
        (dags / name).write_text(text)
    address = {"host": "127.0.0.1", "port": executor_host["port"], "password": TOKEN}
    env = clean_env(
        AIRFLOW_HOME=str(base / "home"), AIRFLOW__CORE__DAGS_FOLDER=str(dags), AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW_CONN_VPE_PROBE=json.dumps({"conn_type": "vpe_executor", **address}),
        AIRFLOW_CONN_GRPC_DEFAULT=json.dumps({"conn_type": "grpc", **address, "extra": {"auth_type": "NO_AUTH"}}))
    cli = venv / "bin" / "airflow"
    run(cli, "db", "migrate", cwd=base, env=env)
    return {"version": version, "venv": venv, "env": env, "cli": cli, "cwd": base}


def airflow_cli(airflow: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return run(airflow["cli"], *args, cwd=airflow["cwd"], env=airflow["env"])


def test_airflow_imports_vpe_from_the_installed_wheel(airflow: dict[str, Any]) -> None:
    where = run(airflow["venv"] / "bin" / "python", "-c", "import vpe.executor; print(vpe.executor.__file__)",
                cwd=airflow["cwd"], env=airflow["env"]).stdout
    assert where.strip().startswith(str(airflow["venv"]))
    assert airflow_cli(airflow, "version").stdout.strip().splitlines()[-1] == airflow["version"]


def test_providers_list_shows_vpe_with_the_version_ping_reports(airflow: dict[str, Any],
                                                               executor_host: dict[str, Any]) -> None:
    providers = last_json(airflow_cli(airflow, "providers", "list", "-o", "json").stdout)
    [vpe] = [p for p in providers if p["package_name"] == "vpe-executor"]
    assert vpe["version"] == executor_host["version"]


def test_connection_form_has_vpe_fields(airflow: dict[str, Any]) -> None:
    shown = run(airflow["venv"] / "bin" / "python", "-c", HOOK_META, cwd=airflow["cwd"], env=airflow["env"])
    meta = last_json(shown.stdout)
    assert meta["hook_class_name"] == "vpe.hooks.ExecutorHook"
    assert meta["hook_name"] == "VPE executor"
    assert {name: field["schema"]["title"] for name, field in meta["extra_fields"].items()} == {
        "tls_ca": "TLS CA file", "tls_cert": "TLS client certificate file", "tls_key": "TLS client key file"}
    assert meta["standard_fields"]["password"]["title"] == "Token"
    assert meta["standard_fields"]["login"]["hidden"] is True
    assert "get_connection_form_widgets" not in shown.stderr  # 3.2+ read the declared fields, with no warning


def test_dags_import_with_the_package_and_with_the_old_module_name(airflow: dict[str, Any]) -> None:
    assert last_json(airflow_cli(airflow, "dags", "list-import-errors", "-l", "-o", "json").stdout) == []
    listed = last_json(airflow_cli(airflow, "dags", "list", "-l", "-o", "json").stdout)
    assert {"vpe_package_probe", "vpe_legacy_import"} <= {d["dag_id"] for d in listed}


def test_dag_runs_tasks_on_the_executor_host(airflow: dict[str, Any]) -> None:
    ran = airflow_cli(airflow, "dags", "test", "vpe_package_probe")
    log = ran.stdout + ran.stderr
    for said in ("own", "grpc", "deferred"):
        assert f"hello from ['{said}']" in log
    assert "state=success" in log
