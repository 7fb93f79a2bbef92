"""A dependency-free sd_notify client: readiness, watchdog pings, stopping and status for systemd services.

The protocol (sd_notify(3)): send datagrams such as ``READY=1`` or ``WATCHDOG=1`` (newline-separated assignments) to
the AF_UNIX SOCK_DGRAM socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names a socket in the abstract namespace.
Without ``$NOTIFY_SOCKET`` (not started by systemd, or not ``Type=notify``) every call is a cheap no-op.

Made for a real-time loop: the socket is opened once and non-blocking (a busy systemd can never stall a control
tick), the datagrams and the socket address are encoded once, and ``WatchdogPinger.ping(now)`` costs a float compare
when no ping is due. A failed send (the socket vanished, systemd's queue full) is swallowed and counted in
``errors``/``last_errno``: a service must never crash because of its notify socket.

Usage (the controller)::

    notifier = Notifier.from_env()
    pinger = notifier.watchdog_pinger()
    ...                                  # first good tick with fresh robot state:
    notifier.ready("running at 500 Hz")
    while ...:
        ...
        if loop_is_healthy:              # deadlines met, robot state fresh
            pinger.ping(now)             # sends WATCHDOG=1 at most every WATCHDOG_USEC / 4
    notifier.stopping()                  # on SIGTERM, as the process begins to exit

After ``STOPPING=1`` (or systemd's own SIGTERM) systemd stops watching: the process then has ``TimeoutStopSec`` to
exit before SIGKILL. A robot stop that the controller makes on its own while the process stays up (e-stop, stale
state) is not ``stopping()``: the unit is still running and watched, so keep pinging while that stop runs properly.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping, Optional

__all__ = ["Notifier", "WatchdogPinger"]

READY = b"READY=1"
WATCHDOG = b"WATCHDOG=1"
STOPPING = b"STOPPING=1"


def _parse_address(value: str) -> Optional[bytes]:
    """``$NOTIFY_SOCKET`` -> the sockaddr_un path as bytes (abstract: a leading NUL), or None if not AF_UNIX."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # e.g. systemd >= 253's "vsock:" addresses: not for us


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


