"""
The Airflow side of the executor (executor.py).

`ExecutorOperator` sends one task script to the executor and mirrors the remote
run in the Airflow task: each output line lands in the task log as it is
printed, the exit status decides success, and killing the Airflow task (marked
failed, cleared, execution_timeout) kills the remote process group.

Words: a "run" is the executor's run of one task instance (one run id for all
its tries); a "DAG run" is Airflow's; the tasks of one DAG run share a
workspace, a folder on the executor. The run outlives the worker for
`keep_alive`: a try that starts while the run an earlier try left behind is
still running attaches to it instead of starting it again (like the
KubernetesPodOperator's `reattach_on_restart`). With
`deferrable=True` the worker follows the run for `defer_after`, then frees its
slot and `ExecutorRunTrigger` follows the rest from the triggerer.

Airflow 3.3.2's defer race, and why the workaround here is safe
----------------------------------------------------------------
A deferred task's worker exits after `defer()`, and LocalExecutor reports that
exit as `success`. The scheduler handles executor events once per loop, in this
order (`SchedulerJobRunner._run_scheduler_loop`): queue scheduled tasks, sync the
executor (collect exit events), `_process_executor_events`. That last step fails
a task instance whose try number matches a `success` event while its state is
queued or running and the executor no longer holds it; it ignores the event
while the state is `deferred`, and (since apache/airflow#66374) while it is
`scheduled` with `next_method` set. So if the trigger fires, the task goes back
to `scheduled` and is queued before the scheduler has synced the stale exit
event, the resumed try is failed ("reported that the task instance ... finished
with state success, but the task instance's state attribute is queued"): the
`queued` case is apache/airflow#67287, the `running` case #71580, both open in
3.3.2.

The task instance's state cannot tell the trigger that the scheduler has seen
the exit: the worker itself sets `deferred` (an Execution API call) before it
exits, and the scheduler writes nothing when it handles the exit of a deferred
task. Two measures instead:
1. A run is followed in the worker for `defer_after` (30 s by default) and only
   a run still going then defers, so short runs never meet the race.
2. `ExecutorRunTrigger` holds its event until DEFER_SETTLE after it began. A
   trigger begins only after the deferral is committed, and the worker exits
   right after that commit, so by then the scheduler has had DEFER_SETTLE for
   the one loop that syncs the exit event and ignores it (the task is still
   `deferred`). Only a scheduler loop longer than DEFER_SETTLE could still lose
   it. Runs that end later than DEFER_SETTLE after deferring are not delayed.
Both can go once Airflow handles a stale defer-exit in every state (#67287,
#71580): then set `defer_after` to 0 and DEFER_SETTLE to 0.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc
from airflow.sdk import Asset, BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 3.1: the task SDK has no AirflowFailException yet
    from airflow.exceptions import AirflowException, AirflowFailException

from vpe.executor import (LIMIT_SETTINGS, ExecutorClient, attach_where_held, auth_metadata, cancel_where_held,
                          parse_size, pb2, pb2_grpc, replica_channel, replica_channels, status_exit_code)
from vpe.hooks import ExecutorHook, connection_settings

STDERR_TAIL_LINES = 20
# How long a run goes on without its Airflow task: room for a lost worker's retry
# (retry_delay plus scheduling) or a triggerer restart to attach again.
DEFAULT_KEEP_ALIVE = timedelta(minutes=10)
# Deferrable runs shorter than this never leave the worker (module docstring: the defer race).
DEFAULT_DEFER_AFTER = timedelta(seconds=30)
# How long a trigger holds its event after it began, so the scheduler has handled the worker's defer-exit.
DEFER_SETTLE = timedelta(seconds=10)
# A task script's stdout line starting with this, then a JSON object, adds that object to the `extra` of
# the asset events its task emits (tasks/ingestion/load.py prints it).
OUTLET_EXTRA_MARK = "vpe-outlet-extra: "
# How a started run's stream breaks when its replica is lost: the connection reset or, for a host gone
# silent, gRPC's keepalive unanswered (vpe.executor's GRPC_OPTIONS).
LOST = {grpc.StatusCode.UNAVAILABLE}
RETRY_AFTER_LOSS = ("This try fails; Airflow's retry attaches to the run if that replica is back and still has it, "
                    "else starts the step on a live replica, which finds the workspace in the executors' "
                    "workspace store (VPE_EXECUTOR_WORKSPACE_STORE).")
# Refusals a retry cannot fix. Others (executor unreachable, env still building,
# queue full) are raised as ordinary failures, so the task's `retries` apply.
PERMANENT_REFUSALS = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def executor_client(grpc_conn_id: str = "grpc_default") -> ExecutorClient:
    """A client for the executor the connection names."""
    return ExecutorHook(grpc_conn_id).get_conn()


def replica_clients(grpc_conn_id: str) -> list[ExecutorClient]:
    """One client per executor replica behind the connection (every address its host resolves to)."""
    target, token, tls = connection_settings(ExecutorHook.get_connection(grpc_conn_id))
    return [ExecutorClient(channel, token=token) for channel in replica_channels(target, **tls)]


def safe_id(*parts: str) -> str:
    """An executor id ([A-Za-z0-9_.-], at most 128) from Airflow ids, which hold ':' and '+'."""
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", ".".join(parts)).lstrip(".-")
    if len(text) > 128:
        text = text[:115] + "." + hashlib.sha256(text.encode()).hexdigest()[:12]
    return text


def remote_run_id(ti: Any) -> str:
    """The remote run of a task instance: the same for every try, so a retry can find the run an
    earlier try left running (what the KubernetesPodOperator does with its pod labels)."""
    mapped = [f"map{ti.map_index}"] if getattr(ti, "map_index", -1) >= 0 else []
    return safe_id(ti.dag_id, ti.run_id, ti.task_id, *mapped)


def run_limits(limits: dict[str, Any]) -> dict[str, float]:
    """RunLimits fields from a DAG's `limits`; the byte sizes may be written like "2G"."""
    unknown = sorted(set(limits) - set(LIMIT_SETTINGS))
    if unknown:
        raise ValueError(f"unknown limits {unknown}; ExecutorOperator(limits=...) takes {', '.join(LIMIT_SETTINGS)}")
    fields = {}
    for name, value in limits.items():
        try:
            fields[name] = parse_size(value) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"limits[{name!r}]={value!r} is not a number (sizes may be written like '2G')") from None
    return fields


