"""zbroker node: the client front, the ledger, the license file."""
