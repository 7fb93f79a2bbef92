"""The e-stop latch: a file that keeps an e-stop across restarts and reboots until a person clears it.

Written and removed durably (synced), in a private state directory on disk; an e-stop the command record holds but
whose latch file is missing is latched again (``relatch_from_record``): an e-stop is cleared by a person only, never
by a lost file. See docs/safety.md, "Where state lives on the robot".
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from runtime.controller.record import CommandRecord
from runtime.controller.safety import ESTOP
from runtime.service import paths

log = logging.getLogger("wam_edge.controller")


class EstopLatch:
    """One latch file. ``write``/``remove`` return None, or why they failed (logged): the caller decides."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def check(self) -> None:
        """Before the controller binds anything: a private, writable directory (PathError otherwise), warned when it
        would not survive a reboot (tmpfs)."""
        latch_dir = paths.ensure_private_dir(os.path.dirname(self.path), "state directory", strict=False)
        paths.check_private_file(self.path, "e-stop latch file")
        paths.probe_writable(latch_dir, f"e-stop latch file {self.path}")
        kind = paths.on_tmpfs(latch_dir)
        if kind:
            log.warning("e-stop latch file %s is on %s: a reboot would clear an e-stop; keep it in a state directory "
                        "on disk (docs/safety.md, \"Where state lives on the robot\")", self.path, kind)

    def latched(self) -> bool:
        return os.path.exists(self.path)

    def write(self, reason: str) -> Optional[str]:
        try:
            paths.write_durably(self.path, f"e-stop latched at {time.time():.3f}: {reason}\n".encode())
        except OSError as exc:
            log.error("e-stop latch file %s: cannot write it: %s", self.path, exc)
            return f"e-stop latch file {self.path}: {exc.strerror or exc}"
        return None

    def remove(self) -> Optional[str]:
        try:
            paths.remove_durably(self.path)
        except OSError as exc:
            log.error("e-stop latch file %s: cannot remove it: %s", self.path, exc)
            return f"e-stop latch file {self.path}: cannot remove it: {exc.strerror or exc}"
        return None

    def relatch_from_record(self, record: CommandRecord) -> Optional[str]:
        """A record whose last state was an e-stop latches again when the latch file is missing, whatever its
        weight. Returns that reason, else None; PathError when the latch cannot be written."""
        try:
            last = record.last()
        except (ValueError, IndexError):  # read() says so
            last = None
        if last is None or last.state != ESTOP or self.latched():
            return None
        reason = (f"e-stop latched from an earlier run (the command record says pid {last.pid} ended in an e-stop; "
                  "its latch file was missing)")
        problem = self.write(reason)
        if problem:
            raise paths.PathError(f"{problem}: cannot latch the e-stop the command record holds")
        log.warning("%s: latched again", reason)
        return reason
