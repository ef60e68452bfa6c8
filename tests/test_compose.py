"""The docker compose stack, as far as it can be checked without a Docker engine.

- docker-compose.yml against the Compose Specification's JSON schema (and `docker compose config`
  / Debian's `docker-compose config` when installed), after interpolation with .env + the secrets;
- every path, port and variable it and the Dockerfiles reference exists in the repo or .env;
- the Dockerfiles follow requirements.txt and envs/*.yml (the same files local mode uses);
- the env-building step of Dockerfile.executor, run for real against the executor (venv backend);
- the grpc_default connection it gives Airflow, read by VPE's hook (vpe.hooks), reaching a real executor;
- scaled executor replicas: no volume shared between them, and each names its own address (a replica bound
  to all addresses run in a stand-in container: its own hostname and /etc/hosts, as Docker gives it);
- bootstrap.sh's compose mode against a `docker` stand-in that records its calls (a double for the CLI only).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import executor
from conftest import ROOT, bootstrap, free_port

COMPOSE_FILE = ROOT / "docker-compose.yml"
SECRET_KEYS = {"VPE_PG_PASSWORD", "VPE_EXECUTOR_TOKEN", "AIRFLOW__API_AUTH__JWT_SECRET",
               "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW_UID",
               "VPE_AIRFLOW_DB_PASSWORD", "VPE_LOADER_PASSWORD", "VPE_READER_PASSWORD", "VPE_REDIS_PASSWORD",
               "VPE_AIRFLOW_ADMIN_PASSWORD", "VPE_EXECUTOR_DB_PASSWORD"}
AIRFLOW_SERVICES = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}; $$ is a literal $.
VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value for key, value in pairs}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's interpolation rules, for the forms docker-compose.yml uses (cross-checked below
    against the real `docker compose config` where one is installed)."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = values.get(name)
        if op in (":-", "-"):
            return arg if value is None or (op == ":-" and value == "") else value
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise ValueError(f"{name}: {arg}")
        return value or ""
    return VARIABLE.sub(replace, text)


def service_environment(model: dict[str, Any], name: str) -> dict[str, str]:
    """A service's environment as compose hands it over: its env_file's values, `environment:` over them."""
    service = model["services"][name]
    files = service.get("env_file") or []
    values: dict[str, str] = {}
    for path in [files] if isinstance(files, str) else files:
        values |= env_file(ROOT / path)
    # An empty value (`KEY: ${UNSET:-}`) is an empty string to compose, None to yaml.
    return values | {k: "" if v is None else str(v) for k, v in (service.get("environment") or {}).items()}


def fake_secrets() -> dict[str, str]:
    return {key: f"test-{key.lower()}" for key in SECRET_KEYS} | {"AIRFLOW_UID": "1000"}


def compose_model(values: dict[str, str] | None = None) -> dict[str, Any]:
    values = values if values is not None else env_file(ROOT / ".env") | fake_secrets()
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), values))


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    return compose_model()


def referenced_variables() -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in VARIABLE.finditer(COMPOSE_FILE.read_text()) if m.group(1)]


# --- the compose file --------------------------------------------------------

def test_compose_file_follows_the_compose_specification(model: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    # check-jsonschema (requirements-test.txt) ships a copy of the Compose Specification's schema.
    check_jsonschema = pytest.importorskip("check_jsonschema")
    schema_file = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(json.loads(schema_file.read_text())).iter_errors(model)]
    assert errors == []


def test_a_compose_cli_accepts_the_file(tmp_path: Path) -> None:
    """`docker compose config` where the plugin is installed, else Debian's docker-compose 1.29."""
    values = env_file(ROOT / ".env") | fake_secrets()
    env_path = tmp_path / "all.env"
    env_path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    clean_env = {k: v for k, v in os.environ.items() if k not in values}
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        command = ["docker", "compose", "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
                   "--env-file", str(env_path), "config", "--format", "json"]
    elif shutil.which("docker-compose"):
        # 1.29 predates the top-level `name:`; everything else it checks as compose v2 would.
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(re.sub(r"(?m)^name: .*\n", "", COMPOSE_FILE.read_text()))
        command = ["docker-compose", "--project-directory", str(ROOT), "-f", str(copy),
                   "--env-file", str(env_path), "config"]
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    ours = compose_model(values)
    for name in ("postgres", "executor", "airflow-api-server"):
        theirs = resolved["services"][name].get("environment") or {}
        theirs = {k: "" if v is None else str(v) for k, v in theirs.items()}
        assert theirs == service_environment(ours, name)


