"""The ZAP handler thread of a node: serves ``zbroker.broker.zap_policy``'s answers (RFC 27).

The handler is a small thread of our own rather than
``zmq.auth.thread.ThreadAuthenticator``: the node's shell ends with
``ctx.destroy(linger=0)``, which closes every socket made by ``ctx.socket`` from the
main thread; the stock authenticator's sockets are such sockets and its thread raises
on them at every shutdown. Ours is made outside the context's socket list, so the
context's ``term`` wakes it with ETERM and it closes its own socket.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from zbroker.broker.zap_policy import Policy

log = logging.getLogger("zbroker.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27


class ZapHandler:
    """The ZAP handler thread of one context: binds before any server socket exists."""

    WARN_EVERY = 60.0  # seconds: a refused peer reconnects every 100 ms; log it rarely

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], policy: Policy) -> None:
        self.policy = policy
        self._warned: dict[tuple[str, str, str], tuple[float, int]] = {}
        # Not ctx.socket(): kept off the context's list, so ctx.destroy() leaves it to
        # this thread, which closes it when the context's term() wakes it with ETERM.
        self._sock: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="zbroker-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        try:
            while True:
                frames = sock.recv_multipart()
                try:
                    reply, verdict, domain, address = self.policy.judge(frames)
                    if verdict.status != "200":
                        self._warn(domain, address, verdict.text)
                except Exception:  # a bug must refuse the connection, never kill the thread
                    log.exception("ZAP policy failed")
                    reply = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"", b"", b""]
                sock.send_multipart(reply)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:
            log.error("ZAP handler stopped: %s", exc)
        finally:
            sock.close(linger=0)

    def _warn(self, domain: str, address: str, why: str) -> None:
        """Log a refusal, then at most once a minute per (domain, address, reason)."""
        now = time.monotonic()
        key = (domain, address, why)
        last, quiet = self._warned.get(key, (-self.WARN_EVERY, 0))
        if now - last < self.WARN_EVERY:
            self._warned[key] = (last, quiet + 1)
            return
        if len(self._warned) > 4096:  # many addresses: forget, rather than grow
            self._warned.clear()
        self._warned[key] = (now, 0)
        more = f" ({quiet} more since)" if quiet else ""
        log.warning(
            "refused a %s connection from %s: %s%s", domain or "?", address or "?", why, more
        )

    def alive(self) -> bool:
        return self._thread.is_alive()
