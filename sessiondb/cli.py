"""The ``sessiondb`` command: one subcommand per library verb, each body open, call, print.

``--db PATH`` and ``--json`` work on every store command, before or after the subcommand
(``sessiondb list --db x --json``); PATH is a SQLite file or a ``postgresql://`` URL, as
is ``$SESSIONDB_PATH``. Without ``--json`` output is a readable table.

Exit status: 0 success; 1 nothing found (``show``, ``export --session``), problems found
(``doctor``), sessions not copied or not matching (``copy``) or a failed ``demo``; 2 bad
usage or an error from the library (one line on stderr, no traceback); 130 interrupted.

``prune`` is a dry run unless ``--yes`` is given: it reports how many sessions it would
delete (counted with the prune's own selection rules) and deletes nothing.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from . import (
    __version__, bench, cli_args, cli_text, copy, demo, doctor, jsonstream, outfile,
    records, top,
)
from .backend import is_url, mask
from .connection import ENV_PATH, default_path, process_alive
from .errors import SessionDBError
from .maintenance import Progress
from .presence import require_store
from .store import SessionDB

__all__ = ["main", "build_parser"]


# -- commands -------------------------------------------------------------------------

def cmd_path(args: argparse.Namespace) -> int:
    target = _target(args)
    if isinstance(target, str):  # a URL: whether a store is there needs a connection
        found = {"path": mask(target), "backend": "postgresql", "exists": None}
    else:
        found = {"path": str(target), "backend": "sqlite", "exists": target.exists()}
    _emit(args, found, lambda d: d["path"])
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    active = True if args.active else False if args.ended else None
    with _open(args) as db:
        rows = db.list_sessions(args.source, active=active, limit=args.limit,
                                after=args.after)
    when = cli_text.when
    _emit(args, rows, lambda rs: cli_text.table(
        ["id", "source", "title", "messages", "started", "ended", "preview"],
        [[r["id"], r["source"], r["title"] or "", r["message_count"], when(r["started_at"]),
          when(r["ended_at"]), r["preview"]] for r in rows],
        widths={"id": 36, "title": 30, "preview": 50}) or "no sessions")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as db:
        sid = db.resolve_session_id(args.id)
        data = db.export_session(sid) if sid else None
    if data is None:
        return _not_found(args.id)
    _emit(args, data, cli_text.show_text)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    with _open(args) as db:
        hits = db.search_messages(args.text, sources=args.source, roles=args.role,
                                  limit=args.limit)
    _emit(args, hits, lambda hs: cli_text.table(
        ["session", "role", "when", "snippet"],
        [[h["session_id"], h["role"], cli_text.when(h["timestamp"]), h["snippet"]]
         for h in hs],
        widths={"session": 36, "snippet": 80}) or "no matches")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.output:
        _refuse_store_file(args.output, args)
    write = jsonstream.write_jsonl if args.format == "jsonl" else jsonstream.write_json_list
    with _open(args) as db:
        if args.session:
            sid = db.resolve_session_id(args.session)
            one = db.export_session(sid) if sid else None
            if one is None:
                return _not_found(args.session)
            items: Iterator[dict[str, Any]] = iter([one])
            total = 1
        else:
            items, total = db.iter_export(args.source), db.session_count(args.source)
        counted = _Counted(items, "export", total, _progress(args))
        if not args.output:
            write(sys.stdout, counted)
            sys.stdout.flush()
            return 0
        _write_atomically(Path(args.output), lambda fh: write(fh, counted))
    summary = {"file": args.output, "sessions": counted.sessions,
               "messages": counted.messages}
    _emit(args, summary,
          lambda d: f"exported {d['sessions']} session(s), {d['messages']} message(s) "
                    f"to {d['file']}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with _input(args.file, args) as (source, size):
        reader = jsonstream.Reader(source)
        show = _progress(args)
        items = _first_checked(_input_errors(reader, args.file))  # before the store opens
        counted = _Counted(items, "read", None, None)

        def progress(p: Progress) -> None:
            # A stream has no total: estimate it from the share of the file read.
            if p.task == "import" and p.total is None and size and reader.bytes_read:
                total = round(counted.messages * size / reader.bytes_read)
                p = Progress(p.task, p.done, max(total, p.done), p.unit, p.elapsed_s)
            assert show is not None
            show(p)

        with _open(args, create=True) as db:  # the file is read beside the writes
            count = db.import_sessions(counted, skip_existing=args.skip_existing,
                                       progress=progress if show else None,
                                       read_in_thread=True)
    _emit(args, {"imported": count}, lambda d: f"imported {d['imported']} session(s)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    with _open(args) as db:
        # A dry run counts with the prune's own selection rules (nothing written).
        counted = db.prune_sessions(args.days, args.source, dry_run=not args.yes,
                                    progress=_progress(args))
    deleted, would = (counted, None) if args.yes else (0, counted)
    result = {"dry_run": not args.yes, "deleted": deleted, "would_delete": would,
              "days": args.days, "source": args.source}
    scope = f"ended {args.source + ' ' if args.source else ''}session(s) started over " \
            f"{args.days:g} day(s) ago"
    _emit(args, result, lambda d: f"deleted {d['deleted']} {scope}" if args.yes else
          f"would delete {d['would_delete']} {scope}; nothing was deleted "
          "(run again with --yes to delete them)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with top.open_store(_target(args), _progress(args)) as db:
        figures = db.stats()
        figures["sessions"] = db.session_count()
        figures["messages"] = db.message_count()
        if db.backend == "sqlite":
            figures = top.across_processes(figures, db.path)
    _emit(args, figures, top.stats_text)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    once = args.once or args.json or not sys.stdout.isatty()
    return top.run(_target(args), interval=args.interval, once=once,
                   progress=_progress(args), emit=lambda data, human: _emit(args, data, human))


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.prefix_index is not None and not args.repair:
        raise _InputError("--prefix-index goes with --repair (it rebuilds the index)")
    report = doctor.check(_target(args), repair=args.repair, deep=args.deep,
                          prefixes=args.prefix_index,
                          progress=_progress(args))
    _emit(args, report, cli_text.pg_doctor_text if report.get("backend") == "postgresql"
          else cli_text.doctor_text)
    return 0 if report["ok"] else 1


def cmd_copy(args: argparse.Namespace) -> int:
    try:
        report, code = copy.copy_store(args.src, args.dst, progress=_progress(args)), 0
    except (copy.CopyConflict, copy.CopyMismatch) as exc:
        assert exc.report is not None
        report, code = exc.report, 1
    _emit(args, report, cli_text.copy_text)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    say = None if args.json else (lambda line: print(line, flush=True))
    result = demo.run(args.db, workers=args.workers, messages=args.messages, progress=say)
    _emit(args, result, cli_text.demo_text)
    return 0 if result["ok"] else 1


def cmd_bench(args: argparse.Namespace) -> int:
    return bench.run(args)


# -- the parser -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation tools)."""
    # SUPPRESS keeps a subcommand's defaults from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print JSON for machines instead of a table")
    common = argparse.ArgumentParser(add_help=False, parents=[machine])
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                        help="database file or postgresql:// URL (default: "
                             "$SESSIONDB_PATH, else the user data dir's sessiondb/state.db)")
    parser = argparse.ArgumentParser(
        prog="sessiondb", parents=[common],
        description="Inspect and maintain a sessiondb store: a session store shared by "
                    "many processes, in a SQLite file or a PostgreSQL database.",
        epilog="Exit status: 0 ok; 1 not found, problems found, copy incomplete or demo "
               "failed; 2 usage or library error.")
    parser.add_argument("--version", action="version", version=f"sessiondb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, fn: Callable[[argparse.Namespace], int], summary: str,
                description: str | None = None, store: bool = True
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common if store else machine], help=summary,
                           description=description or summary)
        p.set_defaults(func=fn)
        return p

    command("path", cmd_path, "print the resolved database path (without opening it)")

    p = command("list", cmd_list, "list sessions, newest first")
    p.add_argument("--source", help="only sessions of this source")
    p.add_argument("--limit", type=cli_args.count, default=20,
                   help="at most N sessions (default 20)")
    p.add_argument("--after", metavar="ID",
                   help="the next page: the sessions after this one (the last id listed)")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--active", action="store_true", help="only sessions not ended")
    state.add_argument("--ended", action="store_true", help="only ended sessions")

    p = command("show", cmd_show, "print a session, then its messages")
    p.add_argument("id", help="session id, or a unique prefix of one")

    p = command("search", cmd_search, "full-text search over message content",
                "Full-text search over message content, best match first. Any text is "
                "accepted: quotes, AND/OR/NOT, '*' and ':' are never a syntax error.")
    p.add_argument("text", help="what to search for")
    p.add_argument("--source", action="append",
                   help="only sessions of this source (repeatable)")
    p.add_argument("--role", action="append",
                   help="only messages with this role, e.g. user (repeatable)")
    p.add_argument("--limit", type=cli_args.count, default=20,
                   help="at most N hits (default 20)")

    p = command("export", cmd_export, "export sessions with their messages as JSON",
                "Export sessions with their messages, oldest first, as a JSON list (the "
                "default) or as JSON Lines, one session per line; `import` reads both. "
                "The store is read a batch of sessions at a time, so memory stays small.")
    p.add_argument("--session", metavar="ID", help="only this session (id or unique prefix)")
    p.add_argument("--source", help="only sessions of this source")
    p.add_argument("--format", choices=("json", "jsonl"), default="json",
                   help="json: one JSON list (default); jsonl: JSON Lines")
    p.add_argument("--jsonl", dest="format", action="store_const", const="jsonl",
                   help="same as --format jsonl")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE (replaced atomically) instead of stdout")

    p = command("import", cmd_import, "import sessions from an export file",
                "Import sessions written by `export` (a JSON list or JSON Lines, told "
                "apart by the first character), streamed a batch at a time, in short "
                "write transactions while others keep writing. If it stops midway, what "
                "was imported stays, each session complete: rerun with --skip-existing. "
                "A missing store is created, once the first session reads and is valid.")
    p.add_argument("file", help="file written by `export` ('-' for stdin)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip sessions that already exist instead of failing")

    p = command("prune", cmd_prune, "delete old ended sessions (dry run unless --yes)",
                "Delete ended sessions started more than N days ago, with their messages, "
                "and give the space back. Active sessions are never pruned. Without "
                "--yes this only reports how many would be deleted.")
    p.add_argument("--days", type=cli_args.days, required=True, metavar="N",
                   help="prune sessions started more than N days ago")
    p.add_argument("--source", help="only sessions of this source")
    p.add_argument("--yes", action="store_true", help="really delete them")

    command("stats", cmd_stats, "print store figures: writes, lock waits, WAL size or "
            "connection pool, counts",
            "Print the store's figures plus session and message counts. On a SQLite "
            "file the write, wait and checkpoint figures are those of every process that "
            "has the store open now (from the process record, <db>.sessiondb-procs: "
            "counts summed, longest wait and hold the largest), with a row per process. "
            "On PostgreSQL they describe this process only, and pool.* is its "
            "connection pool.")

    p = command("top", cmd_top, "show live who holds the write lock, who waits and since "
                "when",
                "Show every process that has the store open, refreshed every second: the "
                "one holding the write lock first, then the waiters, longest waiting "
                "first, each with its pid, program, state and how long it has lasted, "
                "writes, retries, timeouts, longest wait and hold; the write gate's queue, "
                "the WAL's size and bound, the last WAL reset, and the leases and claims "
                "of each owner. Keys: q quit, p pause, space refresh. On PostgreSQL: the "
                "server's view of every client of the database, on every host "
                "(pg_stat_activity, pg_blocking_pids). Prints one screen and exits with "
                "--once or --json, or when stdout is not a terminal.")
    p.add_argument("--once", action="store_true", help="print one screen and exit")
    p.add_argument("--interval", type=cli_args.seconds, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")

    p = command("doctor", cmd_doctor, "check the store's health (exit 1 on problems)",
                "SQLite: check integrity (PRAGMA integrity_check), the full-text index, "
                "foreign keys and message counters; report versions, journal mode, schema "
                "version, WAL size and sidecar files. A missing file is reported, not "
                "created. PostgreSQL: report server, psycopg and libpq versions, schema "
                "version, counts, message counters, index health, connections and the "
                "timeout and keepalive settings as the server applies them (its defaults, "
                "and inside sessiondb's transactions), with advice where unsafe; a "
                "missing store is reported, not created. Exit 0 when healthy, 1 when "
                "problems were found.")
    p.add_argument("--repair", action="store_true",
                   help="SQLite: rebuild the full-text index from the messages (messages "
                        "untouched), in short steps while others keep writing; finishes one "
                        "cut short. PostgreSQL: recount wrong message counters in short "
                        "transactions, REINDEX CONCURRENTLY invalid indexes, create missing "
                        "ones")
    p.add_argument("--deep", action="store_true",
                   help="SQLite: compare the full-text index with the messages also on a "
                        "store of over 100,000 messages (stops writers meanwhile)")
    p.add_argument("--prefix-index", type=cli_args.lengths, metavar="N,N,...",
                   help="with --repair: rebuild with FTS5 prefix indexes of these lengths "
                        "(e.g. 2,3,4: fast prefix queries like dep*, a larger index); "
                        "'none' removes them")

    p = command("copy", cmd_copy, "copy every session from one store to another "
                "(SQLite or PostgreSQL, either way)",
                "Copy every session with its messages from SRC into DST, each a SQLite "
                "file or a postgresql:// URL (DST is created if missing). Streamed a chunk "
                "at a time in short transactions, so memory stays small and others keep "
                "writing; each chunk is read back from DST and its counts verified. Safe "
                "to rerun after an interruption: sessions already in DST with the same "
                "content are left as they are. A session in DST with other content (or "
                "whose title another session there holds) is skipped and reported. "
                "Exit 0 when everything was copied and verified, 1 when sessions were "
                "skipped or counts differ, 2 on errors (e.g. SRC and DST the same store).",
                store=False)
    p.add_argument("src", metavar="SRC", help="the store to copy from (file or URL; "
                                              "must exist, is only read)")
    p.add_argument("dst", metavar="DST", help="the store to copy into (file or URL; "
                                              "created if missing)")

    p = command("demo", cmd_demo, "several processes write one database at once",
                "Spawn worker processes that each create a session and append messages, "
                "while a gateway process creates sessions, all sharing one database; then "
                "print per-process commits, the longest lock wait and the integrity "
                "check. Without --db a temporary database is used and removed.")
    p.add_argument("--workers", type=cli_args.positive, default=4,
                   help="worker processes (default 4)")
    p.add_argument("--messages", type=cli_args.count, default=200,
                   help="messages each worker appends (default 200)")

    # Not a store verb: no --db (every run uses fresh files) and its --json takes a FILE.
    p = sub.add_parser("bench", help="run the multi-process contention benchmark",
                       description="Reproduce the SQLite convoy freeze with real processes "
                                   "(naive and seedfix strategies), then run the same work "
                                   "through sessiondb; print latency, fairness and WAL "
                                   "figures side by side. Each run uses a fresh database.")
    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises for library errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.db = getattr(args, "db", None)
        args.json = getattr(args, "json", False)
        return args.func(args)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (SessionDBError, _InputError) as exc:
        print(f"sessiondb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sessiondb: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sessiondb export | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


# -- helpers --------------------------------------------------------------------------

class _InputError(Exception):
    """A problem with a file the user named (not with the store): exit 2, one line."""


def _open(args: argparse.Namespace, create: bool = False) -> SessionDB:
    """The store, with a progress bar for work done while opening it (finishing the
    conversion of a hermes-agent file). Only ``import`` creates a missing store: the
    commands that read (and ``prune``, which has nothing to prune in none) refuse one
    and create nothing, so that a mistyped path is an error, not an empty result.

    :raises DatabaseOpenError: there is no store and ``create`` is false.
    """
    if not create:
        require_store(_target(args))
    return SessionDB(args.db, progress=_progress(args))


def _db_path(args: argparse.Namespace) -> Path:
    return Path(os.path.abspath(Path(args.db).expanduser() if args.db else default_path()))


def _target(args: argparse.Namespace) -> str | Path:
    """The store ``--db`` (else ``$SESSIONDB_PATH``, else the default) names: a URL, or
    an absolute file path."""
    given = args.db if args.db else os.environ.get(ENV_PATH)
    return given if is_url(given) else _db_path(args)


def _progress(args: argparse.Namespace) -> Callable[[Progress], None] | None:
    """A progress bar on stderr for long work (none with ``--json``): redrawn in place on
    a terminal, a line every few seconds otherwise."""
    if args.json:
        return None
    tty = sys.stderr.isatty()
    last = [0.0]
    ended: list[str | None] = [None]  # the task whose finished line was shown last

    def show(p: Progress) -> None:
        now = time.monotonic()
        finished = p.total is not None and p.done >= p.total
        # Unthrottled once when a task finishes (a total that is an estimate may be
        # passed, and every report after it is then "finished").
        if (not finished or ended[0] == p.task) and now - last[0] < (0.2 if tty else 5.0):
            return
        last[0], ended[0] = now, p.task if finished else None
        print(("\r" if tty else "") + _progress_line(p), end="" if tty else "\n",
              file=sys.stderr, flush=True)
        if tty and finished:
            print(file=sys.stderr)

    return show


def _progress_line(p: Progress) -> str:
    if p.total:
        share = min(1.0, p.done / p.total)
        bar = "#" * int(share * 30)
        eta = "" if p.eta_s is None else f", {_duration(p.eta_s)} left"
        return (f"{p.task:<8} [{bar:<30}] {share:4.0%} {p.done:,}/{p.total:,} {p.unit}"
                f" ({_duration(p.elapsed_s)}{eta})")
    return f"{p.task:<8} {p.done:,} {p.unit} ({_duration(p.elapsed_s)})"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        print(human(data))


def _not_found(prefix: str) -> int:
    print(f"sessiondb: no session matches {prefix!r} (or several do: give more of the id)",
          file=sys.stderr)
    return 1


def _refuse_store_file(name: str, args: argparse.Namespace) -> None:
    """Never read or write the store's own files with open(): that would clobber the
    database, or (on close) drop this process's SQLite locks on it."""
    if isinstance(_target(args), str):
        return  # a PostgreSQL store has no files here
    db = _db_path(args)
    own = {str(db), f"{db}-wal", f"{db}-shm", f"{db}-journal"}
    if os.path.realpath(name) in {os.path.realpath(p) for p in own}:
        raise _InputError(f"{name} is a file of the database itself; choose another file")


@contextmanager
def _input(name: str, args: argparse.Namespace) -> Iterator[tuple[IO[Any], int | None]]:
    """The file to import, open for reading in binary (decoded by the reader), and its
    size when it is a regular file (for the progress estimate)."""
    if name == "-":
        yield getattr(sys.stdin, "buffer", sys.stdin), None
        return
    _refuse_store_file(name, args)
    try:
        fh = open(name, "rb")
    except OSError as exc:
        raise _InputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    with fh:
        size = os.fstat(fh.fileno()).st_size
        yield fh, size if size > 0 else None


def _first_checked(items: Iterator[Any]) -> Iterator[Any]:
    """``items``, with the first one read and its values validated now: an input that
    is not an export, or whose first session has a value the store would refuse, then
    fails before the store is opened, and an import into a new path leaves no empty
    store behind. (Removing the store the import created was rejected: nothing but
    SQLite deletes a database's files.) What goes wrong later (bad JSON further on, a
    session already in the store) is found by the import, with the store open.

    :raises InvalidArgument, InvalidArgumentType: the first session is invalid.
    """
    first = list(itertools.islice(items, 1))
    for item in first:
        records.import_session(item)
    return itertools.chain(first, items)


def _input_errors(items: Iterable[Any], name: str) -> Iterator[Any]:
    """``items``, with a bad file or a read error reported as the user's input problem."""
    try:
        yield from items
    except jsonstream.ExportFormatError as exc:
        raise _InputError(f"{name} is not a JSON export: {exc}") from exc
    except OSError as exc:
        raise _InputError(f"cannot read {name}: {exc.strerror or exc}") from exc


class _Counted:
    """Iterates over sessions, counting them and their messages, and reporting progress
    (task ``task``, unit sessions) as it goes."""

    def __init__(self, items: Iterable[Any], task: str, total: int | None,
                 progress: Callable[[Progress], None] | None) -> None:
        self._items, self._task, self._total, self._progress = items, task, total, progress
        self.sessions = self.messages = 0

    def __iter__(self) -> Iterator[Any]:
        started = time.monotonic()
        for item in self._items:
            self.sessions += 1
            messages = item.get("messages") if isinstance(item, dict) else None
            self.messages += len(messages) if isinstance(messages, list) else 0
            yield item
            if self._progress is not None:
                self._progress(Progress(self._task, self.sessions, self._total, "sessions",
                                        time.monotonic() - started))


def _write_atomically(path: Path, write: Callable[[jsonstream.TextSink], None]) -> None:
    """Write through ``write`` into a temporary file next to ``path``, synced as it grows
    and at the end (:mod:`sessiondb.outfile`), then rename it over ``path``: readers see
    the old file or the whole new one, never a part, after a power cut too. The temporary
    files of earlier writes to ``path`` that were killed are removed first."""
    _sweep_temporary(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", buffering=1 << 20) as fh:
            synced = outfile.SyncedText(fh)
            write(synced)
            synced.sync(last=True)
        outfile.replace_synced(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _InputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


#: Seconds a temporary file of a dead process must have been left unwritten before it
#: is removed (its pid could be another host's, on a shared directory, still writing).
STALE_TEMPORARY = 60.0


def _sweep_temporary(path: Path) -> None:
    """Remove ``.NAME.PID.tmp`` files next to ``path`` left by a write that was killed
    (SIGKILL, or SIGTERM, whose default action runs no cleanup): the pid no longer
    runs and the file has not changed for :data:`STALE_TEMPORARY` seconds."""
    prefix, now = f".{path.name}.", time.time()
    for left in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = left.name[len(prefix):-len(".tmp")]
        try:
            if pid.isdigit() and not process_alive(int(pid)) and \
                    now - left.stat().st_mtime > STALE_TEMPORARY:
                left.unlink()
        except OSError:
            pass  # gone meanwhile, or not ours to remove

