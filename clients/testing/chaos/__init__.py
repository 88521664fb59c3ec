"""Chaos runs: break a real triad under client load and check SPEC section 5 from the record.

The pieces, each usable alone:

- ``history``: the record of a run, JSON lines: every client operation as an invocation
  and a completion, lease-lost notices, faults, status samples and the final status;
- ``nemesis``: the faults of SPEC section 6, a seeded schedule of them, their execution;
- ``workload``: one client process (several sessions and a probe) checking seats out
  and in, recording as it goes;
- ``runner``: starts a triad and the client processes, applies the schedule, writes the
  history, always cleans up;
- ``checker`` (safety: over-allocation, lost grants, exactly once, convergence) and
  ``availability`` (liveness, unavailable windows, failover times): read a history and
  decide, pointing at the operations that break an invariant;
- ``verdict``: the findings and figures, rendered for a person or as numbers;
- ``plot``: a timeline PNG (needs matplotlib, imported only there);
- ``cli``: the command line, ``scripts/chaos.py``.
"""
