"""What the ``sessiondb`` command prints for people: tables, and the reports of doctor,
copy and demo as lines (``--json`` prints the data itself). Pure functions of the data."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

__all__ = ["copy_text", "demo_text", "doctor_text", "figure", "flatten", "pg_doctor_text",
           "readable", "show_text", "table", "when"]


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


def _cell(value: Any, width: int | None) -> str:
    text = " ".join(str("" if value is None else value).split())  # one line
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def table(headers: list[str], rows: list[list[Any]], widths: dict[str, int] | None = None
           ) -> str:
    """Left-aligned columns (numbers right-aligned); '' when there are no rows."""
    if not rows:
        return ""
    widths = widths or {}
    cells = [[_cell(v, widths.get(h)) for h, v in zip(headers, row)] for row in rows]
    size = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows)
               for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(size[i]) if numeric[i] else v.ljust(size[i])
                         for i, v in enumerate(values)).rstrip()

    return "\n".join([line(headers), line(["-" * s for s in size])] + [line(r) for r in cells])


def flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
    return str(value)


def _bytes(n: int | None) -> str:
    return "?" if n is None else f"{n:,} bytes"


def show_text(s: dict[str, Any]) -> str:
    skip = {"messages", "system_prompt"}
    fields = [(k, v) for k, v in s.items() if k not in skip and v not in (None, "", {})]
    out = [f"{k:<20} {when(v) if k in ('started_at', 'ended_at') else v}" for k, v in fields]
    if s.get("system_prompt"):
        out += ["", "system prompt:", s["system_prompt"]]
    out.append("")
    for m in s["messages"]:
        tools = f" tool={m['tool_name']}" if m.get("tool_name") else ""
        calls = f" tool_calls={json.dumps(m['tool_calls'])}" if m.get("tool_calls") else ""
        out.append(f"--- #{m['id']} {m['role']}{tools}  {when(m['timestamp'])}{calls}")
        if m.get("content"):
            out.append(m["content"])
    if not s["messages"]:
        out.append("(no messages)")
    return "\n".join(out)


def doctor_text(r: dict[str, Any]) -> str:
    v = r["versions"]
    rows = [
        ("versions", f"sessiondb {v['sessiondb']}, SQLite {v['sqlite']}, apsw {v['apsw']}, "
                     f"Python {v['python']}"),
        ("file", "missing" if not r["exists"] else _bytes(r["db_bytes"])),
        ("opened", "ok" if r["opened"] else f"no: {r['open_error'] or 'not attempted'}"),
        ("schema version", "?" if r["schema_version"] is None else
         f"{r['schema_version']} (this sessiondb knows up to {r['schema_supported']})"),
        ("filesystem", _filesystem(r.get("filesystem") or {})),
    ]
    if r["opened"]:
        rows += [
            ("application id", f"0x{r['application_id'] & 0xFFFFFFFF:08x}"),
            ("journal mode", r["journal_mode"]),
            ("pages", f"{r['page_count']} of {r['page_size']} bytes, "
                      f"{r['freelist_count']} free"),
            ("write gate", r["gate"]),
            ("contents", f"{r['sessions']} sessions, {r['messages']} messages"),
        ]
    rows.append(("WAL size", _bytes(r["wal_bytes"])))
    rows.append(("sidecar files", ", ".join(f"{s['name']} ({s['bytes']:,} bytes)"
                                            for s in r["sidecars"]) or "none"))
    if r["opened"]:
        if r["repaired"] is not None:
            rows.append(("repaired", "rebuilt the full-text index (it was: "
                                     f"{r['repaired']['fts_index_before']})"))
        rows += [("integrity", r["integrity"]), ("full-text index", r["fts_index"]),
                 ("foreign keys", r["foreign_keys"]), ("counters", r["counters"])]
    out = [f"sessiondb doctor: {r['path']}"]
    out += [f"  {k:<17}{'not checked' if val is None else val}" for k, val in rows]
    if r["ok"]:
        out.append("healthy")
    else:
        out.append(f"{len(r['problems'])} problem(s):")
        out += [f"  - {p}" for p in r["problems"]]
    return "\n".join(out)


def _filesystem(fs: dict[str, Any]) -> str:
    """E.g. ``ext4 (magic 0xef53) at / from /dev/vda: safe, a local filesystem``."""
    if not fs:
        return "not examined"
    where = "".join(f" {label} {fs[key]}" for label, key in (("at", "mount_point"),
                                                              ("from", "source"))
                    if fs.get(key) and fs[key] not in ("none", fs["type"]))
    magic = f" (magic {fs['magic']})" if fs.get("magic") else ""
    return f"{fs['type']}{magic}{where}: {fs['verdict']}, {fs['reason']}"


def readable(figures: dict[str, Any]) -> dict[str, Any]:
    """Stats for people: PostgreSQL's version number as text."""
    if isinstance(figures.get("server_version"), int):
        figures = dict(figures, server_version=_pg_version(figures["server_version"]))
    return figures


def _pg_version(number: int) -> str:
    return (f"{number // 10000}.{number % 100}" if number >= 100000
            else f"{number // 10000}.{number // 100 % 100}.{number % 100}")


