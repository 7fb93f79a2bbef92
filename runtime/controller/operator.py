"""`wam-edge arm | stop | estop | clear-estop | status | task`: a person's commands to a running controller.

Over the controller's control socket (transport.control, ipc by default). Arming and clearing an e-stop are a
person's decisions: nothing in wam-edge does either on its own (the demo stands in for the person on a simulation).
"""

from __future__ import annotations

import getpass
from typing import Optional

import zmq

from runtime.protocol import MAX_REPLY_BYTES, Command, DecodeError, Reply, decode, encode_command, sockets
from runtime.service.paths import PathError


def send(endpoint: str, cmd: str, who: Optional[str] = None, timeout_s: float = 2.0,
         ctx: Optional[zmq.Context] = None) -> Reply:
    """Send one command; a Reply with ok False says why it was refused or that the controller did not answer."""
    who = who or f"{getpass.getuser()} (cli)"
    return request(endpoint, encode_command(Command(cmd, who)), timeout_s, ctx)


def request(endpoint: str, payload: bytes, timeout_s: float = 2.0, ctx: Optional[zmq.Context] = None) -> Reply:
    """Send one encoded request, valid or not (tests and fuzzing send malformed ones), and decode the reply with
    the bounds the controller's ``encode_reply`` keeps to (MAX_REPLY_BYTES, MAX_REPLY_DETAIL characters)."""
    try:
        raw = sockets.request(ctx or zmq.Context.instance(), endpoint, payload, timeout_s, MAX_REPLY_BYTES)
    except PathError as err:  # a control socket in a directory others control: not ours to talk to
        return Reply(False, "unknown", str(err))
    if raw is None:
        return Reply(False, "unknown", f"no answer from the controller at {endpoint} within {timeout_s} s")
    try:
        return decode(raw, ("reply",), MAX_REPLY_BYTES)
    except DecodeError as err:
        return Reply(False, "unknown", f"bad reply from the controller: {err}")
