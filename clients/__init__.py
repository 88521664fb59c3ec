"""zbroker's client library: check licenses out of a triad and keep them through failovers.

    from clients import LicenseClient

    with LicenseClient(["tcp://10.0.0.1:27001", "tcp://10.0.0.2:27001",
                        "tcp://10.0.0.3:27001"]) as client:
        with client.checkout("cad", version="2.0") as grant:
            ...  # use the feature while grant.safe

The wire protocol is docs/protocol.md; errors are in ``clients.errors``.
"""

from clients.client import LicenseClient
from clients.errors import (
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
from clients.grant import Grant, GrantState

__all__ = [
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
]
