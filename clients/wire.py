"""The client side of docs/protocol.md: the library's one codec.

Requests are built as plain maps and packed here; replies are unpacked, checked for
the fields every reply has, and handed on as a frozen ``Reply``. The payload of an
``ok`` is read through the typed accessors below, which raise ``ProtocolError``
instead of letting a wrongly typed field travel into the library. Nothing here
touches a socket or a clock. The protocol's words (version, bounds, statuses, codes)
are ``zbroker.clients.protocol``'s, the same the node checks requests against.

msgpack is used as the node uses it (``zbroker.broker.wire``): ``use_bin_type=True``,
``raw=False``, no ext or bin types accepted, no pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from zbroker.clients.errors import LicenseDenied, LicenseError, LicenseUnavailable, ProtocolError
from zbroker.clients.protocol import (
    MAX_COUNT,
    MAX_LEASE,
    MAX_REQ,
    PROTOCOL_VERSION,
    STATUSES,
    ErrorCode,
    Status,
)


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack_reply(data: bytes) -> Any:
    """A node's reply: no ext or bin types, sizes bounded by the frame itself.

    A request's caps (``zbroker.broker.wire.unpack_bounded``) would not fit: a status reply may
    list a page of up to HOLDERS_PAGE holders (and a node of an older version sent them
    all), so replies keep msgpack's own bound instead: no container may claim more items
    than the frame has bytes.
    """
    return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)


@dataclass(frozen=True)
class Reply:
    """One decoded reply: the fields every reply has, and the rest in ``body``."""

    sid: str | None
    req: int | None
    status: str
    body: Mapping[str, Any]

    def text(self, key: str) -> str:
        value = self.body.get(key)
        if not isinstance(value, str):
            raise ProtocolError(f"{self.status} reply: {key!r} is not a string: {value!r}")
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self.body.get(key) is None else self.text(key)

    def integer(self, key: str) -> int:
        value = self.body.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{self.status} reply: {key!r} is not an integer: {value!r}")
        return value

    def seconds(self, key: str) -> float:
        value = self.body.get(key)
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        # nan or inf would make every deadline computed from it never come (or come at once)
        if number is None or not 0 < number <= MAX_LEASE:
            raise ProtocolError(
                f"{self.status} reply: {key!r} is not seconds from 0 to {MAX_LEASE:.0f}: {value!r}"
            )
        return float(number)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.body.get(key)
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.status} reply: {key!r} is not a map: {value!r}")
        return value


@dataclass(frozen=True)
class GrantInfo:
    """The ``grant`` map of a checkout's ``ok`` reply."""

    id: int
    feature: str
    version: str
    count: int


def encode_request(fields: Mapping[str, Any]) -> bytes:
    """One request frame: ``fields`` plus the protocol version."""
    return pack({"v": PROTOCOL_VERSION, **fields})


def decode_reply(frame: bytes) -> Reply:
    """Unpack and check one reply frame; raises ProtocolError on anything malformed."""
    try:
        obj = unpack_reply(frame)
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        raise ProtocolError(f"reply is not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"reply is not a map: {type(obj).__name__}")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"reply has protocol version {obj.get('v')!r}, expected {PROTOCOL_VERSION}"
        )
    sid, req, status = obj.get("sid"), obj.get("req"), obj.get("status")
    if sid is not None and not isinstance(sid, str):
        raise ProtocolError(f"reply sid is not a string: {sid!r}")
    if req is not None and (not isinstance(req, int) or isinstance(req, bool)):
        raise ProtocolError(f"reply req is not an integer: {req!r}")
    if status not in STATUSES:
        raise ProtocolError(f"reply status {status!r} is not one of {sorted(STATUSES)}")
    return Reply(sid=sid, req=req, status=status, body=obj)


def grant_of(reply: Reply) -> GrantInfo:
    """The grant of a checkout's ``ok`` reply."""
    grant = reply.mapping("grant")
    gid, feature, version, count = (grant.get(k) for k in ("id", "feature", "version", "count"))
    if not isinstance(gid, int) or isinstance(gid, bool) or not 1 <= gid <= MAX_REQ:
        raise ProtocolError(f"checkout reply: grant id is not from 1 to {MAX_REQ}: {gid!r}")
    if not isinstance(feature, str) or not isinstance(version, str):
        raise ProtocolError(f"checkout reply: grant feature/version are not strings: {grant!r}")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise ProtocolError(
            f"checkout reply: grant count is not an integer from 1 to {MAX_COUNT}: {count!r}"
        )
    return GrantInfo(id=gid, feature=feature, version=version, count=count)


def failure_of(reply: Reply) -> LicenseError:
    """The error a final non-``ok`` reply means for the caller (all are definite)."""
    detail = reply.body.get("detail")
    text = detail if isinstance(detail, str) else f"{reply.status} without detail"
    if reply.status == Status.DENIED:
        reason = reply.body.get("reason")
        return LicenseDenied(reason if isinstance(reason, str) else "unknown", text)
    if reply.status == Status.UNAVAILABLE:
        return LicenseUnavailable(text)
    if reply.status == Status.ERROR:
        code = reply.body.get("code")
        if code == ErrorCode.LIMIT:
            return LicenseUnavailable(text, code=ErrorCode.LIMIT)
        return ProtocolError(
            f"node says {code}: {text}", code=code if isinstance(code, str) else None
        )
    return ProtocolError(f"unexpected {reply.status} reply: {text}")
