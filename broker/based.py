"""USER_BASED and HOST_BASED lines: seats for the users (hosts) the options file names.

A FEATURE/INCREMENT line flagged ``USER_BASED[=n]`` may be used only by users that the
options file's INCLUDE (and INCLUDEALL) lines name, and by at most ``n`` of them (the
line's count without ``=n``); ``HOST_BASED[=n]`` the same with hosts (FlexNet's License
Administration Guide, INCLUDE: "INCLUDE is required for USER_BASED or HOST_BASED
features ... the license limits the number of users that are INCLUDEd").

Who is named. For each pool (``zbroker.broker.seats``: the lines of one feature at one
version) with such lines, the INCLUDE lines whose scope covers the pool and the
INCLUDEALL lines are read in file order: ``USER u`` names u, ``GROUP g`` each member of
g in the order written (USER_BASED); ``HOST h`` names h, ``HOST_GROUP g`` each member
(HOST_BASED). The first ``n`` distinct names are kept, ``n`` being the sum over the
pool's USER_BASED (HOST_BASED) lines. Names past ``n``, an IP pattern (a host is counted
by its name), and INCLUDE lines of a type that names no user (host) are *ignored with a
warning* naming the options file's line, as FlexNet ignores INCLUDEs beyond the count:
a reread that refused the whole file for one name too many would also refuse every other
change it brings. Names are compared exactly (GROUPCASEINSENSITIVE does not apply).

The decision is a pure function of the replicated entitlements and options, so every
node derives the same lines: a USER_BASED line's ``users`` becomes the names kept (and,
with ``USERS=`` on the line too, only those of them it lists); a HOST_BASED line's
``hosts`` the same. The checkout then admits by ``users``/``hosts`` as for any line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from zbroker.broker.model import Entitlement, parse_version
from zbroker.broker.options import OptionLine, Options

__all__ = ["restrict"]

Version = tuple[int, ...]
_IP = re.compile(r"[0-9A-Fa-f:.*]*[0-9*][0-9A-Fa-f:.*]*")

# (the flag, the INCLUDE type that names one, the group type that names several)
_KINDS = (
    ("USER_BASED", "USER", "GROUP"),
    ("HOST_BASED", "HOST", "HOST_GROUP"),
)


def restrict(
    entitlements: Sequence[Entitlement], options: Options | None
) -> tuple[tuple[Entitlement, ...], list[str]]:
    """The lines as the checkout reads them, and the warnings of the INCLUDEs ignored.

    Lines that are neither USER_BASED nor HOST_BASED come back as they are (the same
    objects: a license without such lines costs one pass).
    """
    if not any(e.user_based is not None or e.host_based is not None for e in entitlements):
        return tuple(entitlements), []
    warnings: list[str] = []
    by_pool: dict[tuple[str, Version], list[Entitlement]] = {}
    for e in entitlements:
        by_pool.setdefault((e.feature, parse_version(e.version)), []).append(e)
    kept: dict[tuple[str, str, Version], frozenset[str]] = {}
    for flag, single, group in _KINDS:
        for (feature, version), lines in sorted(by_pool.items()):
            counts = [c for c in (_count(e, flag) for e in lines) if c is not None]
            if not counts:
                continue
            pool = f"{feature} {lines[0].version}"
            kept[(flag, feature, version)] = _named(
                options, feature, version, flag, single, group, sum(counts), pool, warnings
            )
    out = []
    for e in entitlements:
        key = (e.feature, parse_version(e.version))
        if e.user_based is not None:
            named = kept[("USER_BASED", *key)]
            e = replace(e, users=named if e.users is None else e.users & named)
        if e.host_based is not None:
            named = kept[("HOST_BASED", *key)]
            e = replace(e, hosts=named if e.hosts is None else e.hosts & named)
        out.append(e)
    return tuple(out), warnings


def _count(line: Entitlement, flag: str) -> int | None:
    return line.user_based if flag == "USER_BASED" else line.host_based


def _named(
    options: Options | None,
    feature: str,
    version: Version,
    flag: str,
    single: str,
    group: str,
    n: int,
    pool: str,
    warnings: list[str],
) -> frozenset[str]:
    """The first ``n`` names the INCLUDE lines covering the pool give, in file order."""
    if options is None:
        return frozenset()
    members = dict(options.groups if group == "GROUP" else options.host_groups)
    covering = [
        ln
        for ln in options.lines
        if (ln.keyword == "INCLUDE" and ln.feature == feature and _covers(ln, version))
        or ln.keyword == "INCLUDEALL"
    ]
    kept: dict[str, None] = {}  # an ordered set
    for ln in sorted(covering, key=lambda ln: ln.line):
        where = f"{options.path}:{ln.line}: {ln.keyword} {ln.kind} {ln.name}"
        if ln.kind == single:
            names: tuple[str, ...] = (ln.name or "",)
        elif ln.kind == group:
            names = members.get(ln.name or "", ())
        else:
            noun = "user" if flag == "USER_BASED" else "host"
            warnings.append(f"{where} names no {noun}: it admits no one to {flag} {pool}")
            continue
        if flag == "HOST_BASED":
            patterns = [h for h in names if _is_ip_pattern(h)]
            if patterns:
                warnings.append(
                    f"{where}: {', '.join(patterns)}: {flag} {pool} counts hosts by name, "
                    "not address: ignored"
                )
            names = tuple(h for h in names if not _is_ip_pattern(h))
        past = [x for x in names if x not in kept][max(0, n - len(kept)) :]
        for name in names:
            if len(kept) < n:
                kept.setdefault(name)
        if past:
            shown = ", ".join(past[:5]) + (", ..." if len(past) > 5 else "")
            warnings.append(f"{where}: {shown} beyond {flag}={n} of {pool}: ignored")
    return frozenset(kept)


def _covers(ln: OptionLine, version: Version) -> bool:
    return ln.version is None or parse_version(ln.version) == version


def _is_ip_pattern(name: str) -> bool:
    # As the policy tells an address pattern from a host name (``policy._ip_regex``).
    return _IP.fullmatch(name) is not None and ("." in name or ":" in name or name == "*")
