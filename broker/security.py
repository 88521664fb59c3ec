"""Who may talk to a node: CURVE key pairs, the ZAP authenticator, socket hardening.

Theory of operation
-------------------
In secure mode (the default; ``secure = false`` in the config turns it off for trials)
every node socket runs ZeroMQ's CURVE (Curve25519 key exchange, then every frame
encrypted and authenticated with per-connection keys), and the node runs a ZAP
handler that says, for each new connection, whether its client key may in:

- peer ROUTER and heartbeat PUB (domain ``peer``): only the public keys on the triad's
  SERVER lines; User-Id ``node:NAME``;
- client ROUTER (domain ``client``): the admin keys (User-Id ``admin``), then any key,
  or with ``client_allow`` only the keys listed (User-Id ``client``).

The connecting side always knows the key of the server it dials (the SERVER line's
``KEY=``), so a node's SUB and DEALERs only ever talk to the real peers, and a client
only to the real node. Server sockets set ``ZAP_ENFORCE_DOMAIN``: with no handler
bound they refuse everyone rather than fall back to "encrypt but accept any key".

The handler is a small thread of our own (``ZapHandler``) rather than
``zmq.auth.thread.ThreadAuthenticator``: the node's shell ends with
``ctx.destroy(linger=0)``, which closes every socket made by ``ctx.socket`` from the
main thread; the stock authenticator's sockets are such sockets and its thread raises
on them at every shutdown. Ours is made outside the context's socket list, so the
context's ``term`` wakes it with ETERM and it closes its own socket. The decisions
are a pure ``Policy`` (bytes of a ZAP request in, status and user id out).

Administrators. A request that administers the triad (``op: admin``) is honoured only
from a connection whose ZAP ``User-Id`` is ``admin`` (secure mode), or, in plain mode,
only from a loopback address, as FlexLM's ``lmgrd -local`` restricts ``lmdown``.
``is_admin`` reads that from the frame's metadata; ``handle_admin`` decides the answer.

Key files are ZeroMQ certificates (``zmq.auth`` format): ``NAME.key`` holds the public
key, ``NAME.key_secret`` both (mode 0600; a secret readable by others is refused). An
allow-list is a text file with a Z85 public key as the first word of each line
(anything after it is a label; a line whose first word starts with ``#`` and is not a
key is a comment: Z85 itself uses ``#``), or a directory of ``*.key`` certificates.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth
from zmq.utils import z85

from broker.model import ErrorCode, Reply, reply_error, reply_ok

if TYPE_CHECKING:  # config imports this module: only for annotations
    from broker.config import Config

log = logging.getLogger("zbroker.security")

KEY_LENGTH = 40  # Z85 text of a 32-byte Curve25519 key
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27
PEER_DOMAIN = "peer"
CLIENT_DOMAIN = "client"
ADMIN_USER = "admin"
CLIENT_USER = "client"
NODE_USER_PREFIX = "node:"
NOT_ALLOWED = "not_allowed"  # the error code of an admin request from a non-admin
ADMIN_ACTIONS = ("down",)
_Z85_ALPHABET = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


class SecurityError(Exception):
    """A key file or allow-list is missing, malformed or unsafe; the message names it."""


# --- keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 text (40 characters each)."""

    public: str
    secret: str = field(repr=False)


def check_key(text: object, where: str) -> str:
    """``text`` if it is a Z85 Curve25519 public key, else SecurityError naming ``where``."""
    if not isinstance(text, str) or len(text) != KEY_LENGTH or not set(text) <= _Z85_ALPHABET:
        shown = repr(text)[:60]
        raise SecurityError(f"{where}: expected a {KEY_LENGTH}-character Z85 key, found {shown}")
    return text


def generate_keypair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode("ascii"), secret.decode("ascii"))


def write_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a fresh key pair as ``directory/NAME.key`` and ``directory/NAME.key_secret``.

    The secret file is created with mode 0600 from the start; an existing file is
    never overwritten (SecurityError), since that would orphan every copy of the key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pair = generate_keypair()
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    banner = f"#   zbroker CURVE certificate of {name} (ZeroMQ certificate format)\n"
    body = f'metadata\n    name = "{name}"\ncurve\n    public-key = "{pair.public}"\n'
    _write_new(
        secret_path,
        banner
        + "#   SECRET: keep it to this host, mode 0600.\n"
        + body
        + f'    secret-key = "{pair.secret}"\n',
        0o600,
    )
    _write_new(public_path, banner + body, 0o644)
    return public_path, secret_path


