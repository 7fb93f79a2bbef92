"""NewestSubscriber: a SUB socket that hands out the newest whole message and survives whatever its peer sends.

Why not ZMQ_CONFLATE: libzmq aborts the process (``Assertion failed: !_more (src/fq.cpp:80)``, SIGABRT) when a
multipart message reaches a conflating socket, and nothing can catch an abort. Instead the receive queue is small
(RCVHWM) and each cycle drains it, keeping only the newest whole message: the same "newest wins", bounded memory.
While the queue is full libzmq stops reading from the peer, so older messages wait upstream (in the kernel's socket
buffers: hundreds of small ones after a stall of the reader). A pass over the queue that found more than one message
says the reader is behind: it then waits briefly for libzmq to refill the queue and drains again, until nothing more
comes within REFILL_WAIT_MS (at most MAX_DRAIN messages per call). One message per cycle, the normal case, never
waits. A backlog is thus drained within a call or, should a refill come late, over the next few.

Multipart messages (never sent by our peers) are received whole, counted ("multipart") and dropped.

Why a monitor: a message over MAXMSGSIZE (or a byte stream that is not ZMTP) is a protocol error to libzmq, which
then drops the link and, on the connecting side, never reconnects (session_base_t::engine_error). A socket monitor
sees the disconnect; when libzmq does not announce a reconnect of its own (it does when the peer merely went away)
within ``GRACE_S``, the link is re-established here (disconnect + connect) and counted ("link_reset").
"""

from __future__ import annotations

from typing import Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

from runtime.protocol.codec import RejectCounter
from runtime.protocol.sockets import discard_rest

#: Monitor events that say libzmq is (re)connecting by itself: a disconnect followed by one of them is not ours.
_RECONNECTING = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECTED


class NewestSubscriber:
    """SUB (empty subscription) connected to ``endpoint``: ``newest(now)`` returns the newest whole single-part
    message waiting (a zmq.Frame, zero-copy) or None. Drops are counted on ``rejects`` by reason: "multipart",
    "link_reset". ``sock`` may be registered in a poller (it is never replaced)."""

    #: How long after a disconnect libzmq has to announce its own reconnect before the link is re-established here.
    GRACE_S = 0.1
    #: Messages taken per call at most (a peer that sends as fast as we read cannot hold the loop).
    MAX_DRAIN = 256
    #: After a pass that took two or more messages: how long to wait for libzmq to refill the queue (ms).
    REFILL_WAIT_MS = 1

    def __init__(self, ctx: zmq.Context, endpoint: str, max_bytes: int, rejects: RejectCounter, hwm: int = 4) -> None:
        self.endpoint = endpoint
        self.rejects = rejects
        self.superseded = 0  # whole messages skipped because a newer one was waiting behind them
        self.link_resets = 0
        self._lost_at: Optional[float] = None  # when the link was seen to drop, until libzmq or we reconnect it
        sock = ctx.socket(zmq.SUB)
        monitor = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | _RECONNECTING)
            sock.connect(endpoint)
        except BaseException:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(0)
            sock.close(0)
            raise
        self.sock = sock
        self._monitor = monitor

    def newest(self, now: float) -> Optional[zmq.Frame]:
        """Drain the queue (at most MAX_DRAIN messages) and return the newest whole single-part message, or None.
        Also watches the link (see the module docstring); ``now`` is time.monotonic()."""
        if self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN or self._lost_at is not None:
            self._watch_link(now)
        sock = self.sock
        newest = None
        in_pass = 0  # messages taken since the queue was last found empty
        for _ in range(self.MAX_DRAIN):
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # behind (more than one message waited): more may wait upstream, where libzmq stopped reading
                if in_pass >= 2 and sock.poll(self.REFILL_WAIT_MS, zmq.POLLIN):
                    in_pass = 0
                    continue
                break
            in_pass += 1
            if frame.more:
                parts = 1 + discard_rest(sock)
                self.rejects.count("multipart", f"a message of {parts} parts; one part expected")
                continue
            if newest is not None:
                self.superseded += 1
            newest = frame
        return newest

    def _watch_link(self, now: float) -> None:
        monitor = self._monitor
        while monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                if self._lost_at is None:
                    self._lost_at = now
            elif event & _RECONNECTING:
                self._lost_at = None  # libzmq reconnects by itself (the peer went away, or we reconnected)
        if self._lost_at is not None and now - self._lost_at >= self.GRACE_S:
            self._relink()

    def _relink(self) -> None:
        """libzmq gave the link up (a protocol error: an oversized or malformed message): connect it again."""
        self._lost_at = None
        self.link_resets += 1
        try:
            self.sock.disconnect(self.endpoint)
        except zmq.ZMQError:  # nothing left to disconnect
            pass
        self.sock.connect(self.endpoint)
        self.rejects.count("link_reset", f"the link to {self.endpoint} ended on a message libzmq refused (oversized "
                                         "or malformed); reconnected")

    def close(self) -> None:
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        self.sock.close(0)
