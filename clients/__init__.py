"""zbroker's client library: check licenses out of a triad and keep them through failovers.

Applications import it as ``zbroker`` (``from zbroker import LicenseClient``, see
``zbroker/__init__.py``); this package holds its modules. It imports nothing here, so
that a node, which takes only the library's leaf modules (``protocol``, ``curve``,
``licfile``), does not load the rest of the library with them.
"""

import logging

# A library's loggers stay quiet until the application configures logging (the logging
# HOWTO's advice): what it logs, the application also hears through on_lost and raises.
logging.getLogger(__name__).addHandler(logging.NullHandler())
