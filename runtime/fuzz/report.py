"""The fuzz report: per socket sent / crashes / stalls / applied / rejected and RSS before and after, as JSON and as a
short table. ok is False when any socket had a crash, a stall or an applied message (or could not be fuzzed)."""

from __future__ import annotations

import sys
from typing import Any, Dict, List, TextIO

from runtime.fuzz.targets import Options


def build(runs: List[Any], opts: Options, names: List[str]) -> Dict[str, Any]:
    sockets = []
    for run in runs:
        t = run.target
        counted: Dict[str, Any] = {}
        if run.reports:
            try:
                counted = t.account(run.reports)
            except Exception as exc:  # noqa: BLE001 - a report in an unexpected shape must not lose the run
                counted = {"account_error": f"{type(exc).__name__}: {exc}"}
        applied = counted.pop("applied", 0)
        rejected = counted.pop("rejected", 0)
        entry = {
            "target": t.name,
            "socket": t.socket,
            "processes": list(t.active_roles()),
            "sent": run.sent,
            "crashes": run.crashes,
            "stalls": run.stalls,
            "applied": applied,
            "rejected": rejected,
            "transport_dropped": t.transport_dropped,
            "restarts": run.restarts,
            "seconds": round(run.seconds, 1),
            "rss_kb": {role: {"before": run.rss_before.get(role), "after": run.rss_after.get(role)}
                       for role in sorted(set(run.rss_before) | set(run.rss_after))},
            "events": run.events,
            "classes": run.classes,
            "exit_codes": run.exit_codes,
            "error": run.error,
        }
        for key in ("fuzz_transitions", "robot_side_transitions"):  # the counts stay; the report shows the first
            if key in counted:
                counted[key] = counted[key][:50]
        entry.update(counted)
        wire = counted.get("dds_wire") or {}
        entry["unsafe_on_wire"] = sum(wire.get(k, 0) for k in ("bad_crc", "non_finite", "out_of_limits"))
        entry["ok"] = not (run.crashes or run.stalls or applied or run.error or entry["unsafe_on_wire"])
        sockets.append(entry)
    return {
        "ok": bool(sockets) and all(s["ok"] for s in sockets),
        "messages_per_socket": opts.messages,
        "seed": opts.seed,
        "canary": opts.canary,
        "driving": opts.driving,
        "targets": names,
        "sockets": sockets,
    }


def _rss(entry: Dict[str, Any]) -> str:
    parts = []
    for role, r in entry["rss_kb"].items():
        b, a = r.get("before"), r.get("after")
        if b is None and a is None:
            continue
        parts.append(f"{role} {(b or 0) / 1024:.0f}->{(a or 0) / 1024:.0f}")
    return ", ".join(parts) or "-"


def print_table(report: Dict[str, Any], out: TextIO = sys.stdout) -> None:
    rows = [("socket", "sent", "crashes", "stalls", "applied", "rejected", "dropped", "RSS MiB before->after")]
    for s in report["sockets"]:
        rows.append((s["target"], str(s["sent"]), str(s["crashes"]), str(s["stalls"]), str(s["applied"]),
                     str(s["rejected"]), str(s["transport_dropped"]), _rss(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i and i < 7 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    for s in report["sockets"]:
        if s.get("error"):
            lines.append(f"{s['target']}: not fuzzed: {s['error']}")
        for e in s["events"][:20]:
            what = e.get("exit") or e.get("detail")
            lines.append(f"{s['target']}: {e['kind']} ({e.get('process', '')}) during {e['class']}, message "
                         f"{e['message']}: {what}")
        if len(s["events"]) > 20:
            lines.append(f"{s['target']}: ... {len(s['events']) - 20} more events in the JSON report")
        for cls, n in sorted(s.get("applied_by_class", {}).items()):
            lines.append(f"{s['target']}: applied {n} x {cls}")
        if s.get("unsafe_on_wire"):
            lines.append(f"{s['target']}: UNSAFE commands on the DDS wire: {s.get('dds_wire')}")
        if s.get("bad_replies"):
            lines.append(f"{s['target']}: {s['bad_replies']} replies the client could not read "
                         f"({s.get('bad_reply_example', '')})")
        stops = s.get("stops") or {}
        if stops:
            top = sorted(stops.items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"{s['target']}: the robot was held or stopped {sum(stops.values())} times (re-armed "
                         f"{s.get('rearms', 0)}); most: " + "; ".join(f"{n} x {r}" for r, n in top))
    lines.append(f"wam-edge fuzz: {'OK' if report['ok'] else 'FAILED'} ({report['messages_per_socket']} messages "
                 f"per socket, seed {report['seed']})")
    out.write("\n".join(lines) + "\n")
