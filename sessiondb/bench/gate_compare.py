"""The two write gates side by side: the portable gate (classic POSIX locks, strategy
``sessiondb-posix``) against the default one (Linux OFD locks, ``sessiondb``), scenario by
scenario, from runs of one benchmark invocation (``--strategy sessiondb --strategy
sessiondb-posix --rounds N``).

Each figure is the median over the rounds of each gate's runs; the goal is the portable
gate within 10% of the OFD gate on every figure: throughput and fairness (Jain) at least
0.90 of the OFD gate's, latency percentiles at most 1.10 of them. A figure that is *better*
by more than 10% is shown as such: it is not a miss, but it says how noisy the machine was.
"""

from __future__ import annotations

from statistics import median
from typing import Any

BASE, PORTABLE = "sessiondb", "sessiondb-posix"
GOAL = 0.10
# (name, how to read it from a run, True if higher is better)
FIGURES = (
    ("writes/s", lambda r: r["throughput_per_s"], True),
    ("p50", lambda r: r["latency_s"]["p50"], False),
    ("p99", lambda r: r["latency_s"]["p99"], False),
    ("max", lambda r: r["latency_s"]["max"], False),
    ("jain", lambda r: r["jain"], True),
)


def compare_gates(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario run with both gates: per figure both medians, their ratio
    (portable / OFD), every round's values, and whether the goal holds."""
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        of = {s: [r for r in runs if r["scenario"] == scenario and r["strategy"] == s]
              for s in (BASE, PORTABLE)}
        if not (of[BASE] and of[PORTABLE]):
            continue
        figures = {}
        for name, read, higher_is_better in FIGURES:
            base, portable = (median(read(r) for r in of[s]) for s in (BASE, PORTABLE))
            ratio = portable / base if base else float("inf") if portable else 1.0
            worse = ratio < 1 - GOAL if higher_is_better else ratio > 1 + GOAL
            better = ratio > 1 + GOAL if higher_is_better else ratio < 1 - GOAL
            figures[name] = {
                "ofd": base, "posix": portable, "ratio": ratio,
                "verdict": "MISS" if worse else "better" if better else "ok",
                "rounds": {s: [read(r) for r in of[s]] for s in (BASE, PORTABLE)},
            }
        rows.append({"scenario": scenario, "rounds": len(of[PORTABLE]),
                     "load_avg_1min": [r["load_avg"][0] for s in of for r in of[s]
                                       if "load_avg" in r],
                     "gates": {s: sorted({r.get("gate", "") for r in of[s]}) for s in of},
                     "figures": figures,
                     "goal_met": all(f["verdict"] != "MISS" for f in figures.values())})
    return rows


def _show(name: str, value: float) -> str:
    if name in ("writes/s",):
        return f"{value:.0f}"
    if name == "jain":
        return f"{value:.3f}"
    return f"{value * 1000:.2f}" if value < 0.001 else f"{value * 1000:.1f}"  # latency, ms


def gate_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as text: medians, ratio and verdict per figure, per scenario."""
    lines = [f"== the two gates side by side (median over rounds; goal: {BASE}-posix "
             f"within {GOAL:.0%} of {BASE}; latency in ms)"]
    table = [("scenario", "figure", "ofd", "posix", "posix/ofd", "verdict", "rounds ofd",
              "rounds posix")]
    for row in rows:
        for name, f in row["figures"].items():
            table.append((row["scenario"], name, _show(name, f["ofd"]), _show(name, f["posix"]),
                          f"{f['ratio']:.2f}", f["verdict"],
                          " ".join(_show(name, v) for v in f["rounds"][BASE]),
                          " ".join(_show(name, v) for v in f["rounds"][PORTABLE])))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    loads = [x for r in rows for x in r["load_avg_1min"]]
    if loads:
        lines.append(f"load average (1 min) after each of these runs: {min(loads):.2f} to "
                     f"{max(loads):.2f}, median {median(loads):.2f}")
    misses = [f"{r['scenario']} {name}" for r in rows for name, f in r["figures"].items()
              if f["verdict"] == "MISS"]
    lines.append("goal met on every figure" if not misses
                 else "goal missed on: " + ", ".join(misses))
    return "\n".join(lines) + "\n"
