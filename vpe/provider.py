"""VPE's registration as an Airflow provider (the `apache_airflow_provider` entry point): its version,
the `vpe_executor` connection type and that connection's form. Imports no Airflow: Airflow reads this
for every CLI call and UI page."""
from __future__ import annotations

from importlib.metadata import version
from typing import Any

DISTRIBUTION = "vpe-executor"
CONN_TYPE = "vpe_executor"
HOOK_NAME = "VPE executor"

# The connection form, once: Airflow 3.2+ reads it from here ("conn-fields", "ui-field-behaviour");
# 3.1 asks the hook, which builds its form from the same tables (vpe.hooks).
TLS_FIELDS = {
    "tls_ca": ("TLS CA file", "PEM file the executor's certificate is checked against (or its self-signed "
                              "certificate); empty = plaintext"),
    "tls_cert": ("TLS client certificate file", "PEM file; with the key, for an executor that requires "
                                                "client certificates (mutual TLS)"),
    "tls_key": ("TLS client key file", "PEM private key of the client certificate"),
}
FIELD_BEHAVIOUR = {
    "hidden_fields": ["login", "schema"],
    "relabeling": {"password": "Token"},
    "placeholders": {"host": "127.0.0.1, or dns:///executor for replicas behind one name", "port": "3170",
                     "password": "the executor's VPE_EXECUTOR_TOKEN"},
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": DISTRIBUTION,
        "name": "VPE",
        "description": "Runs task scripts on a VPE executor, each in its pipeline's own Python env.",
        "versions": [version(DISTRIBUTION)],
        "operators": [{"integration-name": "VPE", "python-modules": ["vpe.operators"]}],
        "hooks": [{"integration-name": "VPE", "python-modules": ["vpe.hooks"]}],
        "triggers": [{"integration-name": "VPE", "python-modules": ["vpe.operators"]}],
        "connection-types": [{
            "connection-type": CONN_TYPE,
            "hook-class-name": "vpe.hooks.ExecutorHook",
            "hook-name": HOOK_NAME,
            "conn-fields": {name: {"label": label, "description": text, "schema": {"type": ["string", "null"]}}
                            for name, (label, text) in TLS_FIELDS.items()},
            "ui-field-behaviour": {key.replace("_", "-"): value for key, value in FIELD_BEHAVIOUR.items()},
        }],
    }