def log_event(logger: Any, event: Any, stderr_tail: deque[str]) -> Any:
    """Writes one streamed event to the task log; returns the final status when it arrives."""
    kind = event.WhichOneof("event")
    if kind == "line" and event.line.stream == pb2.STDERR:
        stderr_tail.append(event.line.text)
        logger.warning("[stderr] %s", event.line.text)
    elif kind == "line":
        logger.info("%s", event.line.text)
    elif kind == "queued":
        logger.info("[executor] %s", event.queued.message)
    elif kind == "started":
        logger.info("[executor] run %s started: pid %s, workspace %s, log %s, on executor %s", event.started.run_id,
                    event.started.pid, event.started.workspace_dir, event.started.log_path, event.started.replica)
    elif kind == "status":
        return event.status
    return None


def outlet_extra(event: Any) -> dict[str, Any]:
    """The asset-event extra a stdout line announces (OUTLET_EXTRA_MARK), else {}."""
    if event.WhichOneof("event") != "line" or not event.line.text.startswith(OUTLET_EXTRA_MARK):
        return {}
    try:
        extra = json.loads(event.line.text[len(OUTLET_EXTRA_MARK):])
    except json.JSONDecodeError:
        return {}
    return extra if isinstance(extra, dict) else {}


def run_summary(status: Any) -> dict[str, Any]:
    """A final RunStatus as plain data (XCom and trigger events carry JSON)."""
    return {"run_id": status.run_id, "exit_code": status_exit_code(status), "timed_out": status.timed_out,
            "cancelled": status.cancelled, "ended_by": status.ended_by,
            "duration_seconds": round(status.duration_seconds, 3), "log_path": status.log_path}