def pg_doctor_text(r: dict[str, Any]) -> str:
    v, conns = r["versions"], r["connections"]
    rows = [("versions", f"sessiondb {v['sessiondb']}, PostgreSQL {v.get('server', '?')}, "
                         f"psycopg {v['psycopg']} (libpq {v['libpq']}), Python {v['python']}"),
            ("connected", "yes" if r["connected"] else "no"),
            ("schema version", "?" if r["schema_version"] is None else
             f"{r['schema_version']} (this sessiondb knows up to {r['schema_supported']})")]
    if r["opened"]:
        indexes = r["indexes"]
        rows += [
            ("contents", f"{r['sessions']:,} sessions, {r['messages']:,} messages"),
            ("counters", r["counters"]),
            ("indexes", f"{len(indexes)}, {_size(sum(i['bytes'] for i in indexes))}: "
                        + ("all valid and ready" if r["index_health"] == "ok"
                           else str(r["index_health"]))),
            ("tables", "; ".join(f"{t['name']} {t['live_rows']:,} live / {t['dead_rows']:,} "
                                 f"dead rows, {_size(t['bytes'])}" for t in r["tables"]
                                 if t["name"] in ("sessions", "messages"))),
        ]
    if conns.get("max_connections"):
        rows.append(("connections", f"{conns['in_use']} in use (doctor's own included) of "
                                    "max_connections "
                                    f"{conns['max_connections']} ({conns['reserved']} "
                                    f"reserved), {conns['sessiondb']} of them sessiondb's; "
                                    f"pool_size {conns.get('pool_size', '?')} per SessionDB"))
    if r["client"]:
        c = r["client"]
        rows.append(("client", f"{c.get('transport')}, keepalives idle "
                               f"{c.get('keepalives_idle', '-')}s, interval "
                               f"{c.get('keepalives_interval', '-')}s, count "
                               f"{c.get('keepalives_count', '-')}"))
    if r["repaired"]:
        done = r["repaired"]
        rows.append(("repaired", f"{done['counters_fixed']} counter(s) recounted; "
                                 f"reindexed: {', '.join(done['reindexed']) or 'none'}; "
                                 f"created: {', '.join(done['created']) or 'none'}; "
                                 f"dropped: {', '.join(done['dropped']) or 'none'}"))
    out = [f"sessiondb doctor: {r['path']} (schema {r['schema']})"]
    out += [f"  {k:<17}{'not checked' if val is None else val}" for k, val in rows]
    if r["settings"]:
        out += ["", table(["setting", "server default", "sessiondb writes", "sessiondb reads"],
                           [[name, s.get("server"), s.get("write") or "-",
                             s.get("read") or "-"] for name, s in r["settings"].items()])]
    if r["advice"]:
        out += ["", "advice:"] + [f"  - {a}" for a in r["advice"]]
    out.append("")
    if r["ok"]:
        out.append("healthy")
    else:
        out.append(f"{len(r['problems'])} problem(s):")
        out += [f"  - {p}" for p in r["problems"]]
    return "\n".join(out)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def copy_text(r: dict[str, Any]) -> str:
    out = [f"copy {r['src']} -> {r['dst']} ({r['elapsed_s']:.1f}s)",
           f"  read from SRC      {r['sessions']:,} sessions, {r['messages']:,} messages",
           f"  copied now         {r['copied']:,} sessions, {r['copied_messages']:,} messages",
           f"  already in DST     {r['present']:,} sessions (same content, left as they were)",
           f"  skipped            {r['skipped_count']:,} sessions",
           "  verified           " + (
               "yes: every copied session read back from DST with its messages"
               if r["verified"] else f"NO: {len(r['differences'])} difference(s)"),
           f"  DST now holds      {r['dst_sessions']:,} sessions, "
           f"{r['dst_messages']:,} messages"]
    out += [f"  - skipped {s['id']}: {s['reason']}" for s in r["skipped"]]
    if r["skipped_count"] > len(r["skipped"]):
        out.append(f"  - ... and {r['skipped_count'] - len(r['skipped']):,} more skipped")
    out += [f"  - differs: {line}" for line in r["differences"]]
    out.append("ok" if r["verified"] and not r["skipped_count"] else "INCOMPLETE")
    return "\n".join(out)


def demo_text(d: dict[str, Any]) -> str:
    rows = [[p["name"], p.get("pid") or "", p.get("writes", ""), p.get("retries", ""),
             f"{p['lock_wait_max_s'] * 1000:.1f} ms" if "lock_wait_max_s" in p else "",
             p.get("error") or ("ok" if p["exitcode"] == 0 else f"exit {p['exitcode']}")]
            for p in d["processes"]]
    out = [table(["process", "pid", "commits", "retries", "longest wait", "result"], rows), ""]
    rate = d["total_writes"] / d["elapsed_s"] if d["elapsed_s"] else 0.0
    out += [
        f"total writes:      {d['total_writes']} in {d['elapsed_s']:.2f}s "
        f"({rate:,.0f} commits/s across processes)",
        f"longest lock wait: {d['longest_wait_s'] * 1000:.1f} ms ({d['longest_wait_process']})",
        f"messages:          {d['messages_found']}/{d['messages_expected']} present, "
        f"counters {'exact' if d['counters_exact'] else 'WRONG'}; "
        f"{d['gateway_sessions']} gateway sessions",
        f"integrity:         {d['integrity']}; full-text index: {d['fts_index']}",
    ]
    out += [f"problem: {p}" for p in d["problems"]]
    out.append(f"database:          {d['path']}" if d["kept"] else
               "database:          temporary, removed (pass --db PATH to keep it)")
    out.append("ok" if d["ok"] else "FAILED")
    return "\n".join(out)
