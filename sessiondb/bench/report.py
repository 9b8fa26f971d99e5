"""Figures, the readable table, the ratios that matter, and the latency-CDF plot."""

from __future__ import annotations

from typing import Any

from ..writes import percentile
from .workers import RunResult

_QS = (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))


def _dist(samples: list[float]) -> dict[str, float]:
    out = {name: percentile(samples, q) for name, q in _QS}
    out["max"] = max(samples) if samples else 0.0
    return out


def jain(values: list[int]) -> float:
    """Jain's fairness index: 1.0 when every process committed the same amount."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return (total * total) / (len(values) * squares) if squares else 0.0


def summarize(run: RunResult, label: str) -> dict[str, Any]:
    """Every figure of one run, JSON-ready (raw latencies rounded to microseconds)."""
    lat = [x for r in run.writers for x in r.latencies]
    holds = [x for r in run.writers for x in r.holds]
    commits = [r.commits for r in run.writers]
    total = sum(commits)
    out: dict[str, Any] = {
        "scenario": run.scenario,
        "strategy": label,
        "duration_s": run.duration,
        "writers": len(run.writers),
        "sqlite_version": next((r.sqlite_version for r in run.writers if r.sqlite_version), ""),
        "gate": next((r.gate for r in run.writers if r.gate), ""),
        "commits": total,
        "throughput_per_s": total / run.duration if run.duration else 0.0,
        "latency_s": _dist(lat),
        "errors": sum(r.errors for r in run.writers),
        "error_samples": [e for r in run.writers for e in r.error_samples][:5],
        "per_process_commits": commits,
        "min_max_ratio": (min(commits) / max(commits)) if commits and max(commits) else 0.0,
        "jain": jain(commits) if commits else 0.0,
        "starved": sum(1 for c in commits if c == 0),
        "lock_hold_s": {"p50": percentile(holds, 50), "p99": percentile(holds, 99)},
        "wal_peak_bytes": run.wal_peak,
        "integrity": run.integrity,
        "lost_writes": max(0, total - run.rows),
        "failed": run.failed,
        "load_average": run.load_average,
        "raw": {
            "latencies_s": [round(x, 6) for x in lat],
            "wal_samples": run.wal_samples,
        },
    }
    if run.poller:
        out["reader_poll_s"] = _dist(run.poller.latencies)
        out["reader_errors"] = run.poller.errors
    if run.long_reader:
        out["long_reader_txns"] = len(run.long_reader.latencies)
        out["long_reader_s"] = _dist(run.long_reader.latencies)
    if run.gateway:
        out["create_session_s"] = _dist(run.gateway.latencies)
        out["gateway_errors"] = run.gateway.errors
        out["raw"]["create_session_s"] = [round(x, 6) for x in run.gateway.latencies]
    if run.loop:
        out["loop_lag_s"] = _dist(run.loop.lags)
        out["loop_wakeups"] = len(run.loop.lags)
        out["loop_calls_s"] = _dist(run.loop.latencies)
        out["loop_calls"] = run.loop.commits
        out["loop_errors"] = run.loop.errors
        out["raw"]["loop_lag_s"] = [round(x, 6) for x in run.loop.lags]
    return out


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per scenario: how sessiondb compares with the others and with the serial ceiling."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["scenario"], {})[r["strategy"]] = r
    out: dict[str, dict[str, float]] = {}
    for scenario, runs_of in by.items():
        aio = runs_of.get("aio")
        if aio:
            out[scenario] = {
                f"{other.replace('-', '_')}_{q}_lag_over_aio": _div(
                    runs_of[other]["loop_lag_s"][q], aio["loop_lag_s"][q])
                for other in ("sync-on-loop", "no-db") if other in runs_of
                for q in ("p99", "max")}
        sdb = runs_of.get("sessiondb")
        if not sdb:
            continue
        row: dict[str, float] = {}
        for other in ("seedfix", "naive"):
            o = runs_of.get(other)
            if o:
                row[f"{other}_max_over_sessiondb"] = _div(o["latency_s"]["max"],
                                                          sdb["latency_s"]["max"])
                row[f"{other}_p99_over_sessiondb"] = _div(o["latency_s"]["p99"],
                                                          sdb["latency_s"]["p99"])
                row[f"throughput_vs_{other}"] = _div(sdb["throughput_per_s"],
                                                     o["throughput_per_s"])
        normal = runs_of.get("sessiondb-normal")
        if normal:  # what durability="full" (sessiondb) costs against "normal"
            row["full_throughput_vs_normal"] = _div(sdb["throughput_per_s"],
                                                    normal["throughput_per_s"])
            row["full_p99_over_normal"] = _div(sdb["latency_s"]["p99"],
                                               normal["latency_s"]["p99"])
        off = runs_of.get("sessiondb-unrecorded")  # the process record's cost
        if off:
            row["throughput_vs_unrecorded"] = _div(sdb["throughput_per_s"],
                                                   off["throughput_per_s"])
            row["p99_vs_unrecorded"] = _div(sdb["latency_s"]["p99"], off["latency_s"]["p99"])
        serial = runs_of.get("serial")
        if serial:
            row["throughput_vs_serial"] = _div(sdb["throughput_per_s"],
                                               serial["throughput_per_s"])
            row["serial_hold_p50_s"] = serial["lock_hold_s"]["p50"]
        out[scenario] = row
    return out


def _div(a: float, b: float) -> float:
    return a / b if b else float("inf") if a else 0.0


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}" if x < 10 else f"{x * 1000:.0f}"


def table(doc: dict[str, Any]) -> str:
    """The human-readable report: header, one table per scenario, ratios."""
    h = doc["header"]
    lines = [
        f"sessiondb {h['sessiondb']} contention benchmark - {h['date']}",
        f"Python {h['python']}, apsw {h['apsw']} (SQLite {h['sqlite_apsw']}), stdlib sqlite3 "
        f"SQLite {h['sqlite_stdlib']}, {h['cpus']} CPUs, {h['platform']}",
        f"options: { {k: v for k, v in h['options'].items() if k != 'scenarios'} }",
    ]
    if "fsync" in h:
        f = h["fsync"]
        fs = f.get("filesystem") or {}
        lines.append(f"disk: {f['call']} after a 1 KiB append, p50 {f['p50_ms']:.3f} ms, "
                     f"p99 {f['p99_ms']:.3f} ms, max {f['max_ms']:.3f} ms "
                     f"({f['syncs']} syncs; {fs.get('type', '?')} on {fs.get('device', '?')}"
                     f" at {fs.get('mount', '?')}); load average at start "
                     f"{h.get('load_average')}")
    lines.append("")
    cols = ("strategy", "sqlite", "commits", "/s", "p50ms", "p90ms", "p99ms", "p99.9ms",
            "max ms", "errors", "min/max", "jain", "starved", "hold p50", "hold p99",
            "WAL MB", "read p99", "integrity")
    rat = ratios(doc["runs"])
    scenarios_seen: list[str] = []
    for r in doc["runs"]:
        if r["scenario"] not in scenarios_seen:
            scenarios_seen.append(r["scenario"])
    for name in scenarios_seen:
        runs = [r for r in doc["runs"] if r["scenario"] == name]
        lines.append(f"== {name} ({runs[-1]['writers']} writers, {runs[-1]['duration_s']:g} s)")
        rows = [cols]
        for r in runs:
            lat = r["latency_s"]
            rows.append((
                r["strategy"] + (f" #{r['round']}" if "round" in r else ""), r["sqlite_version"], str(r["commits"]),
                f"{r['throughput_per_s']:.0f}", _ms(lat["p50"]), _ms(lat["p90"]),
                _ms(lat["p99"]), _ms(lat["p99.9"]), _ms(lat["max"]), str(r["errors"]),
                f"{r['min_max_ratio']:.2f}", f"{r['jain']:.3f}", str(r["starved"]),
                _ms(r["lock_hold_s"]["p50"]), _ms(r["lock_hold_s"]["p99"]),
                f"{r['wal_peak_bytes'] / 1e6:.1f}",
                _ms(r["reader_poll_s"]["p99"]) if "reader_poll_s" in r else "-",
                r["integrity"] + (" LOST %d" % r["lost_writes"] if r["lost_writes"] else ""),
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        for row in rows:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))))
        gw = [r for r in runs if "create_session_s" in r]
        for r in gw:
            c = r["create_session_s"]
            lines.append(f"  create_session ({r['strategy']}): p50 {_ms(c['p50'])} ms, "
                         f"p99 {_ms(c['p99'])} ms, max {_ms(c['max'])} ms, "
                         f"errors {r['gateway_errors']}")
        for r in runs:
            if "loop_lag_s" in r:
                g, c = r["loop_lag_s"], r["loop_calls_s"]
                lines.append(
                    f"  loop lag ({r['strategy']}): p50 {_ms(g['p50'])} ms, p99 {_ms(g['p99'])}"
                    f" ms, max {_ms(g['max'])} ms over {r['loop_wakeups']} wake-ups; "
                    f"{r['loop_calls']} calls, p99 {_ms(c['p99'])} ms, max {_ms(c['max'])} ms, "
                    f"errors {r['loop_errors']}")
        if name in rat:
            lines.append("  ratios: " + ", ".join(f"{k} {v:.2f}" if "hold" not in k else
                                                  f"{k} {v * 1000:.2f} ms"
                                                  for k, v in rat[name].items()))
        loads = [f"{r['strategy']} {r['load_average'][0]:.1f}" for r in runs
                 if r.get("load_average")]
        if loads:
            lines.append("  load average (1 min) after each run: " + ", ".join(loads))
        for r in runs:
            if r["error_samples"]:
                lines.append(f"  {r['strategy']} errors, e.g.: {r['error_samples'][0]}")
            if r["failed"]:
                lines.append(f"  {r['strategy']} FAILED: {r['failed']}")
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> None:
    """Draw write-latency CDFs per strategy, one panel per scenario (needs matplotlib,
    the ``bench`` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for r in doc["runs"]:
        if r["scenario"] not in names:
            names.append(r["scenario"])
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for r in doc["runs"]:
            if r["scenario"] != name or r["strategy"] == "serial":
                continue
            lat = sorted(r["raw"]["latencies_s"])
            if not lat:
                continue
            n = len(lat)
            ax.step([x * 1000 for x in lat], [(i + 1) / n for i in range(n)], where="post",
                    label=f"{r['strategy']} (max {lat[-1]:.2f} s)")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("write latency, ms (log)")
        ax.set_ylabel("fraction of writes")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"sessiondb contention benchmark, {doc['header']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
