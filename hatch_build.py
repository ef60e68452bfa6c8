"""Build hook: the wheel's vpe/ package gets executor.py and the files it reads beside it (ping.proto,
the name tables), which stay at the repo's top level, and the old plugin's module name as a redirect."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# What executor.py reads from its own folder (HERE) at run time.
DATA_BESIDE_EXECUTOR = ("*.proto", "*.yaml")


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        included = build_data["force_include"]
        included[str(root / "vpe" / "legacy_executor_operator.py")] = "executor_operator.py"
        if version == "editable":
            return  # an editable install reaches executor.py in the checkout itself (see vpe/__init__.py)
        for path in [root / "executor.py", *(p for pattern in DATA_BESIDE_EXECUTOR for p in root.glob(pattern))]:
            included[str(path)] = f"vpe/{path.name}"
