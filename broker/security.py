"""Who may talk to a node, and how a node's sockets are set up for it.

Theory of operation
-------------------
In secure mode (the default; ``secure = false`` in the config turns it off for trials)
every node socket runs ZeroMQ's CURVE (Curve25519 key exchange, then every frame
encrypted and authenticated with per-connection keys), and the node runs a ZAP
handler that says, for each new connection, whether its client key may in
(``zbroker.broker.zap_policy``: node keys on the peer sockets, admin and allowed client keys on
the client socket).

The connecting side always knows the key of the server it dials (the SERVER line's
``KEY=``), so a node's SUB and DEALERs only ever talk to the real peers, and a client
only to the real node. Server sockets set ``ZAP_ENFORCE_DOMAIN``: with no handler
bound they refuse everyone rather than fall back to "encrypt but accept any key".

The jobs live apart, one module each:

- key pairs, certificates and dialling a server: ``zbroker.clients.curve`` (the client library
  needs them too, and must not import the node);
- writing key pairs and reading allow-lists: ``zbroker.broker.keys``;
- the ZAP policy, pure: ``zbroker.broker.zap_policy``; its thread: ``zbroker.broker.zap``;
- admin and peer checks on a frame: ``zbroker.broker.admin``;
- a node's socket set-up from its config: this module (``NodeSecurity``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from zbroker.broker.keys import KeyList
from zbroker.broker.zap import ZapHandler
from zbroker.broker.zap_policy import Policy
from zbroker.clients.curve import KeyPair, SecurityError, load_keypair, secure_client

if TYPE_CHECKING:  # config imports this module: only for annotations
    from zbroker.broker.config import Config

log = logging.getLogger("zbroker.security")


def secure_server(sock: zmq.Socket[bytes], keys: KeyPair, domain: str) -> None:
    """Make ``sock`` a CURVE server whose connections the ZAP handler must let in."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler bound: refuse, never accept all


@dataclass(frozen=True)
class NodeSecurity:
    """One node's security as its config says: what ``NodeSockets`` (broker/sockets.py) applies.

    In plain mode every method leaves the socket as it is and no handler runs.
    """

    secure: bool
    keys: KeyPair | None = None
    peers: Mapping[str, str] = field(default_factory=dict)  # other node -> public key
    policy: Policy | None = None

    @classmethod
    def from_config(cls, config: Config, name: str) -> NodeSecurity:
        """Load the node's key pair and allow-lists; SecurityError names what is wrong."""
        me = config.node(name)
        if not config.secure:
            if any(n.public_key for n in config.nodes):
                log.warning(
                    "secure = false, but the license's SERVER lines carry KEY=: clients "
                    "given the license file will try CURVE and not connect"
                )
            return cls(secure=False)
        if me.secret_key is None or me.public_key is None:
            raise SecurityError(f"{config.path}: node {name} has no CURVE key configured")
        keys = load_keypair(me.secret_key)
        if keys.public != me.public_key:
            raise SecurityError(
                f"{me.secret_key}: this is not node {name}'s key: its public key "
                f"{keys.public} differs from KEY= on the SERVER line of {name}"
            )
        return cls(
            secure=True,
            keys=keys,
            peers={n.name: n.public_key for n in config.nodes if n.name != name and n.public_key},
            policy=Policy(
                nodes={n.public_key: n.name for n in config.nodes if n.public_key},
                admins=KeyList(config.admin_keys) if config.admin_keys else (),
                clients=KeyList(config.client_allow) if config.client_allow else None,
            ),
        )

    @property
    def mode(self) -> str:
        """What the status report says: ``curve`` or ``plain``."""
        return "curve" if self.secure else "plain"

    def start(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> ZapHandler | None:
        """The ZAP handler of ``ctx``; call before any server socket is bound."""
        return None if self.policy is None else ZapHandler(ctx, self.policy)

    def server(self, sock: zmq.Socket[bytes], domain: str) -> None:
        if self.keys is not None:
            secure_server(sock, self.keys, domain)

    def client(self, sock: zmq.Socket[bytes], peer: str) -> None:
        """Dial ``peer`` securely: call before each ``connect`` to it."""
        if self.keys is not None:
            secure_client(sock, self.peers[peer], self.keys)
