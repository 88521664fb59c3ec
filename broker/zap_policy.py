"""The ZAP policy: who may connect to which socket of a node (bytes in, verdict out).

- peer ROUTER and heartbeat PUB (domain ``peer``): only the public keys on the triad's
  SERVER lines; User-Id ``node:NAME``;
- client ROUTER (domain ``client``): the admin keys (User-Id ``admin``), then any key,
  or with ``client_allow`` only the keys listed (User-Id ``client``).

No socket and no clock: the only input besides the request is the allow-lists, which
``zbroker.broker.keys.KeyList`` reads again when their files change. The User-Id a connection
gets here is what ``zbroker.broker.admin`` reads back from each frame (``is_admin``,
``is_peer``). The thread that serves these answers is ``zbroker.broker.zap``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from zmq.utils import z85

from zbroker.broker.keys import KeyList

PEER_DOMAIN = "peer"
CLIENT_DOMAIN = "client"
ADMIN_USER = "admin"
CLIENT_USER = "client"
NODE_USER_PREFIX = "node:"


@dataclass(frozen=True)
class ZapAnswer:
    status: str  # "200" let in, "400" refused
    text: str
    user: str = ""


class Policy:
    """Who may connect to which socket of a node (the table above).

    ``nodes`` maps each triad public key to its node name; ``admins`` are the keys that
    may administer (and are always served as clients); ``clients`` is the client
    allow-list, or None to serve any key.
    """

    def __init__(
        self,
        nodes: Mapping[str, str],
        admins: Iterable[str] | KeyList = (),
        clients: Iterable[str] | KeyList | None = None,
    ) -> None:
        self.nodes = dict(nodes)
        self.admins = admins if isinstance(admins, KeyList) else frozenset(admins)
        self.clients = (
            clients if clients is None or isinstance(clients, KeyList) else frozenset(clients)
        )

    def decide(self, domain: str, mechanism: str, credentials: list[bytes]) -> ZapAnswer:
        if mechanism != "CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return ZapAnswer("400", f"{mechanism} is not accepted: CURVE only")
        key = z85.encode(credentials[0]).decode("ascii")
        if domain == PEER_DOMAIN:
            name = self.nodes.get(key)
            if name is None:
                return ZapAnswer("400", "key is not a node of this triad")
            return ZapAnswer("200", "OK", NODE_USER_PREFIX + name)
        if domain == CLIENT_DOMAIN:
            if key in self.admins:
                return ZapAnswer("200", "OK", ADMIN_USER)
            if self.clients is None or key in self.clients:
                return ZapAnswer("200", "OK", CLIENT_USER)
            return ZapAnswer("400", "key is not on the client allow-list")
        return ZapAnswer("400", f"unknown domain {domain!r}")

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply frames to one ZAP request (RFC 27), however malformed it is."""
        return self.judge(frames)[0]

    def judge(self, frames: list[bytes]) -> tuple[list[bytes], ZapAnswer, str, str]:
        """``answer``, with the verdict, domain and peer address (for the handler's log)."""
        if len(frames) < 6 or frames[0] != b"1.0":
            request_id = frames[1] if len(frames) > 1 else b""
            bad = ZapAnswer("400", "malformed ZAP request")
            return [b"1.0", request_id, b"400", bad.text.encode(), b"", b""], bad, "?", "?"
        _, request_id, domain_b, address_b, _, mechanism, *credentials = frames
        domain = domain_b.decode("utf-8", "replace")
        address = address_b.decode("utf-8", "replace")
        verdict = self.decide(domain, mechanism.decode("ascii", "replace"), credentials)
        reply = [
            b"1.0",
            request_id,
            verdict.status.encode(),
            verdict.text.encode(),
            verdict.user.encode(),
            b"",
        ]
        return reply, verdict, domain, address