class ExecutorOperator(BaseOperator):
    """Runs `script` (a path under tasks/) with `args` in the executor's `env` environment.

    All tasks of one DAG run share one workspace on the executor, so a step
    finds the files the steps before it wrote. The task instance's run is
    killed when `execution_timeout` passes, and `keep_alive` after the
    Airflow task is lost without being killed (a lost worker, a triggerer
    restart) unless a new try attaches first. `deferrable=True` waits in the
    triggerer instead of a worker slot once the run has gone on for `defer_after`
    (shorter runs finish in the worker). `limits` bounds the run (executor
    RunLimits: memory_bytes, cpu_seconds, processes, open_files, output_bytes;
    sizes like "2G"); unset ones take the executor's defaults. Returns (to XCom)
    the run id, exit code, duration and the executor-side log path. A stdout line
    "vpe-outlet-extra: {json}" adds that object to the extra of the task's asset
    events (its `outlets`).
    """

    template_fields: Sequence[str] = ("script", "args", "env_vars")
    ui_color = "#dbeafe"

    def __init__(self, *, env: str, script: str, args: Sequence[str] = (),
                 env_vars: dict[str, str] | None = None, grpc_conn_id: str = "grpc_default",
                 deferrable: bool = False, keep_alive: timedelta = DEFAULT_KEEP_ALIVE,
                 defer_after: timedelta = DEFAULT_DEFER_AFTER, limits: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if deferrable and keep_alive.total_seconds() <= 0:
            raise ValueError("deferrable=True needs a keep_alive > 0: the run must outlive the worker until the "
                             "triggerer attaches")
        self.env = env
        self.script = script
        self.args = list(args)
        self.env_vars = env_vars or {}
        self.grpc_conn_id = grpc_conn_id
        self.deferrable = deferrable
        self.keep_alive = keep_alive
        self.defer_after = defer_after
        self.limits = run_limits(limits or {})
        self._call: Any = None
        self._run_id = ""
        self._replica = ""

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        self._run_id = remote_run_id(ti)
        stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        extra: dict[str, Any] = {}
        next_seq = 0
        handing_over = threading.Event()
        timer: threading.Timer | None = None
        try:
            for event in self._attach_or_start(ti):
                next_seq = event.seq + 1
                self._replica = event.started.replica or self._replica
                extra.update(outlet_extra(event))
                status = log_event(self.log, event, stderr_tail)
                if status is not None:
                    return self._outcome(context, run_summary(status), stderr_tail, extra)
                if self.deferrable and event.HasField("started") and timer is None:
                    timer = self._hand_over_after_defer_after(handing_over)
        except grpc.RpcError as err:
            if not handing_over.is_set():
                raise (self._lost(err) if self._replica and err.code() in LOST else self._refusal(err)) from None
        finally:
            if timer is not None:
                timer.cancel()
        if handing_over.is_set():
            self._defer(next_seq, stderr_tail, extra)
        raise AirflowException(f"the executor ended run {self._run_id} without a final status; see the executor's log")

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Resumes a deferred task with what ExecutorRunTrigger saw."""
        if "error" in event:
            raise AirflowException(f"lost track of executor run {event['run_id']} on replica "
                                   f"{event.get('replica') or self.grpc_conn_id}: {event['error']}. {RETRY_AFTER_LOSS}")
        return self._outcome(context, event["summary"], event["stderr_tail"], event.get("outlet_extra", {}))

    def on_kill(self) -> None:
        if not self._run_id:
            return
        try:
            cancel_where_held(self._clients_holding_run(), self._run_id)
        except grpc.RpcError as err:
            self.log.warning("could not cancel executor run %s: %s", self._run_id, err.details())
        if self._call is not None:
            self._call.cancel()

    def _attach_or_start(self, ti: Any) -> Iterator[Any]:
        """The events of this task instance's remote run: attached to if an earlier try left it running,
        else started (with the task's timeout and keep-alive)."""
        try:
            _, self._call, first = attach_where_held(replica_clients(self.grpc_conn_id), self._run_id,
                                                     running_only=True)
            self.log.info("[executor] run %s, started by an earlier try, is still running: attaching to it "
                          "instead of starting it again", self._run_id)
            return itertools.chain([first], self._call)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise self._refusal(err) from None
        timeout = self.execution_timeout.total_seconds() if self.execution_timeout else 0.0
        self._call = executor_client(self.grpc_conn_id).run(
            self.env, self.script, self.args, self.env_vars, timeout, self._run_id,
            workspace=safe_id(ti.dag_id, ti.run_id), limits=self.limits,  # ti.run_id: the DAG run's
            keep_alive_seconds=self.keep_alive.total_seconds())
        return self._call

    def _hand_over_after_defer_after(self, handing_over: threading.Event) -> threading.Timer:
        """Ends this worker's stream once the run has gone on for `defer_after`, so that execute() defers."""
        def hand_over() -> None:
            handing_over.set()
            self._call.cancel()

        timer = threading.Timer(self.defer_after.total_seconds(), hand_over)
        timer.daemon = True
        timer.start()
        return timer

    def _defer(self, from_seq: int, stderr_tail: deque[str], extra: dict[str, Any]) -> None:
        """Hands the started run to the triggerer; the run outlives this process by its keep-alive."""
        trigger = ExecutorRunTrigger(run_id=self._run_id, replica=self._replica, from_seq=from_seq,
                                     grpc_conn_id=self.grpc_conn_id, stderr_tail=list(stderr_tail),
                                     outlet_extra=extra)
        self.log.info("[executor] run %s still running after %ss: freeing this worker slot, the triggerer follows it "
                      "from here", self._run_id, self.defer_after.total_seconds())
        self.defer(trigger=trigger, method_name="execute_complete")

    def _clients_holding_run(self) -> list[ExecutorClient]:
        if not self._replica:
            return replica_clients(self.grpc_conn_id)
        target, token, tls = connection_settings(ExecutorHook.get_connection(self.grpc_conn_id))
        return [ExecutorClient(replica_channel(self._replica, target, **tls), token=token)]

    def _outcome(self, context: Any, result: dict[str, Any], stderr_tail: Sequence[str],
                 extra: dict[str, Any]) -> dict[str, Any]:
        self.log.info("[executor] %s", result)
        if result["exit_code"] == 0 and not result["ended_by"]:
            for outlet in self.outlets:
                if isinstance(outlet, Asset):
                    context["outlet_events"][outlet].extra.update(extra)
            return result
        what = ("timed out" if result["timed_out"] else f"was stopped ({result['ended_by']})" if result["ended_by"]
                else "was cancelled" if result["cancelled"] else f"exited with {result['exit_code']}")
        tail = "\n".join(stderr_tail) or "(nothing on stderr)"
        raise AirflowException(f"{self.script} {what} after {result['duration_seconds']:.1f}s "
                               f"(executor log {result['log_path']}). Last stderr lines:\n{tail}")

    def _lost(self, err: grpc.RpcError) -> AirflowException:
        """The stream of a started run broke: the replica holding it is gone (killed, its host lost), so this try
        fails now rather than wait for it."""
        return AirflowException(f"executor replica {self._replica} was lost while it ran {self._run_id} "
                                f"({err.code().name}: {err.details()}). {RETRY_AFTER_LOSS}")

    def _refusal(self, err: grpc.RpcError) -> AirflowException:
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return AirflowException(f"executor unreachable through connection {self.grpc_conn_id!r}: {err.details()}. "
                                    "Is it running? ./bootstrap.sh status")
        error = AirflowFailException if code in PERMANENT_REFUSALS else AirflowException
        return error(f"the executor refused {self.script} in env {self.env!r}: {code.name}: {err.details()}")


class ExecutorRunTrigger(BaseTrigger):
    """Follows a started executor run from the triggerer (grpc.aio): writes every line to the task's log
    and fires once with the run's final status, no sooner than DEFER_SETTLE after it began (the module
    docstring says why). Its kwargs carry the run id, the replica holding it and the first event not yet
    logged, so a restarted triggerer attaches again from there."""

    def __init__(self, *, run_id: str, replica: str, from_seq: int, grpc_conn_id: str = "grpc_default",
                 stderr_tail: Sequence[str] = (), outlet_extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.replica = replica
        self.from_seq = from_seq
        self.grpc_conn_id = grpc_conn_id
        self.stderr_tail: deque[str] = deque(stderr_tail, maxlen=STDERR_TAIL_LINES)
        self.outlet_extra = dict(outlet_extra or {})

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"run_id": self.run_id, "replica": self.replica, "from_seq": self.from_seq,
                 "grpc_conn_id": self.grpc_conn_id, "stderr_tail": list(self.stderr_tail),
                 "outlet_extra": self.outlet_extra})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        began = time.monotonic()
        outcome = await self._follow()
        await asyncio.sleep(max(0.0, began + DEFER_SETTLE.total_seconds() - time.monotonic()))
        yield TriggerEvent(outcome)

    async def _follow(self) -> dict[str, Any]:
        """Logs the run's events up to its final status; returns what execute_complete needs."""
        target, token, tls = connection_settings(await ExecutorHook.aget_connection(self.grpc_conn_id))
        self.log.info("[executor] following run %s on executor %s from event %d",
                      self.run_id, self.replica or target, self.from_seq)
        async with replica_channel(self.replica or target, target, aio=True, **tls) as channel:
            request = pb2.AttachRequest(run_id=self.run_id, from_seq=self.from_seq)
            try:
                async for event in pb2_grpc.ExecutorStub(channel).Attach(request, metadata=auth_metadata(token)):
                    self.from_seq = event.seq + 1
                    self.outlet_extra.update(outlet_extra(event))
                    status = log_event(self.log, event, self.stderr_tail)
                    await asyncio.sleep(0)  # a replayed backlog must not hold up the triggerer's other triggers
                    if status is not None:
                        return {"summary": run_summary(status), "stderr_tail": list(self.stderr_tail),
                                "outlet_extra": self.outlet_extra}
            except grpc.aio.AioRpcError as err:
                return {"run_id": self.run_id, "replica": self.replica, "error": f"{err.code().name}: {err.details()}"}
        return {"run_id": self.run_id, "replica": self.replica,
                "error": "the executor ended the stream without a final status"}

    async def on_kill(self) -> None:
        """The task was marked failed or cleared while deferred: stop the remote run too."""
        target, token, tls = connection_settings(await ExecutorHook.aget_connection(self.grpc_conn_id))
        async with replica_channel(self.replica or target, target, aio=True, **tls) as channel:
            reply = await pb2_grpc.ExecutorStub(channel).Cancel(pb2.CancelRequest(run_id=self.run_id), timeout=10,
                                                                metadata=auth_metadata(token))
        self.log.info("[executor] %s", reply.message)
