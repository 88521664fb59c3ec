"""``python -m zbroker.broker`` is the ``zbroker`` command (``zbroker up`` starts nodes so)."""

from zbroker.broker.cli import main

main()
