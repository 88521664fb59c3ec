"""The baselines: bare pyzmq ROUTERs that send every message back as it came.

They do what the transport alone costs, and no decoding. They are driven by the same
load processes with the same frames as the triad, so their replies are the requests
themselves (about the size of the triad's replies: ~90 against ~110 bytes for a
checkout). Each runs in its own process, started with ``spawn``, until terminated.

Two loops, because pyzmq's own conveniences cost as much as the transport here:

- ``echo`` (the baseline of every ratio): the idiomatic loop,
  ``send_multipart(recv_multipart())``, as ZMQ-NOTES.md measured it;
- ``echo_tuned``: two plain ``recv`` and two ``send`` calls with integer flags, the
  calls the node itself uses; ``recv_multipart`` and ``send_multipart`` cost 3-5 us
  each in Python, so this loop answers up to twice as fast. Ratios against it are
  reported too: it is the stricter limit.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import zmq


def serve(endpoint: str, ready: Connection, tuned: bool) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    # the same options as a node's client socket (broker/node.py)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.BACKLOG, 1024)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    ready.send("ready")
    if not tuned:
        while True:
            sock.send_multipart(sock.recv_multipart())
    recv, send, more = sock.recv, sock.send, int(zmq.SNDMORE)
    while True:  # a DEALER's request is two frames here: identity, then the request
        identity = recv()
        send(identity, more)
        send(recv())


def start(endpoint: str, *, tuned: bool = False) -> BaseProcess:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(endpoint, child, tuned), daemon=True, name="bench-echo")
    proc.start()
    if not parent.poll(30):
        proc.terminate()
        raise RuntimeError("the echo server did not start within 30 s")
    parent.recv()
    return proc
