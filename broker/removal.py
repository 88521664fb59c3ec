"""``zbroker remove`` (FlexNet's ``lmremove``): the primary takes grants from their sessions.

An administrator names what to take: every grant of a user, of a user on a host, of
a user on a host and display, or one grant by id; a feature narrows any of these.
The primary decides one ``take`` delta (reason ``removed``) per grant that matches and
answers once they commit; the seats are free from then on, on every node, and the
session's next heartbeat tells its library which grant was taken and why.

A grant younger than ``min_remove`` seconds (a node setting, 120 by default, as RLM)
is left alone, and the answer lists it with its age: a user who has only just got a
seat must not lose it to an administrator's slip (RLM's reasoning; FlexNet has no
such floor). A lingering seat may be taken like any grant; a borrowed one may not (as in
FlexNet's lmremove): its holder uses it offline on a signed token, which nothing here can
reach, so only a return from the borrowing machine or its end frees the seat. The answer
lists each borrowed grant that matched, with its end, so that the administrator learns
why it stays and how it goes.

Pure: reads the ledger, returns deltas and the answer; no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from zbroker.broker.ledger import Delta, Ledger
from zbroker.broker.model import ErrorCode, Now, Reply, Request, reply_error, reply_ok


@dataclass(frozen=True, slots=True)
class Removal:
    """Which grants to take: all the given names must match (empty: any)."""

    user: str = ""
    host: str = ""
    display: str = ""
    feature: str = ""
    grant: int = 0  # one grant by id (0: by names)

    @classmethod
    def of(cls, request: Request) -> Removal:
        return cls(request.user, request.host, request.display, request.feature, request.grant)

    def problem(self) -> str | None:
        """Why this is no removal an administrator can mean, or None."""
        if self.grant:
            if self.user or self.host or self.display:
                return "remove names one grant id, or a user (and host, display): not both"
            return None
        if not self.user:
            return "remove needs a grant id or a user (with a host and a display if wanted)"
        if self.display and not self.host:
            return "remove by display needs the host too, as FlexNet's lmremove"
        return None

    def describe(self) -> str:
        if self.grant:
            return f"grant {self.grant}" + (f" of feature {self.feature!r}" if self.feature else "")
        names = [f"user {self.user!r}"]
        names += [f"host {self.host!r}"] if self.host else []
        names += [f"display {self.display!r}"] if self.display else []
        names += [f"feature {self.feature!r}"] if self.feature else []
        return " ".join(names)

    def removed(self, taken: int) -> str:
        """The answer's opening: what was taken of what this names."""
        if self.grant:
            return f"{self.describe()} {'removed' if taken else 'not removed'}"
        return f"{taken} grant(s) of {self.describe()} removed"

    def nothing_out(self) -> str:
        """The answer when no grant matches at all."""
        if self.grant:
            return f"{self.describe()} is not out"
        return f"no grant of {self.describe()} is out"


# How a borrowed seat goes, since remove cannot take it (docs/admin.md, "Borrowing").
BORROWED_GOES = (
    "a borrowed seat is freed by `zbroker borrow FEATURE --return` on the machine that "
    "borrowed it, or at its end"
)


def decide_removal(
    ledger: Ledger, removal: Removal, now: Now, min_remove: float
) -> tuple[list[Delta], Reply]:
    """The ``take`` deltas of ``removal`` (ascending grant id) and the answer to give once
    they commit (at once when there are none).

    The answer: ``taken`` (grant ids), ``young`` (``{grant, age}`` of matching grants
    younger than ``min_remove``), ``borrowed`` (``{grant, feature, until}`` of matching
    borrowed grants, left with their end), ``min_remove``; an ``error`` ``bad_request``
    when the removal names nothing.
    """
    problem = removal.problem()
    if problem is not None:
        return [], reply_error(ErrorCode.BAD_REQUEST, problem)
    if removal.grant:
        one = ledger.grant(removal.grant)
        grants = [] if one is None else [one]
    else:
        grants = sorted(ledger.grants(), key=lambda g: g.id)  # an admin's rare request
    deltas: list[Delta] = []
    taken: list[int] = []
    young: list[dict[str, object]] = []
    borrowed: list[dict[str, object]] = []
    for g in grants:
        session = ledger.session(g.sid)
        if session is None or (removal.feature and g.feature != removal.feature):
            continue
        if not removal.grant and not (
            session.user == removal.user
            and (not removal.host or session.host == removal.host)
            and (not removal.display or session.display == removal.display)
        ):
            continue
        if session.hold == "borrow":  # used offline on a signed token this cannot reach
            borrowed.append({"grant": g.id, "feature": g.feature, "until": session.until})
            continue
        age = now.wall - g.at
        if age < min_remove:
            young.append({"grant": g.id, "age": round(age, 3)})
            continue
        deltas.append({"k": "take", "grant": g.id, "reason": "removed", "at": now.wall})
        taken.append(g.id)
    detail = removal.removed(len(taken))
    if young:
        detail += f"; {len(young)} younger than min_remove ({min_remove:g} s) left alone"
    if borrowed:
        detail += f"; {len(borrowed)} borrowed left alone: {BORROWED_GOES}"
    if not (taken or young or borrowed):
        detail = removal.nothing_out()
    return deltas, reply_ok(
        taken=taken, young=young, borrowed=borrowed, min_remove=min_remove, detail=detail
    )
