"""``zbroker web``: a read-only status page of a triad, for a person with a browser.

- ``model``: the page's model, built from one ``zbroker.broker.status.query_nodes`` answer and
  the time (pure: no sockets, no clock of its own); the HTML page and the JSON endpoint
  both show it.
- ``poller``: one thread that asks the triad at most every ``POLL_EVERY`` seconds and
  keeps the last answer; its ZeroMQ sockets live and die in that thread.
- ``app``: the Starlette application (HTML and JSON rendered from the poller's last
  answer, so any number of browsers costs the triad nothing more) and ``serve``, which
  runs it under uvicorn.
"""
