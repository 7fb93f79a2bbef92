"""ZeroMQ sockets as this project uses them: bounded queues, no lingering, ipc directories made on demand.

Chunks and heartbeats: the controller binds PULL, the runtime connects PUSH and sends without blocking (a full queue
drops the message and counts it; it never blocks the loop). Robot state: the controller binds PUB, the runtime
subscribes with CONFLATE, so it always reads the newest state.
"""

from __future__ import annotations

import os
from typing import Optional

import zmq

from runtime.service import paths


def _prepare(endpoint: str) -> None:
    """Before binding: an ipc socket's directory is its only access control, so it is made private (0700) or checked
    to be (ours, no symlink, parents nobody else can write); abstract sockets (ipc://@name) have no permissions at
    all and are refused. Raises paths.PathError."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if path.startswith("@"):
            raise paths.PathError(f"{endpoint} is an abstract socket: any local user could connect to it; use a path "
                                  "in a private directory")
        paths.ensure_private_dir(os.path.dirname(os.path.abspath(path)), "ipc socket directory")


def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


def pull_bound(ctx: zmq.Context, endpoint: str, hwm: int, max_bytes: int) -> zmq.Socket:
    """The controller's inbox for chunks and heartbeats; oversized messages are refused by ZeroMQ itself."""
    sock = _socket(ctx, zmq.PULL, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    _prepare(endpoint)
    sock.bind(endpoint)
    return sock


def push_connected(ctx: zmq.Context, endpoint: str, hwm: int) -> zmq.Socket:
    sock = _socket(ctx, zmq.PUSH, hwm)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only toward a live peer, never toward a dead connection
    sock.connect(endpoint)
    return sock


def pub_bound(ctx: zmq.Context, endpoint: str, hwm: int) -> zmq.Socket:
    sock = _socket(ctx, zmq.PUB, hwm)
    _prepare(endpoint)
    sock.bind(endpoint)
    return sock


def sub_conflated(ctx: zmq.Context, endpoint: str, max_bytes: int) -> zmq.Socket:
    """Keeps only the newest message (single-part messages only)."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.CONFLATE, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def try_send(sock: zmq.Socket, payload: bytes) -> bool:
    """Send without blocking; False when the peer's queue is full or no peer is connected."""
    try:
        sock.send(payload, zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


def rep_bound(ctx: zmq.Context, endpoint: str, max_bytes: int = 4096) -> zmq.Socket:
    """A control socket (operator commands, fault injection): one request, one reply, polled without blocking.
    Requests over ``max_bytes`` are dropped by ZeroMQ unanswered; a server that wants to answer "too large" sets it
    above its own limit."""
    sock = _socket(ctx, zmq.REP, 4)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    _prepare(endpoint)
    try:
        sock.bind(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def request(ctx: zmq.Context, endpoint: str, payload: bytes, timeout_s: float) -> Optional[bytes]:
    """One request on a fresh REQ socket, so a late reply can never be taken as the answer to the next request.
    None when no reply came within ``timeout_s``."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return sock.recv()
    finally:
        sock.close(0)
