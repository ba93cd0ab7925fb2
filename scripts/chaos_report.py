"""The chaos run's figures and the summary it prints: what an operator (and the README's
Operations section) reads. The verdict itself is chaos_check's."""

from __future__ import annotations

import re
from typing import Any

from chaos_check import RunLog, Verdict


def figures(
    log: RunLog,
    verdict: Verdict,
    *,
    seconds: float,
    seed: int,
    enqueue_errors: int,
    drained: bool,
    drain_seconds: float,
    span: float | None,
    worker_logs: str,
) -> dict[str, Any]:
    """Every figure of the run; `span`: seconds from the first enqueue to the last finish."""
    succeeded = sum(1 for t in log.tasks if t.status == "succeeded")
    rescues = [
        f.release_delay
        for f in log.faults
        if f.kind in ("kill-worker", "stop-worker") and f.release_delay is not None
    ]
    return {
        "seconds": round(seconds, 1),
        "seed": seed,
        "rescue_after": log.rescue_after,
        "enqueued": len(log.tasks),
        "enqueue_errors": enqueue_errors,
        "succeeded": succeeded,
        "lost": verdict.lost,
        "runs": len(log.runs),
        "duplicates": verdict.duplicates,
        "explained": verdict.explained,
        "stale_outcomes": verdict.stale,
        "drained": drained,
        "drain_seconds": round(drain_seconds, 1),
        "throughput": round(succeeded / span, 2) if span else 0.0,
        "max_rescue_delay": round(max(rescues), 2) if rescues else None,
        "longest_orphan": round(max((o.lifetime for o in log.orphans), default=0.0), 1),
        "orphans_at_end": sum(1 for o in log.orphans if o.alive_at_end),
        "lost_ownership_lines": len(re.findall(r"lost ownership of task", worker_logs)),
        "zombie_exits": len(re.findall(r"stops claiming and exits", worker_logs)),
        "tracebacks": len(re.findall(r"^Traceback", worker_logs, re.M)),
    }


def summary(log: RunLog, verdict: Verdict, f: dict[str, Any], kinds: list[str], setup: str) -> str:
    """The table printed at the end; its last line is `CHAOS RESULT: ...` (tests read it)."""
    rescue = f["max_rescue_delay"]
    bound = log.rescue_after + max(0.2, log.rescue_after / 5)
    lines = [
        "",
        f"CHAOS SUMMARY ({f['seconds']:.0f}s, seed {f['seed']}, --rescue-after "
        f"{log.rescue_after:g}, {setup})",
        table(
            [
                ("tasks enqueued", str(f["enqueued"])),
                ("tasks succeeded", str(f["succeeded"])),
                ("tasks lost", str(f["lost"])),
                ("runs logged", str(f["runs"])),
                ("duplicate runs", str(f["duplicates"])),
                ("  explained by a fault", str(f["explained"])),
                ("stale outcomes kept", str(f["stale_outcomes"])),
                ("max rescue delay (s)", "-" if rescue is None else f"{rescue:.2f}"),
                ("  heartbeat bound (s)", f"{bound:.1f}"),
                ("longest orphan life (s)", f"{f['longest_orphan']:.1f}"),
                ("orphans alive at end", str(f["orphans_at_end"])),
                ("throughput (tasks/s)", f"{f['throughput']:.2f}"),
                ("drain after last enqueue (s)", f"{f['drain_seconds']:.1f}"),
                ("enqueues refused (retried)", str(f["enqueue_errors"])),
                ("'lost ownership' log lines", str(f["lost_ownership_lines"])),
                ("zombie exits", str(f["zombie_exits"])),
                ("tracebacks in worker logs", str(f["tracebacks"])),
            ]
        ),
        "",
        fault_table(log, verdict, kinds),
        "",
    ]
    if verdict.violations:
        lines.append(f"VIOLATIONS ({len(verdict.violations)}):")
        lines += [f"  - {v}" for v in verdict.violations[:50]]
        if len(verdict.violations) > 50:
            lines.append(f"  ... and {len(verdict.violations) - 50} more (summary.json)")
        lines.append(f"CHAOS RESULT: {len(verdict.violations)} violation(s)")
    else:
        lines.append("CHAOS RESULT: no violation")
    return "\n".join(lines)


def fault_table(log: RunLog, verdict: Verdict, kinds: list[str]) -> str:
    rows = [("fault", "count", "tasks hit", "duplicates", "max release (s)")]
    for kind in kinds:
        of_kind = [x for x in log.faults if x.kind == kind]
        delays = [x.release_delay for x in of_kind if x.release_delay is not None]
        rows.append(
            (
                kind,
                str(len(of_kind)),
                str(sum(len(x.hit) for x in of_kind)),
                str(verdict.by_kind.get(kind, 0)),
                f"{max(delays):.2f}" if delays else "-",
            )
        )
    rows.append(("total", str(len(log.faults)), "", str(verdict.explained), ""))
    return table(rows)


def table(rows: list[tuple[str, ...]]) -> str:
    """Columns aligned: the first left, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
