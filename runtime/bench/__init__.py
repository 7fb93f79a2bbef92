"""`wam-edge bench`: the whole loop under several inference latencies; a JSON report and a PNG plot."""

#: what latency_ms.overhead measures (runtime/runner/policy_runtime.py)
OWN_TIME = ("the runtime's own time per chunk: the inference call minus the network's stages and any injected "
            "delay (preprocessing, sampler arithmetic, checks) plus encoding and sending; camera decoding happens on "
            "the camera's thread before the frame's stamp and is not in it; frame_age is reported apart")
