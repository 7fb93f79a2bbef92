"""`wam-edge bench`: the whole loop under several inference latencies; a JSON report and a PNG plot."""
