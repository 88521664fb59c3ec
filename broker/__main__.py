"""``python -m broker`` is the ``zbroker`` command (used by ``zbroker up`` to start nodes)."""

from broker.cli import main

main()
