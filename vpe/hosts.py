"""Where a task instance ran, as Airflow records it (`[core] hostname_callable`). On several hosts bootstrap
points that setting here, so the api-server fetches a worker host's task logs from the address that host
serves them on (VPE_LISTEN_ADDRESS), not from a host name the other hosts may not resolve."""
from __future__ import annotations

import os
import socket


def listen_address() -> str:
    return os.environ.get("VPE_LISTEN_ADDRESS") or socket.getfqdn()
