"""zbroker: a highly available floating-license server, and the client library applications embed.

    from zbroker import LicenseClient, LicenseDenied

    with LicenseClient(["tcp://10.0.0.1:27001", "tcp://10.0.0.2:27001",
                        "tcp://10.0.0.3:27001"]) as client:
        with client.checkout("cad", version="2.0") as grant:
            ...  # use the feature while grant.safe

The three parts install under this one name: ``zbroker.clients`` (the library, whose API
is re-exported here), ``zbroker.broker`` (a node) and ``zbroker.peers`` (the replication
between nodes). The folders ``broker/``, ``peers/`` and ``clients/`` of the source tree are
linked into this package (``zbroker/broker`` -> ``../broker``, ...), so the tree, an
editable install and the wheel all import them by the same names.

The API is imported on first use (PEP 562), not with this package: a node imports
``zbroker.broker``, and must not load the client library with it.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# A compiled build (setup.py, ZBROKER_COMPILE=1) left its record here: refuse a compiled
# core whose source changed since, before any core is imported. A pure install: one stat.
if os.path.exists(os.path.join(os.path.dirname(__file__), "compiled.json")):
    from zbroker.compiled import check as _check_compiled

    _check_compiled()

if TYPE_CHECKING:  # what the names are, for type checkers; at run time see __getattr__
    from zbroker.clients.borrow import BorrowToken
    from zbroker.clients.client import LicenseClient
    from zbroker.clients.errors import (
        ClientClosed,
        ClientForked,
        LeaseLost,
        LicenseDenied,
        LicenseError,
        LicensePathError,
        LicenseUnavailable,
        OutcomeUnknown,
        ProtocolError,
    )
    from zbroker.clients.grant import Grant, GrantState
    from zbroker.clients.tokens import StoreError, TokenNotKept

__all__ = [
    "BorrowToken",
    "ClientClosed",
    "ClientForked",
    "Grant",
    "GrantState",
    "LeaseLost",
    "LicenseClient",
    "LicenseDenied",
    "LicenseError",
    "LicensePathError",
    "LicenseUnavailable",
    "OutcomeUnknown",
    "ProtocolError",
    "StoreError",
    "TokenNotKept",
]


_HOMES = {
    "LicenseClient": "client",
    "Grant": "grant",
    "GrantState": "grant",
    "BorrowToken": "borrow",
    "StoreError": "tokens",
    "TokenNotKept": "tokens",
}  # else errors


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(f"zbroker.clients.{_HOMES.get(name, 'errors')}")
        return getattr(module, name)
    raise AttributeError(f"module 'zbroker' has no attribute {name!r}")
