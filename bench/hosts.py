"""Runs per minute of a DAG of many short deferrable tasks: 1 vs 3 executor replicas, 1 vs 2 Celery workers.

For each Celery setup the bench brings up a throwaway offline-demo stack under Airflow's CeleryExecutor
(`./bootstrap.sh --offline-demo --celery`, VPE_CELERY_WORKERS) on a copy of dags/ and tasks/ plus a DAG of
--tasks tasks, each an ExecutorOperator(deferrable=True, defer_after=0) running a one-line
script: every task starts its run, defers at once, and resumes in a worker when the run has ended (no sooner
than the trigger's DEFER_SETTLE), so a DAG run costs two Airflow task starts per task and one executor run.

The executor replicas are the stack's own executor plus two more, each with a VPE_HOME of its own on a
loopback port, started as on an executor host (`./bootstrap.sh up executor` with VPE_CENTRAL_HOST and the
stack's secrets.env copied); the stack's VPE_EXECUTOR_TARGET names all three (`ipv4:127.0.0.1:p1,...`).
The DAG file holds the same DAG twice: vpe_bench_hosts_3 runs through grpc_default (all three replicas),
vpe_bench_hosts_1 through a connection to the stack's executor alone (an AIRFLOW_CONN_* variable, written
the way bootstrap.sh writes grpc_default). Per configuration: one warm-up DAG run, then --runs DAG runs
triggered together; runs/minute = those runs / (last end - first start). Each replica's run logs show where
the executor runs went.

The Celery setups (--setup WORKERS:SLOTS): 1 worker; 2 workers as bootstrap.sh sets them up
(VPE_AIRFLOW_PARALLELISM, .env's 4, is each worker's concurrency and also the scheduler's `parallelism`, its
cap on tasks queued or running in all: the second worker gets no slot of its own); 2 workers with
VPE_AIRFLOW_PARALLELISM doubled, so that the scheduler hands out as many tasks as two hosts of 4 slots each
would take (each worker may then take 8 of them); and 1 worker with it doubled, to tell the slots' share of
the gain from the second worker's.

What a 2-core machine can show: every replica and worker shares the same two cores, the same PostgreSQL and
the same scheduler, so more replicas or workers add no CPU. It can show what spreading over them costs and that
the runs do spread; what several hosts gain needs several machines.

Run with the test venv:  .vpe/venv/bin/python bench/hosts.py [--tasks 40] [--runs 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import (AirflowAPI, bootstrap, free_port, repo_copy_stack_config, stack_parent,  # noqa: E402
                      wait_for_envs)

REPLICAS = (1, 3)
# Each DAG's connection: the stack's executor alone, or grpc_default (VPE_EXECUTOR_TARGET: every replica).
CONNECTIONS = {1: "vpe_bench_one", 3: "grpc_default"}
TINY_TASK = 'print("done")\n'


def dag_file(tasks: int) -> str:
    return f'''
from datetime import timedelta

import pendulum
from airflow.sdk import dag
from vpe import ExecutorOperator

TASKS = {tasks}


def tasks_dag(replicas: int, conn_id: str) -> None:
    @dag(dag_id=f"vpe_bench_hosts_{{replicas}}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, max_active_runs=16, max_active_tasks=TASKS * 16)
    def many_short_deferrable_tasks():
        for i in range(TASKS):
            ExecutorOperator(task_id=f"t{{i:02d}}", env="ingestion", script="vpe_bench/tiny.py", deferrable=True,
                             defer_after=timedelta(0), grpc_conn_id=conn_id, retries=0)

    many_short_deferrable_tasks()


for replicas, conn_id in {CONNECTIONS!r}.items():
    tasks_dag(replicas, conn_id)
'''


def target(ports: list[int]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)


def connection(ports: list[int], token: str) -> str:
    """A vpe_executor connection to the replicas on `ports`, as bootstrap.sh's grpc_connection_json writes it."""
    return f'{{"conn_type": "vpe_executor", "host": "{target(ports)}", "password": "{token}"}}'


