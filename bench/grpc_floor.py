#!/usr/bin/env python3
"""The least a Python gRPC server can do to run a task: the floor under the executor in bench/dispatch.py's (g).

Serves ping.proto's Run on loopback with grpcio's thread-pool server, as executor.py does, and nothing else: the
handler starts `<home>/envs/<env>/bin/python <tasks>/<task>` with Popen, answers Started, reads the task's output
to its end, answers its lines and the exit status. No run log, no cage, no limits, no checks: what the gRPC round
trip, Python's threads and a subprocess cost before an executor does anything of its own.

  python bench/grpc_floor.py --port 50099 --home <executor home> --tasks-dir <tasks>
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from executor import pb2, pb2_grpc  # noqa: E402


class FloorServicer(pb2_grpc.ExecutorServicer):
    def __init__(self, home: Path, tasks_dir: Path):
        self._home = home
        self._tasks_dir = tasks_dir

    def Run(self, request, context):
        argv = [str(self._home / "envs" / request.env / "bin" / "python"), str(self._tasks_dir / request.task)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        yield pb2.RunEvent(started=pb2.Started(pid=proc.pid))
        out, err = proc.communicate()
        for stream, data in ((pb2.STDOUT, out), (pb2.STDERR, err)):
            for text in data.decode(errors="replace").splitlines():
                yield pb2.RunEvent(line=pb2.OutputLine(stream=stream, text=text))
        yield pb2.RunEvent(status=pb2.RunStatus(exit_code=proc.returncode))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--home", type=Path, required=True, help="an executor's home, whose envs/ are built")
    parser.add_argument("--tasks-dir", type=Path, required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb2_grpc.add_ExecutorServicer_to_server(FloorServicer(args.home, args.tasks_dir), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
