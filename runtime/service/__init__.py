"""Running wam-edge as systemd services: the sd_notify client (notify.py) and the unit installer (install.py).

The unit templates live in the repository's top-level systemd/ folder; docs/systemd.md is the operator's guide.
"""

from __future__ import annotations

from runtime.service.notify import Notifier, WatchdogPinger

__all__ = ["Notifier", "WatchdogPinger"]
