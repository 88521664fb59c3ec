"""The one codec: every msgpack call of the node goes through here.

Client requests are decoded and validated into ``zbroker.broker.model.Request`` (docs/protocol.md
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

from zbroker.broker.model import ErrorCode, Reply, Request, reply_error
from zbroker.clients.protocol import (  # the protocol's words: declared once, for node and library
    HOLDERS_PAGE,
    HOLDERS_PAGE_BYTES,
    MAX_ACTION,
    MAX_COUNT,
    MAX_DUP,
    MAX_FLOAT_WHOLE,
    MAX_LEASE,
    MAX_OP,
    MAX_REQ,
    MAX_SID,
    MAX_TEXT,
    MAX_VERSION,
    MAX_VERSION_PART,
    MAX_WAIT,
    OPS,
    PROTOCOL_VERSION,
    check_feature,
    check_version,
    parse_dup_mask,
)

__all__ = [  # the bounds other node modules and tools import from the node's codec
    "HOLDERS_PAGE",
    "HOLDERS_PAGE_BYTES",
    "MAX_COUNT",
    "MAX_LEASE",
    "MAX_REQ",
    "MAX_TEXT",
    "MAX_VERSION",
    "MAX_VERSION_PART",
    "MAX_WAIT",
    "PROTOCOL_VERSION",
    "RemoteProtocolError",
    "check_feature",
    "check_version",
    "decode_request",
    "encode_reply",
    "encode_status_reply",
    "pack",
    "pack_array_raw",
    "pack_map_raw",
    "refuse_frames",
    "unpack",
    "unpack_bounded",
    "whole_number",
]

# A message of several frames is answered in the envelope it came in (a REQ socket's
# empty delimiter, and any proxies' routing ids before it) when that is at most this many
# frames of at most ROUTING_ID bytes (ZeroMQ's longest routing id) each: REQ envelopes
# are one frame per hop, and a reply to a connection that never reads stays small.
MAX_ENVELOPE = 8
ROUTING_ID = 255
# A request map has a dozen short fields; these bounds are far above any honest message
# and far below what would hurt, whatever MAXMSGSIZE lets through.
_MAX_STR, _MAX_ARRAY, _MAX_MAP = 4096, 64, 32
_REQUEST_LIMITS = {
    "max_str_len": _MAX_STR,
    "max_bin_len": 0,
    "max_array_len": _MAX_ARRAY,
    "max_map_len": _MAX_MAP,
    "max_ext_len": 0,
}


def whole_number(value: object) -> int | None:
    """``value`` as an int if it is one, else None.

    An int (not a bool), or a float that is a whole number of at most ``MAX_FLOAT_WHOLE``
    in size: JavaScript has one number type, and its encoders send a float for a number
    they do not see as a safe integer (some for every number), so ``3.0`` means 3.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_FLOAT_WHOLE:
        return int(value)
    return None


