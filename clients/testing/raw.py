"""Raw frames to a node's client socket: for tests of the node itself, and nothing else.

Applications and the tools talk to nodes through the library (``LicenseClient``) or
``zbroker status`` (``zbroker.broker.status.ask``). A test of the node sometimes has to say
what no client would: a map exactly as written (a document's example, a hostile
mutation), junk bytes, several frames, a REQ socket's envelope. ``RawClient`` is the one
socket such tests use, so that how a test connects (CURVE with the keys a secure
``LocalTriad`` shares, ``IMMEDIATE``, ``linger=0``) is written once.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import zmq

from zbroker.broker.status import default_curve
from zbroker.clients.curve import ClientCurve
from zbroker.clients.wire import Reply, decode_reply, encode_request, pack

SEND_TIMEOUT = 5.0  # seconds an IMMEDIATE socket may wait for its connection to come up


class RawClient:
    """One socket (a DEALER unless ``kind`` says otherwise) to one node's client endpoint.

    ``immediate``: sends wait until the connection (and its CURVE handshake) is up
    rather than queue, so that a test knows its frames reached the node's socket.
    ``curve``: the key pair and server keys to dial with (an administrator's, a
    stranger's); by default those a secure ``LocalTriad`` shares, or plain TCP.
    """

    def __init__(
        self,
        endpoint: str,
        kind: int = zmq.DEALER,
        *,
        immediate: bool = False,
        curve: ClientCurve | None = None,
    ) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        if immediate:
            self.sock.setsockopt(zmq.IMMEDIATE, 1)
        if curve is None:
            curve = default_curve([endpoint])  # a secure LocalTriad shares its nodes' keys
        if curve is not None:
            curve.apply(self.sock, endpoint)
        self.sock.connect(endpoint)
        self.sid = uuid.uuid4().hex
        self.reqs = itertools.count(1)

    # --- sending
    def send(self, **fields: Any) -> int:
        """A request of this client's session (``sid`` and the next ``req`` unless given)."""
        fields.setdefault("sid", self.sid)
        fields.setdefault("req", next(self.reqs))
        self.send_frames([encode_request(fields)])
        return int(fields["req"])

    def send_map(self, obj: Any) -> None:
        """``obj`` packed exactly as given: no protocol version or ids added."""
        self.send_frames([pack(obj)])

    def send_frames(self, frames: list[bytes]) -> None:
        deadline = time.monotonic() + SEND_TIMEOUT
        while True:  # with IMMEDIATE: refused until the (CURVE) connection is up
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)  # polling interval of a condition with a deadline

    # --- receiving
    def reply(self, timeout: float = 5.0) -> Reply:
        """The next reply (the last frame of a message that came in an envelope)."""
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply within {timeout} s")
        return decode_reply(self.sock.recv_multipart()[-1])

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next reply as one map: ``status`` and the rest of its fields."""
        reply = self.reply(timeout)
        return {"status": reply.status, **reply.body}

    def replies(self, settle: float = 0.05) -> list[dict[str, Any]]:
        """Every reply that comes until none has for ``settle`` seconds."""
        out = []
        while self.sock.poll(int(settle * 1000)):
            out.append(self.recv(0))
        return out

    # --- both
    def call(self, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """``send``, then the reply to it (a late answer to an earlier request is skipped)."""
        req = self.send(**fields)
        return self._answer(req, timeout, any_reply=fields.get("op") == "status")

    def ask(self, obj: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """``send_map``, then the reply carrying its ``req`` (0 when it has none)."""
        self.send_map(obj)
        return self._answer(obj.get("req", 0), timeout)

    def _answer(self, req: object, timeout: float, any_reply: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(max(0.01, deadline - time.monotonic()))
            if reply.get("req") == req or any_reply:
                return reply

    def open(self) -> dict[str, Any]:
        return self.call(
            op="open", user="tester", host="testhost", display=":0", client_version="raw"
        )

    def close(self) -> None:
        self.sock.close(linger=0)


def bind_retrying(sock: zmq.Socket[bytes], endpoint: str, within: float = 5.0) -> None:
    """Bind, retrying while a killed or just-closed listener on that port is going away
    (a test that takes over a node's endpoint: the kernel frees the port a moment later)."""
    deadline = time.monotonic() + within
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # polling interval of a condition with a deadline
