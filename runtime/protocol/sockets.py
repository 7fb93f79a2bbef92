"""ZeroMQ sockets as this project uses them: bounded queues, no lingering, ipc directories made on demand.

Chunks and heartbeats: the controller binds PULL, the runtime connects PUSH and sends without blocking (a full queue
drops the message and counts it; it never blocks the loop). Robot state: the controller binds PUB, the runtime
subscribes through :class:`~runtime.protocol.subscriber.NewestSubscriber` (newest message wins, without CONFLATE).
Control sockets (operator commands, the simulator, fault injection): REP, served by :class:`RequestServer`, which
receives each request whole and answers it exactly once. No socket a peer can reach uses ZMQ_CONFLATE: libzmq
aborts the process (an assertion, SIGABRT) when a multipart message reaches a conflating socket.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import zmq

from runtime.protocol.codec import RejectCounter
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


def check_connect(endpoint: str) -> None:
    """Before connecting to one of wam-edge's own ipc sockets: its directory, where it is there, is private
    (paths.check_connect_dir); PathError otherwise. tcp endpoints are the config's business."""
    if endpoint.startswith("ipc://"):
        paths.check_connect_dir(os.path.dirname(endpoint[len("ipc://"):]))


def push_connected(ctx: zmq.Context, endpoint: str, hwm: int) -> zmq.Socket:
    check_connect(endpoint)
    sock = _socket(ctx, zmq.PUSH, hwm)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only toward a live peer, never toward a dead connection
    sock.connect(endpoint)
    return sock


def pub_bound(ctx: zmq.Context, endpoint: str, hwm: int) -> zmq.Socket:
    sock = _socket(ctx, zmq.PUB, hwm)
    _prepare(endpoint)
    sock.bind(endpoint)
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
    Requests over ``max_bytes`` are dropped by ZeroMQ unanswered (and that requester's connection closed: a REQ
    connects, so it reconnects by itself); a server that wants to answer "too large" sets it above its own limit.
    Serve it with :class:`RequestServer`."""
    sock = _socket(ctx, zmq.REP, 4)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    _prepare(endpoint)
    try:
        sock.bind(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock


def request(ctx: zmq.Context, endpoint: str, payload: bytes, timeout_s: float,
            max_bytes: int = 1 << 16) -> Optional[bytes]:
    """One request on a fresh REQ socket, so a late reply can never be taken as the answer to the next request.
    None when no reply came within ``timeout_s`` (or it was over ``max_bytes``: ZeroMQ drops it unread)."""
    check_connect(endpoint)
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    try:
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return sock.recv()
    finally:
        sock.close(0)


def describe_error(exc: BaseException, limit: int = 160) -> str:
    """``Type: message``, bounded: for counting and logging an unexpected error without echoing a payload at length."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose str() fails still gets named
        text = "?"
    return f"{type(exc).__name__}: {text[:limit]}"


def discard_rest(sock: zmq.Socket) -> int:
    """After a part with the "more" flag: receive and drop the message's remaining parts; returns how many. libzmq
    hands a message over whole (every part is there once the first is), so this never waits."""
    n = 0
    while True:
        n += 1
        if not sock.recv(zmq.NOBLOCK, copy=False).more:
            return n


class RequestServer:
    """The serving side of a REP socket: each request received whole (every part) and answered exactly once.

    Why: REP is a state machine. ``send`` after a ``recv`` that left parts unread fails with EFSM, and a request left
    unanswered makes every later ``recv`` fail the same way: one bad request would end the server. Here a multipart
    request is refused ("multipart"), a handler that raises is answered with a refusal and counted
    ("handler_error"), and a ``refuse`` that raises still sends ``fallback``. ``handle(request, now) -> reply bytes``;
    ``refuse(reason) -> reply bytes``. Counts and rate-limited logs go to ``rejects``.
    """

    def __init__(self, sock: zmq.Socket, handle: Callable[[bytes, float], bytes], refuse: Callable[[str], bytes],
                 rejects: RejectCounter, fallback: bytes) -> None:
        self.sock = sock
        self._handle = handle
        self._refuse = refuse
        self.rejects = rejects
        self._fallback = fallback
        self._owed: Optional[bytes] = None  # a reply whose send did not go through: sent before anything else

    def serve(self, now: float, limit: int = 1) -> int:
        """Answer up to ``limit`` waiting requests without blocking; returns how many were answered."""
        sock = self.sock
        if self._owed is not None and not self._send(self._owed):
            return 0
        served = 0
        while served < limit and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            served += 1
            if not self._send(self._reply(parts, now)):
                break
        return served

    def _send(self, reply: bytes) -> bool:
        """REP drops the reply to a peer that went away; should a send still not go through, it stays owed (the
        socket accepts nothing else until it is sent)."""
        try:
            self.sock.send(reply, zmq.NOBLOCK)
        except zmq.Again:
            self._owed = reply
            return False
        self._owed = None
        return True

    def _reply(self, parts, now: float) -> bytes:
        if len(parts) != 1:
            reason = f"a request is one message part, got {len(parts)}"
            self.rejects.count("multipart", reason)
            return self._refusal(reason)
        try:
            reply = self._handle(parts[0], now)
            if not isinstance(reply, bytes):
                raise TypeError(f"the handler returned {type(reply).__name__}, not bytes")
            return reply
        except Exception as exc:  # noqa: BLE001 - a bug in handling one request must not end the server
            self.rejects.count("handler_error", describe_error(exc))
            return self._refusal(f"internal error handling the request ({type(exc).__name__})")

    def _refusal(self, reason: str) -> bytes:
        try:
            reply = self._refuse(reason)
            if isinstance(reply, bytes):
                return reply
        except Exception as exc:  # noqa: BLE001
            self.rejects.count("handler_error", describe_error(exc))
        return self._fallback
