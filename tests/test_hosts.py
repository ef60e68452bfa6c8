"""Several hosts on one machine (issue 22, README "Running on several hosts").

The test makes its own network: a bridge holding the central host's address (PostgreSQL, Redis, the api-server,
the scheduler and the demo stand-ins bind it) and a network namespace per other host, each with an address of its
own and a VPE_HOME of its own: three executor replicas and two Celery workers, started by `./bootstrap.sh up
executor` and `./bootstrap.sh --celery up celery-worker` inside their namespaces. The offline demo's `ingestion`
and `landslide_monitor` run through the real scheduler; then, on a fresh warehouse, again with one replica's host
lost (every process in its namespace killed) while it crawls; then with a single replica left. Each round must fill
the warehouse alike.

Needs root (`ip netns`, a bridge) and Debian's redis-server; skips, saying so, where either is missing.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import grpc
import psycopg
import pytest

from conftest import ROOT, AirflowAPI, bootstrap, read_secrets, repo_copy_stack_config, wait_for_envs

sys.path.insert(0, str(ROOT))
import executor  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs Redis: apt-get install redis-server")

EXECUTORS, WORKERS = 3, 2
# Small batches against a slow stand-in: the crawl makes many calls and lasts long enough to lose its host
# in the middle of it.
BATCH = 3
STANDIN_LATENCY_MS = 1000
DAGS = ("ingestion", "landslide_monitor")


def dag_copies() -> dict[str, str]:
    """The repo's two DAGs, changed only where the test needs it: small crawl batches; the monitor triggered by
    the test rather than scheduled, and retried as soon as the ingestion DAG is."""
    ingestion = (ROOT / "dags" / "ingestion.py").read_text()
    monitor = (ROOT / "dags" / "landslide_monitor.py").read_text()
    crawl = 'crawl = ExecutorOperator(task_id="crawl", env="ingestion", script="ingestion/crawl.py",'
    assert crawl in ingestion and 'args=["--pending-from-warehouse",' in monitor
    ingestion = ingestion.replace(crawl, crawl + f' args=["--batch-size", "{BATCH}"],')
    monitor = monitor.replace('args=["--pending-from-warehouse",', f'args=["--batch-size", "{BATCH}", '
                                                                   '"--pending-from-warehouse",')
    for old, new in (('schedule="@daily"', "schedule=None"), ("is_paused_upon_creation=True", "is_paused_upon_creation=False"),
                     ('"retry_delay": timedelta(minutes=5)', '"retry_delay": timedelta(seconds=30)')):
        assert old in monitor, old
        monitor = monitor.replace(old, new)
    return {"dags/ingestion.py": ingestion, "dags/landslide_monitor.py": monitor}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Network:
    """A bridge with the central host's address and one namespace (own address, loopback up) per other host;
    names carry a prefix unique to this run, the /24 is picked at random in 198.18.0.0/15 (RFC 2544)."""

    def __init__(self) -> None:
        self.prefix = "vh" + secrets.token_hex(3)
        self.net = f"198.18.{secrets.randbelow(250) + 1}"
        self.central = f"{self.net}.254"
        self.bridge = f"{self.prefix}br"
        self.namespaces: list[str] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.central}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, index: int) -> tuple[str, str]:
        """(namespace, address) of a new host."""
        ns, veth, address = f"{self.prefix}-{index}", f"{self.prefix}v{index}", f"{self.net}.{index}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        ip("link", "set", f"{veth}p", "netns", ns)
        ip("link", "set", veth, "master", self.bridge)
        ip("link", "set", veth, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", f"{veth}p")
        ip("netns", "exec", ns, "ip", "link", "set", f"{veth}p", "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return ns, address

    def lose(self, ns: str) -> None:
        """The host is lost: every process in its namespace is killed at once."""
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        for ns in self.namespaces:
            self.lose(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip("simulating hosts needs root: network namespaces and a bridge (ip netns, ip link)")
    try:
        net = Network()
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        pytest.skip(f"cannot create a bridge and network namespaces here ({detail}); this test simulates hosts with them")
    try:
        yield net
    finally:
        net.remove()


def in_namespace(ns: str, *args: str, env: dict[str, str]) -> None:
    result = subprocess.run(["ip", "netns", "exec", ns, str(ROOT / "bootstrap.sh"), *args], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"in {ns}: ./bootstrap.sh {' '.join(args)}\n{result.stdout}\n{result.stderr}"


def provision_envs(home: Path, central: dict[str, str]) -> None:
    """Builds the executor's envs in `home` while the host can reach the package index (a namespace cannot):
    an executor started here on loopback, stopped once they are ready; the host's own executor reuses them."""
    port = str(executor.free_port())
    token = read_secrets(home)["VPE_EXECUTOR_TOKEN"]
    env = {**os.environ, "VPE_HOME": str(home), "VPE_EXECUTOR_HOST": "127.0.0.1", "VPE_EXECUTOR_PORT": port,
           "VPE_EXECUTOR_TOKEN": token, "VPE_EXECUTOR_TASKS_DIR": central["VPE_TASKS_DIR"]}
    (home / "logs").mkdir(parents=True, exist_ok=True)
    with (home / "logs" / "provision.log").open("a") as log:
        server = subprocess.Popen([sys.executable, str(ROOT / "executor.py"), "serve"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_envs({"VPE_HOME": str(home), "VPE_EXECUTOR_HOST": "127.0.0.1", "VPE_EXECUTOR_PORT": port})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)


class Hosts:
    def __init__(self, network: Network, central: dict[str, str]) -> None:
        self.network, self.central = network, central
        self.executors: dict[str, tuple[str, Path]] = {}  # replica address (ip:port) -> (namespace, VPE_HOME)
        self.workers: dict[str, Path] = {}  # worker address -> VPE_HOME

    def satellite_env(self, name: str, address: str) -> dict[str, str]:
        home = Path(self.central["VPE_HOME"]).parent / f"hosts-{name}"
        home.mkdir()
        shutil.copy(Path(self.central["VPE_HOME"]) / "secrets.env", home / "secrets.env")
        (home / "secrets.env").chmod(0o600)
        return {**self.central, "VPE_HOME": str(home), "VPE_LISTEN_ADDRESS": address,
                "VPE_CENTRAL_HOST": self.network.central}

    def executor_logs(self) -> str:
        """The end of each replica's executor log, for failure messages."""
        return "\n".join(f"--- {replica}\n" + "\n".join(
            (home / "logs" / "executor" / "executor.log").read_text(errors="replace").splitlines()[-15:])
            for replica, (_, home) in self.executors.items() if (home / "logs" / "executor" / "executor.log").exists())

    def api(self) -> AirflowAPI:
        return AirflowAPI(self.central)

    def standin_stats(self) -> dict[str, Any]:
        url = f"http://{self.network.central}:{self.central['VPE_OPEN_METEO_PORT']}/stats"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def warehouse(self, database: str | None = None) -> str:
        password = read_secrets(Path(self.central["VPE_HOME"]))["VPE_PG_PASSWORD"]
        return (f"postgresql://postgres:{password}@{self.network.central}:{self.central['VPE_PG_PORT']}/"
                f"{database or self.central['VPE_DEMO_WAREHOUSE_DB']}")


@pytest.fixture(scope="module")
def hosts(network: Network, stack_home: Path) -> Iterator[Hosts]:
    central = repo_copy_stack_config(stack_home, "hosts", dag_copies())
    executor_addresses = [f"{network.net}.{i}" for i in range(1, EXECUTORS + 1)]
    central.update(
        VPE_AIRFLOW_EXECUTOR="CeleryExecutor", VPE_CELERY_WORKERS="0", VPE_LISTEN_ADDRESS=network.central,
        VPE_EXECUTOR_TARGET="ipv4:" + ",".join(f"{a}:{central['VPE_EXECUTOR_PORT']}" for a in executor_addresses),
        VPE_OPEN_METEO_ARGS=f"--latency-ms {STANDIN_LATENCY_MS}", VPE_WORKER_LOG_PORT=str(executor.free_port()),
        VPE_DEMO_WAREHOUSE_DB="warehouse_demo", VPE_AIRFLOW_HOST=network.central)
    result = Hosts(network, central)
    started: list[tuple[str, dict[str, str]]] = []
    try:
        bootstrap("--offline-demo", "up", env=central)
        executor_hosts = [(*network.add_host(i), i) for i in range(1, EXECUTORS + 1)]
        executor_envs = [result.satellite_env(f"executor{i}", address) for _, address, i in executor_hosts]
        with ThreadPoolExecutor(EXECUTORS) as pool:
            list(pool.map(lambda env: provision_envs(Path(env["VPE_HOME"]), central), executor_envs))
        for (ns, address, _), env in zip(executor_hosts, executor_envs):
            in_namespace(ns, "--offline-demo", "up", "executor", env=env)
            started.append((ns, env))
            result.executors[f"{address}:{central['VPE_EXECUTOR_PORT']}"] = (ns, Path(env["VPE_HOME"]))
        for env in executor_envs:
            wait_for_envs({**env, "VPE_EXECUTOR_HOST": env["VPE_LISTEN_ADDRESS"]})
        for i in range(EXECUTORS + 1, EXECUTORS + WORKERS + 1):
            ns, address = network.add_host(i)
            env = {**result.satellite_env(f"worker{i}", address), "VPE_CELERY_WORKERS": "1"}
            in_namespace(ns, "--offline-demo", "--celery", "up", "celery-worker", env=env)
            started.append((ns, env))
            result.workers[address] = Path(env["VPE_HOME"])
        yield result
    finally:
        for ns, env in started:
            subprocess.run(["ip", "netns", "exec", ns, str(ROOT / "bootstrap.sh"), "down"], env={**os.environ, **env},
                           capture_output=True, timeout=120)
        bootstrap("down", env=central, check=False)


# ---- what the runs show

STARTED = re.compile(r"run (\S+) started: pid \d+, workspace (\S+?), log (\S+?), on executor ([\d.]+:\d+)")


def task_instances(api: AirflowAPI, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    return api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]


def started_where(api: AirflowAPI, dag_id: str, run_id: str) -> dict[tuple[str, int], tuple[str, str, str]]:
    """(task, map index) -> (replica, workspace folder, run log) of each step's successful try, read from its task
    log as the api-server serves it (fetched from the worker host that ran it)."""
    where = {}
    for ti in task_instances(api, dag_id, run_id):
        if ti["operator"] != "ExecutorOperator":
            continue
        log = api.task_log(dag_id, run_id, ti["task_id"], ti["try_number"], ti["map_index"])
        found = STARTED.findall(log)
        assert found, f"{dag_id}.{ti['task_id']}: no start line in its log (try {ti['try_number']}):\n{log[-2000:]}"
        _, workspace, run_log, replica = found[-1]
        where[(ti["task_id"], ti["map_index"])] = (replica, workspace, run_log)
    return where


def run_dag(hosts: Hosts, dag_id: str) -> str:
    api = hosts.api()
    run_id = api.trigger(dag_id)
    assert api.wait_for_run(dag_id, run_id, timeout=900) == "success", api.explain(dag_id, run_id) + hosts.executor_logs()
    return run_id


def first_tries_except(api: AirflowAPI, dag_id: str, run_id: str, retried: set[str] = frozenset()) -> None:
    tries = {(ti["task_id"], ti["map_index"]): ti["try_number"] for ti in task_instances(api, dag_id, run_id)}
    assert {key: n for key, n in tries.items() if n != 1 and key[0] not in retried} == {}, tries


def warehouse_tables(dsn: str) -> dict[str, list[tuple]]:
    """Every table of the warehouse's public schema, rows sorted, without what differs between equal loads: identity
    keys (and the foreign keys holding them), the moments rows were written (columns defaulting to now()) and the
    Airflow runs that wrote them (run_id, replaced_by_run)."""
    with psycopg.connect(dsn) as conn:
        columns = conn.execute("""
            SELECT c.relname, array_agg(quote_ident(a.attname) ORDER BY a.attnum)
            FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
            LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
            WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
              AND a.attidentity = '' AND coalesce(pg_get_expr(d.adbin, d.adrelid), '') NOT LIKE '%now()%'
              AND a.attname NOT IN ('updated_at', 'last_checked', 'run_id') AND a.attname NOT LIKE '%\\_run'
              AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f'
                                                              AND a.attnum = ANY (k.conkey))
            GROUP BY c.relname""").fetchall()
        return {table: sorted(tuple(map(str, row)) for row in conn.execute(f"SELECT {', '.join(cols)} FROM {table}"))
                for table, cols in columns}


def fresh_warehouse(hosts: Hosts) -> None:
    """The demo warehouse (with what the hosts share in it) dropped and made again, as on a new installation."""
    with psycopg.connect(hosts.warehouse("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{hosts.central["VPE_DEMO_WAREHOUSE_DB"]}" WITH (FORCE)')
    bootstrap("--offline-demo", "up", "postgres", env=hosts.central)


def run_both(hosts: Hosts, lose_during_crawl: str | None = None) -> dict[str, Any]:
    """Runs ingestion, then landslide_monitor; with `lose_during_crawl` (a replica's address), the host of the replica
    running ingestion's crawl is lost after its second call to the archive. Returns where each step ran, the
    warehouse afterwards and the windows the stand-in served per DAG."""
    api, outcome = hosts.api(), {"where": {}, "windows": {}, "lost": None}
    for dag_id in DAGS:
        before = hosts.standin_stats()["locations"]
        if dag_id == "ingestion" and lose_during_crawl:
            run_id = api.trigger(dag_id)
            outcome["lost"] = lose_crawling_replica(hosts, run_id)
            assert api.wait_for_run(dag_id, run_id, timeout=900) == "success", api.explain(dag_id, run_id)
            first_tries_except(api, dag_id, run_id, retried={"crawl"})
            assert api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/crawl")["try_number"] == 2
        else:
            run_id = run_dag(hosts, dag_id)
            first_tries_except(api, dag_id, run_id)
        outcome["windows"][dag_id] = hosts.standin_stats()["locations"] - before
        outcome["where"][dag_id] = started_where(api, dag_id, run_id)
    outcome["warehouse"] = warehouse_tables(hosts.warehouse())
    return outcome


def lose_crawling_replica(hosts: Hosts, run_id: str) -> str:
    """Waits until ingestion's crawl runs and has made two archive calls, then loses its replica's host."""
    remote = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"ingestion.{run_id}.crawl").lstrip(".-")
    token = read_secrets(Path(hosts.central["VPE_HOME"]))["VPE_EXECUTOR_TOKEN"]
    clients = {replica: executor.ExecutorClient(executor.open_channel(replica), token) for replica in hosts.executors}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for replica, client in clients.items():
            try:
                next(client.attach(remote, running_only=True, rpc_timeout=5))
            except grpc.RpcError:
                continue
            calls = hosts.standin_stats()["calls"]
            while hosts.standin_stats()["calls"] < calls + 2:
                assert time.monotonic() < deadline, f"the crawl on {replica} made no two archive calls"
                time.sleep(0.1)
            hosts.network.lose(hosts.executors[replica][0])
            return replica
        time.sleep(0.3)
    raise AssertionError(f"ingestion's crawl ({remote}) did not start on any replica within 600s")


# ---- the tests


@pytest.fixture(scope="module")
def all_up(hosts: Hosts) -> dict[str, Any]:
    return run_both(hosts)


def test_status_on_the_central_host_shows_each_replica_and_the_other_hosts_workers(hosts: Hosts) -> None:
    status = bootstrap("status", env=hosts.central, check=False).stdout
    for replica in hosts.executors:
        assert re.search(rf"^executor\s+{re.escape(replica)}\s+healthy$", status, re.M), status + hosts.executor_logs()
    for address in hosts.workers:
        assert re.search(rf"^airflow-celery-worker\s+celery-worker-1@{re.escape(address)}\s+healthy \(another host\)$",
                         status, re.M), status
    assert not (Path(hosts.central["VPE_HOME"]) / "run" / "executor.pid").exists()


def test_both_dags_run_with_their_steps_spread_over_the_replicas_each_in_its_own_home(
        hosts: Hosts, all_up: dict[str, Any]) -> None:
    steps = [where for dag in all_up["where"].values() for where in dag.values()]
    assert len({replica for replica, _, _ in steps}) >= 2, steps
    for replica, workspace, run_log in steps:
        home = hosts.executors[replica][1]
        assert workspace.startswith(f"{home}/") and run_log.startswith(f"{home}/"), (replica, workspace, run_log)
        assert Path(run_log).is_file()
    # Nothing of one host lands in another's folder: no home holds the run log of a run another replica held.
    for replica, (_, home) in hosts.executors.items():
        others = {Path(run_log).name for other, _, run_log in steps if other != replica}
        assert not [path for path in home.rglob("*") if path.name in others], replica


def test_task_logs_come_from_the_worker_hosts(hosts: Hosts, all_up: dict[str, Any]) -> None:
    """The api-server has no worker's log folder: it fetched every log it showed (started_where read them) from
    the log server of the worker host that ran the task."""
    api = hosts.api()
    run_id = api.request("GET", "/api/v2/dags/ingestion/dagRuns?order_by=-start_date&limit=1")["dag_runs"][0]["dag_run_id"]
    hostnames = {ti["hostname"] for ti in task_instances(api, "ingestion", run_id)}
    assert hostnames <= set(hosts.workers), hostnames
    central_logs = Path(hosts.central["VPE_HOME"]) / "logs" / "airflow"
    assert list(central_logs.glob("dag_id=ingestion/*/task_id=extract/**/*.log")) == []


def test_a_replica_lost_mid_crawl_costs_one_retry_of_that_step_and_nothing_else(
        hosts: Hosts, all_up: dict[str, Any]) -> None:
    fresh_warehouse(hosts)
    replica = next(iter(hosts.executors))  # any: the one holding the crawl is the one lost
    lost = run_both(hosts, lose_during_crawl=replica)
    assert lost["lost"] in hosts.executors
    # The crawl's retry and everything after it ran on live replicas.
    assert lost["where"]["ingestion"][("crawl", -1)][0] != lost["lost"]
    assert all(where[0] != lost["lost"] for where in lost["where"]["landslide_monitor"].values())
    # Each window was fetched once, but for those of the call in flight when the host was lost.
    assert all_up["windows"]["ingestion"] <= lost["windows"]["ingestion"] <= all_up["windows"]["ingestion"] + BATCH
    assert lost["windows"]["landslide_monitor"] == all_up["windows"]["landslide_monitor"]
    assert lost["warehouse"] == all_up["warehouse"]


def test_one_replica_left_fills_the_warehouse_as_all_three_do(hosts: Hosts, all_up: dict[str, Any]) -> None:
    """A one-host run: every replica but one lost (before the runs), so every step lands on the last one."""
    alive = [replica for replica, (ns, _) in hosts.executors.items()
             if subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.strip()]
    for replica in alive[1:]:
        hosts.network.lose(hosts.executors[replica][0])
    fresh_warehouse(hosts)
    one = run_both(hosts)
    assert {where[0] for dag in one["where"].values() for where in dag.values()} == {alive[0]}
    assert one["windows"] == all_up["windows"]
    assert one["warehouse"] == all_up["warehouse"]
