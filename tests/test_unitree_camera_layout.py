"""Unitree's real G1 camera configuration end to end: a stereo head pair and two wrist cameras side by side
(2560x480), of which the reference model takes three; real ZeroMQ, real JPEGs, a real ONNX Runtime session."""

import logging
import time

import numpy as np
from conftest import publish_state, read_chunks

from runtime.cameras import FrameLayout, ImageServerSim

#: xr_teleoperate's real-robot image server: head 480x1280 (the stereo pair), then wrists 480x640 each.
G1_VIEWS = [{"name": "head", "width": 640}, {"name": "head_right", "width": 640},
            {"name": "left_wrist", "width": 640}, {"name": "right_wrist", "width": 640}]


def test_real_g1_layout_runs_the_reference_model_end_to_end(runtime_rig, caplog):
    caplog.set_level(logging.INFO, logger="wam_edge.runtime")
    layout = FrameLayout.from_config(G1_VIEWS, 480)
    assert layout.shape == (480, 2560, 3)
    sim = ImageServerSim("tcp://127.0.0.1:*", layout, fps=15, header="timestamp_id", quality=80)
    sim.start()
    try:
        layout_yaml = "[" + ", ".join("{name: %s, width: %d}" % (v["name"], v["width"]) for v in G1_VIEWS) + "]"
        rt, pull, pub, _ = runtime_rig("camera.source=image_server", f"camera.endpoint={sim.endpoint}",
                                       "camera.header=auto", f"camera.layout={layout_yaml}", "camera.height=480",
                                       "policy.frame_max_age_s=2", "policy.frame_fault_s=5",
                                       "policy.state_max_age_s=5")
        assert rt.policy.manifest.camera_names == ("head", "left_wrist", "right_wrist")
        assert any("camera views used by the model: head, left_wrist, right_wrist; ignored: head_right"
                   in r.getMessage() for r in caplog.records)
        frame = rt.camera.wait_newer(0, 5.0)
        assert frame is not None and tuple(frame.images) == layout.names and frame.sender_id is not None
        publish_state(pub, rt, 42.5)
        deadline = time.monotonic() + 10.0
        chunks = []
        while not chunks and time.monotonic() < deadline:
            rt.step(time.monotonic())
            chunks = read_chunks(pull)
        assert chunks, (rt.stats.counters, rt.camera.stats())
        assert chunks[0].obs_stamp == 42.5 and chunks[0].actions.shape == (32, 17)
        assert np.isfinite(chunks[0].actions).all()
        assert rt.stats.counters["policy_errors"] == 0 and rt.camera.stats()["dropped"] == 0
    finally:
        sim.close()