class Notifier:
    """Talks to systemd's notify socket. ``Notifier.from_env()`` is the way in; ``Notifier(None)`` is a no-op.

    Every method returns True when a datagram was sent, False when disabled or when the send failed (counted).
    Safe to call from several threads: each call is one ``sendto`` of a whole datagram.
    """

    def __init__(self, address: Optional[str] = None, watchdog_usec: Optional[int] = None) -> None:
        """``address`` as ``$NOTIFY_SOCKET`` spells it (``/path`` or ``@abstract``); None: disabled.
        ``watchdog_usec``: the service's watchdog timeout (``$WATCHDOG_USEC``), None when it has none."""
        self.address = address
        self.sent = 0
        self.errors = 0
        self.last_errno: Optional[int] = None
        self._addr: Optional[bytes] = None
        self._sock: Optional[socket.socket] = None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        if not address:
            return
        addr = _parse_address(address)
        family = getattr(socket, "AF_UNIX", None)
        if addr is None or family is None:
            self.errors += 1  # an address we cannot speak to: stay disabled, never raise
            return
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)  # Python sockets are close-on-exec already
            sock.setblocking(False)
        except OSError as exc:
            self.errors += 1
            self.last_errno = exc.errno
            return
        self._addr = addr
        self._sock = sock

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, unset_environment: bool = False) -> "Notifier":
        """A notifier for ``$NOTIFY_SOCKET`` (a no-op one when unset). The watchdog timeout is taken from
        ``$WATCHDOG_USEC`` only when ``$WATCHDOG_PID`` is unset or is this process (sd_watchdog_enabled(3)).
        ``unset_environment``: remove these variables from ``os.environ`` so child processes do not inherit
        them (only when ``environ`` is None)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: Optional[int] = None
        pid = env.get("WATCHDOG_PID", "")
        usec = env.get("WATCHDOG_USEC", "")
        if usec and (not pid or pid.strip() == str(os.getpid())):
            try:
                watchdog_usec = int(usec)
            except ValueError:
                watchdog_usec = None
        if unset_environment and environ is None:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to send to."""
        return self._sock is not None

    def notify(self, message: bytes) -> bool:
        """Send one datagram (``KEY=value`` lines). Never raises; a failure is counted in ``errors``."""
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendto(message, self._addr)
        except OSError as exc:  # ENOENT / ECONNREFUSED (socket gone), EAGAIN (queue full), ...
            self.errors += 1
            self.last_errno = exc.errno
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``: start-up is complete (systemd then starts the units ordered after this one)."""
        if self._sock is None:
            return False
        if status:
            return self.notify(READY + b"\nSTATUS=" + _one_line(status).encode("utf-8", "replace"))
        return self.notify(READY)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one keep-alive ping. In a loop use ``watchdog_pinger()``, which rate-limits."""
        return self.notify(WATCHDOG)

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``: the process has begun to exit. systemd stops watching it and starts counting
        ``TimeoutStopSec`` (then SIGKILL): send it on SIGTERM, not when the robot merely stops."""
        if self._sock is None:
            return False
        if status:
            return self.notify(STOPPING + b"\nSTATUS=" + _one_line(status).encode("utf-8", "replace"))
        return self.notify(STOPPING)

    def status(self, text: str) -> bool:
        """``STATUS=...``: the one-line status ``systemctl status`` shows."""
        if self._sock is None:
            return False
        return self.notify(b"STATUS=" + _one_line(text).encode("utf-8", "replace"))

    def mainpid(self, pid: int) -> bool:
        """``MAINPID=...``: another process is the service's main process (with ``NotifyAccess=main``, only the
        current main process may send this)."""
        return self.notify(b"MAINPID=%d" % int(pid))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=...``: still starting (or stopping); give me ``seconds`` more from now.
        For a long model load or TensorRT warm-up beyond ``TimeoutStartSec``."""
        return self.notify(b"EXTEND_TIMEOUT_USEC=%d" % max(0, int(seconds * 1e6)))

    def watchdog_timeout_s(self) -> Optional[float]:
        """The service's watchdog timeout (``WatchdogSec=``) in seconds; None when there is no watchdog for us."""
        if self._sock is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1e6

    def watchdog_interval_s(self) -> Optional[float]:
        """How often to ping: half the watchdog timeout (``$WATCHDOG_USEC / 2``), as sd_watchdog_enabled(3)
        advises; None when there is no watchdog for this process (or no notify socket)."""
        timeout = self.watchdog_timeout_s()
        return None if timeout is None else timeout / 2.0

    def watchdog_pinger(self, min_period_s: Optional[float] = None,
                        clock: Callable[[], float] = time.monotonic) -> "WatchdogPinger":
        """A rate-limited pinger for a hot loop; see ``WatchdogPinger``."""
        return WatchdogPinger(self, min_period_s, clock)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return "Notifier(address=%r, enabled=%s, sent=%d, errors=%d)" % (self.address, self.enabled, self.sent,
                                                                         self.errors)


class WatchdogPinger:
    """Sends ``WATCHDOG=1`` at most once per ``min_period_s`` however often ``ping()`` is called.

    ``min_period_s`` defaults to ``watchdog_interval_s() / 2``, i.e. a quarter of the watchdog timeout: with
    ``WatchdogSec=1s`` a loop that calls ``ping()`` every tick sends 4 datagrams a second, and systemd acts
    0.75-1 s after the loop stops calling it. Disabled (``ping()`` returns False at once) when the notifier is a
    no-op or the service has no watchdog. The hot path allocates nothing but the clock's float (pass ``now`` from
    the loop's own ``time.monotonic()`` to save that) and encodes nothing.
    """

    __slots__ = ("_notifier", "_clock", "_next", "period_s", "enabled", "pings")

    def __init__(self, notifier: Notifier, min_period_s: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        interval = notifier.watchdog_interval_s()
        if min_period_s is None and interval is not None:
            min_period_s = interval / 2.0
        self._notifier = notifier
        self._clock = clock
        self._next = float("-inf")
        self.period_s = float(min_period_s) if min_period_s is not None else 0.0
        self.enabled = notifier.enabled and interval is not None
        self.pings = 0

    def ping(self, now: Optional[float] = None) -> bool:
        """Call from the loop while it is healthy. True when a datagram went out now."""
        if not self.enabled:
            return False
        if now is None:
            now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.period_s
        if self._notifier.notify(WATCHDOG):
            self.pings += 1
            return True
        return False

    def reset(self) -> None:
        """Make the next ``ping()`` send at once (e.g. right after ``ready()``)."""
        self._next = float("-inf")
