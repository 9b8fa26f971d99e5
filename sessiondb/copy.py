"""Moving a store: copy every session with its messages from one store to another,
SQLite or PostgreSQL in either direction, streamed, verified, and safe to rerun.

:func:`copy_store` reads the source with :meth:`~sessiondb.SessionDB.iter_export` (a batch
of sessions at a time, each batch in one short snapshot) and writes it a *chunk* at a
time (about :data:`CHUNK_ROWS` messages) with
:meth:`~sessiondb.SessionDB.import_sessions` (short write transactions, a session always
with all its messages), so memory is bounded by a chunk, whatever the size of the store.

For each chunk, before writing, it looks in the destination for the chunk's sessions:

- a session already there with the same content (a run that was killed, then rerun) is
  left as it is and counted as ``present``;
- a session already there with other content (written to since, or another store's
  session of the same id) is skipped and reported in ``skipped``, as is a session whose
  title another session of the destination holds; nothing of the destination is ever
  overwritten;
- a session the destination refuses (PostgreSQL text cannot hold U+0000, which SQLite
  stores) is skipped and reported with the reason, and so are its children;
- a session whose parent is neither in the destination nor in the chunk waits for a
  later chunk (exports list sessions oldest first, so a parent comes later only when it
  started after its child); still waiting at the end, it is skipped.

After each chunk is written, it is *verified*: every session of the chunk that was
copied (or found present) is read back from the destination, and its message rows and
its ``message_count`` must equal the number of messages read from the source. The
comparison excludes message ids: an import keeps them where free, and gives a session
new ones, in the same order, where another session of the destination has them.

Rerunning after a kill finishes the job: what was committed is whole sessions, found
``present`` on the rerun. Sessions written to the source after the copy read them are
not copied; a rerun reports them in ``skipped`` (they differ now): stop the writers of
the source for an exact move.

Errors (under :class:`~sessiondb.errors.SessionDBError`)::

    CopyError               the copy did not do all that was asked (``.report``)
    ├── SameStoreError      source and destination are one store: nothing was done
    ├── CopyConflict        sessions were skipped (``report["skipped"]``), others copied
    └── CopyMismatch        the destination does not hold what was read
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypedDict

from . import export, records
from .backend import Conn, is_url
from .errors import (
    IntegrityViolation, InvalidArgument, InvalidArgumentType, SessionDBError,
)
from .maintenance import Progress, ProgressCallback, check_progress
from .presence import require_store
from .store import SessionDB

__all__ = ["CopyConflict", "CopyError", "CopyMismatch", "CopyReport", "SameStoreError",
           "copy_store"]

#: Rows (messages plus one per session) and characters of text per chunk: what is held
#: in memory at once (the source's chunk, its validated rows, and on a rerun the
#: destination's copies of the sessions already there).
CHUNK_ROWS = 10_000
CHUNK_CHARS = 16_000_000
#: Entries kept in the report's ``skipped`` and ``differences`` lists (all are counted).
REPORT_LIMIT = 100

# What the destination may refuse of one session while it takes the others.
_REFUSED = (InvalidArgument, InvalidArgumentType, IntegrityViolation)
# Session fields the import derives from the messages rather than copying them.
_DERIVED = ("message_count", "tool_call_count", "messages")


class CopyError(SessionDBError):
    """A copy that did not do all that was asked.

    :ivar report: the :class:`CopyReport` of what it did (None when nothing was done).
    """

    def __init__(self, message: str, report: "CopyReport | None" = None) -> None:
        super().__init__(message)
        self.report = report


class SameStoreError(CopyError):
    """Source and destination are the same store; nothing was read or written."""


class CopyConflict(CopyError):
    """Some sessions were skipped (``report["skipped"]``: each ``id`` and ``reason``);
    every other session was copied and verified."""


class CopyMismatch(CopyError):
    """After the copy, the destination does not hold what was read from the source.

    :ivar differences: one line per session that differs (the first
        :data:`REPORT_LIMIT`).
    """

    def __init__(self, message: str, report: "CopyReport", differences: list[str]) -> None:
        super().__init__(message, report)
        self.differences = differences


class CopyReport(TypedDict):
    """What :func:`copy_store` did.

    :ivar src, dst: the stores (URLs without their password).
    :ivar src_backend, dst_backend: ``"sqlite"`` or ``"postgresql"``.
    :ivar sessions, messages: sessions and messages read from the source.
    :ivar copied, copied_messages: sessions (and their messages) written by this run.
    :ivar present: sessions that were in the destination already, with the same content.
    :ivar skipped: ``{"id", "reason"}`` of sessions not copied (the first
        :data:`REPORT_LIMIT`); ``skipped_count`` counts them all.
    :ivar verified: True when every copied or present session was read back from the
        destination with the number of messages read from the source.
    :ivar differences: what verification found (empty when ``verified``).
    :ivar dst_sessions, dst_messages: what the destination holds at the end.
    :ivar elapsed_s: seconds the copy took.
    """

    src: str
    dst: str
    src_backend: str
    dst_backend: str
    sessions: int
    messages: int
    copied: int
    copied_messages: int
    present: int
    skipped: list[dict[str, str]]
    skipped_count: int
    verified: bool
    differences: list[str]
    dst_sessions: int
    dst_messages: int
    elapsed_s: float


def copy_store(src: str | os.PathLike[str], dst: str | os.PathLike[str],
               progress: ProgressCallback | None = None) -> CopyReport:
    """Copy every session of ``src`` with its messages into ``dst`` (each a SQLite file
    or a PostgreSQL URL), streamed, verified chunk by chunk, skipping what ``dst`` has
    already (see the module docstring). ``dst`` is created if missing; ``src`` must be
    an existing store.

    :param progress: called with a :class:`~sessiondb.maintenance.Progress` (task
        ``"copy"``, unit ``"messages"``, total: the source's message count at the start)
        as the copy goes.
    :returns: the report; raises instead when anything was skipped or differs.
    :raises SameStoreError: ``src`` and ``dst`` are the same store.
    :raises DatabaseOpenError: ``src`` is missing or holds no sessiondb store.
    :raises CopyConflict: sessions were skipped; the others were copied and verified.
    :raises CopyMismatch: the destination does not hold what was read.
    """
    progress = check_progress(progress)
    started = time.monotonic()
    _refuse_same_file(src, dst)
    require_store(src)
    with SessionDB(src) as source, SessionDB(dst) as target:
        if _identity(source) == _identity(target):
            raise SameStoreError(f"{source.path} and {target.path} are the same store; "
                                 "nothing was copied")
        run = _Run(source, target, progress, started)
        run.copy(source.iter_export())
        report = run.report(time.monotonic() - started)
    _raise_for(report)
    return report


# -- the run ----------------------------------------------------------------------------

class _Run:
    """One copy: the counts, the sessions waiting for a parent, and the chunks."""

    def __init__(self, source: SessionDB, target: SessionDB,
                 progress: ProgressCallback | None, started: float) -> None:
        self.source, self.target = source, target
        self.progress, self.started = progress, started
        self.total = source.message_count()
        self.sessions = self.messages = 0
        self.copied = self.copied_messages = self.present = 0
        self.skipped: list[dict[str, str]] = []
        self.skipped_count = 0
        self.differences: list[str] = []
        self.different = 0
        self.waiting: dict[str, list[dict[str, Any]]] = {}  # parent id -> children
        self.done = 0  # messages dealt with, for the progress
        self.told = -1  # the last ``done`` reported

    def copy(self, items: Iterable[dict[str, Any]]) -> None:
        for chunk in _chunks(items):
            self.sessions += len(chunk)
            self.messages += sum(len(s["messages"]) for s in chunk)
            self._chunk(chunk)
        orphans = [s for children in self.waiting.values() for s in children]
        self.waiting.clear()
        for item in orphans:
            self._skip(item, f"its parent {item['parent_session_id']!r} was not copied")
        self._tell()

    def _chunk(self, chunk: list[dict[str, Any]]) -> None:
        ids = [s["id"] for s in chunk]
        parents = {s.get("parent_session_id") for s in chunk} - {None}
        titles = [s["title"] for s in chunk if s.get("title")]
        found, holders = self.target._read(
            lambda c: (_present(c, self.target, ids + sorted(parents - set(ids))),
                       _title_holders(c, self.target, titles)), snapshot=True)
        there = [sid for sid in ids if sid in found]
        theirs = {s["id"]: s for s in self.target._read(
            lambda c: [export.export_session(c, sid) for sid in there], snapshot=True)
            if s is not None}
        new: list[dict[str, Any]] = []
        known = set(found)  # in the destination, or going in with this chunk
        for item in records.parents_first(chunk):
            sid, title = item["id"], item.get("title")
            if sid in found:
                other = theirs.get(sid)
                if other is not None and _same(item, other):
                    self.present += 1
                    self.done += len(item["messages"])
                else:
                    self._skip(item, "it is in the destination with other content")
            elif title and holders.get(title, sid) != sid:
                self._skip(item, f"its title {title!r} is taken by session "
                                 f"{holders[title]!r} in the destination")
                continue
            else:
                parent = item.get("parent_session_id")
                if parent is not None and parent != sid and parent not in known:
                    self.waiting.setdefault(parent, []).append(item)
                    continue
                new.append(item)
            known.add(sid)
            released = self._released(sid)
            new += released
            known.update(s["id"] for s in released)
        self._write(new)

    def _released(self, sid: str) -> list[dict[str, Any]]:
        """The sessions that waited for ``sid`` (and theirs), now that it comes."""
        out, todo = [], [sid]
        while todo:
            for child in self.waiting.pop(todo.pop(), []):
                out.append(child)
                todo.append(child["id"])
        return out

    def _write(self, new: list[dict[str, Any]]) -> None:
        base = self.done

        def report(p: Progress) -> None:
            if p.task == "import":
                self._tell(base + p.done)

        try:
            # Called even with nothing new: it also finishes the search indexing that
            # a killed run left pending in a SQLite destination.
            self.copied += self.target.import_sessions(
                new, skip_existing=True, progress=report if self.progress else None)
            written = new
        except _REFUSED:
            # A session the destination will not store (PostgreSQL text cannot hold
            # U+0000, which SQLite can) fails its whole step: find it, a session at a
            # time. What the failed call committed is found present.
            written = self._one_by_one(new)
            self.copied += len(written)
        count = sum(len(s["messages"]) for s in written)
        self.copied_messages += count
        self.done += count  # (refused ones were counted as skipped)
        self._verify(written)
        self._tell()

    def _one_by_one(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        written, refused = [], set()
        for item in records.parents_first(items):
            if item.get("parent_session_id") in refused:
                refused.add(item["id"])
                self._skip(item, f"its parent {item['parent_session_id']!r} was not "
                                 "copied")
                continue
            try:
                self.target.import_sessions([item], skip_existing=True)
            except _REFUSED as exc:
                refused.add(item["id"])
                self._skip(item, f"the destination refused it: {exc}")
                continue
            written.append(item)
        return written

    def _verify(self, items: list[dict[str, Any]]) -> None:
        """Read the chunk's copied sessions back: each there, with its messages."""
        if not items:
            return
        counts = self.target._read(lambda c: _message_counts(
            c, self.target, [s["id"] for s in items]), snapshot=True)
        for item in items:
            sid, want = item["id"], len(item["messages"])
            if sid not in counts:
                self._differ(f"session {sid!r} is missing from the destination")
                continue
            rows, counter = counts[sid]
            if rows != want or counter != want:
                self._differ(f"session {sid!r}: {want} message(s) read from the source, "
                             f"{rows} in the destination (its message_count says "
                             f"{counter})")

    def _skip(self, item: dict[str, Any], reason: str) -> None:
        self.skipped_count += 1
        self.done += len(item["messages"])
        if len(self.skipped) < REPORT_LIMIT:
            self.skipped.append({"id": item["id"], "reason": reason})

    def _differ(self, line: str) -> None:
        self.different += 1
        if len(self.differences) < REPORT_LIMIT:
            self.differences.append(line)

    def _tell(self, done: int | None = None) -> None:
        done = self.done if done is None else done
        if self.progress is not None and done != self.told:
            self.told = done
            self.progress(Progress("copy", done, max(self.total, done), "messages",
                                   time.monotonic() - self.started))

    def report(self, elapsed: float) -> CopyReport:
        return CopyReport(
            src=str(self.source.path), dst=str(self.target.path),
            src_backend=self.source.backend, dst_backend=self.target.backend,
            sessions=self.sessions, messages=self.messages, copied=self.copied,
            copied_messages=self.copied_messages, present=self.present,
            skipped=self.skipped, skipped_count=self.skipped_count,
            verified=not self.different, differences=self.differences,
            dst_sessions=self.target.session_count(),
            dst_messages=self.target.message_count(), elapsed_s=round(elapsed, 3))


def _raise_for(report: CopyReport) -> None:
    if report["differences"]:
        more = report["differences"][0] + (
            f" (and {len(report['differences']) - 1} more)"
            if len(report["differences"]) > 1 else "")
        raise CopyMismatch(f"the copy in {report['dst']} does not match what was read from "
                           f"{report['src']}: {more}", report, report["differences"])
    if report["skipped_count"]:
        first = report["skipped"][0]
        raise CopyConflict(
            f"{report['skipped_count']} session(s) were not copied (first: "
            f"{first['id']!r}: {first['reason']}); the other {report['copied']} were "
            "copied and verified", report)


# -- chunks and comparisons -------------------------------------------------------------

def _chunks(items: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Whole sessions, about :data:`CHUNK_ROWS` rows or :data:`CHUNK_CHARS` characters
    at a time (at least one session)."""
    chunk: list[dict[str, Any]] = []
    rows = chars = 0
    for item in items:
        chunk.append(item)
        rows += 1 + len(item["messages"])
        chars += sum(len(m.get("content") or "") + len(m.get("reasoning") or "")
                     for m in item["messages"])
        if rows >= CHUNK_ROWS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, rows, chars = [], 0, 0
    if chunk:
        yield chunk


def _same(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """The same session: equal fields (those both stores have, but the counters the
    import derives) and equal messages in the same order, ids aside."""
    keys = (set(ours) & set(theirs)) - set(_DERIVED)
    if any(ours[k] != theirs[k] for k in keys):
        return False
    mine, other = ours["messages"], theirs["messages"]
    return len(mine) == len(other) and all(
        {k: v for k, v in a.items() if k != "id"} == {k: v for k, v in b.items() if k != "id"}
        for a, b in zip(mine, other))


def _present(conn: Conn, db: SessionDB, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    sql = db._sql
    return {r[0] for r in conn.execute(
        f"SELECT id FROM sessions WHERE id IN {sql.in_list}", (sql.list_arg(ids),))}


def _title_holders(conn: Conn, db: SessionDB, titles: list[str]) -> dict[str, str]:
    if not titles:
        return {}
    sql = db._sql
    return {r[0]: r[1] for r in conn.execute(
        f"SELECT title, id FROM sessions WHERE title IN {sql.in_list}",
        (sql.list_arg(titles),))}


def _message_counts(conn: Conn, db: SessionDB, ids: list[str]) -> dict[str, tuple[int, int]]:
    sql = db._sql
    return {r[0]: (int(r[1]), int(r[2] or 0)) for r in conn.execute(
        "SELECT s.id, (SELECT count(*) FROM messages m WHERE m.session_id = s.id), "
        f"s.message_count FROM sessions s WHERE s.id IN {sql.in_list}",
        (sql.list_arg(ids),))}


# -- which stores -----------------------------------------------------------------------

def _refuse_same_file(src: Any, dst: Any) -> None:
    """Two spellings of one SQLite file (relative, symlinked, hard-linked)."""
    if is_url(src) or is_url(dst):
        return
    a, b = Path(src).expanduser(), Path(dst).expanduser()
    same = os.path.realpath(a) == os.path.realpath(b)
    try:
        same = same or os.path.samefile(a, b)
    except OSError:
        pass  # the destination does not exist yet: not the source
    if same:
        raise SameStoreError(f"{src} and {dst} are the same store; nothing was copied")


def _identity(db: SessionDB) -> tuple[Any, ...]:
    """What tells two open stores apart, however their URLs are spelled: the file
    (device, inode); the server (database, port, start time) and the schema."""
    if db.backend == "sqlite":
        st = os.stat(db.path)
        return ("sqlite", st.st_dev, st.st_ino)
    return ("postgresql",) + tuple(db._read(lambda c: c.execute(
        "SELECT current_database(), current_setting('port'), "
        "pg_postmaster_start_time()::text, current_schema()").fetchone()))

