"""The license the triad serves, and whether this node can vouch for it (issue 12 item 6).

The triad serves one license whoever is primary: the entitlements in the ledger, which
change only by a ``reload`` delta, and a primary decides one only after a reread on it, on
a brand-new triad (a ledger without entitlements), or alone (a single server). The reload
carries the signed lines themselves (``License.signed``: each line's canonical form and
its ``SIGN=``), so that every node can check them with its *own* vendor key rather than
trust the primary's.

``judge`` is that check, a pure function of what the node read and what the ledger holds.
Its ``Verdict`` says whether the node may stand for election (``stands``) and, for the log
and ``zbroker status``, how its files differ from the triad's (``notes``):

- the ledger holds no entitlements yet: nothing to check;
- the ledger's lines are signed: every line must verify under this node's vendor key and
  the lines must make exactly the ledger's entitlements; otherwise the node cannot vouch
  for what it would serve, and never becomes primary (it still votes and replicates, so
  the triad keeps its majority). Lines equal to ones of its own file (which it verified
  when it read the file) are not verified again: only what differs costs a signature check;
- an older node's reload carried no lines: nothing to verify, and the node stands as
  nodes did before (a primary adds the lines once its file has exactly those
  entitlements, or at the next reread);
- whatever the case, a node whose own file (or options file) differs from what the
  triad serves says so: it serves the triad's, and a reread on the primary after copying
  the file to every node is how an administrator changes the license.

Pure: no clock, no sockets, no disk (the node reads the files and the key).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from zbroker.broker.license import LicenseSyntaxError, check_signature, parse_syntax
from zbroker.broker.model import Entitlement, parse_version
from zbroker.broker.options import Options
from zbroker.broker.seats import entitlement_to_map

__all__ = ["DIFFERS", "OwnLicense", "Verdict", "judge", "same_lines"]

DIFFERS = "license differs from the triad's"
_TRIADS = "<the triad's license>"  # the path named in a replicated line's syntax error
_SHOWN = 3  # differences named in a note; the rest are counted


@dataclass(frozen=True)
class OwnLicense:
    """What this node read: its license file's verified lines and its vendor key."""

    path: str
    entitlements: tuple[Entitlement, ...]
    signed: tuple[str, ...] = ()  # ``License.signed``: the lines as a reload carries them
    # None: no key to check replicated lines with (the simulation, unit tests): the node
    # vouches for any line, as before lines were replicated.
    key: Ed25519PublicKey | None = None
    # Its lines refused (``LicenseLineRefused`` as a person reads it: file:line, feature,
    # why), for ``zbroker status`` and ``zbroker reread``: not replicated, each node's own.
    refused: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    stands: bool = True  # the node may become primary
    notes: tuple[str, ...] = ()  # for the log and status, each a sentence naming the node

    @property
    def note(self) -> str | None:
        """The notes as one line (status shows it under the node), None when none."""
        return "; ".join(self.notes) if self.notes else None


def judge(
    node: str,
    own: OwnLicense,
    own_options: Options | None,
    served: Sequence[Entitlement],
    lines: Sequence[str] | None,
    served_options: Options | None,
) -> Verdict:
    """Whether ``node`` can vouch for the triad's license, and how its files differ."""
    if not served:
        return Verdict()  # a brand-new triad: its first primary's file becomes the triad's
    notes: list[str] = []
    stands = True
    if lines is not None and own.key is not None:
        why = _unverified(own, served, lines)
        if why is not None:
            stands = False
            notes.append(
                f"{DIFFERS}: node {node} cannot verify the triad's lines with its vendor key "
                f"({why}); it will not become primary while it cannot"
            )
    if stands and not same_lines(own.entitlements, served):
        notes.append(
            f"{DIFFERS}: node {node}'s file {own.path} differs "
            f"({_difference(own.entitlements, served)}); it serves the triad's (copy the "
            "file to every node, then reread on the primary)"
        )
    if own_options != served_options:
        mine = "none" if own_options is None else own_options.path
        notes.append(
            f"options differ from the triad's: node {node}'s options file ({mine}) is not the "
            "one the triad serves; it serves the triad's until a reread on the primary"
        )
    return Verdict(stands, tuple(notes))


def _unverified(own: OwnLicense, served: Sequence[Entitlement], lines: Sequence[str]) -> str | None:
    """Why the lines cannot be vouched for under ``own.key``; None when they can."""
    assert own.key is not None
    # Lines of its own file were verified under this very key when it was read: neither
    # parsed nor verified again (20,000 lines parsed on the loop after a reload stalled
    # it past peer_timeout); only what differs costs a parse and a signature check.
    known = dict(zip(own.signed, own.entitlements, strict=True))
    unknown = [text for text in lines if text not in known]
    try:
        parsed = parse_syntax("\n".join(unknown), path=_TRIADS, servers_required=False).lines
    except LicenseSyntaxError as exc:
        return f"a line does not parse: {exc}"
    if len(parsed) != len(unknown):
        return f"{len(unknown)} lines make {len(parsed)} FEATURE/INCREMENT lines"
    refused = []
    for line in parsed:
        why = check_signature(line, own.key)
        if why is not None:
            refused.append(f"{line.keyword} {line.name} {line.version}: {why}")
    if refused:
        more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
        return f"{refused[0]}{more}, of {len(lines)} lines"
    theirs = iter(parsed)
    made = [known[t] if t in known else next(theirs).entitlement(_TRIADS) for t in lines]
    if not same_lines(made, served):
        return "its signed lines do not make the entitlements it replicated"
    return None


def same_lines(a: Sequence[Entitlement], b: Sequence[Entitlement]) -> bool:
    """Whether two lists of lines replicate alike: compared as a reload carries them (the
    maps, without where each line was read), so that a field a reload does not carry
    can never make a node unable to vouch for the lines it would serve."""
    return len(a) == len(b) and all(
        _replicated(x) == _replicated(y) for x, y in zip(a, b, strict=True)
    )


def _replicated(line: Entitlement) -> dict[str, object]:
    m = entitlement_to_map(line)
    del m["source"]
    return m


def _difference(own: Sequence[Entitlement], served: Sequence[Entitlement]) -> str:
    """The seats per feature and version that differ, as a person reads them."""
    mine, theirs = _seats(own), _seats(served)
    found = []
    for key in sorted(set(mine) | set(theirs)):
        here, there = mine.get(key), theirs.get(key)
        if here != there:
            name = f"{key[0]} {key[1]}"
            if here is None:
                found.append(f"{name}: none here, {there} served")
            elif there is None:
                found.append(f"{name}: {here} here, none served")
            else:
                found.append(f"{name}: {here} seats here, {there} served")
    if not found:
        return "the same seats, other lines (dates, USERS=, HOSTS=, ...)"
    more = f", and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    return "; ".join(found[:_SHOWN]) + more


def _seats(lines: Sequence[Entitlement]) -> dict[tuple[str, str], int]:
    """Seats per (feature, version as first written), every line counted, expired or not."""
    first: dict[tuple[str, tuple[int, ...]], str] = {}
    out: dict[tuple[str, str], int] = {}
    for e in lines:
        shown = first.setdefault((e.feature, parse_version(e.version)), e.version)
        out[(e.feature, shown)] = out.get((e.feature, shown), 0) + e.count
    return out