def test_every_variable_without_a_default_is_in_env_or_the_secrets(compose_env_run: dict[str, Any]) -> None:
    defined = set(env_file(ROOT / ".env")) | set(env_file(compose_env_run["secrets"]))
    missing = {name for name, op in referenced_variables() if op not in (":-", "-") and name not in defined}
    assert missing == set()


def test_secrets_are_required_with_a_message_that_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="run ./bootstrap.sh first"):
        compose_model(env_file(ROOT / ".env"))


def test_every_bind_mount_source_exists(model: dict[str, Any]) -> None:
    sources = [volume.split(":")[0] for service in model["services"].values()
               for volume in service.get("volumes", []) if volume.startswith("./")]
    assert {"./dags", "./tasks", "./ddl.sql", "./dml.sql"} <= set(sources)
    assert [s for s in sources if not (ROOT / s).exists()] == []


def test_named_volumes_are_declared(model: dict[str, Any]) -> None:
    used = {volume.split(":")[0] for service in model["services"].values()
            for volume in service.get("volumes", []) if not volume.startswith(("./", "/"))}
    assert used == set(model["volumes"])


def test_ports_come_from_env_and_the_executor_is_not_published(model: dict[str, Any]) -> None:
    config = env_file(ROOT / ".env")
    services = model["services"]
    assert services["postgres"]["ports"] == [f"{config['VPE_PG_HOST']}:{config['VPE_PG_PORT']}:5432"]
    assert services["airflow-api-server"]["ports"] == [f"{config['VPE_AIRFLOW_HOST']}:{config['VPE_AIRFLOW_PORT']}:8080"]
    assert "ports" not in services["executor"]
    assert str(services["executor"]["environment"]["VPE_EXECUTOR_PORT"]) == config["VPE_EXECUTOR_PORT"]
    published = [name for name, service in services.items() if "ports" in service]
    assert sorted(published) == ["airflow-api-server", "postgres"]


def test_schema_files_initialise_a_fresh_postgres_volume_in_order(model: dict[str, Any]) -> None:
    mounts = [v for v in model["services"]["postgres"]["volumes"] if "/docker-entrypoint-initdb.d/" in v]
    targets = sorted((v.split(":")[1], v.split(":")[0]) for v in mounts)
    assert [source for _, source in targets] == ["./ddl.sql", "./dml.sql"]


def test_every_long_running_service_has_a_healthcheck(model: dict[str, Any]) -> None:
    dockerfile_healthchecks = {"executor": "HEALTHCHECK" in (ROOT / "Dockerfile.executor").read_text()}
    for name, service in model["services"].items():
        if name == "airflow-init":
            assert service["restart"] == "no"
            continue
        assert "healthcheck" in service or dockerfile_healthchecks.get(name), name
    assert "executor.py\", \"ping\"" in (ROOT / "Dockerfile.executor").read_text()


def test_dependencies_wait_for_health_or_completion(model: dict[str, Any]) -> None:
    for name, service in model["services"].items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in model["services"], (name, dependency)
            expected = "service_completed_successfully" if dependency == "airflow-init" else "service_healthy"
            assert rule == {"condition": expected}, (name, dependency)
    for name in AIRFLOW_SERVICES:
        assert set(model["services"][name]["depends_on"]) == {"postgres", "executor", "airflow-init"}


def test_airflow_reaches_every_executor_replica_through_dns(model: dict[str, Any]) -> None:
    for name in ["airflow-init", *AIRFLOW_SERVICES, "airflow-worker"]:
        conn = json.loads(model["services"][name]["environment"]["AIRFLOW_CONN_GRPC_DEFAULT"])
        assert conn["host"] == "dns:///executor"
        assert str(conn["port"]) == env_file(ROOT / ".env")["VPE_EXECUTOR_PORT"]
        assert conn["conn_type"] == "vpe_executor"
        assert conn["password"] == fake_secrets()["VPE_EXECUTOR_TOKEN"]
    executor = model["services"]["executor"]
    assert executor["environment"]["VPE_EXECUTOR_TOKEN"] == fake_secrets()["VPE_EXECUTOR_TOKEN"]
    assert "container_name" not in executor, "a fixed container name would forbid --scale executor=N"


