"""`wam-edge arm | stop | estop | clear-estop | status | task`: a person's commands to a running controller.

Over the controller's control socket (transport.control, ipc by default). Arming and clearing an e-stop are a
person's decisions: nothing in wam-edge does either on its own (the demo stands in for the person on a simulation).
"""

from __future__ import annotations

import getpass
from typing import Optional

import zmq

from runtime.protocol import Command, DecodeError, Reply, decode, encode_command, sockets


def send(endpoint: str, cmd: str, who: Optional[str] = None, timeout_s: float = 2.0,
         ctx: Optional[zmq.Context] = None) -> Reply:
    """Send one command; a Reply with ok False says why it was refused or that the controller did not answer."""
    who = who or f"{getpass.getuser()} (cli)"
    raw = sockets.request(ctx or zmq.Context.instance(), endpoint, encode_command(Command(cmd, who)), timeout_s)
    if raw is None:
        return Reply(False, "unknown", f"no answer from the controller at {endpoint} within {timeout_s} s")
    try:
        return decode(raw, ("reply",), 4096)
    except DecodeError as err:
        return Reply(False, "unknown", f"bad reply from the controller: {err}")
