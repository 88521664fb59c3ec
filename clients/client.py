"""``LicenseClient``: the public face of the library, safe to share between threads.

It resolves the servers (an endpoint list, a license path, or ``ZBROKER_LICENSE``) and
turns each call into jobs for the process's I/O thread (engine.py, shared by every
client of the process and joined by the first call), waiting on a future with a
deadline. It also walks the license path: entries are independent servers or triads
tried in order, and a checkout denied or unavailable on one is tried on the next, as
FlexLM clients do. Sessions are opened lazily, per entry, by the first call that needs
one.

A guest in its host process: a client has no thread, socket or descriptor of its own
(docs/protocol.md, "What a client costs"); a call that would need a descriptor the
process has not got fails with ``LicenseUnavailable`` naming the cause; a client used in
a forked child of the process that made it raises ``ClientForked`` at once. The engine
holds a client weakly (its links refer to it through a weak reference): a client the
application drops unclosed is closed as it is collected (``_close_collected``): once the
application holds neither the client nor any of its grants (a ``Grant`` refers to its
client; the links keep only ``GrantRecord``s, which do not).

Timing. ``timeout`` bounds the time spent waiting for answers. With several entries,
each gets an equal share of what is left of it; a checkout with ``wait`` may also
queue up to ``wait`` seconds on each entry it tries.

Loss reporting. Grants that stop being safe (the lease lapsed; the triad expired the
session and the grant could not be checked out again) are reported once: to the
``on_lost`` callback, called on a thread of its own (one for every client of the
process, not the I/O thread) so it may call back into the client, or, without a
callback, by a ``LeaseLost`` raised from the next ``checkout`` or ``status`` (before
that call does anything). A grant can be reported twice: when the lease lapses
(``grant.state`` UNSAFE: it may come back, and does if the triad still knows the
session) and again if it could not be checked out again (LOST).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import logging
import math
import os
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from zbroker.clients import engine as shared
from zbroker.clients.borrow import CLOCK_SLACK, Refused, Token, TokenError, refusal, when
from zbroker.clients.curve import ClientCurve, SecurityError, load_keypair, process_keypair
from zbroker.clients.engine import Engine
from zbroker.clients.errors import (
    ClientClosed,
    ClientForked,
    LeaseLost,
    LicenseDenied,
    LicenseError,
    LicensePathError,
    LicenseUnavailable,
    OutcomeUnknown,
    ProtocolError,
)
from zbroker.clients.grant import Grant, GrantState
from zbroker.clients.licpath import (
    borrow_keys,
    raise_if_out_of_descriptors,
    resolve,
    server_keys,
)
from zbroker.clients.link import Link
from zbroker.clients.protocol import (
    MAX_COUNT,
    MAX_TEXT,
    Reason,
    check_feature,
    parse_dup_mask,
    parse_version,
)
from zbroker.clients.tokens import StoreError, TokenNotKept, TokenStore

log = logging.getLogger(__name__)  # under "zbroker.clients", which has the NullHandler

CLIENT_VERSION = "zbroker-python/0.1.0"
CLIENT_KEY_ENV = "ZBROKER_CLIENT_KEY"  # the client's secret certificate (allow-listed triads)
PROJECT_ENV = "ZBROKER_PROJECT"  # the project sessions open under, as FlexNet's LM_PROJECT
TRY_TIMEOUT = 0.3  # per try: a live primary answers in milliseconds, a failover takes ~0.5 s
GRACE = 2.0  # beyond a deadline, how long to wait for the I/O thread before calling it dead
CLOSE_TIMEOUT = 2.0  # close() returns within this (or the client's timeout, if shorter)
# Denials closest to success first: the one reported when every entry refused.
_REASON_RANK = [
    Reason.NO_SEATS,
    Reason.NOT_ALLOWED,
    Reason.EXPIRED,
    Reason.VERSION_TOO_HIGH,
    Reason.NO_SUCH_FEATURE,
]

OnLost = Callable[[list[Grant]], None]


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no LOGNAME/USER: e.g. some containers
        return "unknown"


class LicenseClient:
    """A client of one license path: several independent servers or triads, tried in order.

    ``servers``: endpoints of one triad (``["tcp://127.0.0.1:27001", ...]``), or a license
    path (``"27001@h1,27001@h2,27001@h3:/opt/acme/license.lic"``, entries separated by
    ``:`` or ``;``; a path object names one file or directory); default from the
    ``ZBROKER_LICENSE`` environment variable, else ``LM_LICENSE_FILE``. ``timeout`` is
    the default deadline of every call, in seconds. ``on_lost(grants)`` is called when
    held grants stop being safe to use; see the module docstring.

    Security: a server whose key is known (``KEY=`` on its SERVER line in a license file
    of the path or of ``ZBROKER_SERVER_KEYS``, or ``server_keys={endpoint: z85}``) is
    dialled with CURVE, others in plain TCP; ``secure=True`` refuses plain servers,
    ``secure=False`` never uses CURVE. The client's own key pair is the secret
    certificate ``client_key`` (default ``ZBROKER_CLIENT_KEY``; needed when the triad
    keeps a client allow-list), or else one made for this process.

    ``project``: what the triad's options file (``PROJECT``) and report log know this
    client's sessions by; default from ``ZBROKER_PROJECT``, none when that is unset.

    Raises LicensePathError (the servers, a license or key file cannot be used), or
    LicenseUnavailable when the process has no descriptor left to read those files.
    Every call on a client made by another process (this one is its fork) raises
    ClientForked.
    """

    def __init__(
        self,
        servers: str | os.PathLike[str] | Sequence[str] | None = None,
        *,
        user: str | None = None,
        host: str | None = None,
        display: str | None = None,
        project: str | None = None,
        timeout: float = 10.0,
        on_lost: OnLost | None = None,
        server_keys: Mapping[str, str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        secure: bool | None = None,
        borrow_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        self._entries = resolve(servers)
        self._servers = servers  # its license files name the borrow keys (read when needed)
        self._tokens = TokenStore(borrow_dir)
        curve = None if secure is False else _curve(servers, self._entries, server_keys, client_key)
        if secure and (curve is None or any(e not in curve.servers for e in _flat(self._entries))):
            plain = [e for e in _flat(self._entries) if curve is None or e not in curve.servers]
            raise LicensePathError(f"secure=True, but no server key is known for {plain}")
        self._timeout = float(timeout)
        self._on_lost = on_lost
        self._curve = curve
        self._pid = os.getpid()  # the process whose engine it joins: see ClientForked
        self._lock = threading.Lock()  # guards _closed, _unreported and joining the engine
        self._closed = False
        self._unreported: list[Grant] = []
        hello = {
            "user": user if user is not None else _default_user(),
            "host": host if host is not None else socket.gethostname(),
            "display": display if display is not None else os.environ.get("DISPLAY", ""),
            "client_version": CLIENT_VERSION,
            "project": project if project is not None else os.environ.get(PROJECT_ENV, ""),
        }
        self._hello = {k: v[:MAX_TEXT] for k, v in hello.items()}
        # Joined by the first call, so that a client that is never used costs nothing.
        self._engine: Engine | None = None
        self._links: list[Link] = []
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def entries(self) -> list[tuple[str, ...]]:
        """The license path as endpoints: one tuple per server or triad, in order."""
        return list(self._entries)

    # --- the calls
    def checkout(
        self,
        feature: str,
        count: int = 1,
        version: str | None = None,
        wait: float | None = None,
        timeout: float | None = None,
        *,
        dup: str | None = None,
        vendor_string: str | None = None,
    ) -> Grant:
        """Check out ``count`` seats of ``feature`` at ``version`` or newer.

        ``wait``: queue up to that many seconds for seats to free up (per entry).
        ``dup``: share one seat with checkouts that match under this DUP_GROUP mask
        (``"UHD"``, ``"SITE"``, ...; docs/client.md) when the license line sets none;
        ``vendor_string``: what the mask's ``V`` compares.
        A borrowed seat serves first: with a valid borrow token of the feature that covers
        ``count`` and ``version``, the grant comes from it at once and no server is asked
        (``grant.borrowed_until``; docs/client.md, "Borrowing").
        Raises LicenseDenied, LicenseUnavailable, OutcomeUnknown, LeaseLost, ClientClosed.
        """
        return self._checkout(feature, count, version, wait, timeout, dup, vendor_string, None)

    async def checkout_async(
        self,
        feature: str,
        count: int = 1,
        version: str | None = None,
        wait: float | None = None,
        timeout: float | None = None,
        *,
        dup: str | None = None,
        vendor_string: str | None = None,
    ) -> Grant:
        """``checkout`` for asyncio: runs in the loop's default executor, and a
        cancellation (``task.cancel()``, ``asyncio.wait_for``'s or ``asyncio.timeout``'s
        end) abandons the request as an interrupted call does: whatever it gets, now or
        later, is checked back in (docs/client.md). Raises what ``checkout`` raises."""
        cancel: Future[Any] = Future()  # set: nobody waits for the checkout any more
        handoff = threading.Lock()  # the grant goes to the coroutine or back, never both
        got: list[Grant] = []

        def call() -> Grant:
            grant = self._checkout(feature, count, version, wait, timeout, dup, vendor_string,
                                   cancel)  # fmt: skip
            with handoff:
                got.append(grant)
                if cancel.done():  # cancelled as it came: nobody will take it
                    self._give_back(grant)
            return grant

        running = asyncio.get_running_loop().run_in_executor(None, call)
        try:
            return await running
        except asyncio.CancelledError:
            with handoff:
                cancel.set_result(None)  # the waiting thread abandons the request
                for grant in got:  # it had come, but the coroutine never took it
                    self._give_back(grant)
            raise

    def _checkout(
        self,
        feature: str,
        count: int,
        version: str | None,
        wait: float | None,
        timeout: float | None,
        dup: str | None,
        vendor_string: str | None,
        cancel: Future[Any] | None,
    ) -> Grant:
        """``checkout``; ``cancel``, once done, abandons the call (``_call``)."""
        check_feature(feature)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be an int from 1 to {MAX_COUNT}, not {count!r}")
        if version is not None and not isinstance(version, str):
            raise ValueError(f"version must be a string such as '2.0' or None, not {version!r}")
        if wait is not None and not wait >= 0:
            raise ValueError(f"wait must be >= 0 seconds or None, not {wait!r}")
        grouping = _grouping(dup, vendor_string)
        self._check_usable()
        # A borrowed seat serves first, as in FlexNet: the triad already counts it for the
        # borrow (asking again would take a second seat) and offline no server answers.
        borrowed = self._from_token(feature, count, version)
        if borrowed is not None:
            return borrowed
        queue_time = float(wait) if wait is not None else 0.0

        def start(link: Link, fut: Future[Any], now: float, deadline: float) -> None:
            link.checkout(
                fut, now, feature=feature, count=count, version=version, wait=wait,
                deadline=deadline, grouping=grouping,
            )  # fmt: skip

        grant: Grant = self._over_path(
            timeout,
            queue_time,
            start,
            (LicenseDenied, LicenseUnavailable, OutcomeUnknown),
            cancel,
        )
        return grant

    def set_idle(self, idle: bool = True, timeout: float | None = None) -> None:
        """Tell the triads the application is idle (``True``) or busy again (``False``),
        as FlexNet's ``lc_idle``: under a TIMEOUT line (docs/admin.md) a session idle
        longer than the line allows loses its grants of that feature (reported through
        ``on_lost``/``LeaseLost`` with reason ``timeout``). Heartbeats never count as
        activity; only this call does. Every session of the client is marked; one opened
        later (another entry of the path, or after the triad expired the old one) is
        marked as it opens.

        Raises LicenseUnavailable or OutcomeUnknown when a triad could not be told (the
        mark is kept for its next session: call again to retry), ClientClosed.
        """
        if not isinstance(idle, bool):
            raise ValueError(f"idle must be True or False, not {idle!r}")
        self._check_open()
        engine, links = self._joined()
        deadline = time.monotonic() + self._budget(timeout)
        marked: list[Future[Any]] = [Future() for _ in links]

        def job(now: float) -> None:
            for link, fut in zip(links, marked, strict=True):
                link.set_idle(fut, now, idle, deadline)

        def failed(posted: Future[Any]) -> None:  # not run: the client closed meanwhile
            for fut in marked:
                if not fut.done():
                    fut.set_exception(cast(BaseException, posted.exception()))

        posted: Future[Any] = Future()
        posted.add_done_callback(failed)
        engine.post(job, posted, links)
        wait_futures(marked, timeout=max(0.0, deadline - time.monotonic()) + GRACE)
        for fut in marked:
            if not fut.done():
                raise OutcomeUnknown("the client's I/O thread did not answer in time")
            error = fut.exception()
            if error is not None:
                raise error

    def borrow(
        self,
        feature: str,
        *,
        until: float | None = None,
        hours: float | None = None,
        version: str | None = None,
        count: int = 1,
        timeout: float | None = None,
    ) -> Token:
        """Borrow ``count`` seats of ``feature`` to use offline until ``until`` (wall
        seconds) or for ``hours`` from the server's now (neither: the longest allowed).

        The triad counts the seats until the end whatever happens to this process; the
        signed token it returns is kept in the token store, and ``checkout`` uses it
        while no server of the path answers. Raises LicenseDenied (``not_borrowable``,
        ``borrow_end``, ``already_borrowed``, ``lowwater``, or a checkout's reasons),
        LicenseUnavailable, OutcomeUnknown, ProtocolError (a malformed token), StoreError
        (the token store cannot be written: checked before the triad is asked), and
        TokenNotKept (saving failed after the triad lent the seats: given back if it can).
        """
        if until is not None and hours is not None:
            raise ValueError("give until or hours, not both")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            raise ValueError(f"count must be an int from 1 to {MAX_COUNT}, not {count!r}")
        for name, value in (("until", until), ("hours", hours)):
            if value is not None and (isinstance(value, bool) or not 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number above 0 or None, not {value!r}")
        fields = {"feature": feature, "count": count, "version": version, "until": until,
                  "hours": hours}  # fmt: skip
        check_feature(feature)
        # Before the triad lends anything: a seat lent whose token cannot be kept is
        # counted until its end and serves nobody offline.
        self._tokens.check()
        body = self._ask_path("borrow", fields, timeout, (LicenseDenied, LicenseUnavailable))
        try:
            token = Token.from_map(body.get("token"))
        except TokenError as exc:
            raise ProtocolError(f"the triad's borrow reply holds no usable token: {exc}") from None
        try:
            self._tokens.save(token)
        except StoreError as exc:  # the store broke since the check (a full disk, ...)
            # The seats are lent and no token holds them: give them back if the line allows.
            try:
                self.return_borrow(feature, timeout)
            except LicenseError as failed:
                lent = f"the seats stay lent, with no token, until {when(token.end)}"
                if isinstance(failed, LicenseDenied) and failed.reason == "no_early_return":
                    after = f"its line forbids returning them early (NO_EARLY_RETURN): {lent}"
                else:
                    after = (
                        f"giving them back failed ({failed}): {lent} unless returned "
                        f"(return_borrow, zbroker borrow {feature} --return)"
                    )
                raise TokenNotKept(exc, token, False, after) from None
            raise TokenNotKept(
                exc, token, True, "the seats were given back: nothing is borrowed"
            ) from None
        now = time.time()
        why = refusal(token, trusted=self._trusted(), user=token.user, host=token.host, now=now)
        if why is not None:
            log.warning("borrowed %s, but its token cannot serve offline now: %s", feature, why.why)
            self._tokens.warned.add(token.sig)  # said now: checkouts need not say it again
        elif now - token.start > CLOCK_SLACK:  # a fast clock: it ends early here, say so now
            log.warning(
                "borrowed %s: this computer's clock is %.0f s ahead of the triad's, so its "
                "token stops serving that much before its end: set the clock right",
                feature,
                now - token.start,
            )
        return token

    def return_borrow(self, feature: str, timeout: float | None = None) -> None:
        """Check a borrow of ``feature`` in before its end, and delete its token.

        Raises LicenseDenied (``not_borrowed``; ``no_early_return``: the license line
        forbids it), LicenseUnavailable, OutcomeUnknown.
        """
        body = self._ask_path("return", {"feature": feature}, timeout, (LicenseDenied,))
        gid = body.get("grant")
        for path, token in self._tokens.tokens(feature):
            if isinstance(token, Token) and token.grant == gid:
                self._tokens.delete(path)

    def borrowed(self) -> list[Token]:
        """The tokens of the store that serve this client now (valid, this user and host,
        signed by a borrow key of the path); refused ones are deleted as ``checkout`` does."""
        return [token for f in self._token_features() for token in self._usable(f)]

    def _ask_path(
        self,
        op: str,
        fields: dict[str, Any],
        timeout: float | None,
        next_on: tuple[type[LicenseError], ...],
    ) -> dict[str, Any]:
        check_feature(fields.get("feature"))
        self._check_usable()

        def start(link: Link, fut: Future[Any], now: float, deadline: float) -> None:
            link.ask(fut, now, op, fields, deadline)

        body: dict[str, Any] = self._over_path(timeout, 0.0, start, next_on)
        return body

    def _trusted(self) -> frozenset[str]:
        return borrow_keys(self._servers)

    def _token_features(self) -> list[str]:
        return sorted({t.feature for _, t in self._tokens.tokens() if isinstance(t, Token)})

    def _usable(self, feature: str) -> list[Token]:
        """The tokens of ``feature`` that may serve now; deletes the ones that never will
        (unreadable, forged, altered, ended a day ago, another user's or host's), keeps
        those a clock that is off holds back, and those of a borrow key the path does not
        name (another license path's): see ``refusal``."""
        found = list(self._tokens.tokens(feature))
        if not found:
            return []  # no license file read for nothing
        trusted, now = self._trusted(), time.time()
        user, host = self._hello["user"], self._hello["host"]
        out = []
        for path, token in found:
            if isinstance(token, TokenError):
                why = Refused(str(token))
            else:
                refused = refusal(token, trusted=trusted, user=user, host=host, now=now)
                if refused is None:
                    out.append(token)
                    continue
                why = refused
            if not why.keep:
                log.warning("%s: deleted: %s", path, why.why)
                self._tokens.delete(path)
            elif isinstance(token, Token) and why.clock and token.sig not in self._tokens.warned:
                self._tokens.warned.add(token.sig)
                log.warning("%s: not used: %s", path, why.why)
            else:
                log.info("%s: not used: %s", path, why.why)
        return out

    def _from_token(self, feature: str, count: int, version: str | None) -> Grant | None:
        """A grant served from a borrow token (``Grant.borrowed_until``), or None: no token
        of ``feature`` covers ``count`` seats at ``version`` for this user and host now."""
        try:
            usable = self._usable(feature)
        except (LicenseError, OSError) as exc:  # e.g. no descriptor left: the servers decide
            log.debug("borrow tokens of %s not read: %s", feature, exc)
            return None
        if not usable:
            return None
        try:
            floor = parse_version(version) if version is not None else None
        except ValueError:
            return None  # the servers answer it, saying what is wrong with it
        for token in usable:
            if token.count >= count and (floor is None or parse_version(token.version) >= floor):
                log.info("%s served from its borrow token, without asking a server", feature)
                return Grant(
                    self, id=token.grant, feature=token.feature, version=token.version,
                    count=count, triad=(), entry=-1, session="", borrowed_until=token.end,
                )  # fmt: skip
        return None

    def checkin(self, grant: Grant, timeout: float | None = None) -> None:
        """Return a grant's seats. Checking in a released or lost grant does nothing.

        A grant served from a borrow token is only marked released: the borrow holds its
        seat on the triad until its end or ``return_borrow``, whatever the application does.

        Raises LicenseUnavailable (still held; try again), OutcomeUnknown (the library
        keeps re-sending the checkin), LicenseDenied(``not_held``), ClientClosed.
        """
        if not isinstance(grant, Grant) or grant._owner is not self:
            raise ValueError(f"{grant!r} was not checked out through this client")
        if grant.released or grant.lost:
            return
        if grant.borrowed_until is not None:  # served from a token: the borrow goes on
            grant._set_state(GrantState.RELEASED)
            return
        self._check_open()
        engine, links = self._joined()
        link = links[grant._record._entry]
        deadline = time.monotonic() + self._budget(timeout)

        def job(now: float, fut: Future[Any]) -> None:
            link.checkin(fut, now, grant, deadline)

        self._call(engine, link, job, deadline)

    def _let_go(self, grant: Grant) -> None:
        """Check ``grant`` in as a ``with`` block ends by an exception, raising nothing of
        the library's (``Grant.__exit__``): a checkin that found no node goes on in the
        background, re-sent until a node answers or the triad forgets the session."""
        try:
            self.checkin(grant)
        except LicenseError as exc:
            if grant.released or grant.lost or self._engine is None or os.getpid() != self._pid:
                return  # settled (or another process's: ClientForked)
            log.warning(
                "checkin of grant %d of %s as its with block raised: %s; the library "
                "checks it in in the background",
                grant.id, grant.feature, exc,
            )  # fmt: skip
            # Waited for (a job of the I/O thread: at once) so that the grant reads released
            # when the block's exception reaches the application.
            with contextlib.suppress(TimeoutError):
                self._give_back(grant).result(GRACE)

    def _give_back(self, grant: Grant) -> Future[Any]:
        """Have the I/O thread check ``grant`` in with nobody waiting (``Link.give_back``);
        the future is done once it has (at once, unless the client is closed: then its
        session closed, which freed the seats)."""
        given: Future[Any] = Future()
        engine, links = self._engine, self._links
        if engine is None or grant.borrowed_until is not None:
            given.set_result(None)  # nothing got from a server, or its borrow goes on
            return given
        link = links[grant._record._entry]

        def job(now: float) -> None:
            link.give_back(grant, now)
            given.set_result(None)

        try:
            engine.post(job, given, (link,))
        except ClientClosed:
            given.set_result(None)
        return given

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The status map (docs/protocol.md) of the first entry of the path that answers."""
        self._check_usable()

        def start(link: Link, fut: Future[Any], now: float, deadline: float) -> None:
            link.status(fut, now, deadline)

        report: dict[str, Any] = self._over_path(timeout, 0.0, start, (LicenseUnavailable,))
        return report

    def _over_path(
        self,
        timeout: float | None,
        extra: float,
        start: Callable[[Link, Future[Any], float, float], None],
        next_on: tuple[type[LicenseError], ...],
        cancel: Future[Any] | None = None,
    ) -> Any:
        """Run one call on each entry of the license path in turn until one succeeds.

        Each entry gets an equal share of what is left of ``timeout``, plus ``extra``
        (a checkout's queueing time); a failure of a kind in ``next_on`` moves on to the
        next entry, as FlexLM clients do.
        """
        budget = self._budget(timeout)
        engine, links = self._joined()
        failures: list[LicenseError] = []
        for i, link in enumerate(links):
            began = time.monotonic()
            deadline = began + extra + max(0.0, budget) / (len(self._entries) - i)

            def job(
                now: float, fut: Future[Any], link: Link = link, deadline: float = deadline
            ) -> None:
                start(link, fut, now, deadline)

            try:
                return self._call(engine, link, job, deadline, cancel)
            except next_on as exc:
                failures.append(exc)
            budget -= max(0.0, time.monotonic() - began - extra)
        raise _summary(failures)

    def close(self, timeout: float | None = None) -> None:
        """Close every session (releasing its grants) and leave the I/O thread. Idempotent.

        Returns within about ``timeout`` (default: the shorter of 2 s and the client's
        timeout) even when no server answers; the triad then expires the sessions.
        In a forked child it only marks this copy closed: the sessions are the parent's.
        """
        if os.getpid() != self._pid:
            # Before any lock: a thread of the parent may have held it across the fork,
            # and no thread of the child will ever let it go.
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            engine, links = self._engine, self._links
        if engine is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        budget = min(self._timeout, CLOSE_TIMEOUT) if timeout is None else self._budget(timeout)
        deadline = time.monotonic() + budget
        closing: list[Future[Any]] = [Future() for _ in links]

        def job(now: float) -> None:
            for link, fut in zip(links, closing, strict=True):
                link.close(fut, now, deadline)

        detached: Future[Any] = Future()
        try:
            try:
                engine.post(job, Future(), links)
                wait_futures(closing, timeout=max(0.0, deadline - time.monotonic()))
            finally:
                # Interrupted too (KeyboardInterrupt): the close job runs on, and then the
                # links leave the engine (its jobs run in order), or it would drive them on.
                try:
                    engine.detach(links, detached)
                except ClientClosed:
                    detached.set_result(None)  # stopped: it drives nothing any more
            detached.result(timeout=max(0.0, deadline - time.monotonic()) + GRACE)
        except (ClientClosed, TimeoutError):
            pass  # the I/O thread stopped or is stuck: nothing more to wait for
        except BaseException:
            shared.release(engine, 0.0)  # interrupted: its sessions close in the background
            raise
        engine.flush_notices(max(0.0, deadline - time.monotonic()))
        shared.release(engine, GRACE)

    def __enter__(self) -> LicenseClient:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a LicenseClient cannot be pickled or copied: its sessions and I/O thread belong "
            "to the process that made it; create a LicenseClient in each process instead"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- plumbing
    def _joined(self) -> tuple[Engine, list[Link]]:
        """The process's engine and this client's links on it, joining it on first use."""
        with self._lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            if self._engine is None:
                engine = shared.acquire()  # LicenseUnavailable: no descriptor, no thread
                links = [
                    Link(
                        i,
                        entry,
                        hello=self._hello,
                        send=engine.send,
                        report=functools.partial(_report_to, weakref.ref(self)),
                        owner=weakref.ref(self),
                        new_sid=lambda: uuid.uuid4().hex,
                        try_timeout=TRY_TIMEOUT,
                        recover_timeout=self._timeout,
                        clock=time.monotonic,  # the engine's clock: the one leases count by
                    )
                    for i, entry in enumerate(self._entries)
                ]
                try:
                    engine.attach(links, self._curve)
                except ClientClosed:
                    shared.release(engine, GRACE)
                    raise
                self._engine, self._links = engine, links
                # Collected unclosed: its sessions close then, not at the process's exit.
                what = ":".join(",".join(entry) for entry in self._entries)
                self._finalizer = weakref.finalize(
                    self, _close_collected, engine, links, self._pid, what
                )
                self._finalizer.atexit = False  # at exit the triad expires the sessions
            return self._engine, self._links

    def _call(
        self,
        engine: Engine,
        link: Link,
        job: Callable[[float, Future[Any]], None],
        deadline: float,
        cancel: Future[Any] | None = None,
    ) -> Any:
        """Hand ``job`` to the I/O thread and wait for its answer until the deadline, or
        until ``cancel`` is done (``checkout_async`` cancelled: the call is abandoned)."""
        fut: Future[Any] = Future()
        engine.post(lambda now: job(now, fut), fut, (link,))
        try:
            if cancel is not None:
                left = max(0.0, deadline - time.monotonic()) + GRACE
                wait_futures([fut, cancel], timeout=left, return_when=FIRST_COMPLETED)
                if cancel.done():
                    raise asyncio.CancelledError  # abandoned below, as an interrupt is
            return fut.result(timeout=max(0.0, deadline - time.monotonic()) + GRACE)
        except TimeoutError:
            # The I/O thread always answers by the deadline; this means it is stuck.
            _abandon(engine, link, fut)
            raise OutcomeUnknown("the client's I/O thread did not answer in time") from None
        except (OutcomeUnknown, LicenseUnavailable):
            if self._closed:  # close() ended it, not its deadline nor the servers
                raise ClientClosed(
                    "the client was closed during the call; closing its sessions (or their "
                    "lease's end) frees whatever it got"
                ) from None
            raise
        except BaseException as exc:
            # Not the call's own answer but the wait interrupted (KeyboardInterrupt, a
            # signal handler's exception): whatever the call gets is given back.
            if not (fut.done() and fut.exception() is exc):
                _abandon(engine, link, fut)
            raise

    def _budget(self, timeout: float | None) -> float:
        """A call's ``timeout``, the client's when None; ValueError unless above 0 (a call
        given none would be sent, and end unknown at once)."""
        if timeout is None:
            return self._timeout
        if isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        return float(timeout)

    def _check_open(self) -> None:
        if os.getpid() != self._pid:  # before anything: the parent's engine is not here
            raise ClientForked(self._pid, os.getpid())
        if self._closed:
            raise ClientClosed("the client is closed")

    def _check_usable(self) -> None:
        self._check_open()
        with self._lock:
            lost, self._unreported = self._unreported, []
        if lost:
            raise LeaseLost(lost)

    def _report_lost(self, grants: list[Grant]) -> None:
        """Called on the I/O thread: hand the news on without blocking it."""
        engine = self._engine
        if self._on_lost is not None and engine is not None:
            engine.notify(self._on_lost, list(grants))
            return
        with self._lock:
            self._unreported.extend(g for g in grants if g not in self._unreported)


def _report_to(client: weakref.ref[LicenseClient], grants: list[Grant]) -> None:
    """A link's report, to its client if it is still alive (see ``_close_collected``)."""
    alive = client()
    if alive is not None:
        alive._report_lost(grants)


def _close_collected(engine: Engine, links: list[Link], pid: int, what: str) -> None:
    """A client collected unclosed (its ``weakref.finalize``): close its sessions as
    ``close`` does, on the I/O thread, without blocking the thread that collects."""
    if os.getpid() != pid:
        return  # a forked child's copy: the sessions are the parent's
    warnings.warn(
        f"LicenseClient of {what} was collected unclosed: its sessions are closed now; "
        "close() it (or use `with`) so that its seats are freed when you are done",
        ResourceWarning,
        stacklevel=2,
    )
    deadline = time.monotonic() + CLOSE_TIMEOUT

    def job(now: float) -> None:
        left = [len(links)]

        def closed(_: Future[Any]) -> None:
            left[0] -= 1
            if left[0] == 0:  # then leave: leaving ends the exchanges still going
                engine.detach(links, Future())
                shared.release(engine, 0.0)

        for link in links:
            fut: Future[Any] = Future()
            fut.add_done_callback(closed)
            link.close(fut, now, deadline)

    engine.post_from_finalizer(job, links)


def _abandon(engine: Engine, link: Link, fut: Future[Any]) -> None:
    """Tell the I/O thread nobody waits for ``fut`` any more (``Link.abandon``)."""
    with contextlib.suppress(ClientClosed):  # stopped: the sessions closed with it
        engine.post(lambda now: link.abandon(fut, now), Future(), (link,))


def _grouping(dup: str | None, vendor_string: str | None) -> dict[str, str]:
    """A checkout's duplicate-grouping fields (docs/protocol.md), checked here."""
    out: dict[str, str] = {}
    if dup is not None:
        if not isinstance(dup, str):
            raise ValueError(f"dup must be a DUP_GROUP mask such as 'UHD', not {dup!r}")
        out["dup"] = parse_dup_mask(dup)  # its ValueError says what a mask is
    if vendor_string is not None:
        if not isinstance(vendor_string, str) or len(vendor_string) > MAX_TEXT:
            raise ValueError(f"vendor_string must be a string of at most {MAX_TEXT} characters")
        out["vendor_string"] = vendor_string
    return out


def _flat(entries: list[tuple[str, ...]]) -> list[str]:
    return [endpoint for entry in entries for endpoint in entry]


def _curve(
    servers: str | os.PathLike[str] | Sequence[str] | None,
    entries: list[tuple[str, ...]],
    given: Mapping[str, str] | None,
    client_key: str | os.PathLike[str] | None,
) -> ClientCurve | None:
    """The CURVE settings of a client: None when no server of its path has a key."""
    keys = server_keys(servers, given)
    if not any(e in keys for e in _flat(entries)):
        return None
    path = client_key if client_key is not None else os.environ.get(CLIENT_KEY_ENV)
    try:
        pair = load_keypair(Path(path)) if path else process_keypair()
    except SecurityError as exc:
        raise_if_out_of_descriptors(str(path), exc)
        raise LicensePathError(str(exc)) from exc
    return ClientCurve(pair, keys)


def _summary(failures: list[LicenseError]) -> LicenseError:
    """The one error to raise when every entry of the path failed."""
    if not failures:
        return LicenseUnavailable("no server to ask")
    for exc in failures:
        if isinstance(exc, OutcomeUnknown):
            return exc  # a seat may be held somewhere (until the library settles it)
    denials = [e for e in failures if isinstance(e, LicenseDenied)]
    if denials:
        rank = {reason: i for i, reason in enumerate(_REASON_RANK)}
        return min(denials, key=lambda e: rank.get(e.reason, len(rank)))
    return failures[-1]
