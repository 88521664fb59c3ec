"""Break a zbroker triad under client load and check SPEC section 5 from the clients' record.

    python scripts/chaos.py --duration 300           # every fault, as many as fit
    python scripts/chaos.py --help                   # the options

The same as ``zbroker chaos``; the work is in ``zbroker.clients.testing.chaos``
(``clients/testing/chaos/cli.py`` is the click command); this file only makes the
repository importable when it is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zbroker.clients.testing.chaos.cli import chaos

if __name__ == "__main__":
    chaos()
