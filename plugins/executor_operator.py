"""
The Airflow side of the executor (executor.py).

`ExecutorOperator` sends one task script to the executor and mirrors the remote
run in the Airflow task: each output line lands in the task log as it is
printed, the exit status decides success, and killing the Airflow task (marked
failed, run cancelled, execution_timeout) kills the remote process group.
"""
from __future__ import annotations

import hashlib
import re
from collections import deque
from typing import Any, Sequence

import grpc
from airflow.exceptions import AirflowException, AirflowFailException
from airflow.providers.grpc.hooks.grpc import GrpcHook
from airflow.sdk import BaseOperator

from executor import ExecutorClient, open_channel, pb2, status_exit_code

STDERR_TAIL_LINES = 20
# Refusals a retry cannot fix. Others (executor unreachable, env still building,
# queue full) are raised as ordinary failures, so the task's `retries` apply.
PERMANENT_REFUSALS = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def executor_client(grpc_conn_id: str = "grpc_default") -> ExecutorClient:
    """A client for the executor the connection names: host and port, the token as
    its password, and for TLS the provider's `credential_pem_file` extra (the CA)."""
    conn = GrpcHook.get_connection(grpc_conn_id)
    target = f"{conn.host}:{conn.port}" if conn.port else conn.host
    # The channel is built here rather than by GrpcHook.get_conn(): the hook's
    # channels take no options, so no round-robin over scaled-out executors.
    channel = open_channel(target, tls_ca=conn.extra_dejson.get("credential_pem_file", ""))
    return ExecutorClient(channel, token=conn.password or None)


def safe_id(*parts: str) -> str:
    """An executor id ([A-Za-z0-9_.-], at most 128) from Airflow ids, which hold ':' and '+'."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", ".".join(parts)).lstrip(".-")
    if len(text) > 128:
        text = text[:115] + "." + hashlib.sha256(text.encode()).hexdigest()[:12]
    return text


class ExecutorOperator(BaseOperator):
    """Runs `script` (a path under tasks/) with `args` in the executor's `env` environment.

    All tasks of one DAG run share one working folder on the executor (their
    workspace), so a step finds the files the steps before it wrote. The remote
    run is killed when `execution_timeout` passes. Returns (to XCom) the run id,
    exit code, duration and the executor-side log path.
    """

    template_fields: Sequence[str] = ("script", "args", "env_vars")
    ui_color = "#dbeafe"

    def __init__(self, *, env: str, script: str, args: Sequence[str] = (),
                 env_vars: dict[str, str] | None = None, grpc_conn_id: str = "grpc_default",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.env = env
        self.script = script
        self.args = list(args)
        self.env_vars = env_vars or {}
        self.grpc_conn_id = grpc_conn_id
        self._client: ExecutorClient | None = None
        self._call: Any = None
        self._run_id = ""

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        # Mapped instances share a task id: the map index keeps their executor run ids apart.
        task = ti.task_id if getattr(ti, "map_index", -1) < 0 else f"{ti.task_id}.{ti.map_index}"
        self._run_id = safe_id(ti.dag_id, ti.run_id, task, f"try{ti.try_number}")
        timeout = self.execution_timeout.total_seconds() if self.execution_timeout else 0.0
        self._client = executor_client(self.grpc_conn_id)
        self._call = self._client.run(self.env, self.script, self.args, self.env_vars, timeout,
                                      self._run_id, workspace=safe_id(ti.dag_id, ti.run_id))
        stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        try:
            for event in self._call:
                status = self._log_event(event, stderr_tail)
                if status is not None:
                    return self._outcome(status, stderr_tail)
        except grpc.RpcError as err:
            raise self._refusal(err) from None
        raise AirflowException(f"the executor ended run {self._run_id} without a final status; see the executor's log")

    def on_kill(self) -> None:
        if self._client and self._run_id:
            try:
                self._client.cancel(self._run_id)
            except grpc.RpcError as err:
                self.log.warning("could not cancel executor run %s: %s", self._run_id, err.details())
        if self._call is not None:
            self._call.cancel()

    def _log_event(self, event: Any, stderr_tail: deque[str]) -> Any:
        """Writes one streamed event to the task log; returns the final status when it arrives."""
        kind = event.WhichOneof("event")
        if kind == "line" and event.line.stream == pb2.STDERR:
            stderr_tail.append(event.line.text)
            self.log.warning("[stderr] %s", event.line.text)
        elif kind == "line":
            self.log.info("%s", event.line.text)
        elif kind == "queued":
            self.log.info("[executor] %s", event.queued.message)
        elif kind == "started":
            self.log.info("[executor] run %s started: pid %s, folder %s, log %s", event.started.run_id,
                          event.started.pid, event.started.run_dir, event.started.log_path)
        elif kind == "status":
            return event.status
        return None

    def _outcome(self, status: Any, stderr_tail: deque[str]) -> dict[str, Any]:
        result = {"run_id": status.run_id, "exit_code": status_exit_code(status),
                  "duration_seconds": round(status.duration_seconds, 3), "log_path": status.log_path}
        self.log.info("[executor] %s", result)
        if result["exit_code"] == 0:
            return result
        what = ("timed out" if status.timed_out else "was cancelled" if status.cancelled
                else f"exited with {result['exit_code']}")
        tail = "\n".join(stderr_tail) or "(nothing on stderr)"
        raise AirflowException(f"{self.script} {what} after {status.duration_seconds:.1f}s "
                               f"(executor log {status.log_path}). Last stderr lines:\n{tail}")

    def _refusal(self, err: grpc.RpcError) -> AirflowException:
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return AirflowException(f"executor unreachable through connection {self.grpc_conn_id!r}: {err.details()}. "
                                    "Is it running? ./bootstrap.sh status")
        error = AirflowFailException if code in PERMANENT_REFUSALS else AirflowException
        return error(f"the executor refused {self.script} in env {self.env!r}: {code.name}: {err.details()}")
