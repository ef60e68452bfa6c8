"""
### ping_grpc: is the executor reachable from Airflow?

Calls the executor's `Ping` through the `grpc_default` connection and logs its
version and the state of every pipeline environment. Trigger it after
`./bootstrap.sh` to check the whole chain: scheduler → worker → gRPC → executor.
"""
from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["vpe", "smoke"],
    doc_md=__doc__,
)
def ping_grpc() -> None:
    @task
    def ping() -> str:
        from vpe.operators import executor_client

        reply = executor_client("grpc_default").ping()
        print(f"executor {reply.version} answered {reply.message!r}")
        for env in reply.envs:
            print(f"  env {env.name}: {env.detail or env.state}")
        return reply.version

    ping()


ping_grpc()
