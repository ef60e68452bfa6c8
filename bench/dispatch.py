#!/usr/bin/env python3
"""Dispatch overhead of the executor, measured in one run against its floor and against a fresh venv per run.

  (a) a trivial task through the executor's Run RPC (client in this process, server on loopback)
  (b) the floor: `<env>/bin/python task.py` as a bare subprocess of this process
  (c) a fresh venv per run, the way Airflow's PythonVirtualenvOperator does by default
      (providers/standard/utils/python_virtualenv.py: `uv venv --allow-existing --seed --python ...` then
      `uv pip install --python <venv>/bin/python <requirements>` when uv is on PATH), then the task;
  (c') the same without uv on PATH (`python -m venv`, then `<venv>/bin/pip install <requirements>`)

(a) and (b) alternate run by run so that machine noise hits both alike. Then concurrent throughput: runs/s with
as many client threads as the executor has run slots, against bare subprocesses with the same parallelism.
Not part of CI: `python bench/dispatch.py` (about a minute). Goals: (a) <= 1.15 x (b) + 10 ms; (c) >= 50 x (a).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import executor  # noqa: E402

REQUIREMENTS = ["six==1.16.0"]
TASK = 'print("ok")\n'


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prepare(workdir: Path) -> tuple[Path, Path]:
    envs, tasks = workdir / "envs", workdir / "tasks" / "bench"
    envs.mkdir(parents=True)
    tasks.mkdir(parents=True)
    pins = "".join(f"      - {r}\n" for r in REQUIREMENTS)
    (envs / "bench.yml").write_text(f"name: bench\ndependencies:\n  - python=3.11\n  - pip:\n{pins}")
    (tasks / "noop.py").write_text(TASK)
    return envs, tasks


def start_server(workdir: Path, envs: Path, tasks: Path, port: int, slots: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPE_")}
    log = (workdir / "executor.log").open("w")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "executor.py"), "serve", "--port", str(port), "--home", str(workdir / "home"),
         "--envs-dir", str(envs), "--tasks-dir", str(tasks.parent), "--max-concurrent", str(slots)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(client: executor.ExecutorClient, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(e.state == executor.pb2.ENV_READY for e in client.list_envs(timeout=2)):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise SystemExit("bench env did not become ready; see the executor log in the work dir (--keep)")


def via_executor(client: executor.ExecutorClient) -> float:
    started = time.perf_counter()
    events = list(client.run("bench", "bench/noop.py"))
    elapsed = time.perf_counter() - started
    assert events[-1].status.exit_code == 0, events
    return elapsed


def bare(python: Path, script: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(python), str(script)], check=True, stdout=subprocess.DEVNULL, cwd=script.parent)
    return time.perf_counter() - started


def fresh_venv(uv: str | None, script: Path, scratch: Path) -> float:
    """uv=None: the pip path Airflow takes when uv is not on PATH."""
    venv = scratch / "venv"
    started = time.perf_counter()
    if uv:
        steps = [[uv, "venv", "--allow-existing", "--seed", "--python", "python3.11", str(venv)],
                 [uv, "pip", "install", "--python", str(venv / "bin" / "python"), *REQUIREMENTS]]
    else:
        steps = [["python3.11", "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", *REQUIREMENTS]]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    subprocess.run([str(venv / "bin" / "python"), str(script)], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    shutil.rmtree(venv)
    return elapsed


def throughput(work, workers: int, seconds: float) -> float:
    done = [0] * workers
    stop_at = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop_at:
            work()
            done[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="runs of (a) and of (b) (default 100)")
    parser.add_argument("--venv-runs", type=int, default=5, help="runs of (c) and of (c') (default 5)")
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="executor run slots (default: cores)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each throughput phase (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (executor log, built env)")
    args = parser.parse_args()

    uv = executor.find_uv()
    if uv is None:
        raise SystemExit("uv is needed for (c) (PythonVirtualenvOperator uses it when on PATH): pip install uv")
    workdir = Path(tempfile.mkdtemp(prefix="vpe-bench-"))
    envs, tasks = prepare(workdir)
    port = executor.free_port()
    server = start_server(workdir, envs, tasks, port, args.slots)
    try:
        client = executor.ExecutorClient(executor.open_channel(f"127.0.0.1:{port}"))
        print(f"building the bench env ({', '.join(REQUIREMENTS)}) ...", file=sys.stderr)
        wait_ready(client)
        python = workdir / "home" / "envs" / "bench" / "bin" / "python"
        script = tasks / "noop.py"
        for _ in range(5):  # warm-up: page cache, first connection
            via_executor(client)
            bare(python, script)
        print(f"timing {args.runs} runs each of (a) and (b), {args.venv_runs} of (c) and (c') ...", file=sys.stderr)
        a, b = [], []
        for _ in range(args.runs):
            a.append(via_executor(client))
            b.append(bare(python, script))
        c = [fresh_venv(uv, script, workdir) for _ in range(args.venv_runs)]
        c_pip = [fresh_venv(None, script, workdir) for _ in range(args.venv_runs)]
        print(f"throughput with {args.slots} parallel clients for {args.seconds:.0f}s each ...", file=sys.stderr)
        rate_a = throughput(lambda: via_executor(client), args.slots, args.seconds)
        rate_b = throughput(lambda: bare(python, script), args.slots, args.seconds)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    report(a, b, c, c_pip, rate_a, rate_b, args.slots)
    return 0


def report(a: list[float], b: list[float], c: list[float], c_pip: list[float], rate_a: float, rate_b: float,
           slots: int) -> None:
    floor = statistics.median(b)
    rows = [("(a) executor Run RPC", a), ("(b) bare subprocess (floor)", b), ("(c) fresh venv per run, uv", c),
            ("(c') fresh venv per run, pip", c_pip)]
    print(f"\n{'variant':<30} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'p50 / (b)':>10}")
    for name, samples in rows:
        p50 = statistics.median(samples)
        print(f"{name:<30} {len(samples):>4} {p50 * 1000:>9.1f} {percentile(samples, 0.95) * 1000:>9.1f} "
              f"{p50 / floor:>9.2f}x")
    p50_a, p50_c = statistics.median(a), statistics.median(c)
    budget = 1.15 * floor + 0.010
    print(f"\nthroughput at {slots} slots: executor {rate_a:.1f} runs/s, bare subprocess {rate_b:.1f} runs/s "
          f"({rate_a / rate_b:.2f}x)")
    print(f"goal (a) <= 1.15 x (b) + 10 ms = {budget * 1000:.1f} ms: {p50_a * 1000:.1f} ms "
          f"{'MET' if p50_a <= budget else 'MISSED'}")
    print(f"goal (c) >= 50 x (a): {p50_c / p50_a:.0f}x {'MET' if p50_c >= 50 * p50_a else 'MISSED'} "
          f"(c') {statistics.median(c_pip) / p50_a:.0f}x")


if __name__ == "__main__":
    sys.exit(main())
