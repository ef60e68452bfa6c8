"""The connection to a VPE executor: host and port, the executor's token as the password, TLS files as
extras. Connections of type `grpc` (Airflow's gRPC provider; what VPE used before it had its own type) are
read the same way, their `credential_pem_file` being the CA."""
from __future__ import annotations

import copy
from typing import Any

from airflow.sdk import BaseHook

from vpe.executor import ExecutorClient, open_channel
from vpe.provider import CONN_TYPE, FIELD_BEHAVIOUR, HOOK_NAME, TLS_FIELDS


def connection_settings(conn: Any) -> tuple[str, str | None, dict[str, str]]:
    """(address, token, TLS files as open_channel's keywords) from a vpe_executor or grpc connection."""
    target = f"{conn.host}:{conn.port}" if conn.port else conn.host
    extra = conn.extra_dejson
    tls = {name: extra.get(name) or "" for name in TLS_FIELDS}
    tls["tls_ca"] = tls["tls_ca"] or extra.get("credential_pem_file") or ""
    return target, conn.password or None, tls


class ExecutorHook(BaseHook):
    """A client (vpe.executor.ExecutorClient) for the executor a connection names."""

    conn_name_attr = "grpc_conn_id"
    default_conn_name = "grpc_default"
    conn_type = CONN_TYPE
    hook_name = HOOK_NAME

    def __init__(self, grpc_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.grpc_conn_id = grpc_conn_id

    def get_conn(self) -> ExecutorClient:
        target, token, tls = connection_settings(self.get_connection(self.grpc_conn_id))
        # The channel is built here rather than by the grpc provider's GrpcHook.get_conn(): its
        # channels take no options, so no round-robin over scaled-out executors.
        return ExecutorClient(open_channel(target, **tls), token=token)

    # Airflow 3.1 builds the connection form from these two; 3.2+ reads vpe.provider's declaration instead.
    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import StringField

        return {name: StringField(lazy_gettext(label), widget=BS3TextFieldWidget(), description=text)
                for name, (label, text) in TLS_FIELDS.items()}

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return copy.deepcopy(FIELD_BEHAVIOUR)  # Airflow rewrites the placeholders' keys in place
