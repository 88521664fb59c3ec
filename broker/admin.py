"""Who may act as whom on an open connection: administrators, and peers by name.

Administrators. A request that administers the triad (``op: admin``) is honoured only
from a connection whose ZAP ``User-Id`` is ``admin`` (secure mode), or, in plain mode,
only from a loopback address, as FlexLM's ``lmgrd -local`` restricts ``lmdown``.
``is_admin`` reads that from the frame's metadata; ``handle_admin`` decides the answer.
Peers. A peer message is taken only from the connection of the node it claims to come
from (``is_peer``), by the ``node:NAME`` User-Id ``zbroker.broker.zap_policy`` gave it.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

import zmq

from zbroker.broker.model import ErrorCode, Reply, reply_error, reply_ok
from zbroker.broker.zap_policy import ADMIN_USER, NODE_USER_PREFIX
from zbroker.clients.protocol import ADMIN_ACTIONS

log = logging.getLogger("zbroker.security")


def is_peer(frame: zmq.Frame | None, name: str, *, secure: bool) -> bool:
    """Whether a peer message claiming to come from node ``name`` came in on its key.

    Secure mode: the ZAP handler named the connection ``node:NAME`` from the key it
    presented, so a stolen key lets its holder pose as that one node only. Plain mode
    authenticates nothing: every claim is taken (docs/security.md).
    """
    if not secure:
        return True
    if frame is None:
        return False
    try:
        return bool(frame.get("User-Id") == NODE_USER_PREFIX + name)
    except zmq.ZMQError:  # no such metadata: no ZAP handler saw this connection
        return False


def is_admin(frame: zmq.Frame | None, *, secure: bool) -> bool:
    """Whether the connection ``frame`` (a part of the request) came in on may administer.

    Secure mode: the ZAP handler named it ``admin`` (its key is on the admin list).
    Plain mode: it comes from a loopback address (anyone on this host).
    """
    if frame is None:
        return False
    try:
        if secure:
            return bool(frame.get("User-Id") == ADMIN_USER)
        address = frame.get("Peer-Address")
    except zmq.ZMQError:  # no such metadata: not over TCP, or no ZAP handler
        return False
    try:
        return ipaddress.ip_address(str(address)).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AdminDecision:
    reply: Reply | None  # None: the core answers (``remove``: once its deltas commit)
    stop: bool = False  # the node should stop once the reply has left
    reread: bool = False  # the node should read its license and options files again
    remove: bool = False  # the primary takes grants (broker/removal.py)


def handle_admin(action: object, *, admin: bool, node: str, secure: bool) -> AdminDecision:
    """The answer to an ``admin`` request (docs/protocol.md), and what the node must do."""
    if not admin:
        how = (
            "the administrator's key (admin_keys in the node's config)"
            if secure
            else "a connection from the node's own host (plain mode)"
        )
        return AdminDecision(reply_error(ErrorCode.NOT_ALLOWED, f"admin requests need {how}"))
    if action == "down":
        log.warning("administrator asked node %s to stop", node)
        return AdminDecision(reply_ok(node=node, stopping=True), stop=True)
    if action == "reread":
        log.warning("administrator asked node %s to reread its license and options", node)
        return AdminDecision(reply_ok(node=node, rereading=True), reread=True)
    if action == "remove":
        return AdminDecision(None, remove=True)
    return AdminDecision(
        reply_error(
            ErrorCode.BAD_REQUEST,
            f"unknown admin action {action!r:.40}; known: {', '.join(ADMIN_ACTIONS)}",
        )
    )
