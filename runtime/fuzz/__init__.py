"""`wam-edge fuzz`: malformed messages of every class to each socket of the running processes (rig use, loopback
only), and what became of them: sent, crashes, stalls, applied, rejected, RSS before and after (docs/fuzz.md).

messages.py makes the messages, spec.py says whether a message is valid (the oracle), targets.py holds the
sockets, rig.py the processes and the fuzzer's own peers, campaign.py the run, report.py the report, command.py the
command line. Nothing is imported here: `wam-edge --help` stays light.
"""