def replica_env(env: dict[str, str], home: Path, port: int) -> dict[str, str]:
    """An executor host's environment: its own VPE_HOME and port, the stack's services and secrets."""
    home.mkdir(parents=True)
    shutil.copy(Path(env["VPE_HOME"]) / "secrets.env", home / "secrets.env")
    (home / "secrets.env").chmod(0o600)
    own = {k: v for k, v in env.items() if k != "VPE_EXECUTOR_TARGET" and not k.startswith("AIRFLOW_CONN_")}
    return {**own, "VPE_HOME": str(home), "VPE_EXECUTOR_PORT": str(port), "VPE_CENTRAL_HOST": "127.0.0.1"}


def parallelism() -> int:
    """VPE_AIRFLOW_PARALLELISM as bootstrap.sh reads it: the environment's, else .env's."""
    lines = (ROOT / ".env").read_text().splitlines()
    configured = dict(line.split("=", 1) for line in lines if line.startswith("VPE_AIRFLOW_PARALLELISM="))
    return int(os.environ.get("VPE_AIRFLOW_PARALLELISM") or configured["VPE_AIRFLOW_PARALLELISM"])


def default_setups() -> list[str]:
    """WORKERS:SLOTS (Celery workers, the scheduler's parallelism) of each stack."""
    slots = parallelism()
    return [f"1:{slots}", f"2:{slots}", f"2:{2 * slots}", f"1:{2 * slots}"]


