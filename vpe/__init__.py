"""VPE as a package: the executor (`vpe.executor`, also the `vpe-executor` command) and its Airflow
provider (`from vpe import ExecutorOperator`; the `vpe_executor` connection type, `vpe.hooks.ExecutorHook`).

Importing `vpe` imports no Airflow, so an executor host needs none."""
from __future__ import annotations

from pathlib import Path
from typing import Any

# In a checkout executor.py lies beside this folder, not in it (the wheel puts it in): the package
# reaches it there, so `vpe.executor` is the one server module in both layouts.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not Path(__file__).with_name("executor.py").exists() and (_CHECKOUT / "executor.py").exists():
    __path__.append(str(_CHECKOUT))

_LAZY = {"ExecutorOperator": "vpe.operators", "ExecutorRunTrigger": "vpe.operators", "ExecutorHook": "vpe.hooks"}


def __getattr__(name: str) -> Any:
    """The Airflow side on first use only (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'vpe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
