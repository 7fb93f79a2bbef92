"""Hostile operator requests to a real controller over its real control socket: every one gets a reply the client
decodes, short and printable, that does not echo the request (issue 10, item 13)."""

import threading

import msgpack
import pytest
import zmq

from runtime.config import load_config
from runtime.controller import operator
from runtime.controller.controller import Controller
from runtime.controller.safety import IDLE
from runtime.protocol import MAX_REPLY_DETAIL
from runtime.robot.sim_g1 import SimulatedG1

LONG = "".join(chr(0x41 + i % 26) for i in range(3900))  # 3.9 KB of text that fits a 4 KB request


@pytest.fixture
def control(tmp_path):
    """The control endpoint of a running Controller on the simulated G1, and a context to reach it."""
    cfg = load_config(None, [f"transport.chunks=ipc://{tmp_path}/chunks", f"transport.state=ipc://{tmp_path}/state",
                             f"transport.control=ipc://{tmp_path}/control",
                             f"controller.latch_file={tmp_path}/estop.latched",
                             f"controller.command_record={tmp_path}/controller.record"])
    ctx = zmq.Context()
    controller = Controller(cfg, SimulatedG1(mode=cfg["controller"]["mode"]), ctx)
    stop = threading.Event()
    loop = threading.Thread(target=lambda: controller.run(lambda: not stop.is_set()))
    loop.start()
    try:
        yield cfg["transport"]["control"], ctx
    finally:
        stop.set()
        loop.join()
        controller.close()
        ctx.term()


def _raw(**fields):
    return msgpack.packb({"v": 1, "type": "command", "cmd": "status", "who": "t", **fields}, use_bin_type=True)


@pytest.mark.parametrize("payload", [
    _raw(cmd=LONG), _raw(who=LONG),  # too long to be a command or a name
    _raw(**{LONG: 1}),  # was: the unknown key echoed in full; the client refused the 3.9 KB reply
    _raw(v=LONG),  # was: the version's repr echoed in full
    _raw(type=LONG),
    _raw(cmd="\x1b[2J" + LONG[:40]),
    _raw(who="me\r\n" + LONG[:40]),
], ids=["cmd", "who", "key", "version", "type", "cmd-controls", "who-controls"])
def test_a_hostile_request_gets_a_short_printable_reply_the_client_decodes(control, payload):
    endpoint, ctx = control
    reply = operator.request(endpoint, payload, timeout_s=5.0, ctx=ctx)
    assert reply.state == IDLE, reply.detail  # "unknown" would mean the client could not decode the reply
    assert reply.ok is False and 0 < len(reply.detail) <= MAX_REPLY_DETAIL and reply.detail.isprintable()
    assert not any(LONG[i:i + 32] in reply.detail for i in range(len(LONG) - 31)), reply.detail
    assert operator.send(endpoint, "status", "t", timeout_s=5.0, ctx=ctx).ok  # and the controller goes on