def setup(text: str) -> tuple[int, int]:
    workers, _, slots = text.partition(":")
    if not (workers.isdigit() and slots.isdigit() and int(workers) > 0 and int(slots) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not WORKERS:SLOTS, e.g. 2:8")
    return int(workers), int(slots)


def stack_env(parent: Path, workers: int, slots: int, tasks: int) -> tuple[dict[str, str], list[int]]:
    """A Celery stack's environment (not yet up) with the bench DAG and connections to 1 and to 3 replicas, and
    the replicas' ports (the stack's executor's first). The token is written before bootstrap makes the other
    secrets: the connections carry it."""
    files = {"dags/vpe_bench_hosts.py": dag_file(tasks), "tasks/vpe_bench/tiny.py": TINY_TASK}
    env = repo_copy_stack_config(parent, f"workers{workers}-slots{slots}", files)
    env.update(VPE_AIRFLOW_EXECUTOR="CeleryExecutor", VPE_CELERY_WORKERS=str(workers),
               VPE_AIRFLOW_PARALLELISM=str(slots))
    token = os.urandom(32).hex()
    secrets = Path(env["VPE_HOME"]) / "secrets.env"
    secrets.write_text(f"VPE_EXECUTOR_TOKEN={token}\n")
    secrets.chmod(0o600)
    ports = [int(env["VPE_EXECUTOR_PORT"]), free_port(), free_port()]
    env["VPE_EXECUTOR_TARGET"] = target(ports)
    env[f"AIRFLOW_CONN_{CONNECTIONS[1].upper()}"] = connection(ports[:1], token)
    return env, ports


def seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def runs_per_replica(homes: list[Path]) -> list[int]:
    return [len(list((home / "logs" / "runs").glob("*.jsonl"))) for home in homes]


def batch(airflow: AirflowAPI, dag_id: str, runs: int) -> dict:
    """`runs` DAG runs triggered together: their span (first start to last end) and what did not succeed at once."""
    run_ids = [airflow.trigger(dag_id) for _ in range(runs)]
    for run_id in run_ids:
        airflow.wait_for_run(dag_id, run_id, timeout=3600)
    dag_runs = [airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}") for run_id in run_ids]
    tis = [ti for run_id in run_ids for ti in airflow.request(
        "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]]
    span = seconds(min(r["start_date"] for r in dag_runs), max(r["end_date"] for r in dag_runs))
    return {"span": span, "failed_runs": sum(r["state"] != "success" for r in dag_runs),
            "tasks": len(tis), "failed_tasks": sum(ti["state"] != "success" or ti["try_number"] != 1 for ti in tis)}


def measure(airflow: AirflowAPI, replica_homes: list[Path], replicas: int, runs: int) -> dict:
    dag_id = f"vpe_bench_hosts_{replicas}"
    airflow.wait_for_dag(dag_id)
    airflow.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    batch(airflow, dag_id, 1)
    before = runs_per_replica(replica_homes)
    result = batch(airflow, dag_id, runs)
    result["per_replica"] = [after - b for after, b in zip(runs_per_replica(replica_homes), before)][:replicas]
    result["runs_per_minute"] = runs / result["span"] * 60
    return result


def measure_stack(parent: Path, workers: int, slots: int, tasks: int, runs: int) -> dict[int, dict]:
    """Each replica count's result on one stack of `workers` Celery workers and `slots` scheduler slots."""
    env, ports = stack_env(parent, workers, slots, tasks)
    name = f"workers{workers}-slots{slots}"
    replica_homes = [Path(env["VPE_HOME"])] + [parent / f"{name}-replica{i}" for i in (2, 3)]
    print(f"bringing up an offline-demo stack with {workers} Celery worker(s), scheduler parallelism {slots} and "
          f"3 replicas in {parent}", flush=True)
    replica_envs = []
    try:
        bootstrap("--offline-demo", "--celery", "up", env=env, timeout=1200)
        for home, port in zip(replica_homes[1:], ports[1:]):
            replica_envs.append(replica_env(env, home, port))
            bootstrap("--offline-demo", "up", "executor", env=replica_envs[-1])
        for port in ports:
            wait_for_envs({**env, "VPE_EXECUTOR_PORT": str(port)})
        airflow = AirflowAPI(env)
        results = {}
        for replicas in REPLICAS:
            results[replicas] = r = measure(airflow, replica_homes, replicas, runs)
            print(f"  {replicas} replica(s): {r['runs_per_minute']:.2f} runs/min ({runs} runs in {r['span']:.0f} s), "
                  f"runs per replica {r['per_replica']}, failed runs {r['failed_runs']}, "
                  f"tasks not done in one try {r['failed_tasks']}", flush=True)
        return results
    finally:
        bootstrap("down", env=env, check=False)
        for replica in replica_envs:
            bootstrap("down", env=replica, check=False)


def report(results: dict[tuple[int, int, int], dict], tasks: int, runs: int) -> None:
    base = next(iter(results.values()))["runs_per_minute"]
    print(f"\n{runs} DAG runs of {tasks} deferrable tasks (defer_after=0) each, triggered together, after one "
          f"warm-up run; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'replicas':>8} {'workers':>8} {'scheduler slots':>16} {'runs/min':>9} {'tasks/min':>10} {'vs 1st':>7} "
          f"{'runs per replica':>17} {'not 1st try':>12}")
    for (replicas, workers, slots), r in results.items():
        rate = r["runs_per_minute"]
        print(f"{replicas:>8} {workers:>8} {slots:>16} {rate:>9.2f} {rate * tasks:>10.0f} {rate / base:>6.2f}x "
              f"{'/'.join(map(str, r['per_replica'])):>17} {r['failed_tasks']:>12}")
    print("\nOn one 2-core machine the replicas and workers share the same cores, PostgreSQL and scheduler: the "
          "ratios show what spreading costs, not what more hosts would gain.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40, help="deferrable tasks in the DAG (default: 40)")
    parser.add_argument("--runs", type=int, default=2, help="DAG runs triggered together per configuration "
                                                            "(default: 2)")
    parser.add_argument("--setup", type=setup, action="append",
                        help="WORKERS:SLOTS, Celery workers and the scheduler's parallelism, one stack each; "
                             f"repeatable; the first row is the ratios' base (default: {' '.join(default_setups())})")
    args = parser.parse_args()
    parent = stack_parent("vpe-bench-hosts-")
    results = {}
    try:
        for workers, slots in args.setup or [setup(text) for text in default_setups()]:
            for replicas, result in measure_stack(parent, workers, slots, args.tasks, args.runs).items():
                results[(replicas, workers, slots)] = result
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    report(results, args.tasks, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
