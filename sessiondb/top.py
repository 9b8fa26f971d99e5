"""``sessiondb top`` and ``sessiondb stats``: who holds the write lock, who waits, since
when, and the figures of every process that has the store open.

A SQLite store's processes publish themselves in the process record
(:mod:`sessiondb.procs`); :func:`snapshot` reads it with the gate's queue, the WAL's size
and bound, the last WAL reset and the leases and claims per owner, :func:`frame` turns
that into the lines of a screen (pure), and :func:`live` redraws them every second with
``curses``. Rows come in blocking order: whoever holds the write lock first, then the
waiters, longest waiting first (the gate serves them in that order), then the readers in
a ``snapshot()`` block (they hold WAL resets back), longest first, then the idle.

A PostgreSQL store spans machines, so no file can hold its processes: there :func:`snapshot`
asks the server (``pg_stat_activity`` and ``pg_blocking_pids`` for every client of the
database, and ``pg_locks.waitstart``), which sees every host but none of the client-side
counters; ``stats`` on a URL stays the calling process's own figures and pool.

:func:`across_processes` turns ``SessionDB.stats()`` of the CLI's own instance (whose
write figures are its own, so zero) into the figures of the processes in the record.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from . import procs
from .backend import is_url
from .errors import ConfigurationError, SessionDBError
from .presence import require_store
from .store import SessionDB

__all__ = ["across_processes", "frame", "live", "open_store", "snapshot", "stats_text"]

KEYS = "q quit  p pause  space refresh"
_WRITE_FIGURES = ("writes", "failed_writes", "retries", "timeouts", "hold_timeouts",
                  "contended_writes", "lock_wait_max_s", "lock_hold_max_s")
_ORDER = {"holding": 0, "waiting": 1, "reading": 2, "idle": 3}
_PG_ACTIVITY = (
    "SELECT a.pid, a.application_name, coalesce(host(a.client_addr), 'local'), a.state, "
    "extract(epoch FROM now() - a.xact_start), extract(epoch FROM now() - a.backend_start), "
    "a.wait_event_type, a.wait_event, pg_blocking_pids(a.pid), "
    "extract(epoch FROM now() - (SELECT min(l.waitstart) FROM pg_locks l "
    "WHERE l.pid = a.pid AND NOT l.granted)), left(a.query, 120) "
    "FROM pg_stat_activity a WHERE a.datname = current_database() "
    "AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()")


def open_store(target: str | Path, progress: Any = None) -> SessionDB:
    """The store, opened to be looked at: on SQLite without a slot in the process record
    (the looker is not one of the processes it shows), and never created.

    :raises DatabaseOpenError: there is no store at ``target``.
    """
    require_store(target)
    if is_url(target):
        return SessionDB(str(target), progress=progress)
    return SessionDB(Path(target), progress=progress, procs=False)


# -- what there is to show -------------------------------------------------------------

def snapshot(db: SessionDB) -> dict[str, Any]:
    """Everything ``top`` shows, JSON-ready: ``backend``, ``path``, ``at`` (wall clock),
    ``rows`` (blocking order), ``totals``, ``owners`` (leases and claims per owner);
    SQLite also ``gate_queue``, ``wal_bytes``, ``wal_limit``, ``last_reset``,
    ``damaged_slots``, ``record_error``."""
    figures = db.stats()
    owners = figures["coordination"]["owners"]
    if db.backend == "postgresql":
        rows = _pg_rows(db)
        return {"backend": "postgresql", "path": str(db.path), "at": time.time(),
                "rows": rows, "owners": owners,
                "totals": {"processes": len(rows),
                           "holding": sum(r["state"] == "holding" for r in rows),
                           "waiting": sum(r["state"] == "waiting" for r in rows)}}
    path = Path(db.path)
    error = None
    try:
        record = procs.read_record(path)
    except (procs.ProcessRecordError, OSError) as exc:
        error = str(exc)
        record = procs.Record(str(procs.sidecar(path)), False, [], 0, None)
    rows = [r.as_dict() for r in record.rows]
    rows.sort(key=lambda r: min(_rank(r["state"], r["state_s"]),
                                _rank(r["reset_state"], r["reset_state_s"])))
    limits = [r["wal_limit"] for r in rows if r["wal_limit"]]
    try:
        wal = os.stat(f"{path}-wal").st_size
    except OSError:
        wal = 0
    return {"backend": "sqlite", "path": str(path), "at": time.time(), "rows": rows,
            "totals": procs.totals(record.rows), "owners": owners,
            "gate_queue": figures["gate_queue"], "wal_bytes": wal,
            "wal_limit": min(limits) if limits else None, "last_reset": record.last_reset,
            "damaged_slots": record.damaged, "record_error": error}


def _rank(state: str, lasted: float) -> tuple[int, float]:
    return _ORDER[state], -lasted


def _pg_rows(db: SessionDB) -> list[dict[str, Any]]:
    from .backend import fetch

    found = db._read(lambda conn: fetch(conn, _PG_ACTIVITY))
    blocking = {p for row in found for p in (row[8] or [])}
    rows = []
    for (pid, app, client, state, xact_s, conn_s, wait_type, wait, blocked_by, wait_s,
         query) in found:
        if blocked_by:
            shown, lasted = "waiting", float(wait_s or 0.0)
        elif pid in blocking:
            shown, lasted = "holding", float(xact_s or 0.0)
        else:
            shown, lasted = state or "?", float(xact_s or 0.0)
        rows.append({"pid": pid, "application": app, "client": client, "state": shown,
                     "state_s": lasted, "server_state": state, "connected_s": float(conn_s),
                     "wait": f"{wait_type}:{wait}" if wait_type else "",
                     "blocked_by": list(blocked_by or []), "query": query or ""})
    rows.sort(key=lambda r: (_ORDER.get(r["state"], 3), -r["state_s"]))
    return rows


# -- the screen --------------------------------------------------------------------------

def frame(snap: dict[str, Any], width: int = 120, height: int | None = None,
          footer: str = "") -> list[str]:
    """The lines of one screen (pure: a function of the snapshot)."""
    clock = time.strftime("%H:%M:%S", time.localtime(snap["at"]))
    title, room = f"sessiondb top: {snap['path']}", max(20, width - len(clock) - 2)
    if len(title) > room:  # keep the end of the path (the file's name) and the clock
        title = "sessiondb top: …" + snap["path"][-(room - 16):]
    lines = [title + clock.rjust(max(1, width - len(title)))]
    if snap["backend"] == "postgresql":
        lines += _pg_summary(snap) + [""] + _pg_table(snap["rows"])
    else:
        lines += _summary(snap) + [""] + _table(snap["rows"])
    lines += ["", _owners(snap["owners"])]
    if height is not None and len(lines) > height - 1:
        cut = len(lines) - (height - 2)
        lines = lines[:height - 2] + [f"... {cut} more line(s): a larger window shows them"]
    if footer:
        lines.append(footer)
    return [line[:width] for line in lines]


def _summary(snap: dict[str, Any]) -> list[str]:
    t = snap["totals"]
    queue = snap["gate_queue"]
    gate = "no gate" if queue is None else f"{queue} in the queue (holder included)"
    bound = f" of {_size(snap['wal_limit'])}" if snap["wal_limit"] else ""
    reset = snap["last_reset"]
    last = "none yet" if reset is None else (
        f"{time.strftime('%H:%M:%S', time.localtime(reset['at']))}, "
        f"{'ok' if reset['ok'] else 'FAILED'} in {_duration(reset['s'])} by pid {reset['pid']}")
    out = [f"write gate: {gate} | WAL {_size(snap['wal_bytes'])}{bound} | last WAL reset: "
           f"{last}",
           f"instances: {t['processes']} ({t['holding']} holding, {t['waiting']} waiting, "
           f"{t['reading']} reading) | "
           f"writes {t['writes']:,} | retries {t['retries']:,} | timeouts {t['timeouts']:,} | "
           f"longest wait {_duration(t['lock_wait_max_s'])} | "
           f"longest hold {_duration(t['lock_hold_max_s'])}"]
    if snap["record_error"]:
        out.append(f"process record unreadable: {snap['record_error']}")
    if snap["damaged_slots"]:
        out.append(f"{snap['damaged_slots']} slot(s) of live processes are damaged "
                   "(not shown)")
    return out


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["no process has the store open"]
    head = (f"{'PID':>7}  {'PROGRAM':<30} {'STATE':<8} {'FOR':>7} {'WRITES':>9} "
            f"{'RETRIES':>7} {'TIMEOUTS':>8} {'MAX WAIT':>8} {'MAX HOLD':>8}  OPENED")
    out = [head]
    for r in rows:
        opened = time.strftime("%H:%M:%S", time.localtime(r["opened_at"]))
        out.append(f"{r['pid']:>7}  {_fit(r['program'], 30)} {r['state']:<8} "
                   f"{_duration(r['state_s']) if r['state'] != 'idle' else '':>7} "
                   f"{r['writes']:>9,} {r['retries']:>7,} {r['timeouts']:>8,} "
                   f"{_duration(r['lock_wait_max_s']):>8} "
                   f"{_duration(r['lock_hold_max_s']):>8}  {opened}")
        if r["reset_state"] != "idle":
            out.append(f"{r['pid']:>7}  {_fit('  └ its WAL reset', 30)} "
                       f"{r['reset_state']:<8} {_duration(r['reset_state_s']):>7}")
    return out


def _pg_summary(snap: dict[str, Any]) -> list[str]:
    t = snap["totals"]
    return [f"clients of this database, every host (pg_stat_activity): {t['processes']} "
            f"({t['holding']} holding locks others wait for, {t['waiting']} waiting)",
            "write figures stay in each process: `sessiondb stats` shows this process's "
            "own and its pool"]


def _pg_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["no other client is connected to this database"]
    out = [f"{'PID':>7}  {'APPLICATION':<20} {'CLIENT':<15} {'STATE':<19} {'FOR':>7} "
           f"{'BLOCKED BY':<12} QUERY"]
    for r in rows:
        out.append(f"{r['pid']:>7}  {_fit(r['application'], 20)} {_fit(r['client'], 15)} "
                   f"{_fit(r['state'], 19)} {_duration(r['state_s']):>7} "
                   f"{_fit(','.join(map(str, r['blocked_by'])), 12)} "
                   f"{' '.join(r['query'].split())}")
    return out


def _owners(owners: dict[str, dict[str, int]] | None) -> str:
    if not owners:
        return "leases and claims by owner: none"
    return "leases and claims by owner: " + "; ".join(
        f"{name} {o['leases']} lease(s), {o['claims']} claim(s)" for name, o in owners.items())


def _fit(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return (text[:width - 1] + "…" if len(text) > width else text).ljust(width)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms" if seconds >= 0.0005 or not seconds else "<1ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


# -- live ------------------------------------------------------------------------------

def live(db: SessionDB, interval: float = 1.0) -> None:
    """Redraw :func:`frame` every ``interval`` seconds until q (or Ctrl-C); p pauses,
    space redraws at once. Errors reading the store are shown, not raised."""
    import curses

    def loop(screen: Any) -> None:
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal that cannot hide the cursor
        screen.timeout(max(50, int(interval * 1000)))
        paused, lines = False, []
        while True:
            height, width = screen.getmaxyx()
            if not paused or not lines:
                lines = _lines(db, width - 1, height, interval)  # the last column stays
                # empty: curses cannot write the bottom-right cell
            screen.erase()
            shown = lines[:-1] + [lines[-1].replace(KEYS, KEYS + ("  PAUSED" if paused else ""))]
            for y, line in enumerate(shown[:height]):
                try:
                    screen.addnstr(y, 0, line, max(1, width - 1))
                except curses.error:
                    pass  # the bottom-right cell
            screen.refresh()
            key = screen.getch()
            if key in (ord("q"), ord("Q"), 27):
                return
            if key in (ord("p"), ord("P")):
                paused = not paused

    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass
    except curses.error as exc:  # no terminfo for $TERM, or not a terminal at all
        raise ConfigurationError(f"cannot draw on this terminal ({exc}); use --once or "
                                 "--json") from exc


def _lines(db: SessionDB, width: int, height: int, interval: float) -> list[str]:
    footer = f"{KEYS}  (every {interval:g}s)"
    try:
        return frame(snapshot(db), width, height, footer)
    except SessionDBError as exc:  # a busy or vanished store: say so, try again later
        return [f"sessiondb top: {db.path}", "", f"cannot read the store: {exc}", "", footer]


def run(target: str | Path, *, interval: float = 1.0, once: bool = False,
        progress: Any = None, emit: Callable[[Any, Callable[[Any], str]], None]
        ) -> int:
    """The ``top`` command: one snapshot through ``emit`` (``--once``, ``--json``, or
    when stdout is not a terminal), else the live view."""
    with open_store(target, progress) as db:
        if once:
            emit(snapshot(db), lambda s: "\n".join(frame(s, _columns())))
        else:
            live(db, interval)
    return 0


def _columns() -> int:
    try:
        return max(80, os.get_terminal_size().columns)
    except OSError:
        return 132


# -- stats -----------------------------------------------------------------------------

def across_processes(figures: dict[str, Any], db_path: str | Path) -> dict[str, Any]:
    """``SessionDB.stats()`` of the CLI's own instance, its write and checkpoint figures
    replaced by those of every instance in the process record (summed; the longest wait
    and hold the largest), plus ``processes``, ``holding``, ``waiting``, ``gate_queue``,
    ``wal_limit`` and ``per_process`` (a row per instance, as ``top --json`` gives)."""
    record = procs.read_record(db_path)
    out = procs.totals(record.rows)  # processes, holding, waiting, reading, write figures
    out["checkpoint"] = {k: sum(getattr(r, k) for r in record.rows)
                         for k in ("passive_runs", "resets_ok", "resets_failed")}
    out["checkpoint"]["last_reset"] = record.last_reset
    limits = [r.wal_limit for r in record.rows if r.wal_limit]
    out["wal_bytes"] = figures["wal_bytes"]
    out["wal_limit"] = min(limits) if limits else None
    out["gate_queue"] = figures["gate_queue"]
    out.update((k, v) for k, v in figures.items() if k not in out and k != "procs"
               and not k.startswith(("lock_wait_", "lock_hold_")))
    out["damaged_slots"] = record.damaged
    out["per_process"] = [r.as_dict() for r in record.rows]
    return out


def stats_text(figures: dict[str, Any]) -> str:
    """``stats`` for people: the figures, then (SQLite) a row per process."""
    from .cli_text import figure, flatten, readable, table

    rows = figures.get("per_process")
    shown = {k: v for k, v in figures.items() if k != "per_process"}
    out = table(["figure", "value"], [[k, figure(v)] for k, v in flatten(readable(shown))])
    if rows is None:
        return out
    if not rows:
        return out + "\n\nno process has the store open"
    return out + "\n\n" + table(
        ["pid", "program", "state", "writes", "failed", "retries", "timeouts", "max wait",
         "max hold"],
        [[r["pid"], r["program"], r["state"], r["writes"], r["failed_writes"], r["retries"],
          r["timeouts"], _duration(r["lock_wait_max_s"]), _duration(r["lock_hold_max_s"])]
         for r in rows])
