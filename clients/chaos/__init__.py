"""Chaos runs: break a real triad under client load and check SPEC section 5 from the record.

The pieces, each usable alone:

- ``history``: the record of a run, JSON lines: every client operation as an invocation
  and a completion, lease-lost notices, faults, status samples and the final status;
- ``nemesis``: the faults of SPEC section 6 and a seeded schedule of them;
- ``workload``: one client process (several sessions) doing checkouts and checkins;
- ``runner``: starts a triad and the client processes, applies the schedule, writes the
  history, always cleans up;
- ``checker``: reads a history and decides whether an invariant broke, pointing at the
  operations that break it;
- ``plot``: a timeline PNG (needs matplotlib, imported only there).

``scripts/chaos.py`` is the command line over them.
"""
