#!/usr/bin/env python3
"""Dispatch overhead of the executor, measured in one run against its floor and against a fresh venv per run.

Two envs, built by the executor the same way: a small one (six) and one of a scientific stack's size (pandas,
matplotlib, openpyxl and their dependencies, about 10,000 files once compiled), so that a cost growing with the env
shows.

  (a) a trivial task through the executor's Run RPC (client in this process, server on loopback), in each env
  (a0) the same on the executor of an earlier commit (--baseline, default: before containment), for comparison
  (g) the same on bench/grpc_floor.py, a bare-bones gRPC server (Popen, read to the end, answer; no run log, no
      cage, no checks): what any executor written with Python and grpcio pays before it does anything of its own
  (b) the floor: `<env>/bin/python task.py` as a bare subprocess of this process, in each env
  (d) (b) from the executor's waiting shell (a shell that reads its start script: rlimits, cwd, env), no cgroups
  (e) the same with the run's cgroups created, joined (the executor writes the shell's pid) and removed, all while
      the run waits: how a run starts when no parked process is ready
  (f) the task started as the executor starts a run: from a process parked in its cgroups ahead of its run (the
      executor's Containment), which keeps or removes them afterwards: (f) - (d) is what a run pays for its cgroups
  (c) a fresh venv per run, the way Airflow's PythonVirtualenvOperator does by default
      (providers/standard/utils/python_virtualenv.py: `uv venv --allow-existing --seed --python ...` then
      `uv pip install --python <venv>/bin/python <requirements>` when uv is on PATH), then the task;
  (c') the same without uv on PATH (`python -m venv`, then `<venv>/bin/pip install <requirements>`)

(a), (a0), (g), (b), (d), (e) and (f) alternate run by run so that machine noise hits all alike, each after a pause
(--pause, 50 ms): a pipeline's tasks come seconds apart, and joining a cgroup costs much more after the kernel was
idle (see README's Known limits). Then concurrent throughput: runs/s with as many client threads as the executor
has run slots, back to back, against bare subprocesses with the same parallelism; (g)'s throughput is the most any
executor built on Python and grpcio could reach here.
Not part of CI: `python bench/dispatch.py` as root (cgroups; about three minutes). Goals: (a) <= (b) + 5 ms in both
envs; throughput >= 0.7 x bare in both; cgroups (f) - (d) <= 2 ms; (c) >= 50 x (a).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import executor  # noqa: E402

REQUIREMENTS = ["six==1.16.0"]
BASELINE = "c77a5c3"  # the last commit before containment and sealed envs
ENVS = {"bench": REQUIREMENTS, "bench_pandas": ["pandas==2.1.4", "numpy==1.26.4", "matplotlib==3.8.0", "openpyxl==3.1.5",
                                 "sqlalchemy==2.0.44", "pygments==2.19.2"]}
TASK = 'print("ok")\n'


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prepare(workdir: Path) -> tuple[Path, Path]:
    envs, tasks = workdir / "envs", workdir / "tasks" / "bench"
    envs.mkdir(parents=True)
    tasks.mkdir(parents=True)
    for name, requirements in ENVS.items():
        pins = "".join(f"      - {r}\n" for r in requirements)
        (envs / f"{name}.yml").write_text(f"name: {name}\ndependencies:\n  - python=3.11\n  - pip:\n{pins}")
    (tasks / "noop.py").write_text(TASK)
    return envs, tasks


def start_server(workdir: Path, envs: Path, tasks: Path, port: int, slots: int, code: Path = ROOT,
                 home: str = "home") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPE_")}
    log = (workdir / f"executor-{home}.log").open("w")
    return subprocess.Popen(
        [sys.executable, str(code / "executor.py"), "serve", "--port", str(port), "--home", str(workdir / home),
         "--envs-dir", str(envs), "--tasks-dir", str(tasks.parent), "--max-concurrent", str(slots)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def baseline_code(workdir: Path, commit: str) -> Path:
    """executor.py and ping.proto as they were at `commit`, in a folder of their own."""
    folder = workdir / f"executor-{commit}"
    folder.mkdir()
    for name in ("executor.py", "ping.proto"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"], check=True, capture_output=True)
        (folder / name).write_bytes(shown.stdout)
    return folder


def start_floor(workdir: Path, tasks: Path, port: int) -> subprocess.Popen:
    """bench/grpc_floor.py on the envs the executor built in `workdir`."""
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "grpc_floor.py"), "--port", str(port),
                             "--home", str(workdir / "home"), "--tasks-dir", str(tasks.parent)],
                            stdout=(workdir / "grpc-floor.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_answering(client: executor.ExecutorClient, env: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            via_executor(client, env)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(30)


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


def via_executor(client: executor.ExecutorClient, env: str) -> float:
    started = time.perf_counter()
    events = list(client.run(env, "bench/noop.py"))
    elapsed = time.perf_counter() - started
    assert events[-1].status.exit_code == 0, events
    return elapsed


def bare(python: Path, script: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(python), str(script)], check=True, stdout=subprocess.DEVNULL, cwd=script.parent)
    return time.perf_counter() - started


class Cages:
    """The executor's per-run cages: (d) and (e) under a cgroup of this bench's own, (f) through the executor's
    Containment, which parks a process for the next run in its cgroups ahead of it."""

    def __init__(self, workdir: Path):
        self.limits = executor.ConfigBase().limit_defaults
        self.bases: dict[str, Path] = {}
        try:
            for controller in executor.CGROUP_CONTROLLERS:
                base = executor.home_cgroup(workdir, controller) / f"bench-{os.getpid()}"
                base.mkdir(parents=True)
                self.bases[controller] = base
        except (OSError, TypeError) as exc:
            self.close()
            raise SystemExit(f"cannot make cgroups ({exc}): run the bench as root") from None
        self._count = 0
        self._workdir = workdir
        cfg = dataclasses.replace(executor.config_from(argparse.Namespace()), home=workdir / "cages", max_concurrent=1,
                                  containment="cgroup", env_protection="watch")
        self.containment = executor.Containment(cfg)

    def parked(self, python: Path, script: Path) -> float:
        """(f): the task started as the executor starts a run, from a process parked in its cgroups."""
        self._count += 1
        env = {"PATH": os.environ.get("PATH", ""), "VPE_RUN_ID": f"bench-{self._count}", "VPE_BUFFER": str(self._workdir)}
        cage = self.containment.cage(env["VPE_RUN_ID"], env)
        started = time.perf_counter()
        proc = self.containment.start(cage, [str(python), str(script)], env, script.parent, self.limits)
        proc.stdout.read()
        proc.stderr.read()
        assert proc.wait() == 0, proc.returncode
        self.containment.forget(cage, self.limits)  # keeps or removes its cgroups, parks the next run's process
        elapsed = time.perf_counter() - started
        proc.stdout.close()
        proc.stderr.close()
        return elapsed

    def run(self, python: Path, script: Path, cgroups: bool) -> float:
        """(d) or, with cgroups, (e): the task from a fresh waiting shell, as the executor starts a run when no
        parked process is ready, timed like bare()."""
        self._count += 1
        folders = {c: base / f"run-{self._count}" for c, base in self.bases.items()} if cgroups else {}
        cage = executor.Cage(f"bench-{self._count}", frozenset(), folders)
        env = {"PATH": os.environ.get("PATH", "")}
        started = time.perf_counter()
        cage.create(self.limits)
        proc = executor.waiting_shell()
        cage.join(proc.pid)
        executor.hand_over(proc, executor.start_script([str(python), str(script)], env, script.parent,
                                                       executor.Cage.rlimits(self.limits)))
        proc.stdout.read()
        proc.stderr.read()
        assert proc.wait() == 0, proc.returncode
        cage.remove()
        elapsed = time.perf_counter() - started
        proc.stdout.close()
        proc.stderr.close()
        return elapsed

    def close(self) -> None:
        if hasattr(self, "containment"):
            self.containment.stop()
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                base.rmdir()
                base.parent.rmdir()


def file_count(prefix: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(prefix))


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
    parser.add_argument("--pause", type=float, default=0.05, help="seconds before each timed run (default 0.05)")
    parser.add_argument("--baseline", default=BASELINE, help=f"also time (a) on the executor of this commit, for "
                        f"comparison in the same run ('' for none; default {BASELINE}: before containment)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (executor log, built env)")
    args = parser.parse_args()

    uv = executor.find_uv()
    if uv is None:
        raise SystemExit("uv is needed for (c) (PythonVirtualenvOperator uses it when on PATH): pip install uv")
    workdir = Path(tempfile.mkdtemp(prefix="vpe-bench-"))
    envs, tasks = prepare(workdir)
    port = executor.free_port()
    server = start_server(workdir, envs, tasks, port, args.slots)
    clients = {"(a)": executor.ExecutorClient(executor.open_channel(f"127.0.0.1:{port}"))}
    baseline = None
    if args.baseline:
        baseline_port = executor.free_port()
        baseline = start_server(workdir, envs, tasks, baseline_port, args.slots, baseline_code(workdir, args.baseline),
                                "baseline-home")
        clients["(a0)"] = executor.ExecutorClient(executor.open_channel(f"127.0.0.1:{baseline_port}"))
    cages = Cages(workdir)
    floor = None
    try:
        print(f"building the bench envs ({'; '.join(', '.join(r) for r in ENVS.values())}) ...", file=sys.stderr)
        for each in clients.values():
            wait_ready(each)
        floor_port = executor.free_port()
        floor = start_floor(workdir, tasks, floor_port)
        clients["(g)"] = executor.ExecutorClient(executor.open_channel(f"127.0.0.1:{floor_port}"))
        wait_answering(clients["(g)"], "bench")
        pythons = {env: workdir / "home" / "envs" / env / "bin" / "python" for env in ENVS}
        sizes = {env: file_count(python.parent.parent.resolve()) for env, python in pythons.items()}
        script = tasks / "noop.py"
        for _ in range(5):  # warm-up: page cache, first connection
            for env, python in pythons.items():
                for each in clients.values():
                    via_executor(each, env)
                bare(python, script)
        print(f"timing {args.runs} runs each of (a), (b) per env, (d), (e), (f), {args.venv_runs} of (c) and (c') ...",
              file=sys.stderr)
        samples: dict[str, list[float]] = {}

        def timed(key: str, run) -> None:
            time.sleep(args.pause)
            samples.setdefault(key, []).append(run())

        for _ in range(args.runs):
            for env, python in pythons.items():
                for variant, each in clients.items():
                    timed(f"{env} {variant}", lambda: via_executor(each, env))
                timed(f"{env} (b)", lambda: bare(python, script))
            timed("(d)", lambda: cages.run(pythons["bench"], script, cgroups=False))
            timed("(e)", lambda: cages.run(pythons["bench"], script, cgroups=True))
            timed("(f)", lambda: cages.parked(pythons["bench"], script))
        samples["(c)"] = [fresh_venv(uv, script, workdir) for _ in range(args.venv_runs)]
        samples["(c')"] = [fresh_venv(None, script, workdir) for _ in range(args.venv_runs)]
        print(f"throughput with {args.slots} parallel clients for {args.seconds:.0f}s each ...", file=sys.stderr)
        rates: dict[str, dict[str, float]] = {}
        for env, python in pythons.items():
            rates[env] = {variant: throughput(lambda: via_executor(each, env), args.slots, args.seconds)
                          for variant, each in clients.items()}
            rates[env]["(b)"] = throughput(lambda: bare(python, script), args.slots, args.seconds)
    finally:
        cages.close()
        for each in (server, baseline, floor):
            if each is not None:
                stop_server(each)
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    report(samples, sizes, rates, args.slots, args.baseline)
    return 0


def report(samples: dict[str, list[float]], sizes: dict[str, int], rates: dict[str, dict[str, float]],
           slots: int, baseline: str) -> None:
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    floor = p50["bench (b)"]
    names = {"(a)": "executor Run RPC", "(a0)": f"the same at {baseline}", "(g)": "bare-bones gRPC server",
             "(b)": "bare subprocess (floor)"}
    rows = [(f"{env}: {v} {names[v]}", f"{env} {v}") for env in ENVS for v in names if f"{env} {v}" in p50] + [
        ("(d) bare from a waiting shell", "(d)"), ("(e) (d) + run's cgroups, cold", "(e)"),
        ("(f) as a run starts: parked in its cgroups", "(f)"),
        ("(c) fresh venv per run, uv", "(c)"), ("(c') fresh venv per run, pip", "(c')")]
    print("\n" + "; ".join(f"env {env}: {sizes[env]:,} files ({', '.join(ENVS[env])})" for env in ENVS))
    print(f"\n{'variant':<44} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'p50 / bench (b)':>16}")
    for title, key in rows:
        print(f"{title:<44} {len(samples[key]):>4} {p50[key] * 1000:>9.1f} "
              f"{percentile(samples[key], 0.95) * 1000:>9.1f} {p50[key] / floor:>15.2f}x")
    print()
    for env, rate in rates.items():
        print(f"throughput at {slots} slots, env {env}: executor {rate['(a)']:.1f} runs/s, bare subprocess "
              f"{rate['(b)']:.1f} runs/s ({rate['(a)'] / rate['(b)']:.2f}x)" +
              (f"; at {baseline}: {rate['(a0)']:.1f} runs/s ({rate['(a0)'] / rate['(b)']:.2f}x)" if "(a0)" in rate else "")
              + f"; bare-bones gRPC server (g): {rate['(g)']:.1f} runs/s ({rate['(g)'] / rate['(b)']:.2f}x)")
    print()
    for env in ENVS:
        a, b = p50[f"{env} (a)"], p50[f"{env} (b)"]
        print(f"goal (a) <= (b) + 5 ms, env {env} ({sizes[env]:,} files): {a * 1000:.1f} <= {(b + 0.005) * 1000:.1f} ms "
              f"{'MET' if a <= b + 0.005 else 'MISSED'} (overhead {(a - b) * 1000:.1f} ms" +
              (f"; at {baseline}: {(p50[f'{env} (a0)'] - b) * 1000:.1f} ms" if f"{env} (a0)" in p50 else "") +
              f"; bare-bones gRPC server (g): {(p50[f'{env} (g)'] - b) * 1000:.1f} ms)")
    for env, rate in rates.items():
        ratio, ceiling = rate["(a)"] / rate["(b)"], rate["(g)"] / rate["(b)"]
        print(f"goal throughput >= 0.7 x bare at {slots} slots, env {env}: {ratio:.2f}x "
              f"{'MET' if ratio >= 0.7 else 'MISSED'} (bare-bones gRPC server (g): {ceiling:.2f}x; "
              f"executor / (g): {ratio / ceiling:.2f}x)")
    cgroups, cold = p50["(f)"] - p50["(d)"], p50["(e)"] - p50["(d)"]
    print(f"goal cgroups created, joined, removed <= 2 ms per run: (f) - (d) = {cgroups * 1000:.1f} ms "
          f"{'MET' if cgroups <= 0.002 else 'MISSED'} (all at dispatch, (e) - (d): {cold * 1000:.1f} ms; "
          f"the waiting shell itself, (d) - (b): {(p50['(d)'] - floor) * 1000:.1f} ms)")
    run_rpc, fresh, fresh_pip = p50["bench (a)"], p50["(c)"], p50["(c')"]
    print(f"goal (c) >= 50 x (a): {fresh / run_rpc:.0f}x {'MET' if fresh >= 50 * run_rpc else 'MISSED'} "
          f"(c') {fresh_pip / run_rpc:.0f}x")


if __name__ == "__main__":
    sys.exit(main())
