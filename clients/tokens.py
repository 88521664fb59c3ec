"""The library's store of borrow tokens (the tokens themselves: ``clients/borrow.py``).

Apart from ``borrow.py`` so that a node, which reads and signs tokens, takes only that
leaf module: the store and its errors are the application's side.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zbroker.clients.borrow import MAX_TOKEN_BYTES, SAFE, STORE_ENV, Token, TokenError
from zbroker.clients.errors import LicenseError


class StoreError(LicenseError):
    """The token store cannot keep a token: ``directory`` and the OS's ``reason``.

    Raised by ``borrow`` before it asks the triad: nothing was borrowed (``TokenNotKept``
    when saving fails after). The CLI exits 2.
    """

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"cannot keep borrow tokens in {directory}: {reason}; {self.fix()}")
        self.directory = directory
        self.reason = reason

    @staticmethod
    def fix() -> str:
        return f"make it a directory this user can write, or point {STORE_ENV} (borrow_dir=) at one"


class TokenNotKept(StoreError):
    """The triad lent the seats, then the token could not be saved.

    ``token`` is the token lost; ``returned``: the seats were given back (nothing is
    borrowed), else they stay lent with no token until ``token.end`` unless returned
    (``no_early_return`` lines cannot be), and ``detail`` says which.
    """

    def __init__(self, cause: StoreError, token: Token, returned: bool, after: str) -> None:
        LicenseError.__init__(
            self,
            f"borrowed {token.count} seat(s) of {token.feature} (grant {token.grant}), but "
            f"cannot keep its token in {cause.directory}: {cause.reason}; {after}; {self.fix()}",
        )
        self.directory = cause.directory
        self.reason = cause.reason
        self.token = token
        self.returned = returned


# --- the store ---------------------------------------------------------------------------


def default_dir() -> Path:
    """Where tokens live: ``ZBROKER_BORROW_DIR``, else the user's data directory."""
    given = os.environ.get(STORE_ENV)
    if given:
        return Path(given)
    if os.name == "nt" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "zbroker" / "borrow"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zbroker" / "borrow"


class TokenStore:
    """The borrow tokens of one user, one file each (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_dir()
        # Signatures of tokens a clock keeps from serving that were warned about: a clock
        # that is off is said once per token, not on every checkout.
        self.warned: set[str] = set()

    def path_of(self, triad: str, feature: str) -> Path:
        return self.directory / f"{triad[:16]}-{SAFE.sub('_', feature)}.json"

    def check(self) -> None:
        """Make the directory if need be and prove a token can be written in it now, as
        ``save`` writes one; StoreError naming the directory and the cause if not."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".check-", dir=self.directory)
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise self._error(exc) from None

    def save(self, token: Token) -> Path:
        """Write ``token`` (replacing one of the same triad and feature); its path.
        StoreError when it cannot be written (nothing is left behind)."""
        path = self.path_of(token.triad, token.feature)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".token-", dir=self.directory)
        except OSError as exc:
            raise self._error(exc) from None
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                json.dump(token.to_map(), f, sort_keys=True, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise self._error(exc) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def _error(self, exc: OSError) -> StoreError:
        # The OS says "File exists" of a file where the directory should be, and "Not a
        # directory" of one under a file: name the file in the way instead.
        for at in (self.directory, *self.directory.parents):
            try:
                if at.exists() and not at.is_dir():
                    return StoreError(self.directory, f"{at} is a file, not a directory")
            except OSError:  # not even that can be seen: the OS's words are all there is
                break
        return StoreError(self.directory, exc.strerror or str(exc))

    def files(self) -> Iterator[Path]:
        if self.directory.is_dir():
            yield from sorted(self.directory.glob("*.json"))

    def load(self, path: Path) -> Token:
        """The token in ``path``; TokenError when it is no token, OSError when unreadable."""
        with path.open("rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
        if len(data) > MAX_TOKEN_BYTES:
            raise TokenError(f"{path}: larger than {MAX_TOKEN_BYTES} bytes: not a borrow token")
        try:
            m = json.loads(data.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenError(f"{path}: not a borrow token ({exc})") from None
        try:
            return Token.from_map(m)
        except TokenError as exc:
            raise TokenError(f"{path}: {exc}") from None

    def tokens(self, feature: str | None = None) -> Iterator[tuple[Path, Token | TokenError]]:
        """Every file of the store (of ``feature`` only, when given) and its token, or the
        TokenError that says why it is none."""
        for path in self.files():
            try:
                token: Token | TokenError = self.load(path)
            except TokenError as exc:
                token = exc
            except OSError as exc:
                token = TokenError(f"{path}: cannot read: {exc.strerror}")
            if feature is None or isinstance(token, TokenError) or token.feature == feature:
                yield path, token

    def delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)