def _write_new(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SecurityError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise SecurityError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_certificate(path: Path) -> tuple[str, str | None]:
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
    public, secret = _read_certificate(path)
    if secret is None:
        raise SecurityError(f"{path}: holds no secret-key (is it the public .key file?)")
    if zmq.curve_public(secret.encode()).decode() != public:
        raise SecurityError(f"{path}: its public-key does not belong to its secret-key")
    return KeyPair(public, secret)


def load_public_key(path: Path) -> str:
    return _read_certificate(path)[0]


def load_key_list(path: Path) -> frozenset[str]:
    """The public keys of an allow-list: a text file of keys or a directory of certs."""
    if path.is_dir():
        return frozenset(load_public_key(cert) for cert in sorted(path.glob("*.key")))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityError(f"{path}: cannot read allow-list: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecurityError(f"{path}: allow-list is not UTF-8 text") from None
    keys = set()
    for number, row in enumerate(text.splitlines(), start=1):
        words = row.split()
        if not words or (words[0].startswith("#") and not _is_key(words[0])):
            continue  # blank, or a comment (Z85 has '#', so a key may start with one)
        keys.add(check_key(words[0], f"{path}:{number}"))
    return frozenset(keys)


def _is_key(word: str) -> bool:
    return len(word) == KEY_LENGTH and set(word) <= _Z85_ALPHABET


class KeyList:
    """An allow-list file, read again when it changes (so keys can be added live).

    Only new connections see the change: an authenticated connection stays. If the
    file turns unreadable or malformed, the last good list stays in force (logged).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._keys = load_key_list(path)

    def _stat(self) -> tuple[int, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (-1, -1)
        return (st.st_mtime_ns, st.st_size)

    def keys(self) -> frozenset[str]:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._keys = load_key_list(self.path)
                log.info("allow-list %s reloaded: %d keys", self.path, len(self._keys))
            except SecurityError as exc:
                log.error("allow-list not reloaded, keeping the previous one: %s", exc)
        return self._keys

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


# --- the ZAP policy (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ZapAnswer:
    status: str  # "200" let in, "400" refused
    text: str
    user: str = ""


class Policy:
    """Who may connect to which socket of a node (see the table in the module docstring).

    ``nodes`` maps each triad public key to its node name; ``admins`` are the keys that
    may administer (and are always served as clients); ``clients`` is the client
    allow-list, or None to serve any key.
    """

    def __init__(
        self,
        nodes: Mapping[str, str],
        admins: Iterable[str] | KeyList = (),
        clients: Iterable[str] | KeyList | None = None,
    ) -> None:
        self.nodes = dict(nodes)
        self.admins = admins if isinstance(admins, KeyList) else frozenset(admins)
        self.clients = (
            clients if clients is None or isinstance(clients, KeyList) else frozenset(clients)
        )

    def decide(self, domain: str, mechanism: str, credentials: list[bytes]) -> ZapAnswer:
        if mechanism != "CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return ZapAnswer("400", f"{mechanism} is not accepted: CURVE only")
        key = z85.encode(credentials[0]).decode("ascii")
        if domain == PEER_DOMAIN:
            name = self.nodes.get(key)
            if name is None:
                return ZapAnswer("400", "key is not a node of this triad")
            return ZapAnswer("200", "OK", NODE_USER_PREFIX + name)
        if domain == CLIENT_DOMAIN:
            if key in self.admins:
                return ZapAnswer("200", "OK", ADMIN_USER)
            if self.clients is None or key in self.clients:
                return ZapAnswer("200", "OK", CLIENT_USER)
            return ZapAnswer("400", "key is not on the client allow-list")
        return ZapAnswer("400", f"unknown domain {domain!r}")

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply frames to one ZAP request (RFC 27), however malformed it is."""
        return self.judge(frames)[0]

    def judge(self, frames: list[bytes]) -> tuple[list[bytes], ZapAnswer, str, str]:
        """``answer``, with the verdict, domain and peer address (for the handler's log)."""
        if len(frames) < 6 or frames[0] != b"1.0":
            request_id = frames[1] if len(frames) > 1 else b""
            bad = ZapAnswer("400", "malformed ZAP request")
            return [b"1.0", request_id, b"400", bad.text.encode(), b"", b""], bad, "?", "?"
        _, request_id, domain_b, address_b, _, mechanism, *credentials = frames
        domain = domain_b.decode("utf-8", "replace")
        address = address_b.decode("utf-8", "replace")
        verdict = self.decide(domain, mechanism.decode("ascii", "replace"), credentials)
        reply = [
            b"1.0",
            request_id,
            verdict.status.encode(),
            verdict.text.encode(),
            verdict.user.encode(),
            b"",
        ]
        return reply, verdict, domain, address


class ZapHandler:
    """The ZAP handler thread of one context: binds before any server socket exists."""

    WARN_EVERY = 60.0  # seconds: a refused peer reconnects every 100 ms; log it rarely

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], policy: Policy) -> None:
        self.policy = policy
        self._warned: dict[tuple[str, str, str], tuple[float, int]] = {}
        # Not ctx.socket(): kept off the context's list, so ctx.destroy() leaves it to
        # this thread, which closes it when the context's term() wakes it with ETERM.
        self._sock: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="zbroker-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self._sock
        try:
            while True:
                frames = sock.recv_multipart()
                try:
                    reply, verdict, domain, address = self.policy.judge(frames)
                    if verdict.status != "200":
                        self._warn(domain, address, verdict.text)
                except Exception:  # a bug must refuse the connection, never kill the thread
                    log.exception("ZAP policy failed")
                    reply = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"", b"", b""]
                sock.send_multipart(reply)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:
            log.error("ZAP handler stopped: %s", exc)
        finally:
            sock.close(linger=0)

    def _warn(self, domain: str, address: str, why: str) -> None:
        """Log a refusal, then at most once a minute per (domain, address, reason)."""
        now = time.monotonic()
        key = (domain, address, why)
        last, quiet = self._warned.get(key, (-self.WARN_EVERY, 0))
        if now - last < self.WARN_EVERY:
            self._warned[key] = (last, quiet + 1)
            return
        if len(self._warned) > 4096:  # many addresses: forget, rather than grow
            self._warned.clear()
        self._warned[key] = (now, 0)
        more = f" ({quiet} more since)" if quiet else ""
        log.warning(
            "refused a %s connection from %s: %s%s", domain or "?", address or "?", why, more
        )

    def alive(self) -> bool:
        return self._thread.is_alive()


