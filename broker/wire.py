"""The one codec: every msgpack call of the node goes through here.

Client requests are decoded and validated into ``broker.model.Request`` (docs/protocol.md
is the contract); anything that does not fit raises ``RemoteProtocolError`` carrying the
error reply to send, so a malformed message is an answer, never a crash. Peer messages
and stored records are plain maps packed and unpacked here too, with the same limits.

msgpack is used with ``raw=False`` (str stays str), no ext types, no pickle, and bounded
lengths, so hostile bytes cannot allocate without limit or build arbitrary objects.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from broker.model import ErrorCode, Reply, Request, parse_version, reply_error

PROTOCOL_VERSION = 1
MAX_TEXT = 256
MAX_SID = 64
MAX_COUNT = 1_000_000
MAX_REQ = 2**63 - 1
OPS = frozenset({"open", "close", "checkout", "checkin", "heartbeat", "status", "admin"})

# A request map has a dozen short fields; these bounds are far above any honest message
# and far below what would hurt, whatever MAXMSGSIZE lets through.
_REQUEST_LIMITS = {
    "max_str_len": 4096,
    "max_bin_len": 0,
    "max_array_len": 64,
    "max_map_len": 32,
    "max_ext_len": 0,
}


class RemoteProtocolError(Exception):
    """Bytes from outside that are not a valid message; ``reply`` is the error to answer."""

    def __init__(self, code: str, detail: str, sid: object = None, req: object = None) -> None:
        super().__init__(detail)
        self.reply: Reply = reply_error(code, detail)
        self.sid = sid if isinstance(sid, str) else None
        self.req = req if isinstance(req, int) and not isinstance(req, bool) else None


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes, **limits: int) -> Any:
    """Trusted-ish data (peer messages, our own files): no size caps beyond the socket's."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, **limits)


def encode_reply(reply: Reply, sid: str | None, req: int | None) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "sid": sid, "req": req, **reply})


def unpack_bounded(data: bytes) -> Any:
    """Bytes from outside (a client request, a node's reply): bounded sizes, no ext types."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, **_REQUEST_LIMITS)


def unpack_reply(data: bytes) -> Any:
    """A node's reply, for clients: no ext or bin types, sizes bounded by the frame itself.

    ``unpack_bounded``'s caps fit one request; a status reply lists every holder (100,000
    grants make a 7 MB reply), so replies keep msgpack's own bound instead: no container
    may claim more items than the frame has bytes.
    """
    return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)


def decode_request(data: bytes) -> Request:
    """Validate one client frame into a Request, or raise RemoteProtocolError."""
    try:
        obj = unpack_bounded(data)
    except Exception as exc:  # ExtraData, FormatError, ValueError, StackError, ...
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, f"not a msgpack message: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "a request must be a msgpack map")
    sid, req = obj.get("sid"), obj.get("req")
    if obj.get("v") != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {obj.get('v')!r} is not supported; this node speaks "
            f"{PROTOCOL_VERSION}",
            sid,
            req,
        )
    fields = _Fields(obj)
    op = fields.text("op", max_len=16)
    if op not in OPS:
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, f"unknown op {op!r}", sid, req)
    if op in ("status", "admin"):
        return Request(
            op=op,
            sid=fields.text("sid", max_len=MAX_SID, default=""),
            req=fields.integer("req", 0, MAX_REQ, default=0),
            action=fields.text("action", max_len=32, min_len=1) if op == "admin" else "",
        )
    common: dict[str, Any] = {
        "op": op,
        "sid": fields.text("sid", max_len=MAX_SID, min_len=1),
        "req": fields.integer("req", 1, MAX_REQ),
        "ack": fields.integer("ack", 0, MAX_REQ, default=0),
    }
    if op == "open":
        for name in ("user", "host", "display", "client_version"):
            common[name] = fields.text(name, max_len=MAX_TEXT, default="")
    elif op == "checkout":
        common["feature"] = fields.text("feature", max_len=MAX_TEXT, min_len=1)
        common["count"] = fields.integer("count", 1, MAX_COUNT, default=1)
        version = fields.optional_text("version", max_len=32)
        if version is not None:
            try:
                parse_version(version)
            except ValueError as exc:
                raise RemoteProtocolError(ErrorCode.BAD_REQUEST, str(exc), sid, req) from None
        common["version"] = version
        common["wait"] = fields.optional_seconds("wait")
    elif op == "checkin":
        common["grant"] = fields.integer("grant", 1, MAX_REQ)
    return Request(**common)


class _Fields:
    """Typed access to a decoded map; every miss raises RemoteProtocolError naming the field."""

    def __init__(self, obj: dict[Any, Any]) -> None:
        self.obj = obj
        self.sid = obj.get("sid")
        self.req = obj.get("req")

    def _fail(self, name: str, expected: str) -> RemoteProtocolError:
        found = self.obj.get(name, "nothing")
        shown = repr(found)[:40]
        return RemoteProtocolError(
            ErrorCode.BAD_REQUEST,
            f"field {name!r}: expected {expected}, found {shown}",
            self.sid,
            self.req,
        )

    def text(self, name: str, *, max_len: int, min_len: int = 0, default: str | None = None) -> str:
        value = self.obj.get(name, default)
        if not isinstance(value, str) or not min_len <= len(value) <= max_len:
            raise self._fail(name, f"a string of {min_len} to {max_len} characters")
        return value

    def optional_text(self, name: str, *, max_len: int) -> str | None:
        if self.obj.get(name) is None:
            return None
        return self.text(name, max_len=max_len, min_len=1)

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        value = self.obj.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._fail(name, f"a whole number from {low} to {high}")
        return value

    def optional_seconds(self, name: str) -> float | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(name, "seconds as a number, or nil")
        seconds = float(value)
        if not math.isfinite(seconds) or not 0 <= seconds <= 86_400:
            raise self._fail(name, "seconds from 0 to 86400")
        return seconds
