"""The readable table of the scale benchmark (:mod:`sessiondb.bench.scale`)."""

from __future__ import annotations

from typing import Any

_MB = 1e6


def _ms(x: float) -> str:
    return f"{x * 1000:.2f}" if x < 0.01 else f"{x * 1000:.1f}" if x < 10 else f"{x * 1000:.0f}"


def _mb(n: int | float) -> str:
    return f"{n / _MB:,.1f}"


def _grid(rows: list[tuple[str, ...]], left: int = 1) -> list[str]:
    """Rows as aligned columns: the first ``left`` to the left, the others to the right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def _reads(title: str, figures: dict[str, Any], extra: str) -> list[str]:
    """One row per shape of a ``{name: {"p50_ms", "p99_ms", "max_ms", ...}}`` dict;
    ``extra`` names one more figure to show (``hits``, ``cpu_p99_ms``)."""
    rows = [("shape", "p50 ms", "p99 ms", "max ms", extra.replace("_ms", " ms"))]
    for name, f in figures.items():
        more = f.get(extra)
        rows.append((name, f"{f['p50_ms']:.2f}", f"{f['p99_ms']:.2f}",
                     f"{f['max_ms']:.2f}", "-" if more is None else f"{more:,.1f}"))
    return [title, *_grid(rows), ""]


def _tasks(tasks: dict[str, Any]) -> str:
    """The last progress report of each task: "index 90,000/90,000 messages by 8.3 s"."""
    return ", ".join(f"{t['task']} {t['done']:,}" + (f"/{t['total']:,}" if t["total"] else "")
                     + f" {t['unit']} by {t['elapsed_s']:.1f} s" for t in tasks.values())


def _writer(w: dict[str, Any]) -> tuple[str, ...]:
    lat = w["latency_s"]
    return (f"{w['calls']:,}", _ms(lat["p50"]), _ms(lat["p99"]), _ms(lat["max"]),
            str(w["errors"]))


def _maintenance(m: dict[str, Any]) -> list[str]:
    rows = [("operation", "result", "seconds", "w.calls", "w.p50 ms", "w.p99 ms",
             "w.max ms", "w.errors")]
    notes: list[str] = []

    def row(name: str, result: str) -> None:
        if name in m:
            op = m[name]
            rows.append((name, "FAILED" if op.get("error") else result,
                         f"{op['duration_s']:.1f}", *_writer(op["writer"])))
            if op.get("error"):
                notes.append(f"  {name} FAILED: {op['error']}")
            tasks = (op.get("progress") or {}).get("tasks") or {}
            if tasks:
                notes.append(f"  {name}, as its progress reported: " + _tasks(tasks))
            if op["writer"]["error_samples"]:
                notes.append(f"  {name}: writer errors, e.g. {op['writer']['error_samples'][0]}")

    row("rebuild_search_index", "rebuilt")
    if "export" in m:
        e = m["export"]
        row("export", f"{e.get('messages', 0):,} messages")
        if "peak_rss_bytes" in e:
            notes.append(f"  export: peak RSS {_mb(e['peak_rss_bytes'])} MB (after opening "
                         f"the store: {_mb(e['baseline_rss_bytes'])} MB), JSON Lines file "
                         f"{_mb(e['file_bytes'])} MB")
    if "import" in m:
        i = m["import"]
        row("import", f"{i.get('imported', 0):,} sessions")
        if "peak_rss_bytes" in i:
            phase = ((i.get("progress") or {}).get("tasks") or {}).get("import") or {}
            rows_phase = ""
            if phase.get("unit") == "messages" and phase.get("elapsed_s"):
                rows_phase = (f"; rows phase (JSON decoding included, beside the appender) "
                              f"{phase['done'] / phase['elapsed_s']:,.0f} messages/s")
            notes.append(f"  import: peak RSS {_mb(i['peak_rss_bytes'])} MB (after opening "
                         f"the store: {_mb(i['baseline_rss_bytes'])} MB), "
                         f"{i.get('messages_per_s', 0):,.0f} messages/s{rows_phase}")
    if "round_trip" in m:
        r = m["round_trip"]
        if "sessions" in r:
            notes.append(f"  round trip: {'equal' if r['equal'] else 'NOT EQUAL'}: sessions "
                         f"{r['sessions'][0]:,} / {r['sessions'][1]:,}, messages "
                         f"{r['messages'][0]:,} / {r['messages'][1]:,}, "
                         f"{r['sampled_equal']} of {r['sampled']} sampled sessions equal")
        else:
            notes.append("  round trip: NOT COMPARED")
    if "prune_sessions" in m:
        p = m["prune_sessions"]
        row("prune_sessions", f"{p.get('pruned') or 0:,} sessions")
        b, a = p["sizes_before"], p["sizes_after"]
        notes.append(f"  prune_sessions(older_than_days={p['older_than_days']:.1f}): "
                     f"{p.get('pruned') or 0:,} pruned, {p['expected']:,} expected; file "
                     f"{_mb(b['db_bytes'])} MB ({_mb(b['free_bytes'])} MB free inside) -> "
                     f"{_mb(a['db_bytes'])} MB ({_mb(a['free_bytes'])} MB free inside)")
    if "reclaim_space" in m:
        r = m["reclaim_space"]
        row("reclaim_space", f"{_mb(r['given_back_bytes'])} MB back")
        notes.append(f"  reclaim_space: file {_mb(r['sizes_after']['db_bytes'])} MB, free "
                     f"inside {_mb(r['sizes_after']['free_bytes'])} MB, given back "
                     f"{_mb(r['given_back_bytes'])} MB")
    if "hermes_conversion" in m:
        h = m["hermes_conversion"]
        row("hermes_conversion", "converted" if h.get("converted") else "NOT converted")
        notes.append(f"  hermes_conversion: a hermes-agent state.db of "
                     f"{h['built']['messages']:,} messages ({_mb(h['built']['file_bytes'])} MB,"
                     f" built in {h['built']['duration_s']:.1f} s); the writer is hermes-agent"
                     f"'s own (raw SQL, 1 s busy timeout, 15 attempts); "
                     f"{h['lost_writes']} acknowledged writes lost")
    return ["== maintenance, each while another process appends every 5-10 ms (w. = that "
            "writer's calls during the operation)", *_grid(rows, left=2), *notes, ""]


def table(doc: dict[str, Any]) -> str:
    """The human-readable report: header, build, reads, maintenance, memory."""
    h = doc["header"]
    lines = [
        f"sessiondb {h['sessiondb']} scale benchmark - {h['date']}",
        f"Python {h['python']}, apsw {h['apsw']} (SQLite {h['sqlite_apsw']}), "
        f"{h['cpus']} CPUs, {h['platform']}",
        f"options: {h['options']}",
        "",
    ]
    for run in doc["runs"]:
        lines.append(f"== build: {run['messages']:,} messages in {run['sessions']:,} sessions"
                     f" of 50")
        ingest = run.get("ingest", {})
        if "import" in ingest:
            i = ingest["import"]
            lines.append(f"  import_sessions: {i['messages']:,} messages in "
                         f"{i['duration_s']:.1f} s: {i['messages_per_s']:,.0f} messages/s "
                         f"(generating the data, {i['generate_s']:.1f} s, left out; "
                         f"{i['wall_messages_per_s']:,.0f} with it)")
            tasks = i["progress"].get("tasks", {})
            if len(tasks) > 1:
                lines.append("    as its progress reported: " + _tasks(tasks))
            if "rows_messages_per_s" in i:
                lines.append(f"    rows phase (the rows in, before the index catch-up): "
                             f"{i['rows_messages_per_s']:,.0f} messages/s (generating the "
                             f"data left out; {i['messages'] / i['rows_s']:,.0f} with it)")
        if "transaction" in ingest:
            t = ingest["transaction"]
            lines.append(f"  transaction() of 50 append_message: {t['messages']:,} messages"
                         f" in {t['duration_s']:.1f} s: {t['messages_per_s']:,.0f} messages/s")
        if ingest.get("optimize"):
            o = ingest["optimize"]
            lines.append(f"  optimize_search_index: {o['pages']:,} pages merged in "
                         f"{o['duration_s']:.1f} s")
        if "store" in run:
            s = run["store"]
            lines.append(f"  store: {s['sessions']:,} sessions, {s['messages']:,} messages, "
                         f"file {_mb(s['db_bytes'])} MB, WAL {_mb(s['wal_bytes'])} MB")
        lines.append("")
        if "search" in run:
            shapes = run["search"]["shapes"]
            n = next(iter(shapes.values()))["n"] if shapes else 0
            lines += _reads(f"== search_messages, {n} timed calls per shape",
                            shapes, "hits")
            fractions = run["search"].get("terms", {}).get("doc_fraction", {})
            if fractions:
                lines[-1:-1] = ["  words (share of messages): " + ", ".join(
                    f"{w} {f:.2%}" for w, f in fractions.items())]
        if "listing" in run:
            calls = run["listing"]["calls"]
            n = next(iter(calls.values()))["n"] if calls else 0
            lines += _reads(f"== listing, counts, pages, {n} timed calls each", calls,
                            "cpu_p99_ms")
        if "maintenance" in run:
            lines += _maintenance(run["maintenance"])
        if "store_after" in run:
            s = run["store_after"]
            lines.append(f"== after: {s['sessions']:,} sessions, {s['messages']:,} messages,"
                         f" file {_mb(s['db_bytes'])} MB, WAL {_mb(s['wal_bytes'])} MB")
        lines.append(f"== benchmark process: peak RSS {_mb(run['rss']['peak_bytes'])} MB; "
                     f"{run['duration_s']:.0f} s in all")
        if run["failed"]:
            lines.append(f"FAILED: {run['failed']}")
    return "\n".join(lines)
