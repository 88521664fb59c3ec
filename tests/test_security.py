"""Secure mode: keys, the ZAP policy, the config, and real nodes facing the wrong keys.

The integration tests run real secure triads (``LocalTriad`` is secure by default) and
play an attacker who knows everything public (endpoints, the nodes' public keys from
the license file) but holds none of the triad's secret keys: nothing it sends may
move a term, be acknowledged or be applied, nor may it get a checkout when the client
allow-list is on. Controls show that the same bytes *are* accepted from the right key,
so the negative results are not vacuous.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import CliRunner
from zmq.utils.monitor import recv_monitor_message

from zbroker import LicenseClient, LicenseUnavailable
from zbroker.broker.admin import handle_admin
from zbroker.broker.cli import main
from zbroker.broker.config import ConfigError, load_config
from zbroker.broker.demo import write_demo
from zbroker.broker.keys import KeyList, load_key_list, write_keypair
from zbroker.broker.limits import Limits
from zbroker.broker.security import NodeSecurity
from zbroker.broker.wire import pack
from zbroker.broker.zap_policy import ADMIN_USER, CLIENT_DOMAIN, PEER_DOMAIN, Policy
from zbroker.clients.curve import (
    ClientCurve,
    KeyPair,
    SecurityError,
    check_key,
    generate_keypair,
    load_keypair,
)
from zbroker.clients.errors import LicensePathError
from zbroker.clients.licpath import KEYS_ENV, server_keys
from zbroker.clients.testing import LocalTriad, RawClient, wait_for
from zbroker.clients.testing.raw import bind_retrying
from zbroker.clients.wire import encode_request

pytestmark = pytest.mark.unit

# --- keys and allow-lists ---------------------------------------------------------------


def test_key_pairs_are_written_private_and_load_back(tmp_path: Path) -> None:
    public_path, secret_path = write_keypair(tmp_path, "alpha")
    assert oct(secret_path.stat().st_mode & 0o777) == "0o600"
    pair = load_keypair(secret_path)
    assert check_key(pair.public, "x") == pair.public
    assert zmq.curve_public(pair.secret.encode()).decode() == pair.public
    with pytest.raises(SecurityError, match="refusing to overwrite"):
        write_keypair(tmp_path, "alpha")
    with pytest.raises(SecurityError, match="no secret-key"):
        public_path.chmod(0o600)
        load_keypair(public_path)


def test_a_secret_key_others_can_read_is_refused(tmp_path: Path) -> None:
    _, secret_path = write_keypair(tmp_path, "beta")
    secret_path.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_keypair(secret_path)


def test_a_secret_key_whose_public_half_was_swapped_is_refused(tmp_path: Path) -> None:
    _, secret_path = write_keypair(tmp_path, "gamma")
    other = generate_keypair().public
    text = secret_path.read_text()
    secret_path.write_text(text.replace(load_keypair(secret_path).public, other))
    with pytest.raises(SecurityError, match="does not belong"):
        load_keypair(secret_path)


@pytest.mark.parametrize("bad", ["", "short", "x" * 41, "é" * 40, "a b" + "c" * 37, None, 7])
def test_check_key_refuses_what_is_not_a_z85_key(bad: object) -> None:
    with pytest.raises(SecurityError, match="where: expected a 40-character Z85 key"):
        check_key(bad, "where")


def test_allow_list_file_comments_labels_and_errors(tmp_path: Path) -> None:
    a, b = generate_keypair().public, generate_keypair().public
    hashed = "#" + generate_keypair().public[1:]  # Z85 uses '#': a key may start with it
    listed = tmp_path / "clients"
    listed.write_text(f"# who may check out\n\n{a} ann's laptop\n  {b}\n{hashed} # ci\n")
    assert load_key_list(listed) == {a, b, hashed}
    listed.write_text(f"{a}\nnot-a-key\n")
    with pytest.raises(SecurityError, match=r"clients:2: expected a 40-character Z85 key"):
        load_key_list(listed)


def test_allow_list_directory_of_certificates(tmp_path: Path) -> None:
    write_keypair(tmp_path, "ann")
    write_keypair(tmp_path, "bob")
    expected = {load_keypair(tmp_path / f"{n}.key_secret").public for n in ("ann", "bob")}
    assert load_key_list(tmp_path) == expected


def test_key_list_reloads_when_the_file_changes_and_keeps_the_last_good(tmp_path: Path) -> None:
    a, b = generate_keypair().public, generate_keypair().public
    path = tmp_path / "allow"
    path.write_text(f"{a}\n")
    keys = KeyList(path)
    assert a in keys and b not in keys
    path.write_text(f"{a}\n{b}\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert b in keys
    path.write_text("garbage\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert a in keys and b in keys  # malformed: the previous list stays


# --- the ZAP policy (pure) ---------------------------------------------------------------


def _raw(key: str) -> bytes:
    return zmq.utils.z85.decode(key.encode())


def test_policy_lets_only_triad_keys_on_peer_sockets() -> None:
    alpha, stranger, admin = (generate_keypair().public for _ in range(3))
    policy = Policy(nodes={alpha: "alpha"}, admins=[admin])
    ok = policy.decide(PEER_DOMAIN, "CURVE", [_raw(alpha)])
    assert (ok.status, ok.user) == ("200", "node:alpha")
    for key in (stranger, admin):  # an administrator is not a node either
        refused = policy.decide(PEER_DOMAIN, "CURVE", [_raw(key)])
        assert (refused.status, refused.user) == ("400", "")
    assert policy.decide(PEER_DOMAIN, "NULL", []).status == "400"
    assert policy.decide("other", "CURVE", [_raw(alpha)]).status == "400"


def test_policy_on_the_client_socket_with_and_without_allow_list() -> None:
    node, admin, listed, stranger = (generate_keypair().public for _ in range(4))
    anyone = Policy(nodes={node: "alpha"}, admins=[admin])
    assert anyone.decide(CLIENT_DOMAIN, "CURVE", [_raw(stranger)]).user == "client"
    assert anyone.decide(CLIENT_DOMAIN, "CURVE", [_raw(admin)]).user == ADMIN_USER
    allow = Policy(nodes={node: "alpha"}, admins=[admin], clients=[listed])
    assert allow.decide(CLIENT_DOMAIN, "CURVE", [_raw(listed)]).status == "200"
    assert allow.decide(CLIENT_DOMAIN, "CURVE", [_raw(admin)]).user == ADMIN_USER
    refused = allow.decide(CLIENT_DOMAIN, "CURVE", [_raw(stranger)])
    assert (refused.status, refused.text) == ("400", "key is not on the client allow-list")


def test_policy_answers_malformed_zap_requests() -> None:
    policy = Policy(nodes={})
    assert policy.answer([])[2] == b"400"
    assert policy.answer([b"2.0", b"7", b"", b"", b"", b"CURVE"])[:3] == [b"1.0", b"7", b"400"]
    key = generate_keypair().public
    reply = policy.answer([b"1.0", b"9", b"client", b"10.0.0.1", b"", b"CURVE", _raw(key)])
    assert reply == [b"1.0", b"9", b"200", b"OK", b"client", b""]
    bad_key = policy.answer([b"1.0", b"9", b"client", b"", b"", b"CURVE", b"short"])
    assert bad_key[2] == b"400"


def test_admin_requests_need_the_admin() -> None:
    refused = handle_admin("down", admin=False, node="alpha", secure=True)
    assert refused.reply["code"] == "not_allowed" and not refused.stop
    assert "administrator's key" in str(refused.reply["detail"])
    local = handle_admin("down", admin=False, node="alpha", secure=False)
    assert "own host" in str(local.reply["detail"])
    done = handle_admin("down", admin=True, node="alpha", secure=True)
    assert done.stop and done.reply == {"status": "ok", "node": "alpha", "stopping": True}
    odd = handle_admin("explode", admin=True, node="alpha", secure=True)
    assert odd.reply["code"] == "bad_request" and not odd.stop


# --- config and init ---------------------------------------------------------------------


def test_init_is_secure_by_default(tmp_path: Path) -> None:
    config = load_config(write_demo(tmp_path / "d"))
    assert config.secure and config.mode == "curve"
    assert all(n.public_key and n.secret_key for n in config.nodes)
    assert config.admin_keys is not None and config.admin_key is not None
    admin = load_keypair(config.admin_key)
    assert load_key_list(config.admin_keys) == {admin.public}
    security = NodeSecurity.from_config(config, "beta")
    assert security.keys is not None and security.keys.public == config.node("beta").public_key
    assert set(security.peers) == {"alpha", "gamma"}
    plain = load_config(write_demo(tmp_path / "p", secure=False))
    assert not plain.secure and plain.mode == "plain"
    assert all(n.public_key is None for n in plain.nodes)
    assert " KEY=" not in plain.license_path.read_text()  # (BORROW_KEY= is no CURVE key)


def test_init_cli_plain_flag(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["init", str(tmp_path / "p"), "--plain"])
    assert result.exit_code == 0 and "plain TCP" in result.output
    assert "secure = false" in (tmp_path / "p" / "zbroker.toml").read_text()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_secure_config_needs_key_on_every_server_line(tmp_path: Path) -> None:
    config = write_demo(tmp_path / "d")
    lic = tmp_path / "d" / "demo.lic"
    key = load_config(config).node("beta").public_key or ""
    _edit(lic, f" KEY={key}", "")
    with pytest.raises(ConfigError, match=r"beta \(license line 4\) has no KEY="):
        load_config(config)
    _edit(config, "secure = true", "secure = false")
    assert not load_config(config).secure  # plain mode needs no keys


def test_secure_config_refuses_bad_keys_duplicates_and_missing_secret_key(tmp_path: Path) -> None:
    config = write_demo(tmp_path / "d")
    lic = tmp_path / "d" / "demo.lic"
    nodes = load_config(config).nodes
    _edit(lic, f"KEY={nodes[1].public_key}", "KEY=tooshort")
    with pytest.raises(ConfigError, match="40-character Z85 key"):
        load_config(config)
    _edit(lic, "KEY=tooshort", f"KEY={nodes[0].public_key}")
    with pytest.raises(ConfigError, match="same KEY="):
        load_config(config)
    _edit(lic, f"KEY={nodes[0].public_key}", f"KEY={nodes[1].public_key}")
    _edit(config, 'secret_key = "curve/gamma.key_secret"\n', "")
    with pytest.raises(ConfigError, match=r"\[nodes.gamma\] secret_key"):
        load_config(config)


def test_a_node_refuses_another_nodes_secret_key(tmp_path: Path) -> None:
    config_path = write_demo(tmp_path / "d")
    _edit(
        config_path, 'secret_key = "curve/beta.key_secret"', 'secret_key = "curve/gamma.key_secret"'
    )
    with pytest.raises(SecurityError, match="not node beta's key"):
        NodeSecurity.from_config(load_config(config_path), "beta")


def test_limits_and_paths_in_the_config(tmp_path: Path) -> None:
    config_path = write_demo(tmp_path / "d")
    text = config_path.read_text()
    config_path.write_text(
        'max_sessions_per_host = 3\nmax_queue = 2\nclient_allow = "curve/clients"\n' + text
    )
    config = load_config(config_path)
    assert config.limits == Limits(max_sessions_per_host=3, max_queue=2)
    assert config.client_allow == tmp_path / "d" / "curve" / "clients"
    config_path.write_text("max_queue = 0\n" + text)
    with pytest.raises(ConfigError, match="max_queue must be a whole number >= 1"):
        load_config(config_path)
    config_path.write_text("max_queue = true\n" + text)
    with pytest.raises(ConfigError, match="max_queue"):
        load_config(config_path)
    config_path.write_text(text.replace("secure = true", "secure = 1"))
    with pytest.raises(ConfigError, match="secure must be true or false"):
        load_config(config_path)


# --- client key resolution ---------------------------------------------------------------


def test_server_keys_come_from_the_license_file_env_and_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_demo(tmp_path / "d"))
    lic = str(config.license_path)
    expected = {n.client: n.public_key for n in config.nodes}
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv("ZBROKER_LICENSE", raising=False)
    assert server_keys(lic) == expected
    assert server_keys([n.client for n in config.nodes]) == {}  # bare: nothing known
    monkeypatch.setenv(KEYS_ENV, lic)
    assert server_keys([n.client for n in config.nodes]) == expected
    mine = {config.nodes[0].client: "x" * 40}
    assert server_keys(lic, mine)[config.nodes[0].client] == "x" * 40
    with pytest.raises(LicensePathError, match="server_keys"):
        server_keys(lic, {config.nodes[0].client: "not a key"})
    monkeypatch.setenv(KEYS_ENV, str(tmp_path / "gone.lic"))  # unreadable: skipped
    assert server_keys("27001@h") == {}


def test_secure_true_refuses_servers_without_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)
    with pytest.raises(LicensePathError, match="no server key is known"):
        LicenseClient(["tcp://127.0.0.1:9"], secure=True)


# --- real nodes: an attacker without the triad's keys ------------------------------------


class Attacker:
    """Sockets of a process that knows the endpoints and public keys, not the secrets."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.monitors: list[zmq.Socket[bytes]] = []
        self.subs: list[zmq.Socket[bytes]] = []

    def socket(self, kind: int, keys: KeyPair | None, server: str | None) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None and server is not None:
            ClientCurve(keys, {"*": server}).apply(sock, "*")
        self.monitors.append(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
        if kind == zmq.SUB:
            self.subs.append(sock)
        return sock

    def handshakes(self) -> int:
        """How many of our connections completed a CURVE handshake (must stay 0)."""
        return sum(1 for mon in self.monitors if mon.poll(0))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def _refusals(triad: LocalTriad, name: str) -> int:
    return (triad.logs / f"{name}.log").read_text().count("refused a peer connection")


def _forgeries(term: int, last: int, sender: str) -> list[dict[str, Any]]:
    """Well-formed peer messages that would move terms, votes, commits and the ledger."""
    grant = {
        "k": "grant",
        "sid": "f" * 32,
        "req": 1,
        "ack": 0,
        "grant": 1,
        "feature": "cad",
        "version": "2.0",
        "count": 15,
        "at": time.time(),
    }
    high = term + 100
    return [
        {"t": "vote_req", "term": high, "candidate": sender, "last": last + 5,
         "last_term": high, "transfer": True, "pre": False},
        {"t": "append", "term": high, "prev_index": last, "prev_term": term,
         "entries": [{"term": high, "index": last + 1, "delta": grant}], "commit": last + 1},
        {"t": "append_ack", "term": term, "ok": True, "match": last + 1000,
         "prev_index": last, "last": last + 1000, "commit": last},
        {"t": "hb", "term": high, "node": sender, "role": "primary", "last": last + 5,
         "last_term": high, "commit": last + 5, "primary": sender},
        {"t": "timeout_now", "term": high},
        {"t": "snapshot", "term": high, "index": last + 50, "term_at": high, "offset": 0,
         "size": 64, "crc": 0x758D6336, "data": b"\x00" * 64},  # crc32 of the data
    ]  # fmt: skip


def _views(triad: LocalTriad) -> dict[str, tuple[Any, ...]]:
    report = triad.status()
    nodes = {n["name"]: (n["role"], n["term"], n.get("commit")) for n in report["nodes"]}
    holders = sorted(
        (f["name"], h["user"], h["count"]) for f in report["features"] for h in f["holders"]
    )
    return {"nodes": tuple(sorted(nodes.items())), "holders": tuple(holders)}


def _settled(triad: LocalTriad) -> Any:
    """A condition: the view once every node has committed the same index and holds some."""

    def check() -> dict[str, tuple[Any, ...]] | None:
        view = _views(triad)
        commits = {c for _, (_, _, c) in view["nodes"]}
        return view if view["holders"] and len(commits) == 1 else None

    return check


@pytest.mark.integration
def test_wrong_keys_get_no_vote_ack_delta_or_heartbeat_accepted(tmp_path: Path) -> None:
    with LocalTriad(tmp_path / "t", lease=5.0) as triad:
        primary = triad.wait_for_primary()
        with LicenseClient(triad.license, user="legit") as client:
            client.checkout("cad", count=2)
            before = wait_for(_settled(triad), 5, "the grant committed on every node")
            nodes = {n.name: n for n in triad.config.nodes}
            own = dict(before["nodes"])
            term, last = own[primary][1], own[primary][2]
            attacker = Attacker()
            admin = load_keypair(triad.config.admin_key or Path("missing"))
            try:
                # Every kind of forgery, to every node's peer ROUTER, posing as every
                # other node, with a fresh key and with the administrator's key.
                for name, node in nodes.items():
                    for keys in (generate_keypair(), admin):
                        for sender in set(nodes) - {name}:
                            sock = attacker.socket(zmq.DEALER, keys, node.public_key)
                            sock.setsockopt(zmq.ROUTING_ID, sender.encode())
                            sock.connect(node.peer)
                            for msg in _forgeries(term, last, sender):
                                sock.send(pack(msg), zmq.NOBLOCK)
                    # and a listener on its heartbeat PUB
                    sub = attacker.socket(zmq.SUB, generate_keypair(), node.public_key)
                    sub.setsockopt(zmq.SUBSCRIBE, b"")
                    sub.connect(node.pub)
                for name in nodes:  # each node saw its attackers and shut them out
                    wait_for(lambda n=name: _refusals(triad, n), 5, f"{name} to refuse")
                assert attacker.handshakes() == 0
                assert _views(triad) == before
                # Positive control, not a pause of peer_timeout for late effects: a grant
                # after the refusals is committed on every node only through the triad's
                # own connections (appends, acks, and heartbeats on the PUBs the attackers
                # dial) while the attackers keep knocking; roles and terms stay as before.
                client.checkout("cad", count=1)
                holders = tuple(sorted((*before["holders"], ("cad", "legit", 1))))

                def committed() -> dict[str, tuple[Any, ...]] | None:
                    view = _settled(triad)()
                    return view if view is not None and view["holders"] == holders else None

                after = wait_for(committed, 5, "the control grant committed on every node")
                assert [(n, v[:2]) for n, v in after["nodes"]] == [
                    (n, v[:2]) for n, v in before["nodes"]
                ]
                assert attacker.handshakes() == 0
                assert not any(sub.poll(0) for sub in attacker.subs)  # heard nothing
            finally:
                attacker.close()
            assert client.checkout("cad", count=1).count == 1  # still serving


@pytest.mark.integration
def test_a_fake_peer_without_its_key_is_not_heard_and_hears_nothing(tmp_path: Path) -> None:
    """A backup dies; an impostor binds its endpoints. Without its key it changes nothing;
    with the stolen key (the control) the very same heartbeats move the primary's term."""
    with LocalTriad(tmp_path / "t", lease=5.0) as triad:
        primary = triad.wait_for_primary()
        victim = next(n for n in triad.config.nodes if n.name != primary)
        triad.kill(victim.name)
        wait_for(lambda: dict(_views(triad)["nodes"])[victim.name][0] == "down", 5, "victim down")
        own = dict(_views(triad)["nodes"])[primary]
        attacker = Attacker()
        try:
            impostor = generate_keypair()
            pub = attacker.ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.curve_server = True
            pub.curve_secretkey = impostor.secret.encode()
            router = attacker.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.curve_server = True
            router.curve_secretkey = impostor.secret.encode()
            # Positive control, not a stream of set length: the triad's nodes dial both
            # endpoints, and every handshake fails (they expect the victim's key), so the
            # heartbeat stream offered meanwhile can reach nobody.
            monitors = {sock: sock.get_monitor_socket(HANDSHAKE_EVENTS) for sock in (pub, router)}
            bind_retrying(pub, victim.pub)
            bind_retrying(router, victim.peer)
            hb = _forgeries(own[1], own[2], victim.name)[3]
            refused = dict.fromkeys(monitors, 0)

            def refused_twice() -> bool:
                pub.send(pack(hb))  # the heartbeat stream goes on until then
                for sock, monitor in monitors.items():
                    while monitor.poll(0):
                        event = recv_monitor_message(monitor)["event"]
                        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "the impostor got in"
                        refused[sock] += 1
                return min(refused.values()) >= 2

            wait_for(refused_twice, 10, "handshakes with the impostor refused", every=0.05)
            assert dict(_views(triad)["nodes"])[primary][:2] == own[:2]  # role and term
            assert not router.poll(0)  # the primary's appends never reached the impostor
            pub.close(linger=0)
            router.close(linger=0)

            # Control: the victim's real secret key, stolen. Same bytes, now believed.
            stolen = load_keypair(victim.secret_key or Path("missing"))
            pub = attacker.ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.curve_server = True
            pub.curve_secretkey = stolen.secret.encode()
            bind_retrying(pub, victim.pub)

            def moved() -> bool:
                pub.send(pack(hb))
                return bool(dict(_views(triad)["nodes"])[primary][1] > own[1])

            wait_for(moved, 10, "the primary to adopt the forged term", every=0.05)
        finally:
            attacker.close()


@pytest.mark.integration
def test_a_stolen_node_key_poses_as_that_node_only(tmp_path: Path) -> None:
    """A thief holding one backup's secret key talks to the primary's peer ROUTER under
    the other backup's name (that backup killed, so the ROUTER takes the name): not
    heard. Control: the very same bytes under the dead backup's own key move the term."""
    with LocalTriad(tmp_path / "t", lease=5.0) as triad:
        primary = triad.wait_for_primary()
        target = next(n for n in triad.config.nodes if n.name == primary)
        robbed, dead = (n for n in triad.config.nodes if n.name != primary)
        triad.kill(dead.name)
        wait_for(lambda: dict(_views(triad)["nodes"])[dead.name][0] == "down", 5, "a backup down")
        own = dict(_views(triad)["nodes"])[primary]
        term, last = own[1], own[2]
        # An empty append of a far higher term: believed, it makes the primary step down.
        forged = pack(
            {"t": "append", "term": term + 100, "prev_index": last, "prev_term": term,
             "entries": [], "commit": last}
        )  # fmt: skip
        attacker = Attacker()
        try:
            posing = attacker.socket(
                zmq.DEALER, load_keypair(robbed.secret_key or Path("missing")), target.public_key
            )
            posing.setsockopt(zmq.ROUTING_ID, dead.name.encode())
            posing.connect(target.peer)
            # > peer_timeout: time for any effect to show. A wait for nothing that stays:
            # the node drops every message of this connection unread (the key's name is
            # not the sender's), so nothing sent on it can come back as a positive control.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                posing.send(forged, zmq.NOBLOCK)
                time.sleep(0.05)  # a stream of forgeries, not a synchronisation
            assert attacker.handshakes() == 1  # the stolen key got it in: only the name failed
            assert dict(_views(triad)["nodes"])[primary][:2] == own[:2]  # role and term
            posing.close(linger=0)  # frees the name on the ROUTER for the control

            def honest_connection() -> zmq.Socket[bytes]:
                sock = attacker.socket(
                    zmq.DEALER, load_keypair(dead.secret_key or Path("missing")), target.public_key
                )
                sock.setsockopt(zmq.ROUTING_ID, dead.name.encode())
                sock.connect(target.peer)
                return sock

            # A connection that arrives while the ROUTER still holds the name for the closed
            # one is parked by libzmq and, if its messages came before the name was freed,
            # never named afterwards: connect again, as a restarted node does.
            honest, since = honest_connection(), time.monotonic()

            def moved() -> bool:
                nonlocal honest, since
                if time.monotonic() - since > 1.5:
                    honest.close(linger=0)
                    honest, since = honest_connection(), time.monotonic()
                honest.send(forged, zmq.NOBLOCK)
                return bool(dict(_views(triad)["nodes"])[primary][1] > term)

            wait_for(moved, 10, "the primary to adopt the forged term", every=0.05)
        finally:
            attacker.close()


def _allow_triad(tmp_path: Path, allowed: KeyPair) -> LocalTriad:
    triad = LocalTriad(tmp_path / "t", servers=1, settings={"client_allow": '"curve/clients"'})
    (triad.dir / "curve" / "clients").write_text(f"{allowed.public} the one client\n")
    return triad


@pytest.mark.integration
def test_allow_list_serves_only_the_listed_clients(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_keypair(keys, "good")
    write_keypair(keys, "bad")
    good, bad = keys / "good.key_secret", keys / "bad.key_secret"
    triad = _allow_triad(tmp_path, load_keypair(good))
    with triad:
        triad.wait_for_primary()
        before = _views(triad)
        with (
            LicenseClient(triad.license, client_key=bad, timeout=1.5) as stranger,
            pytest.raises(LicenseUnavailable),
        ):
            stranger.checkout("cad")
        with (
            LicenseClient(triad.license, timeout=1.5) as anonymous,
            pytest.raises(LicenseUnavailable),
        ):
            anonymous.checkout("cad")  # the per-process key is not listed either
        assert _views(triad) == before
        with LicenseClient(triad.license, client_key=good) as client:
            assert client.checkout("cad", count=2).count == 2
        # Keys are added live: the allow-list is read again when it changes.
        allow = triad.dir / "curve" / "clients"
        allow.write_text(allow.read_text() + f"{load_keypair(bad).public} now trusted\n")
        with LicenseClient(triad.license, client_key=bad) as client:
            assert client.checkout("cad", count=1).count == 1


@pytest.mark.integration
def test_a_plain_client_cannot_talk_to_a_secure_node(tmp_path: Path) -> None:
    with LocalTriad(tmp_path / "t", servers=1) as triad:
        triad.wait_for_primary()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(triad.endpoints[0])
        sock.send(encode_request({"op": "status", "req": 1}))
        assert not sock.poll(1000)
        sock.close()
        with (
            LicenseClient(triad.endpoints, secure=False, timeout=1.0) as plain,
            pytest.raises(LicenseUnavailable),
        ):
            plain.checkout("cad")


# --- administration (needs the node edits) -----------------------------------------------


def _admin(endpoint: str, curve: ClientCurve, **fields: Any) -> dict[str, Any]:
    client = RawClient(endpoint, curve=curve)
    try:
        return client.ask({"v": 1, "op": "admin", "req": 1, **fields})
    finally:
        client.close()


def _zbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker.broker", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.integration
def test_down_needs_the_admin_key_and_stops_the_triad_cleanly(tmp_path: Path) -> None:
    with LocalTriad(tmp_path / "t", lease=5.0) as triad:
        triad.wait_for_primary()
        node = triad.config.nodes[0]
        stranger = ClientCurve(generate_keypair(), {node.client: node.public_key or ""})
        refused = _admin(node.client, stranger, action="down")
        assert (refused["status"], refused["code"]) == ("error", "not_allowed")
        assert "administrator's key" in refused["detail"]
        admin = ClientCurve(load_keypair(triad.config.admin_key or Path("-")), stranger.servers)
        odd = _admin(node.client, admin, action="reboot")
        assert (odd["status"], odd["code"]) == ("error", "bad_request")
        assert triad.status()["mode"] == "curve"
        triad.wait_for_primary()  # nothing above stopped anything
        result = _zbroker("down", "--config", str(triad.config_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "all stopped" in result.stdout
        for name in triad.names:
            assert triad.procs[name].wait(timeout=10) == 0  # a clean exit, not a kill


@pytest.mark.integration
def test_down_in_plain_mode_works_from_this_host(tmp_path: Path) -> None:
    with LocalTriad(tmp_path / "t", servers=1, secure=False) as triad:
        triad.wait_for_primary()
        assert triad.status()["mode"] == "plain"
        result = _zbroker("down", "--config", str(triad.config_path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert triad.procs["alpha"].wait(timeout=10) == 0


@pytest.mark.integration
def test_status_cli_names_the_mode(tmp_path: Path) -> None:
    with LocalTriad(tmp_path / "t", servers=1) as triad:
        triad.wait_for_primary()
        result = _zbroker("status", "--config", str(triad.config_path))
        assert result.returncode == 0, result.stderr
        assert "curve (CURVE" in result.stdout.splitlines()[0]


def test_keygen_cli_prints_the_public_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keygen", str(tmp_path), "ann"])
    assert result.exit_code == 0, result.output
    public = load_keypair(tmp_path / "ann.key_secret").public
    assert result.output.splitlines()[0] == f"public key: {public}"
    again = CliRunner().invoke(main, ["keygen", str(tmp_path), "ann"])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


# --- license tampering -------------------------------------------------------------------


def _signed_demo(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    config = load_config(write_demo(tmp_path / "d"))
    return config.license_path, config.vendor_key, config.license_path.read_text().split("\n")


def _verify(lic: Path, pub: Path) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["vendor", "verify", str(lic), "--pub", str(pub)])
    return result.exit_code, result.output.splitlines()


def _refusals_of(lic: Path, pub: Path) -> list[str]:
    """What the node itself refuses of the file (it logs each), as 'LINE: WHY'."""
    from zbroker.broker.license import load_license
    from zbroker.broker.signing import load_public_key

    return [f"{r.line}: {r.why}" for r in load_license(lic, load_public_key(pub)).refused]


def _row(rows: list[str], start: str) -> int:
    return next(i for i, r in enumerate(rows) if r.startswith(start))


def test_vendor_verify_names_each_tampered_line(tmp_path: Path) -> None:
    lic, pub, rows = _signed_demo(tmp_path)
    assert _verify(lic, pub)[0] == 0
    feature, increment = _row(rows, "FEATURE cad"), _row(rows, "INCREMENT cad")
    solver, viewer = _row(rows, "FEATURE solver"), _row(rows, "FEATURE viewer")
    tampered = list(rows)
    tampered[feature] = tampered[feature].replace(" 10 ", " 1000 ")  # count
    tampered[increment] = tampered[increment].replace("permanent", "31-dec-2099")  # date
    tampered[solver] = tampered[solver].replace(" 1.5 ", " 9.5 ")  # version
    tampered[viewer] = tampered[viewer].replace("viewer", "cad")  # feature name
    lic.write_text("\n".join(tampered))
    code, out = _verify(lic, pub)
    assert code == 1
    why = "refused: signature does not verify against the vendor key"
    for i, name in ((feature, "FEATURE cad"), (increment, "INCREMENT cad"),
                    (solver, "FEATURE solver"), (viewer, "FEATURE cad")):  # fmt: skip
        assert f"{lic}:{i + 1}: {name} {why}" in out
    assert out[-1] == "0 verified, 4 refused"
    assert len(_refusals_of(lic, pub)) == 4  # the node refuses the same four lines


def test_vendor_verify_removed_copied_and_foreign_signatures(tmp_path: Path) -> None:
    from zbroker.broker.license import sign_license_text
    from zbroker.broker.signing import load_private_key
    from zbroker.broker.signing import write_keypair as write_vendor_keypair

    lic, pub, rows = _signed_demo(tmp_path)
    solver, viewer = _row(rows, "FEATURE solver"), _row(rows, "FEATURE viewer")
    removed = list(rows)
    removed[solver] = removed[solver].rstrip(" \\")
    del removed[solver + 1]  # the SIGN= continuation line
    lic.write_text("\n".join(removed))
    code, out = _verify(lic, pub)
    assert code == 1 and f"{lic}:{solver + 1}: FEATURE solver refused: no signature" in (
        " ".join(out)
    )
    copied = list(rows)
    copied[viewer + 1] = rows[solver + 1]  # solver's signature under viewer
    lic.write_text("\n".join(copied))
    code, out = _verify(lic, pub)
    assert code == 1 and any(
        line.startswith(f"{lic}:{viewer + 1}: FEATURE viewer refused: signature does not verify")
        for line in out
    )
    truncated = list(rows)
    truncated[viewer + 1] = rows[viewer + 1][:-10]
    lic.write_text("\n".join(truncated))
    assert (
        f"{lic}:{viewer + 1}: FEATURE viewer refused: signature is not 128 hex digits"
        in (_verify(lic, pub)[1])
    )
    # A license signed with another vendor's key: every line refused.
    other_key, _ = write_vendor_keypair(tmp_path / "other")
    lic.write_text(sign_license_text("\n".join(rows), load_private_key(other_key)))
    code, out = _verify(lic, pub)
    assert code == 1 and out[-1] == "0 verified, 4 refused"
    assert len(_refusals_of(lic, pub)) == 4


def _duplicate_increment(lic: Path, rows: list[str]) -> int:
    increment = _row(rows, "INCREMENT cad")
    copy = rows[: increment + 2] + rows[increment : increment + 2] + rows[increment + 2 :]
    lic.write_text("\n".join(copy))
    return increment + 1


def test_vendor_verify_refuses_a_copied_signed_line(tmp_path: Path) -> None:
    lic, pub, rows = _signed_demo(tmp_path)
    first = _duplicate_increment(lic, rows)
    code, out = _verify(lic, pub)
    assert code == 1
    assert (
        f"{lic}:{first + 2}: INCREMENT cad refused: a copy of line {first}: "
        "a signed line counts once"
    ) in out


def test_the_node_counts_a_copied_increment_once(tmp_path: Path) -> None:
    lic, pub, rows = _signed_demo(tmp_path)
    first = _duplicate_increment(lic, rows)
    assert _refusals_of(lic, pub) == [
        f"{first + 2}: a copy of line {first}: a signed line counts once"
    ]
