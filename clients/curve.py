"""The client's CURVE: key pairs, certificate files, and dialling a server securely.

What every party that *connects* to a node needs, the client library first: a key pair
(read from a ZeroMQ certificate, or made once per process), the check that a text is a
Curve25519 public key (a SERVER line's ``KEY=``), and setting CURVE on a socket before it
connects to a server whose public key it knows (``ClientCurve``), so a client talks only
to the real node. The node's side (its server sockets, the ZAP handler that decides who
may in, allow-lists) is the node's (``zbroker.broker.security`` says which module has which
job) and builds on this module: one reading of a key file for both.

Key files are ZeroMQ certificates (``zmq.auth`` format): ``NAME.key`` holds the public
key, ``NAME.key_secret`` both (mode 0600; a secret readable by others is refused).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

KEY_LENGTH = 40  # Z85 text of a 32-byte Curve25519 key
_Z85_ALPHABET = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


class SecurityError(Exception):
    """A key file or allow-list is missing, malformed or unsafe; the message names it."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 text (40 characters each)."""

    public: str
    secret: str = field(repr=False)


def check_key(text: object, where: str) -> str:
    """``text`` if it is a Z85 Curve25519 public key, else SecurityError naming ``where``."""
    if not isinstance(text, str) or not is_key(text):
        shown = repr(text)[:60]
        raise SecurityError(f"{where}: expected a {KEY_LENGTH}-character Z85 key, found {shown}")
    return text


def is_key(word: str) -> bool:
    """Whether ``word`` has the shape of a Z85 key (Z85 has ``#``: a key may start with one)."""
    return len(word) == KEY_LENGTH and set(word) <= _Z85_ALPHABET


def generate_keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode("ascii"), secret.decode("ascii"))


def read_certificate(path: Path) -> tuple[str, str | None]:
    """The public key of a certificate, and its secret key if it holds one."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: not a readable CURVE certificate ({exc})") from None
    where = str(path)
    return (
        check_key(public.decode("ascii", "replace"), where),
        None if secret is None else check_key(secret.decode("ascii", "replace"), where),
    )


def load_keypair(path: Path) -> KeyPair:
    """The key pair in a secret certificate; refuses one that others may read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read secret key: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"{path}: secret key is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"run chmod 600 {path}"
        )
    public, secret = read_certificate(path)
    if secret is None:
        raise SecurityError(f"{path}: holds no secret-key (is it the public .key file?)")
    if zmq.curve_public(secret.encode()).decode() != public:
        raise SecurityError(f"{path}: its public-key does not belong to its secret-key")
    return KeyPair(public, secret)


def load_public_key(path: Path) -> str:
    return read_certificate(path)[0]


def secure_client(sock: zmq.Socket[bytes], server_public: str, keys: KeyPair) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is ``server_public``.

    The key applies to the next ``connect`` calls; set it again before connecting the
    same socket to another server.
    """
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public.encode("ascii"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode("ascii"))
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))


@dataclass(frozen=True)
class ClientCurve:
    """What a client's DEALERs need: its key pair and the key of each server endpoint.

    An endpoint with no key here is dialled in plain TCP (a plain triad).
    """

    keys: KeyPair
    servers: Mapping[str, str]  # endpoint -> the server's public key (Z85)

    def apply(self, sock: zmq.Socket[bytes], endpoint: str) -> bool:
        """Set CURVE on ``sock`` if ``endpoint``'s key is known; True when it did."""
        server = self.servers.get(endpoint)
        if server is None:
            return False
        secure_client(sock, server, self.keys)
        return True


_process_keys: KeyPair | None = None
_process_lock = threading.Lock()


def _forget_process_keys() -> None:
    # A forked child is another client process: its own key pair, and a lock that no
    # thread of the parent may be holding at the moment of the fork.
    global _process_keys, _process_lock
    _process_keys, _process_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_process_keys)


def process_keypair() -> KeyPair:
    """A client key pair made once per process: CURVE without a key of one's own."""
    global _process_keys
    with _process_lock:
        if _process_keys is None:
            _process_keys = generate_keypair()
        return _process_keys