# --- sockets -----------------------------------------------------------------------------


def secure_server(sock: zmq.Socket[bytes], keys: KeyPair, domain: str) -> None:
    """Make ``sock`` a CURVE server whose connections the ZAP handler must let in."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler bound: refuse, never accept all


def secure_client(sock: zmq.Socket[bytes], server_public: str, keys: KeyPair) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is ``server_public``.

    The key applies to the next ``connect`` calls; set it again before connecting the
    same socket to another server.
    """
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public.encode("ascii"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public.encode("ascii"))
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret.encode("ascii"))


@dataclass(frozen=True)
class NodeSecurity:
    """One node's security as its config says: what ``Node._open_sockets`` applies.

    In plain mode every method leaves the socket as it is and no handler runs.
    """

    secure: bool
    keys: KeyPair | None = None
    peers: Mapping[str, str] = field(default_factory=dict)  # other node -> public key
    policy: Policy | None = None

    @classmethod
    def from_config(cls, config: Config, name: str) -> NodeSecurity:
        """Load the node's key pair and allow-lists; SecurityError names what is wrong."""
        me = config.node(name)
        if not config.secure:
            if any(n.public_key for n in config.nodes):
                log.warning(
                    "secure = false, but the license's SERVER lines carry KEY=: clients "
                    "given the license file will try CURVE and not connect"
                )
            return cls(secure=False)
        if me.secret_key is None or me.public_key is None:
            raise SecurityError(f"{config.path}: node {name} has no CURVE key configured")
        keys = load_keypair(me.secret_key)
        if keys.public != me.public_key:
            raise SecurityError(
                f"{me.secret_key}: this is not node {name}'s key: its public key "
                f"{keys.public} differs from KEY= on the SERVER line of {name}"
            )
        return cls(
            secure=True,
            keys=keys,
            peers={n.name: n.public_key for n in config.nodes if n.name != name and n.public_key},
            policy=Policy(
                nodes={n.public_key: n.name for n in config.nodes if n.public_key},
                admins=KeyList(config.admin_keys) if config.admin_keys else (),
                clients=KeyList(config.client_allow) if config.client_allow else None,
            ),
        )

    @property
    def mode(self) -> str:
        """What the status report says: ``curve`` or ``plain``."""
        return "curve" if self.secure else "plain"

    def start(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> ZapHandler | None:
        """The ZAP handler of ``ctx``; call before any server socket is bound."""
        return None if self.policy is None else ZapHandler(ctx, self.policy)

    def server(self, sock: zmq.Socket[bytes], domain: str) -> None:
        if self.keys is not None:
            secure_server(sock, self.keys, domain)

    def client(self, sock: zmq.Socket[bytes], peer: str) -> None:
        """Dial ``peer`` securely: call before each ``connect`` to it."""
        if self.keys is not None:
            secure_client(sock, self.peers[peer], self.keys)


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


# --- administrators ----------------------------------------------------------------------


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
    reply: Reply
    stop: bool = False  # the node should stop once the reply has left


def handle_admin(action: object, *, admin: bool, node: str, secure: bool) -> AdminDecision:
    """The answer to an ``admin`` request (docs/protocol.md), and what the node must do."""
    if not admin:
        how = (
            "the administrator's key (admin_keys in the node's config)"
            if secure
            else "a connection from the node's own host (plain mode)"
        )
        return AdminDecision(reply_error(NOT_ALLOWED, f"admin requests need {how}"))
    if action == "down":
        log.warning("administrator asked node %s to stop", node)
        return AdminDecision(reply_ok(node=node, stopping=True), stop=True)
    return AdminDecision(
        reply_error(
            ErrorCode.BAD_REQUEST,
            f"unknown admin action {action!r:.40}; known: {', '.join(ADMIN_ACTIONS)}",
        )
    )
