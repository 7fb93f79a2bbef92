"""Field controls from the G1's own wireless remote, so a field test needs no workstation.

Each action is a button combination from config (remote.*). An action fires once when its combination becomes held
(a rising edge), never again until it is released; arming and clearing an e-stop must be held for remote.hold_s so a
brush against the remote does neither. E-stop and stop are checked first and fire at once.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from runtime.robot.remote import button_mask, decode_buttons, pressed

__all__ = ["ACTIONS", "RemoteControls", "button_mask", "decode_buttons", "pressed"]

#: Checked in this order; the first that fires wins the tick.
ACTIONS = ("estop", "stop", "clear_estop", "arm", "next_task", "prev_task")
HELD_ACTIONS = ("clear_estop", "arm")


class RemoteControls:
    """``poll(buttons, now)`` -> the action that fires this tick, or None."""

    def __init__(self, section: Dict[str, Any]) -> None:
        self.hold_s = section["hold_s"]
        self._combos: Tuple[Tuple[str, int], ...] = tuple((a, button_mask(section[a])) for a in ACTIONS)
        self._held_since: Dict[str, Optional[float]] = {a: None for a in ACTIONS}
        self._fired: Dict[str, bool] = {a: False for a in ACTIONS}

    def poll(self, buttons: int, now: float) -> Optional[str]:
        fire = None
        for action, mask in self._combos:
            if buttons & mask != mask:
                self._held_since[action] = None
                self._fired[action] = False
                continue
            if self._held_since[action] is None:
                self._held_since[action] = now
            if self._fired[action] or fire is not None:
                continue
            if action in HELD_ACTIONS and now - self._held_since[action] < self.hold_s:
                continue
            self._fired[action] = True
            fire = action
        return fire
