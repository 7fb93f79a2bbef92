"""Preallocated message buffers: fill a packed C record in place, seal it (CRC + XCDR1 bytes), or load one received.

This is the hot path of the link and the simulator. Going through cyclonedds' Python IdlStruct serializer costs
150-320 us per LowCmd/LowState message and allocates some 300 Python objects; these buffers do the same in a few
microseconds with numpy gathers and no allocation, and hand the bytes straight to cyclonedds' C writer.
"""

from __future__ import annotations

import numpy as np

from runtime.robot.dds.crc import WordCrc
from runtime.robot.dds.idl_layout import CDR_LE_HEADER, CDR_LE_IDS, LOWCMD_LAYOUT, LOWSTATE_LAYOUT, StructLayout


class WireBuffer:
    """One message: ``rec`` (packed C record, shape (1,)), ``c`` (its bytes) and ``cdr`` (header + XCDR1 payload)."""

    def __init__(self, layout: StructLayout) -> None:
        self.layout = layout
        self.rec = np.zeros(1, dtype=layout.dtype)
        self.c = self.rec.view(np.uint8)
        self.cdr = np.zeros(4 + layout.cdr_size, dtype=np.uint8)
        self.cdr[:4] = np.frombuffer(CDR_LE_HEADER, dtype=np.uint8)
        self._payload = self.cdr[4:]
        self._crc = WordCrc(layout.c_size - 4)
        self._crc_field = self.rec["crc"]
        # received samples are copied into _rx (header + payload + one zero byte), then gathered into the C image;
        # C padding gathers the trailing zero byte, as the sender's zeroed struct has it whatever CDR padding held
        self._rx = np.zeros(len(self.cdr) + 1, dtype=np.uint8)
        self._from_rx = layout.c_from_cdr + 4
        self._from_rx[layout.c_padding] = len(self.cdr)

    def computed_crc(self) -> int:
        """The CRC of the record as it is now (the crc field excluded)."""
        return self._crc(self.c)

    def seal(self) -> int:
        """Set the crc field last, then lay the record out as CDR in ``cdr``; returns the crc."""
        crc = self._crc(self.c)
        self._crc_field[0] = crc
        np.take(self.c, self.layout.cdr_from_c, out=self._payload)
        return crc

    def seal_without_crc(self) -> None:
        """Lay the record out as CDR keeping whatever crc it holds (tests: a corrupt message)."""
        np.take(self.c, self.layout.cdr_from_c, out=self._payload)

    def load(self, data) -> bool:
        """Unpack a received serialized sample (encapsulation header + payload) into ``rec``.

        False (``rec`` untouched) for a sample we cannot take in place: too short, or big-endian.
        """
        if len(data) < len(self.cdr) or data[0:2] not in CDR_LE_IDS:
            return False
        n = len(self.cdr)
        self._rx[:n] = np.frombuffer(data, dtype=np.uint8, count=n)
        np.take(self._rx, self._from_rx, out=self.c)
        return True

    def crc_ok(self) -> bool:
        return self._crc(self.c) == int(self._crc_field[0])


class LowCmdBuffer(WireBuffer):
    """A LowCmd with views on its per-motor arrays (35 slots each)."""

    def __init__(self) -> None:
        super().__init__(LOWCMD_LAYOUT)
        motors = self.rec["motor_cmd"][0]
        self.mode = motors["mode"]
        self.q = motors["q"]
        self.dq = motors["dq"]
        self.tau = motors["tau"]
        self.kp = motors["kp"]
        self.kd = motors["kd"]
        self.mode_pr = self.rec["mode_pr"]
        self.mode_machine = self.rec["mode_machine"]


class LowStateBuffer(WireBuffer):
    """A LowState with views on the fields a driver reads and a simulator writes."""

    def __init__(self) -> None:
        super().__init__(LOWSTATE_LAYOUT)
        motors = self.rec["motor_state"][0]
        imu = self.rec["imu_state"]
        self.mode = motors["mode"]
        self.q = motors["q"]
        self.dq = motors["dq"]
        self.ddq = motors["ddq"]
        self.tau_est = motors["tau_est"]
        self.temperature = motors["temperature"]  # (35, 2): casing, winding
        self.quaternion = imu["quaternion"][0]
        self.gyroscope = imu["gyroscope"][0]
        self.accelerometer = imu["accelerometer"][0]
        self.rpy = imu["rpy"][0]
        self.wireless_remote = self.rec["wireless_remote"][0]
        self.mode_pr = self.rec["mode_pr"]
        self.mode_machine = self.rec["mode_machine"]
        self.tick = self.rec["tick"]
