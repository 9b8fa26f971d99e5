"""The PostgreSQL benchmark's report: per-scenario tables, the side-by-side summary of
SQLite and PostgreSQL, and the goals checked against the run's own figures (ratios in
one run, never against numbers from another machine or day)."""

from __future__ import annotations

from typing import Any

from .report import _ms

#: The goals: agent-16 throughput against sessiondb on SQLite; one session row's convoy;
#: the library's cost per write against plain psycopg; 64 writers in several pools.
AGENT_SPEEDUP = 5.0
CONVOY_MAX_S = 1.0
CONVOY_JAIN = 0.98
OVERHEAD_MAX = 1.3


def _find(runs: list[dict[str, Any]], scenario: str, backend: str, client: str
          ) -> dict[str, Any] | None:
    return next((r for r in runs if r["scenario"] == scenario and r["backend"] == backend
                 and r["client"] == client), None)


def _div(a: float, b: float) -> float:
    return a / b if b else float("inf") if a else 0.0


def goals(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal with ``met`` (None when its scenario was not run), its figures and a
    one-line verdict."""
    out: list[dict[str, Any]] = []

    def add(name: str, met: bool | None, figures: dict[str, Any], detail: str) -> None:
        out.append({"goal": name, "met": met, "figures": figures, "detail": detail})

    pg, sq = (_find(runs, "agent-16", b, "sessiondb") for b in ("postgresql", "sqlite"))
    name = f"agent-16: throughput >= {AGENT_SPEEDUP:g}x sessiondb-SQLite's, 0 errors"
    if pg and sq:
        ratio = _div(pg["throughput_per_s"], sq["throughput_per_s"])
        add(name, ratio >= AGENT_SPEEDUP and pg["errors"] == 0 and not pg["failed"],
            {"postgresql_per_s": pg["throughput_per_s"], "sqlite_per_s":
             sq["throughput_per_s"], "ratio": ratio, "errors": pg["errors"]},
            f"{pg['throughput_per_s']:.0f} vs {sq['throughput_per_s']:.0f} writes/s = "
            f"{ratio:.2f}x, {pg['errors']} errors")
    else:
        add(name, None, {}, "not run")

    cv = _find(runs, "convoy-row", "postgresql", "sessiondb")
    name = f"convoy-row: max <= {CONVOY_MAX_S:g} s, Jain >= {CONVOY_JAIN}"
    if cv:
        mx = cv["latency_s"]["max"]
        add(name, mx <= CONVOY_MAX_S and cv["jain"] >= CONVOY_JAIN and cv["errors"] == 0
            and not cv["failed"],
            {"max_s": mx, "jain": cv["jain"], "errors": cv["errors"]},
            f"max {_ms(mx)} ms, Jain {cv['jain']:.3f}, {cv['errors']} errors")
    else:
        add(name, None, {}, "not run")

    # The cost per write against plain psycopg: the library's one-call write
    # (append_message) and the scenarios' turn (a transaction() block of append_message
    # and update_token_counts) against the turn's work in the fewest statements a
    # hand-written client sends; and the turn against its own statements sent as they
    # are (what the library costs beyond its SQL). One closed-loop writer: the mean
    # time per write is 1 / throughput.
    for client, base, what in (
            ("sessiondb-append", "psycopg", "append_message against the fewest statements"),
            ("sessiondb", "psycopg", "a transaction() turn against the fewest statements"),
            ("sessiondb", "psycopg-same", "a transaction() turn against its own statements")):
        lib = _find(runs, "overhead", "postgresql", client)
        raw = _find(runs, "overhead", "postgresql", base)
        name = (f"overhead ({what}): per write <= {OVERHEAD_MAX:g}x plain psycopg")
        if not (lib and raw):
            add(name, None, {}, "not run")
            continue
        mean = _div(raw["throughput_per_s"], lib["throughput_per_s"])
        p50 = _div(lib["latency_s"]["p50"], raw["latency_s"]["p50"])
        add(name, mean <= OVERHEAD_MAX and lib["errors"] == 0 and not lib["failed"],
            {"mean_ratio": mean, "p50_ratio": p50, "p50_s": lib["latency_s"]["p50"],
             "psycopg_p50_s": raw["latency_s"]["p50"], "per_s": lib["throughput_per_s"],
             "psycopg_per_s": raw["throughput_per_s"]},
            f"{mean:.2f}x per write (mean: {lib['throughput_per_s']:.0f} vs "
            f"{raw['throughput_per_s']:.0f} writes/s), {p50:.2f}x at p50 "
            f"({_ms(lib['latency_s']['p50'])} vs {_ms(raw['latency_s']['p50'])} ms)")

    a64 = _find(runs, "agent-64", "postgresql", "sessiondb")
    name = "agent-64 (several processes, own pools): 0 errors, no pool exhaustion"
    if a64:
        pool = a64.get("pool", {})
        timeouts = pool.get("wait_timeouts", 0)
        add(name, a64["errors"] == 0 and timeouts == 0 and not a64["failed"]
            and a64["starved"] == 0,
            {"errors": a64["errors"], "pool_wait_timeouts": timeouts,
             "pool_waits": pool.get("waited", 0), "pool_warnings": a64["pool_warnings"],
             "throughput_per_s": a64["throughput_per_s"], "max_s": a64["latency_s"]["max"]},
            f"{a64['errors']} errors, {timeouts} pool wait timeouts, "
            f"{pool.get('waited', 0)} calls waited for a connection, "
            f"{a64['pool_warnings']} PoolWarnings, {a64['throughput_per_s']:.0f} writes/s, "
            f"max {_ms(a64['latency_s']['max'])} ms")
    else:
        add(name, None, {}, "not run")
    return out


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                      enumerate(zip(row, widths))) for row in rows]


def _pool(r: dict[str, Any]) -> str:
    pool = r.get("pool") or {}
    if not pool:
        return "-"
    return f"{pool.get('waited', 0)}/{pool.get('wait_timeouts', 0)}"


def table(doc: dict[str, Any]) -> str:
    """The readable report: versions and options, one table per scenario, the
    side-by-side summary, the goals."""
    h = doc["header"]
    pg = h["postgresql"]
    opts = {k: v for k, v in h["options"].items() if k != "scenarios"}
    lines = [
        f"sessiondb {h['sessiondb']} contention benchmark, SQLite and PostgreSQL - "
        f"{h['date']}",
        f"Python {h['python']}, apsw {h['apsw']} (SQLite {h['sqlite_apsw']}), PostgreSQL "
        f"{pg['server_version']}, psycopg {pg['psycopg']} ({pg['psycopg_impl']}, libpq "
        f"{pg['libpq']}), {h['cpus']} CPUs, {h['platform']}",
        "server settings: " + ", ".join(f"{k}={v}" for k, v in pg["settings"].items()),
        f"options: {opts}",
        "latency: ms per write, end to end (pool and lock waits included); pool: calls "
        "that waited for a connection / waits that timed out; load: the machine's 1-minute "
        f"load average when the run ended (at the start: {h.get('loadavg_start', 0):.1f})",
        "",
    ]
    cols = ("backend", "client", "procs", "commits", "/s", "p50", "p90", "p99", "p99.9",
            "max", "errors", "jain", "starved", "read p99", "pool", "load", "check")
    names: list[str] = []
    for r in doc["runs"]:
        if r["scenario"] not in names:
            names.append(r["scenario"])
    for name in names:
        runs = [r for r in doc["runs"] if r["scenario"] == name]
        desc = next((s.get("description", "") for s in h["options"]["scenarios"]
                     if s["name"] == name), "")
        lines.append(f"== {name} ({runs[0]['writers']} writers, {runs[0]['duration_s']:g} s"
                     f"{', one session' if runs[0].get('one_row') else ''}): {desc}")
        rows = [cols]
        for r in runs:
            lat = r["latency_s"]
            rows.append((
                r["backend"], r["client"], str(r["processes"]), str(r["commits"]),
                f"{r['throughput_per_s']:.0f}", _ms(lat["p50"]), _ms(lat["p90"]),
                _ms(lat["p99"]), _ms(lat["p99.9"]), _ms(lat["max"]), str(r["errors"]),
                f"{r['jain']:.3f}", str(r["starved"]),
                _ms(r["reader_poll_s"]["p99"]) if "reader_poll_s" in r else "-",
                _pool(r), f"{max(r.get('loadavg_1m') or [0]):.1f}",
                r["integrity"] + (f" LOST {r['lost_writes']}" if r["lost_writes"] else "")))
        lines.extend(_grid(rows))
        sq = _find(runs, name, "sqlite", "sessiondb")
        lib = _find(runs, name, "postgresql", "sessiondb")
        raw = _find(runs, name, "postgresql", "psycopg")
        ratios = []
        if sq and lib:
            ratios.append(f"postgresql/sqlite throughput "
                          f"{_div(lib['throughput_per_s'], sq['throughput_per_s']):.2f}x, "
                          f"max {_div(lib['latency_s']['max'], sq['latency_s']['max']):.2f}x")
        if lib and raw:
            ratios.append(f"sessiondb/psycopg throughput "
                          f"{_div(lib['throughput_per_s'], raw['throughput_per_s']):.2f}x, "
                          f"p50 {_div(lib['latency_s']['p50'], raw['latency_s']['p50']):.2f}x")
        if ratios:
            lines.append("  ratios: " + "; ".join(ratios))
        for r in runs:
            if r["error_samples"]:
                lines.append(f"  {r['backend']} {r['client']} errors, e.g.: "
                             f"{r['error_samples'][0]}")
            if r["pool_warnings"]:
                lines.append(f"  {r['backend']} {r['client']}: {r['pool_warnings']} "
                             "PoolWarning(s)")
            if r["failed"]:
                lines.append(f"  {r['backend']} {r['client']} FAILED: {r['failed']}")
        lines.append("")
    lines.extend(side_by_side(doc["runs"]))
    lines.append("")
    lines.append("goals (ratios within this run):")
    for g in doc.get("goals", []):
        verdict = {True: "MET", False: "NOT MET", None: "-"}[g["met"]]
        lines.append(f"  [{verdict}] {g['goal']}: {g['detail']}")
    return "\n".join(lines)


def side_by_side(runs: list[dict[str, Any]]) -> list[str]:
    """One line per scenario: sessiondb on SQLite, sessiondb on PostgreSQL and plain
    psycopg, writes/s and p99/max in ms."""
    rows = [("scenario", "sqlite /s", "p99", "max", "pg sessiondb /s", "p99", "max",
             "errors", "jain", "pg psycopg /s", "p99", "max", "pg/sqlite")]
    names: list[str] = []
    for r in runs:
        if r["scenario"] not in names:
            names.append(r["scenario"])
    for name in names:
        sq = _find(runs, name, "sqlite", "sessiondb")
        lib = _find(runs, name, "postgresql", "sessiondb")
        raw = _find(runs, name, "postgresql", "psycopg")

        def cells(r: dict[str, Any] | None, extra: bool = False) -> tuple[str, ...]:
            if r is None:
                return ("-",) * (5 if extra else 3)
            base = (f"{r['throughput_per_s']:.0f}", _ms(r["latency_s"]["p99"]),
                    _ms(r["latency_s"]["max"]))
            return base + ((str(r["errors"]), f"{r['jain']:.3f}") if extra else ())

        speed = (f"{_div(lib['throughput_per_s'], sq['throughput_per_s']):.2f}x"
                 if sq and lib else "-")
        rows.append((name, *cells(sq), *cells(lib, True), *cells(raw), speed))
    return ["side by side (writes/s; p99 and max in ms):", *_grid(rows)]
