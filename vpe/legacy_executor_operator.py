"""`executor_operator`, the module name of VPE's Airflow side before it became the `vpe` package.

Installed as the top-level module `executor_operator`, so DAGs that still import from it, and triggers
deferred before an upgrade (their class path names this module), keep working."""
import sys
import warnings

import vpe.operators

warnings.warn("`executor_operator` is the old name of VPE's Airflow module: write "
              "`from vpe import ExecutorOperator` (or `from vpe.operators import ...`)", DeprecationWarning, stacklevel=2)
# The same module object, so a name imported from either place is the same class.
sys.modules[__name__] = vpe.operators
