"""zbroker's test tooling, apart from the client library (``zbroker[testing]``).

- ``kit``: ``LocalTriad``, real node processes on free loopback ports, ``wait_for`` and
  ``settled`` (a call retried across a failover);
- ``pytest_plugin``: the kit's fixtures (``make_triad``, ``triad``, ``single``, ``raw``),
  registered under pytest's ``pytest11`` entry point, so that a project that embeds
  ``clients`` gets them by installing ``zbroker[testing]`` (as ``kazoo.testing`` ships
  its harness);
- ``raw``: the one raw socket for tests of the node itself;
- ``chaos``: ``zbroker chaos``; ``bench``: ``zbroker bench``.

The library (``clients`` outside this package) never imports it; it may import the
library and the node. The kit is importable from here (``from zbroker.clients.testing import
LocalTriad``); chaos and bench are not imported here, so that loading the plugin stays
light.
"""

from zbroker.clients.testing.kit import LocalTriad, TriadTimeout, settled, wait_for
from zbroker.clients.testing.raw import RawClient

__all__ = ["LocalTriad", "RawClient", "TriadTimeout", "settled", "wait_for"]
