"""``zbroker bench``: zbroker's speed beside the raw ZeroMQ limit, measured in one run.

The load generators are separate processes speaking docs/protocol.md over raw DEALER
sockets (the client library is for applications; raw sockets keep the measurement
about the server). The same processes drive a bare pyzmq ROUTER echo of the same
message size and the triad, at the same concurrency, interleaved level by level, so
that every triad figure has a baseline taken minutes apart on the same machine.

Modules:

- ``common``: request frames, percentiles, /proc sampling, the heartbeat watcher;
- ``echo``: the baseline server;
- ``load``: the throughput and latency workers (checkout + checkin pairs);
- ``fleet``: many sessions heartbeating at the default interval, and mass checkouts;
- ``failover``: the prober that times SIGKILL -> first grant by the new primary;
- ``storm``: many clients, each failing over with the client library's own policy;
- ``flood``: status requests from one connection that never reads, beside honest load;
- ``triad``: a ``LocalTriad`` with a large bench feature, and node process stats;
- ``runner``: the plans (full, quick, tiny) and the run itself;
- ``report``: the printed table;
- ``cli``: the click command (``scripts/bench.py``, ``zbroker bench``).

Nothing is imported here, so that ``zbroker --help`` stays light; use
``zbroker.clients.testing.bench.runner.run``.
"""

# the phases of ``runner.run``, in run order (``fleet``: sessions, then their grants)
PHASES = ("throughput", "failover", "fleet", "storm", "flood")
