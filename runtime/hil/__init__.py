"""`wam-edge hil`: a fault-injection suite for hardware-in-the-loop rigs (docs/hil.md)."""