def test_executor_replicas_share_no_volume(model: dict[str, Any]) -> None:
    """With --scale executor=N a named volume is one disk under every replica; replicas on several hosts have
    none in common, so what they write goes to volumes of their own (anonymous: one per container)."""
    volumes = model["services"]["executor"]["volumes"]
    writable = [v for v in volumes if not v.endswith(":ro")]
    assert sorted(writable) == ["/vpe/buffer", "/vpe/logs"]
    assert all(v.startswith("./") for v in volumes if v.endswith(":ro")), "read-only: the repo's own files"
    assert not {"buffer", "executor-logs"} & set(model["volumes"])


def test_the_executor_service_has_nothing_one_replica_only_can_have(model: dict[str, Any]) -> None:
    """Started.replica (where Attach and Cancel go) is the container's own address when bound to all (next test):
    a fixed name, address or host port would be the same for every replica, or forbid scaling."""
    executor = model["services"]["executor"]
    assert "VPE_EXECUTOR_ADVERTISE" not in executor["environment"]
    assert not {"container_name", "hostname", "ports"} & set(executor)


def replica_named_in_a_container(tmp_path: Path, hostname: str, address: str, port: int) -> str:
    """Started.replica of an executor bound to 0.0.0.0 in a stand-in for a Docker container: its own hostname
    (UTS namespace) and an /etc/hosts that maps it to the container's address (mount namespace), as Docker
    writes them."""
    hosts = tmp_path / f"hosts-{hostname}"
    hosts.write_text(f"127.0.0.1 localhost\n{address} {hostname}\n")
    probe = f"import executor; print(executor.Config(host='0.0.0.0', port={port}).replica)"
    script = f"hostname {hostname} && mount --bind {hosts} /etc/hosts && exec {sys.executable} -c \"{probe}\""
    result = subprocess.run(["unshare", "--uts", "--mount", "sh", "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0 and ("unshare" in result.stderr or "mount" in result.stderr):
        pytest.skip(f"cannot make UTS and mount namespaces here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_each_scaled_replica_names_its_own_container_address(model: dict[str, Any], tmp_path: Path) -> None:
    executor_env = model["services"]["executor"]["environment"]
    assert executor_env["VPE_EXECUTOR_HOST"] == "0.0.0.0"
    port = int(executor_env["VPE_EXECUTOR_PORT"])
    named = [replica_named_in_a_container(tmp_path, hostname, address, port)
             for hostname, address in [("3f2a9c1b7d4e", "172.30.0.7"), ("9b0c4d2e6a18", "172.30.0.8")]]
    assert named == [f"172.30.0.7:{port}", f"172.30.0.8:{port}"]


def test_the_executor_keeps_workspaces_in_the_warehouses_postgresql(model: dict[str, Any]) -> None:
    secrets = fake_secrets()
    store = model["services"]["executor"]["environment"]["VPE_EXECUTOR_WORKSPACE_STORE"]
    assert store == f"postgresql://vpe_executor:{secrets['VPE_EXECUTOR_DB_PASSWORD']}@postgres:5432/" \
                    f"{env_file(ROOT / '.env')['VPE_WAREHOUSE_DB']}"
    init = model["services"]["airflow-init"]
    assert '"vpe_executor": "VPE_EXECUTOR_DB_PASSWORD"' in init["command"][-1]
    assert init["environment"]["VPE_EXECUTOR_DB_PASSWORD"] == secrets["VPE_EXECUTOR_DB_PASSWORD"]
    assert model["services"]["executor"]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}


def test_airflows_target_is_one_dns_name_for_every_replica(model: dict[str, Any]) -> None:
    """gRPC's dns resolver returns every address of the scaled service, and round_robin uses them all."""
    from airflow.models.connection import Connection

    from vpe.hooks import connection_settings
    conn = model["services"]["airflow-scheduler"]["environment"]["AIRFLOW_CONN_GRPC_DEFAULT"]
    target, token, _ = connection_settings(Connection.from_json(conn, conn_id="grpc_default"))
    port = int(env_file(ROOT / ".env")["VPE_EXECUTOR_PORT"])
    assert target == f"dns:///executor:{port}"
    assert token == fake_secrets()["VPE_EXECUTOR_TOKEN"]
    assert executor.split_target(target) == ("executor", port) and executor.listed_addresses(target) is None
    assert ("grpc.lb_policy_name", "round_robin") in executor.GRPC_OPTIONS


def test_celery_profile_adds_redis_and_workers(model: dict[str, Any]) -> None:
    services = model["services"]
    assert {name for name, s in services.items() if s.get("profiles")} == {"redis", "airflow-worker"}
    assert services["airflow-worker"]["command"] == "celery worker"
    assert "healthcheck" in services["redis"] and "healthcheck" in services["airflow-worker"]
    assert str(services["airflow-worker"]["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"]) == \
        env_file(ROOT / ".env")["VPE_AIRFLOW_PARALLELISM"]
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    celery = compose_model(env_file(ROOT / ".env") | fake_secrets() | {"VPE_AIRFLOW_EXECUTOR": "CeleryExecutor"})
    assert celery["services"]["airflow-worker"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert celery["services"]["airflow-scheduler"]["environment"]["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"


def airflow_env_in_bootstrap() -> dict[str, str]:
    """The AIRFLOW__ values bootstrap.sh's airflow_env exports as literals (local mode's own)."""
    text = (ROOT / "bootstrap.sh").read_text()
    return dict(re.findall(r"^\s*export (AIRFLOW__[A-Z_]+)=([^$\s]+)$", text, re.M))


def local_airflow_environment(tmp_path: Path) -> dict[str, str]:
    """The environment `./bootstrap.sh --local airflow` gives the airflow CLI: a stand-in `airflow`
    in a stand-in venv prints it. The caller's AIRFLOW__ variables are left out: they would win."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "airflow").write_text(f"#!{sys.executable}\nimport json, os\nprint(json.dumps(dict(os.environ)))\n")
    (venv / "bin" / "airflow").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(VPE_HOME=str(tmp_path / "home"), VPE_VENV=str(venv))
    result = subprocess.run([str(ROOT / "bootstrap.sh"), "--local", "airflow"], env=env, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_both_modes_take_the_shared_airflow_settings_from_airflow_env(model: dict[str, Any], tmp_path: Path) -> None:
    shared = env_file(ROOT / "airflow.env")
    assert {"AIRFLOW__CORE__LOAD_EXAMPLES", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"} <= set(shared)
    # Literals only: bootstrap's reader takes a value as written, compose v2 unquotes and interpolates it.
    assert {k: v for k, v in shared.items() if not re.fullmatch(r"[^\s$\"'#]+", v)} == {}
    for name in ["airflow-init", *AIRFLOW_SERVICES, "airflow-worker"]:
        assert model["services"][name]["env_file"] == "airflow.env", name
        assert set(shared).isdisjoint(model["services"][name]["environment"]), f"{name} overrides airflow.env"
        assert {k: service_environment(model, name)[k] for k in shared} == shared
    local = local_airflow_environment(tmp_path)
    assert {k: local.get(k) for k in shared} == shared
    assert set(shared).isdisjoint(airflow_env_in_bootstrap()), "bootstrap.sh overrides airflow.env"


def test_compose_serves_airflow_with_fab_users_and_an_admin_from_the_secrets(model: dict[str, Any]) -> None:
    for name in ["airflow-init", *AIRFLOW_SERVICES, "airflow-worker"]:
        assert model["services"][name]["environment"]["AIRFLOW__CORE__AUTH_MANAGER"].endswith(".FabAuthManager")
    init = model["services"]["airflow-init"]
    assert "airflow users create --username admin --role Admin" in init["command"][-1]
    assert "VPE_AIRFLOW_ADMIN_PASSWORD" in init["environment"]


def test_per_mode_airflow_settings_agree_where_they_are_literals(model: dict[str, Any]) -> None:
    local = airflow_env_in_bootstrap()
    compose = model["services"]["airflow-scheduler"]["environment"]
    shared = set(local) & set(compose)
    assert {k: compose[k] for k in shared} == {k: local[k] for k in shared}


def test_per_mode_airflow_settings_come_from_the_same_env_variables() -> None:
    """The executor and its parallelism are .env's settings in both modes, not a value written in each."""
    local = dict(re.findall(r"^\s*export (AIRFLOW__[A-Z_]+)=\$([A-Z_]+)$", (ROOT / "bootstrap.sh").read_text(), re.M))
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-airflow-common"]["environment"]
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__PARALLELISM"):
        assert VARIABLE.search(compose[key]).group(1) == local[key], key
        assert local[key] in env_file(ROOT / ".env"), key


# --- the Dockerfiles ---------------------------------------------------------

def dockerfile_copies(name: str) -> list[str]:
    sources = []
    for line in (ROOT / name).read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    return sources


def dockerignore_keeps(path: str) -> bool:
    kept = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            kept = negate
    return kept


@pytest.mark.parametrize("dockerfile", ["Dockerfile.executor", "Dockerfile.airflow"])
def test_everything_the_dockerfiles_copy_exists_and_reaches_the_build(dockerfile: str) -> None:
    sources = [s.rstrip("/") for s in dockerfile_copies(dockerfile)]
    assert sources
    assert [s for s in sources if not (ROOT / s).exists()] == []
    assert [s for s in sources if not dockerignore_keeps(s)] == []
    assert not dockerignore_keeps(".vpe"), "the build context must not carry the local venv and secrets"


def test_airflow_image_is_local_modes_airflow_with_the_same_pins() -> None:
    text = (ROOT / "Dockerfile.airflow").read_text()
    pinned = re.search(r"^apache-airflow==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert re.search(r"^ARG AIRFLOW_VERSION=(\S+)", text, re.M).group(1) == pinned
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}", text, re.M)
    assert "pip install --no-cache-dir -r /opt/vpe/requirements.txt" in text
    assert "requirements.txt" in dockerfile_copies("Dockerfile.airflow")
    assert {"pyproject.toml", "hatch_build.py", "executor.py", "ping.proto", "vpe/"} <= set(
        dockerfile_copies("Dockerfile.airflow"))
    assert "pip install --no-cache-dir --no-deps /opt/vpe/src" in text, "DAGs import the operator from the vpe package"
    assert "PYTHONPATH" not in text


def test_executor_image_builds_every_env_file_of_local_mode() -> None:
    text = (ROOT / "Dockerfile.executor").read_text()
    assert re.search(r"^FROM mambaorg/micromamba:", text, re.M)
    copies = dockerfile_copies("Dockerfile.executor")
    assert "envs/grpc.yml" in copies and "envs/" in copies
    assert "micromamba install --yes --name base --file /tmp/grpc.yml" in text
    assert re.search(r"^USER \$MAMBA_USER$", text, re.M), "the executor must not run as root"
    assert list((ROOT / "envs").glob("*.yml")), "envs/ holds the env files both modes build"


def env_build_script() -> str:
    text = (ROOT / "Dockerfile.executor").read_text()
    return re.search(r"<<'SH'\n(.*?)\nSH\n", text, re.S).group(1)


@pytest.fixture
def env_build(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    envs = tmp_path / "envs"
    envs.mkdir()
    env = {**os.environ, "VPE_HOME": str(tmp_path / "home"), "VPE_EXECUTOR_ENVS_DIR": str(envs),
           "VPE_EXECUTOR_PORT": str(free_port()), "VPE_EXECUTOR_ENV_BACKEND": "venv",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("VPE_EXECUTOR_TOKEN", None)
    yield envs, env


def run_env_build(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", env_build_script()], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, start_new_session=True)


def test_dockerfile_env_build_step_leaves_every_env_ready(env_build: tuple[Path, dict[str, str]]) -> None:
    """The RUN step that bakes the envs, run outside Docker against the real executor (venv backend
    here, micromamba in the image)."""
    envs, env = env_build
    (envs / "tiny.yml").write_text(f"name: tiny\ndependencies:\n  - python={sys.version_info.major}.{sys.version_info.minor}\n")
    result = run_env_build(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^tiny\s+ready\b", result.stdout, re.M)
    assert (Path(env["VPE_HOME"]) / "envs" / "tiny" / "bin" / "python").exists()


def test_dockerfile_env_build_step_fails_the_build_with_the_reason(env_build: tuple[Path, dict[str, str]]) -> None:
    envs, env = env_build
    (envs / "broken.yml").write_text("name: broken\ndependencies:\n  - python=3.11\n  - gdal\n")
    result = run_env_build(env)
    assert result.returncode == 1
    assert "building envs/*.yml failed" in result.stdout
    assert "gdal" in result.stdout


# --- the connection Airflow gets, against a real executor -------------------

@pytest.fixture
def executor_with_token(tmp_path: Path) -> Iterator[dict[str, str]]:
    (tmp_path / "envs").mkdir()
    env = {**os.environ, "VPE_HOME": str(tmp_path / "home"), "VPE_EXECUTOR_ENVS_DIR": str(tmp_path / "envs"),
           "VPE_EXECUTOR_HOST": "127.0.0.1", "VPE_EXECUTOR_PORT": str(free_port()),
           "VPE_EXECUTOR_TOKEN": fake_secrets()["VPE_EXECUTOR_TOKEN"]}
    server = subprocess.Popen([sys.executable, str(ROOT / "executor.py"), "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        subprocess.run([sys.executable, str(ROOT / "executor.py"), "ping", "--wait", "30"], env=env,
                       check=True, capture_output=True, timeout=60)
        yield env
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_compose_grpc_connection_reaches_an_executor_through_airflows_hook(
        model: dict[str, Any], executor_with_token: dict[str, str]) -> None:
    """The connection docker-compose.yml sets, with `executor` resolved here as localhost instead of by Docker's DNS."""
    conn = json.loads(model["services"]["airflow-scheduler"]["environment"]["AIRFLOW_CONN_GRPC_DEFAULT"])
    conn["host"] = conn["host"].replace("dns:///executor", "dns:///localhost")
    conn["port"] = int(executor_with_token["VPE_EXECUTOR_PORT"])
    probe = textwrap.dedent("""
        from vpe.operators import executor_client
        print(executor_client("grpc_default").ping().message)
    """)
    env = {**os.environ, "AIRFLOW_CONN_GRPC_DEFAULT": json.dumps(conn),
           "AIRFLOW_HOME": str(Path(executor_with_token["VPE_HOME"]) / "airflow")}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "pong"


# --- bootstrap.sh's compose mode against a recording `docker` ---------------

FAKE_DOCKER = r'''#!/usr/bin/env python3
"""Stands in for the docker CLI: records each call, answers like a healthy compose stack."""
import json, os, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if ["-f", "-"] in [args[i:i + 2] for i in range(len(args))] else None
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps({"args": args, "stdin": stdin}) + "\n")
if args[:1] == ["info"] or args[:2] == ["compose", "version"]:
    print("Docker Compose version " + os.environ.get("FAKE_COMPOSE_VERSION", "v2.29.0")); sys.exit(0)
health = json.loads(os.environ.get("FAKE_DOCKER_HEALTH", "{}"))
init_exit = int(os.environ.get("FAKE_DOCKER_INIT_EXIT", "0"))
if "up" in args and "--wait" in args:
    # compose's own messages when --wait gives up (pkg/compose/convergence.go's waitDependencies)
    if init_exit:
        sys.exit(f'service "airflow-init" didn\'t complete successfully: exit {init_exit}')
    for service, state in health.items():
        if state == "unhealthy":
            sys.exit(f"container vpe-{service}-1 is unhealthy")
if "ps" in args:
    services = ["postgres", "executor", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer"]
    print(json.dumps({"Service": "airflow-init", "Name": "vpe-airflow-init-1", "State": "exited",
                      "Health": "", "ExitCode": init_exit}))
    for s in services:
        print(json.dumps({"Service": s, "Name": f"vpe-{s}-1", "State": "running",
                          "Health": health.get(s, "healthy"), "ExitCode": 0}))
    sys.exit(0)
if "exec" in args and "ping" in args:
    print("pong from executor 0.3.0 at 127.0.0.1:3170"); sys.exit(0)
sys.exit(0)
'''


def compose_calls(log: Path) -> list[dict[str, Any]]:
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [c for c in calls if c["args"][:1] == ["compose"] and c["args"][1:2] != ["version"]]


def compose_args(call: dict[str, Any]) -> list[str]:
    """The part after the common --project-directory/-f/--env-file options."""
    args = call["args"][1:]
    while args and args[0] in ("--project-directory", "-f", "--env-file", "--profile"):
        args = args[2:]
    return args


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"
        self.log = tmp / "docker-calls.jsonl"
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "docker").write_text(FAKE_DOCKER.replace("/usr/bin/env python3", sys.executable, 1))
        (bin_dir / "docker").chmod(0o755)
        self.env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "VPE_HOME": str(self.home),
                    "FAKE_DOCKER_LOG": str(self.log), "VPE_COMPOSE_WAIT": "2"}

    def run(self, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
        self.log.unlink(missing_ok=True)
        return bootstrap(*args, env={**self.env, **extra}, check=check, timeout=60)

    def calls(self) -> list[list[str]]:
        return [compose_args(c) for c in compose_calls(self.log)]


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path)


@pytest.fixture(scope="module")
def compose_env_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    stack = Stack(tmp_path_factory.mktemp("compose-up"))
    first = stack.run()
    raw_calls = compose_calls(stack.log)
    secrets_before = (stack.home / "secrets.env").read_text()
    second = stack.run()
    return {"stack": stack, "first": first, "second": second, "raw_calls": raw_calls,
            "secrets": stack.home / "secrets.env", "secrets_before": secrets_before}


def test_up_builds_starts_waits_and_applies_the_schema(compose_env_run: dict[str, Any]) -> None:
    calls = [compose_args(c) for c in compose_env_run["raw_calls"]]
    assert calls[0] == ["up", "--detach", "--build", "--wait", "--wait-timeout", "2"]
    assert any(c[:3] == ["ps", "--all", "--format"] for c in calls)
    schema = [c for c in compose_env_run["raw_calls"] if "psql" in c["args"]]
    assert [c["stdin"] for c in schema] == [(ROOT / "ddl.sql").read_text(), (ROOT / "dml.sql").read_text()]
    for call in schema:
        args = compose_args(call)
        assert args[:3] == ["exec", "-T", "postgres"]
        assert "ON_ERROR_STOP=1" in args and args[args.index("-d") + 1] == "warehouse"


def test_up_passes_both_env_files_to_compose(compose_env_run: dict[str, Any]) -> None:
    args = compose_env_run["raw_calls"][0]["args"]
    env_files = [args[i + 1] for i, a in enumerate(args) if a == "--env-file"]
    assert env_files == [str(ROOT / ".env"), str(compose_env_run["secrets"])]
    assert args[args.index("-f") + 1] == str(COMPOSE_FILE)


def test_up_prints_the_status_table(compose_env_run: dict[str, Any]) -> None:
    out = compose_env_run["first"].stdout
    for name in ["postgres", "executor", *AIRFLOW_SERVICES]:
        assert re.search(rf"^vpe-{name}-1\s+\S.*\bhealthy$", out, re.M), name
    assert "vpe-airflow-init-1" not in out
    assert "pong from executor" in out
    # The FAB admin that airflow-init creates has the secrets file's password.
    assert f"password {env_file(compose_env_run['secrets'])['VPE_AIRFLOW_ADMIN_PASSWORD']})" in out


def test_secrets_are_made_once_outside_the_repo_and_kept(compose_env_run: dict[str, Any]) -> None:
    secrets = env_file(compose_env_run["secrets"])
    assert set(secrets) == SECRET_KEYS
    assert all(secrets.values())
    expected_uid = str(os.getuid()) if os.getuid() != 0 else "50000"
    assert secrets["AIRFLOW_UID"] == expected_uid
    assert compose_env_run["secrets"].read_text() == compose_env_run["secrets_before"]
    assert compose_env_run["secrets"].stat().st_mode & 0o077 == 0
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked.strip() == ".env" and "VPE_PG_PASSWORD" not in (ROOT / ".env").read_text()


def test_up_of_one_component_starts_only_its_services(stack: Stack) -> None:
    stack.run("up", "airflow")
    assert stack.calls()[0] == ["up", "--detach", "--build", "--wait", "--wait-timeout", "2", "airflow-init",
                                *AIRFLOW_SERVICES]


def test_up_waits_for_airflow_init_to_complete_not_to_keep_running(model: dict[str, Any], stack: Stack) -> None:
    """`up --wait` waits for a one-shot service to exit 0 only when a service started with it depends on it
    with service_completed_successfully; otherwise its exit 0 fails the wait (docker/compose#10596)."""
    for component in ("airflow", "postgres executor airflow"):
        stack.run("up", *component.split())
        started = stack.calls()[0][6:]
        assert "airflow-init" in started
        adopters = [name for name in started if model["services"][name].get("depends_on", {}).get("airflow-init")
                    == {"condition": "service_completed_successfully"}]
        assert adopters, started


def test_up_with_celery_executor_adds_the_profile_and_workers(stack: Stack) -> None:
    stack.run("up", "airflow", VPE_AIRFLOW_EXECUTOR="CeleryExecutor")
    up = compose_calls(stack.log)[0]["args"]
    assert up[up.index("--profile") + 1] == "celery"
    assert compose_args(compose_calls(stack.log)[0])[-1] == "airflow-worker"


def test_up_fails_when_a_container_stays_unhealthy(stack: Stack) -> None:
    result = stack.run(check=False, FAKE_DOCKER_HEALTH=json.dumps({"executor": "unhealthy"}))
    assert result.returncode == 1
    assert "container vpe-executor-1 is unhealthy" in result.stderr
    assert "docker compose up --wait failed" in result.stderr and "2s passed" in result.stderr
    assert "./bootstrap.sh logs" in result.stderr
    assert not any(c[:1] == ["exec"] for c in stack.calls()), "no schema is applied to a stack that is not up"


def test_up_fails_when_airflow_init_fails(stack: Stack) -> None:
    result = stack.run(check=False, FAKE_DOCKER_INIT_EXIT="1")
    assert result.returncode == 1
    assert "airflow-init\" didn't complete successfully: exit 1" in result.stderr


def test_a_compose_without_wait_timeout_is_refused_with_what_to_do(stack: Stack) -> None:
    result = stack.run(check=False, FAKE_COMPOSE_VERSION="v2.16.0")
    assert result.returncode == 1
    assert "Docker Compose 2.17 or newer" in result.stderr and "--local" in result.stderr
    assert stack.calls() == []
    assert stack.run("status", FAKE_COMPOSE_VERSION="v2.17.0").returncode == 0


def test_status_exit_code_follows_health(stack: Stack) -> None:
    assert stack.run("status").returncode == 0
    result = stack.run("status", check=False, FAKE_DOCKER_HEALTH=json.dumps({"airflow-scheduler": "unhealthy"}))
    assert result.returncode == 1
    assert re.search(r"^vpe-airflow-scheduler-1\s.*unhealthy$", result.stdout, re.M)


def test_down_stops_every_profile_and_keeps_the_volumes(stack: Stack) -> None:
    stack.run("down")
    down = compose_calls(stack.log)[-1]["args"]
    assert down[-1] == "down" and down[down.index("--profile") + 1] == "celery"
    assert "--volumes" not in down and "-v" not in down


def test_psql_logs_migrate_and_airflow_go_to_the_containers(stack: Stack) -> None:
    stack.run("psql", "-c", "select 1")
    assert stack.calls() == [["exec", "-T", "postgres", "psql", "-U", "vpe_reader", "-d", "warehouse", "-c", "select 1"]]
    stack.run("psql", "--admin", "-c", "select 1")
    assert stack.calls() == [["exec", "-T", "postgres", "psql", "-U", "postgres", "-d", "warehouse", "-c", "select 1"]]
    stack.run("logs", "executor", "postgres")
    assert stack.calls() == [["logs", "--tail", "40", "executor", "postgres"]]
    stack.run("logs")
    assert stack.calls() == [["logs", "--tail", "40"]]
    stack.run("migrate")
    assert [c[:3] for c in stack.calls()] == [["exec", "-T", "postgres"]] * 2
    stack.run("airflow", "dags", "list")
    assert stack.calls() == [["exec", "-T", "airflow-scheduler", "airflow", "dags", "list"]]


def test_forced_docker_mode_without_compose_says_what_to_install(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    result = bootstrap("--docker", "status", check=False,
                       env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "VPE_HOME": str(tmp_path / "home")})
    assert result.returncode == 1
    assert "install the Docker Compose plugin" in result.stderr
