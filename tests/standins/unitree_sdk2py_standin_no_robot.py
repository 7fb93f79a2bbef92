"""A STAND-IN for the two parts of unitree_sdk2py that wam-edge calls, for tests without the SDK (not on any package
registry) and without a robot.

Not Unitree's code. ``ChannelFactoryInitialize(id, interface)`` does to the process what Unitree's does, with real
CycloneDDS: it creates ``Domain(id, config)`` with an XML naming the interface (or autodetermine) and then one
``DomainParticipant(id)`` that it keeps for the life of the process, and raises a bare Exception when either fails
(a second call on the same id, a domain someone else opened first). ``MotionSwitcherClient`` answers as a robot's
motion_switcher service would (the robot we cannot have): mode "ai" is active until ReleaseMode is called; it needs
the factory to be initialised first, as the SDK's clients do.

    install()          # the fake modules in sys.modules (a subprocess of its own: the domain stays for its life)
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, Optional, Tuple

from cyclonedds.domain import Domain, DomainParticipant

_INTERFACE_XML = ('<?xml version="1.0" encoding="UTF-8" ?><CycloneDDS><Domain Id="any"><General><Interfaces>'
                  '<NetworkInterface name="{}" priority="default" multicast="default"/></Interfaces></General>'
                  "</Domain></CycloneDDS>")
_AUTO_XML = ('<?xml version="1.0" encoding="UTF-8" ?><CycloneDDS><Domain Id="any"><General><Interfaces>'
             '<NetworkInterface autodetermine="true" priority="default" multicast="default"/></Interfaces>'
             "</General></Domain></CycloneDDS>")


class Factory:
    """The process-wide channel factory: the domain and the one participant the SDK keeps."""

    domain: Optional[Domain] = None
    participant: Optional[DomainParticipant] = None
    calls = 0


def config_xml(interface: Optional[str]) -> str:
    """A config shaped like the SDK's: one named interface, or autodetermine."""
    return _AUTO_XML if interface is None else _INTERFACE_XML.format(interface)


def ChannelFactoryInitialize(id: int = 0, networkInterface: Optional[str] = None) -> None:  # noqa: N802 - SDK name
    Factory.calls += 1
    try:
        Factory.domain = Domain(id, config_xml(networkInterface))
        Factory.participant = DomainParticipant(id)
    except Exception as exc:  # the SDK prints and raises a bare Exception
        print("[ChannelFactory] create domain error. msg:", exc)
        raise Exception("channel factory init error.") from None


class MotionSwitcherClient:
    """The robot's motion_switcher service, as a client sees it."""

    active = "ai"  # class-wide: the robot's state, whichever client asks
    releases = 0

    def __init__(self) -> None:
        self.timeout = None

    def SetTimeout(self, timeout: float) -> None:  # noqa: N802
        self.timeout = timeout

    def Init(self) -> None:  # noqa: N802
        if Factory.participant is None:
            raise Exception("channel factory is not initialised")

    def CheckMode(self) -> Tuple[int, Dict[str, Any]]:  # noqa: N802
        return 0, {"name": MotionSwitcherClient.active, "form": "0"}

    def ReleaseMode(self) -> Tuple[int, None]:  # noqa: N802
        MotionSwitcherClient.releases += 1
        MotionSwitcherClient.active = ""
        return 0, None


def install() -> None:
    """Put the stand-in in sys.modules under the SDK's module names (what wam-edge imports)."""
    names = ("unitree_sdk2py", "unitree_sdk2py.core", "unitree_sdk2py.core.channel", "unitree_sdk2py.comm",
             "unitree_sdk2py.comm.motion_switcher", "unitree_sdk2py.comm.motion_switcher.motion_switcher_client")
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["unitree_sdk2py.core.channel"].ChannelFactoryInitialize = ChannelFactoryInitialize
    sys.modules["unitree_sdk2py.comm.motion_switcher.motion_switcher_client"].MotionSwitcherClient = \
        MotionSwitcherClient