class RemoteProtocolError(Exception):
    """Bytes from outside that are not a valid message; ``reply`` is the error to answer."""

    def __init__(self, code: str, detail: str, sid: object = None, req: object = None) -> None:
        super().__init__(detail)
        self.reply: Reply = reply_error(code, detail)
        self.sid = sid if isinstance(sid, str) else None
        self.req = whole_number(req)


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes, **limits: int) -> Any:
    """Trusted-ish data (peer messages, our own files): no size caps beyond the socket's."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, **limits)


def encode_reply(reply: Reply, sid: str | None, req: int | None) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "sid": sid, "req": req, **reply})


# Status replies are packed from pieces packed once: a loop cycle may answer hundreds of
# status requests with one report, and a page of holders is measured while it is built.
_STATUS_HEAD = (
    msgpack.Packer().pack_map_header(5) + pack("v") + pack(PROTOCOL_VERSION) + pack("sid")
)
_STATUS_MID = pack("req")
_STATUS_TAIL = pack("status") + pack("ok") + pack("report")


def encode_status_reply(report: bytes, sid: str | None, req: int | None) -> bytes:
    """``encode_reply(reply_ok(report=...), sid, req)`` for a ``report`` already packed."""
    return b"".join((_STATUS_HEAD, pack(sid), _STATUS_MID, pack(req), _STATUS_TAIL, report))


def pack_map_raw(fields: dict[str, Any], packed: dict[str, bytes]) -> bytes:
    """A map of ``fields`` and of ``packed``, whose values are packed already."""
    parts = [msgpack.Packer().pack_map_header(len(fields) + len(packed))]
    for key, value in fields.items():
        parts += (pack(key), pack(value))
    for key, data in packed.items():
        parts += (pack(key), data)
    return b"".join(parts)


def pack_array_raw(items: list[bytes]) -> bytes:
    """An array of items packed already (``pack``)."""
    return msgpack.Packer().pack_array_header(len(items)) + b"".join(items)


def unpack_bounded(data: bytes) -> Any:
    """Bytes from outside (a client request, a node's reply): bounded sizes, no ext types."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, **_REQUEST_LIMITS)


def _ids_of(data: bytes) -> tuple[object, object]:
    """The ``sid`` and ``req`` of a frame ``unpack_bounded`` refused, as far as they can be
    read, so that the error reaches a client that matches replies by them (a map of too
    many fields, a field too long, trailing bytes). Every other value is skipped unbuilt,
    and what is built is bounded by the frame, which MAXMSGSIZE bounds."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    found: dict[str, object] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in ("sid", "req") and key not in found:
                found[key] = unpacker.unpack()
            else:
                unpacker.skip()
    except Exception:  # not a map, or broken further on: what was read is all there is
        pass
    return found.get("sid"), found.get("req")


def decode_request(data: bytes) -> Request:
    """Validate one client frame into a Request, or raise RemoteProtocolError."""
    try:
        obj = unpack_bounded(data)
    except Exception as exc:  # ExtraData, FormatError, ValueError, StackError, ...
        raise RemoteProtocolError(
            ErrorCode.BAD_REQUEST,
            f"not one msgpack map within the request bounds (maps of {_MAX_MAP} fields, "
            f"strings of {_MAX_STR} characters, arrays of {_MAX_ARRAY} items, no bin or "
            f"ext): {exc}",
            *_ids_of(data),
        ) from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "a request must be a msgpack map")
    sid, req = obj.get("sid"), obj.get("req")
    if whole_number(obj.get("v")) != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {obj.get('v')!r} is not supported; this node speaks "
            f"{PROTOCOL_VERSION}",
            sid,
            req,
        )
    fields = _Fields(obj)
    op = fields.text("op", max_len=MAX_OP, min_len=1)
    if op not in OPS:
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, f"unknown op {op!r}", sid, req)
    if op == "status":
        return Request(
            op=op,
            sid=fields.text("sid", max_len=MAX_SID, default=""),
            req=fields.integer("req", 0, MAX_REQ, default=0),
            holders=fields.boolean("holders", default=False),
            feature=fields.optional_text("feature", max_len=MAX_TEXT) or "",
            after=fields.integer("after", 0, MAX_REQ, default=0),
            limit=fields.integer("limit", 1, HOLDERS_PAGE, default=HOLDERS_PAGE),
        )
    if op == "admin":
        action = fields.text("action", max_len=MAX_ACTION, min_len=1)
        if action == "remove":  # decided by the primary: a sid keys its answer (removal.py)
            return Request(
                op=op,
                sid=fields.text("sid", max_len=MAX_SID, min_len=1),
                req=fields.integer("req", 0, MAX_REQ, default=0),
                action=action,
                user=fields.text("user", max_len=MAX_TEXT, default=""),
                host=fields.text("host", max_len=MAX_TEXT, default=""),
                display=fields.text("display", max_len=MAX_TEXT, default=""),
                feature=fields.text("feature", max_len=MAX_TEXT, default=""),
                grant=fields.integer("grant", 0, MAX_REQ, default=0),
            )
        return Request(
            op=op,
            sid=fields.text("sid", max_len=MAX_SID, default=""),
            req=fields.integer("req", 0, MAX_REQ, default=0),
            action=action,
        )
    common: dict[str, Any] = {
        "op": op,
        "sid": fields.text("sid", max_len=MAX_SID, min_len=1),
        "req": fields.integer("req", 1, MAX_REQ),
        "ack": fields.integer("ack", 0, MAX_REQ, default=0),
    }
    if op == "open":
        for name in ("user", "host", "display", "client_version", "project"):
            common[name] = fields.text(name, max_len=MAX_TEXT, default="")
    elif op == "checkout":
        common["feature"] = fields.text("feature", max_len=MAX_TEXT, min_len=1)
        common["count"] = fields.integer("count", 1, MAX_COUNT, default=1)
        common["version"] = _min_version(fields, sid, req)
        common["wait"] = fields.optional_seconds("wait")
        if "dup" in fields.obj or "vendor_string" in fields.obj:  # DUP_GROUP (broker/dup.py)
            common["dup"] = fields.dup_mask("dup")
            common["vendor_string"] = fields.text("vendor_string", max_len=MAX_TEXT, default="")
    elif op == "checkin":
        common["grant"] = fields.integer("grant", 1, MAX_REQ)
    elif op == "idle":  # docs/protocol.md, "idle": TIMEOUT counts from when it went idle
        common["idle"] = fields.boolean("idle", default=True)
    elif op in ("borrow", "return"):  # docs/protocol.md, "Borrowing"
        common["feature"] = fields.text("feature", max_len=MAX_TEXT, min_len=1)
        if op == "borrow":
            common["count"] = fields.integer("count", 1, MAX_COUNT, default=1)
            common["version"] = _min_version(fields, sid, req)
            common["until"] = fields.optional_number("until", 0.0, MAX_WALL)
            common["hours"] = fields.optional_number("hours", 0.0, MAX_BORROW_HOURS)
    return Request(**common)


def _min_version(fields: _Fields, sid: object, req: object) -> str | None:
    """A checkout's or borrow's optional minimum version, checked as the ledger parses it."""
    version = fields.optional_text("version", max_len=MAX_VERSION)
    if version is not None:
        try:
            check_version(version)
        except ValueError as exc:
            raise RemoteProtocolError(ErrorCode.BAD_REQUEST, str(exc), sid, req) from None
    return version


# The latest wall time a borrow may ask for (31-dec-9999, a license date's range) and
# the longest one in hours (ten years): beyond them, no line allows it anyway.
MAX_WALL = 253_402_300_799.0
MAX_BORROW_HOURS = 87_600.0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def refuse_frames(frames: list[bytes]) -> list[bytes]:
    """The answer to a client message of more than one frame (``frames`` as the ROUTER
    read them, identity first): ``error`` ``bad_request``, with the ``sid`` and ``req`` of
    its last frame when they can be read.

    It goes back in the envelope the message came in when it has one (routing ids, then
    an empty delimiter, then the body: what a REQ socket sends, through any proxies), as
    a REQ socket drops a reply without its delimiter and would wait forever; otherwise as
    the protocol's one frame.
    """
    head, body = frames[:-1], frames[-1]
    routed = all(len(frame) <= ROUTING_ID for frame in head)
    envelope = head if 2 <= len(head) <= MAX_ENVELOPE and head[-1] == b"" and routed else head[:1]
    error = RemoteProtocolError(
        ErrorCode.BAD_REQUEST,
        f"a request is one frame holding a msgpack map; this message has {len(frames) - 1}"
        " (a REQ socket's empty delimiter?): send the map alone from a DEALER socket",
        *_ids_of(body),
    )
    return [*envelope, encode_reply(error.reply, error.sid, error.req)]


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

    def boolean(self, name: str, *, default: bool) -> bool:
        value = self.obj.get(name, default)
        if not isinstance(value, bool):
            raise self._fail(name, "true or false")
        return value

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int:
        found = self.obj.get(name, default)
        value = found if type(found) is int else whole_number(found)  # the common case first
        if value is None or not low <= value <= high:
            floats = " (a float only if whole and at most 2^53)" if isinstance(found, float) else ""
            raise self._fail(name, f"a whole number from {low} to {high}{floats}")
        return value

    def optional_number(self, name: str, low: float, high: float) -> float | None:
        """A finite number from ``low`` (excluded) to ``high``, or nil."""
        value = self.obj.get(name)
        if value is None:
            return None
        number = float(value) if _is_number(value) else math.nan
        if not math.isfinite(number) or not low < number <= high:
            raise self._fail(name, f"a number above {low:g} up to {high:g}, or nil")
        return number

    def dup_mask(self, name: str) -> str | None:
        """A DUP_GROUP mask (NONE, SITE, letters of UHDV), normalised, or nil."""
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, str) and len(value) <= MAX_DUP:
            try:
                return parse_dup_mask(value)
            except ValueError:
                pass
        raise self._fail(name, "NONE, SITE or letters of UHDV such as UHD, or nil")

    def optional_seconds(self, name: str) -> float | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(name, "seconds as a number, or nil")
        seconds = float(value)
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_WAIT:
            raise self._fail(name, f"seconds from 0 to {MAX_WAIT:.0f}")
        return seconds
