"""``SessionDB``: the public session and message API, over SQLite or PostgreSQL.

A ``SessionDB`` holds an engine (:mod:`sessiondb.backend`) and writes its rules once:
every method is a short read through the engine's ``read`` or a write through its
``execute_write``, the only write path (SQLite: :mod:`sessiondb.engine` and
:mod:`sessiondb.writes`; PostgreSQL: :mod:`sessiondb.pg.engine`). Coordination (leases,
claims) and upkeep (export, import, prune) are the other two parts of the class
(:mod:`sessiondb.coordination`, :mod:`sessiondb.upkeep`).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from . import listing, records, search, search_index
from .backend import (
    Conn, Dialect, Engine, Handle, fetch as _fetch, first as _first, rows as _rows,
    session_lock_key as _key,
)
from .opening import open_engine
from .coordination import MAX_CLAIMS_PER_OWNER, MAX_LEASES_PER_OWNER, Coordination
from .errors import (
    ClosedError, IntegrityViolation, InvalidArgument, InvalidArgumentType,
    SessionNotFound, StaleRevision, TitleConflict,
)
from .text import (
    MAX_ID_LENGTH, MAX_TITLE_LENGTH, check_cost, check_count, check_flag, check_id,
    check_limit, check_list, check_text, lineage_number,
    sanitize_title, split_lineage, to_json,
)
from .upkeep import Upkeep

_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens",
                 "cache_write_tokens", "reasoning_tokens")
_LATEST_WINS = ("cost_status", "cost_source", "pricing_version")
_FIRST_WINS = ("billing_provider", "billing_base_url", "billing_mode", "model")
_INT64_MAX = 2**63 - 1
_SESSION_FIELDS = ("model", "model_config", "system_prompt", "user_id", "parent_session_id",
                   "title")


class SessionDB(Handle, Coordination, Upkeep):
    """A session store that many processes can share.

    :param path: the database file, or a PostgreSQL URL (``postgresql://user@host/db``,
        see README "Running on PostgreSQL"); ``None`` means ``$SESSIONDB_PATH`` (a path
        or a URL) or ``platformdirs.user_data_dir("sessiondb")/state.db``.
    :param write_timeout: seconds a write may wait for the lock before
        :class:`~sessiondb.errors.WriteTimeout` (default 30).
    :param hold_timeout: seconds a write transaction may hold the write lock (default 10;
        None = no bound); past it a watchdog rolls it back and the write raises
        :class:`~sessiondb.errors.HoldTimeout`, so a stuck ``transaction()`` block cannot
        freeze the other processes.
    :param busy_timeout: seconds SQLite itself retries a busy lock before our jittered
        retry takes over (default 0.05; long waits queue in the kernel gate instead).
    :param checkpoint_every: PASSIVE checkpoint after this many writes (default 50; 0 = never).
    :param wal_limit: bytes the ``-wal`` file is kept under (default 64 MiB; 0 = no bound).
    :param reset_timeout: seconds a WAL reset may wait for readers (default 1.0); writers
        wait too while it does. It keeps ``wal_limit`` against foreign readers whose
        transactions last up to about half of it, see :mod:`sessiondb.checkpoint`.
    :param journal_size_limit: bytes the ``-wal`` file is truncated to after a reset.
    :param gate: the kernel-queued FIFO write gate (:mod:`sessiondb.gate`): ``"auto"``
        (default; ``$SESSIONDB_GATE`` if set, else Linux OFD locks where they exist, else
        classic POSIX locks, else none), ``"ofd"``, ``"posix"``, or ``"none"`` (True and
        False mean "auto" and "none"). ``stats()["gate"]`` says which is in use.
    :param vfs: the name of a registered SQLite VFS to open the file through (default: the
        platform's); e.g. an :class:`apsw.VFS` shim that injects I/O faults in tests.
    :param unsafe_filesystem: what to do when the store's directory is on a filesystem
        where SQLite's WAL is unsafe (NFS, SMB, 9p, virtiofs, FUSE ...; see
        :mod:`sessiondb.filesystems`): ``"refuse"`` (the default: raise
        :class:`~sessiondb.errors.UnsafeFilesystemError`), ``"journal"`` (use the rollback
        journal there and on unknown filesystems: slower, readers and writers wait for each
        other, and every process of the store must do the same) or ``"allow"`` (WAL
        anyway). None: ``$SESSIONDB_UNSAFE_FILESYSTEM``, else ``"refuse"``.
    :param durability: ``"full"`` (default): a write is on disk when its call returns,
        and survives a power cut or an OS crash (SQLite: ``synchronous=FULL``, a sync of
        the ``-wal`` per commit); ``"normal"``: it survives a crash of the process, but a
        power cut may lose the writes since the last sync (SQLite: ``synchronous=NORMAL``,
        consistent on a disk with powersafe overwrite, see
        :func:`sessiondb.connection.connection_durability`; PostgreSQL:
        ``synchronous_commit = off``).
    :param procs: publish this instance's state and write figures in the process record
        beside the store, which ``sessiondb top`` and ``sessiondb stats`` read (default
        True; ``$SESSIONDB_PROCS=0`` turns it off too); see :mod:`sessiondb.procs`.
    :param max_leases_per_owner: live leases one owner may hold (default 1000; None = no
        cap); see :mod:`sessiondb.coordination`.
    :param max_claims_per_owner: work claims one owner may hold (default 100; None = no cap).

    SQLite only: ``busy_timeout``, ``checkpoint_every``, ``wal_limit``, ``reset_timeout``,
    ``journal_size_limit``, ``gate``, ``vfs``, ``unsafe_filesystem``,
    ``procs``. PostgreSQL only (see
    :class:`sessiondb.pg.engine.PgEngine`): ``pool_size``, ``schema``, ``pooler``,
    ``application_name``.

    :raises DatabaseOpenError: the path is unusable (directory, not a database, no access);
        :class:`~sessiondb.errors.UnsafeFilesystemError` on a filesystem where WAL is
        unsafe, :class:`~sessiondb.errors.ForeignDatabaseError` for another application's
        database.
    :raises SchemaTooNewError: the store was written by a newer sessiondb.
    :raises ConfigurationError: an option is invalid or the SQLite is too old.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 max_leases_per_owner: int | None = MAX_LEASES_PER_OWNER,
                 max_claims_per_owner: int | None = MAX_CLAIMS_PER_OWNER,
                 **options: Any) -> None:
        Coordination.__init__(self, max_leases_per_owner, max_claims_per_owner)
        self._engine: Engine = open_engine(path, options)
        self._sql = self._engine.sql
        self._execute_write = self._engine.execute_write
        self._read = self._engine.read
        self._run_steps = self._engine.run_steps

    @contextmanager
    def transaction(self) -> Iterator["SessionDB"]:
        """Group several calls into one atomic write transaction::

            with db.transaction():
                db.append_message(sid, "assistant", text)
                db.update_token_counts(sid, output_tokens=120)

        The write lock is taken up front (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the
        locks of what each call touches, as it runs) and held until the block ends: keep
        the block short and do no slow work (model calls, network) inside it. Other
        threads using this instance wait for the block to finish. Calls inside run as
        savepoints: a call that raises undoes only itself; an exception leaving the block
        rolls back everything.
        """
        with self._engine.transaction():
            yield self

    @contextmanager
    def snapshot(self) -> Iterator["SessionDB"]:
        """Read several things as of one moment::

            with db.snapshot():
                newest = db.list_sessions(limit=1)
                messages = db.get_messages(newest[0]["id"])

        Every read inside the block sees the store as it was when the block began;
        writing inside it raises :class:`~sessiondb.errors.ConfigurationError`. The block
        holds a read transaction (SQLite: it keeps the WAL frames written meanwhile from
        being checkpointed; see :meth:`sessiondb.engine.Engine.snapshot`): keep it short.
        Other threads using this instance wait for the block to finish.
        """
        with self._engine.snapshot():
            yield self

    def checkpoint(self, reset: bool = False) -> dict[str, int]:
        """SQLite: run a PASSIVE checkpoint now, and a WAL reset (TRUNCATE, see
        :mod:`sessiondb.checkpoint`) if ``reset`` or the WAL is past half of
        ``wal_limit``; returns when both are done. PostgreSQL: nothing to do (the server
        checkpoints), returns zeros.

        :raises InvalidArgumentType: ``reset`` is not True or False.
        :raises StorageError: a disk fault stopped it; nothing is lost.
        """
        return self._engine.checkpoint(reset)

    def stats(self) -> dict[str, Any]:
        """Figures to act on: writes, retries, timeouts, lock-wait percentiles (s),
        longest lock hold (s); SQLite: checkpoints and the WAL size (bytes); PostgreSQL:
        the pool; and ``coordination``: live leases, claims per state, what each owner
        holds, and the caps."""
        figures = self._engine.stats()
        figures["coordination"] = self._coordination_stats()
        return figures

    def _source_filter(self, source: str | None, exclude: list[str] | None
                       ) -> tuple[list[str], list]:
        where: list[str] = []
        args: list[Any] = []
        if source:
            where.append("s.source = ?")
            args.append(source)
        if exclude:
            where.append(f"s.source NOT IN {self._sql.in_list}")
            args.append(self._sql.list_arg(exclude))
        return where, args

    # -- sessions ---------------------------------------------------------------------
    def create_session(self, session_id: str, source: str, **fields: Any) -> str:
        """Create a session; creating an existing id again changes nothing.

        :param fields: ``model``, ``model_config`` (JSON-serializable), ``system_prompt``,
            ``user_id``, ``parent_session_id``, ``title``.
        :returns: ``session_id``.
        :raises SessionNotFound: ``parent_session_id`` names a missing session.
        :raises TitleConflict: another session has the title.
        """
        values = self._session_values(session_id, source, fields)

        def write(conn: Conn) -> None:
            # PostgreSQL: creators of this id, and deleters of the parent, wait for us.
            self._sql.lock(conn, _key(session_id),
                           *([_key(values["parent_session_id"])]
                             if values["parent_session_id"] else []))
            if _exists(conn, session_id):
                return
            parent = values["parent_session_id"]
            if parent is not None and parent != session_id and not _exists(conn, parent):
                raise SessionNotFound(parent, f"parent session {parent!r} does not exist")
            if values["title"] is not None:
                _check_title_free(conn, values["title"], session_id)
            cols = ", ".join(values)
            marks = ", ".join("?" * len(values))
            conn.execute(f"INSERT INTO sessions ({cols}, started_at) VALUES ({marks}, ?)",
                         (*values.values(), time.time()))

        self._execute_write(write)
        return session_id

    def ensure_session(self, session_id: str, source: str = "unknown", **fields: Any) -> str:
        """Create the session if it is missing (same arguments as :meth:`create_session`)."""
        return self.create_session(session_id, source, **fields)

    def _session_values(self, session_id: str, source: str, fields: dict[str, Any]
                        ) -> dict[str, Any]:
        unknown = set(fields) - set(_SESSION_FIELDS)
        if unknown:
            raise InvalidArgumentType(
                f"unexpected session field(s): {', '.join(sorted(unknown))}; known fields "
                f"are {', '.join(_SESSION_FIELDS)}")
        return {
            "id": check_id("session_id", session_id),
            "source": check_id("source", source),
            "model": check_text("model", fields.get("model")),
            "model_config": to_json("model_config", fields.get("model_config")),
            "system_prompt": check_text("system_prompt", fields.get("system_prompt")),
            "user_id": check_text("user_id", fields.get("user_id")),
            "parent_session_id": check_text("parent_session_id",
                                            fields.get("parent_session_id")),
            "title": sanitize_title(fields.get("title")),
        }

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session as a dict (all columns, ``model_config`` decoded), or None."""
        check_text("session_id", session_id, optional=False)
        rows = self._read(lambda c: _rows(c, "SELECT * FROM sessions WHERE id = ?",
                                          (session_id,)))
        return records.session(rows[0]) if rows else None

    def list_sessions(self, source: str | None = None, *,
                      exclude_sources: list[str] | None = None, active: bool | None = None,
                      limit: int | None = 20, offset: int = 0,
                      after: str | None = None) -> list[dict[str, Any]]:
        """Sessions, newest first (``started_at``, then ``id`` for equal times), each
        with ``preview`` (its first user message on one line, 60 characters and
        ``...`` if longer) and ``last_active`` (latest message time, else start time).

        Page with ``offset``, or with ``after`` = the id of the last session of the
        previous page (keyset paging: as fast for the thousandth page as for the
        first, and sessions created meanwhile do not shift the pages)::

            page = db.list_sessions(limit=50)
            while page:
                ...
                page = db.list_sessions(limit=50, after=page[-1]["id"])

        :param active: True = only sessions not ended; False = only ended ones; None = all.
        :param after: continue after this session (in this order, whatever the filters);
            ``offset`` then counts from there.
        :raises SessionNotFound: ``after`` names a session that does not exist (any
            more); nothing is returned.
        """
        limit, offset = check_limit(limit, offset)
        where, args = self._source_filter(check_text("source", source),
                                          check_list("exclude_sources", exclude_sources))
        if active is not None and not isinstance(active, bool):
            raise InvalidArgumentType("active must be True, False or None, not "
                                      f"{type(active).__name__}")
        if active is not None:
            where.append("s.ended_at IS NULL" if active else "s.ended_at IS NOT NULL")
        if after is not None:
            check_id("after", after)

        def read(conn: Conn) -> list[dict[str, Any]]:
            conditions, values = list(where), list(args)
            if after is not None:
                cond, more = listing.after_condition(conn, after)
                conditions.append(cond)
                values += more
            rows = self._sql.list_page(conn, conditions, values, listing.ORDER, limit,
                                       offset, columns="s.*", preview_order="m.id")
            for row in rows:
                row["preview"] = listing.sessiondb_preview(row["preview"])
            return rows

        return [records.listed_session(r) for r in self._read(read, snapshot=True)]

    def end_session(self, session_id: str, reason: str | None = None, *,
                    expected_revision: int | None = None) -> int:
        """Mark the session ended now, with a reason (ending again updates both).

        :returns: the session's revision after the change.
        """
        reason = check_text("reason", reason)
        return self._update_session(session_id, {"ended_at": time.time(), "end_reason": reason},
                                    expected_revision)

    def reopen_session(self, session_id: str, *, expected_revision: int | None = None) -> int:
        """Clear the ended state; returns the revision after the change."""
        return self._update_session(session_id, {"ended_at": None, "end_reason": None},
                                    expected_revision)

    def update_system_prompt(self, session_id: str, system_prompt: str | None, *,
                             expected_revision: int | None = None) -> int:
        """Replace the session's system prompt snapshot; returns the revision after it."""
        prompt = check_text("system_prompt", system_prompt)
        return self._update_session(session_id, {"system_prompt": prompt}, expected_revision)

    def set_model(self, session_id: str, model: str | None,
                  model_config: dict[str, Any] | None = None, *,
                  expected_revision: int | None = None) -> int:
        """Set the session's model and model config (JSON-serializable); returns the
        revision after it."""
        model = check_text("model", model)
        config = to_json("model_config", model_config)
        return self._update_session(session_id, {"model": model, "model_config": config},
                                    expected_revision)

    def update_session(self, session_id: str, *, expected_revision: int | None = None,
                       **fields: Any) -> int:
        """Change several fields of a session at once, optionally only if nobody changed
        the session since ``expected_revision`` (optimistic concurrency)::

            s = db.get_session(sid)
            db.update_session(sid, expected_revision=s["revision"], title="Parser work")

        A session's ``revision`` (0 when created) grows by one with every change to its
        fields, by any method; counters (messages, tokens, cost) do not count. An update
        that changes nothing leaves the revision alone, and is never a conflict, even
        with an older ``expected_revision``.

        :param fields: ``title``, ``model``, ``model_config``, ``system_prompt``,
            ``user_id``.
        :returns: the revision after the update.
        :raises StaleRevision: the session changed since ``expected_revision``
            (``.actual``); nothing was written.
        :raises SessionNotFound: no such session.
        :raises TitleConflict: another session has the title.
        """
        editable = ("title", "model", "model_config", "system_prompt", "user_id")
        unknown = set(fields) - set(editable)
        if unknown:
            raise InvalidArgumentType(
                f"unexpected session field(s): {', '.join(sorted(unknown))}; editable "
                f"fields are {', '.join(editable)}")
        values = {k: (sanitize_title(v) if k == "title" else to_json(k, v)
                      if k == "model_config" else check_text(k, v)) for k, v in fields.items()}
        return self._update_session(session_id, values, expected_revision)

    def _update_session(self, session_id: str, values: dict[str, Any],
                        expected: int | None) -> int:
        check_id("session_id", session_id)
        if expected is not None:
            check_count("expected_revision", expected)
        assignments = ", ".join(f"{column} = ?" for column in values)

        def write(conn: Conn) -> int:
            self._sql.lock(conn, _key(session_id))  # the revision stays as checked
            if values.get("title") is not None:
                _check_title_free(conn, values["title"], session_id)
            before = _revision(conn, session_id)
            if before is None:
                raise SessionNotFound(session_id)
            if values:
                conn.execute(f"UPDATE sessions SET {assignments} WHERE id = ?",
                             (*values.values(), session_id))
            after = _revision(conn, session_id)
            if expected is not None and expected != before and after != before:
                raise StaleRevision(session_id, expected, before)  # rolls the update back
            return after

        return self._execute_write(write)

    def delete_session(self, session_id: str) -> bool:
        """Delete the session and its messages; False if it did not exist.

        :raises IntegrityViolation: another session names it as parent (delete those first).
        """
        check_text("session_id", session_id, optional=False)

        def write(conn: Conn) -> bool:
            self._sql.lock(conn, _key(session_id))  # creators of children wait for us
            if not _exists(conn, session_id):
                return False
            child = _first(conn, "SELECT id FROM sessions WHERE parent_session_id = ? "
                                 "AND id != ? LIMIT 1", (session_id, session_id))
            if child is not None:
                raise IntegrityViolation(
                    f"session {session_id!r} is the parent of {child!r}; delete or re-parent "
                    "its child sessions first")
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            return True

        return self._execute_write(write)

    def resolve_session_id(self, prefix: str) -> str | None:
        """The id equal to ``prefix``, else the only id starting with it (ASCII case
        folded); None when no or several sessions match."""
        check_text("prefix", prefix, optional=False)

        def read(conn: Conn) -> str | None:
            if len(prefix) > MAX_ID_LENGTH:
                return None  # no id is that long
            if _exists(conn, prefix):
                return prefix
            # Not LIKE: it reads pattern and id as C strings, so a NUL ended both and
            # "a\0y" resolved to "a\0x" (see the dialects' starts_with).
            match, args = self._sql.starts_with("id", prefix, fold=True)
            rows = _fetch(conn, f"SELECT id FROM sessions WHERE {match} LIMIT 2", args)
            return rows[0][0] if len(rows) == 1 else None

        return self._read(read, snapshot=True)

    def session_count(self, source: str | None = None) -> int:
        """Number of sessions, optionally of one source."""
        source = check_text("source", source)
        if source:
            return self._read(lambda c: _first(c, "SELECT COUNT(*) FROM sessions WHERE source = ?",
                                               (source,)))
        return self._read(lambda c: _first(c, "SELECT COUNT(*) FROM sessions", ()))

    def message_count(self, session_id: str | None = None) -> int:
        """Number of messages, in one session or in all (SQLite: the total is kept by
        triggers on every insert and delete, see :mod:`sessiondb.schema`, one row read;
        PostgreSQL: the sum of the sessions' counters, see :mod:`sessiondb.pg.schema`)."""
        session_id = check_text("session_id", session_id)
        if session_id:
            return self._read(lambda c: _first(
                c, "SELECT COUNT(*) FROM messages WHERE session_id = ?", (session_id,)))
        return self._read(lambda c: _first(c, self._sql.message_total, ()))

    # -- titles -----------------------------------------------------------------------
    def set_session_title(self, session_id: str, title: str | None, *,
                          expected_revision: int | None = None) -> bool:
        """Set (or, with empty text, clear) the title; False if the session is missing.

        :raises InvalidTitle: over 100 characters after sanitizing.
        :raises TitleConflict: another session has this title (exact, case-sensitive).
        :raises StaleRevision: ``expected_revision`` given and the session changed since.
        """
        check_text("session_id", session_id, optional=False)
        clean = sanitize_title(title)
        if not session_id or len(session_id) > MAX_ID_LENGTH:
            return False  # no session has such an id
        try:
            self._update_session(session_id, {"title": clean}, expected_revision)
        except SessionNotFound:
            return False
        return True

    def get_session_title(self, session_id: str) -> str | None:
        session = self.get_session(session_id)
        return session["title"] if session else None

    def get_session_by_title(self, title: str) -> dict[str, Any] | None:
        """The session whose title is exactly ``title``, or None."""
        check_text("title", title, optional=False)
        rows = self._read(lambda c: _rows(c, "SELECT * FROM sessions WHERE title = ?", (title,)))
        return records.session(rows[0]) if rows else None

    def resolve_session_by_title(self, title: str) -> str | None:
        """The newest session among ``title`` and its numbered variants ``title #N``."""
        check_text("title", title, optional=False)

        def read(conn: Conn) -> str | None:
            # The exact title competes too: newest wins, ties go to the higher number.
            family = [(started, 1 if t == title else lineage_number(t), sid)
                      for sid, t, started in _lineage(conn, self._sql, title)
                      if t == title or lineage_number(t)]
            return max(family)[2] if family else None

        return self._read(read, snapshot=True)

    def get_next_title_in_lineage(self, title: str) -> str:
        """The next free title of a lineage: ``"name"`` -> ``"name #2"`` -> ``"name #3"``."""
        check_text("title", title, optional=False)
        base = split_lineage(title)
        rows = self._read(lambda c: _lineage(c, self._sql, base))
        if not rows:
            return base
        highest = max([1] + [lineage_number(t) or 1 for _, t, _ in rows])
        return f"{base} #{highest + 1}"

    # -- messages ---------------------------------------------------------------------
    def append_message(self, session_id: str, role: str, content: str | None = None, *,
                       tool_name: str | None = None, tool_calls: Any = None,
                       tool_call_id: str | None = None, token_count: int | None = None,
                       finish_reason: str | None = None, reasoning: str | None = None,
                       reasoning_details: Any = None, codex_reasoning_items: Any = None,
                       metadata: Any = None) -> int:
        """Append a message and keep the session's counters exact.

        ``message_count`` grows by one; ``tool_call_count`` by the number of calls in
        ``tool_calls`` (a list counts its items, any other value one call).

        :returns: the new message id (increasing; usable for keyset pagination).
        :raises SessionNotFound: the session does not exist (nothing is written).
        """
        check_id("session_id", session_id)
        row = {
            "session_id": session_id,
            "role": check_id("role", role),
            "content": check_text("content", content),
            "tool_call_id": check_text("tool_call_id", tool_call_id),
            "tool_calls": to_json("tool_calls", tool_calls),
            "tool_name": check_text("tool_name", tool_name),
            "token_count": check_count("token_count", token_count, optional=True),
            "finish_reason": check_text("finish_reason", finish_reason),
            "reasoning": check_text("reasoning", reasoning),
            "reasoning_details": to_json("reasoning_details", reasoning_details),
            "codex_reasoning_items": to_json("codex_reasoning_items", codex_reasoning_items),
            "metadata": to_json("metadata", metadata),
        }
        calls = records.count_tool_calls(tool_calls)

        def write(conn: Conn) -> int:
            new_id = self._sql.insert_for_session(
                conn, _key(session_id), "message_count = message_count + 1, "
                "tool_call_count = tool_call_count + ?", [calls], session_id, "messages",
                {**row, "timestamp": time.time()})
            if new_id is None:
                raise SessionNotFound(session_id)
            return new_id

        return self._execute_write(write)

    def get_messages(self, session_id: str, *, after_id: int | None = None,
                     limit: int | None = None) -> list[dict[str, Any]]:
        """Messages of a session in order; page with ``after_id`` = the last id seen."""
        check_text("session_id", session_id, optional=False)
        after = check_count("after_id", after_id, optional=True) or 0
        limit, _ = check_limit(limit, 0)
        rows = self._read(lambda c: _rows(
            c, f"SELECT {records.MESSAGE_SELECT} FROM messages WHERE session_id = ? AND id > ? "
               "ORDER BY id LIMIT ?",
            (session_id, after, limit)))
        return [records.message(r) for r in rows]

    def get_messages_as_conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The session as an OpenAI-style message list (role, content, tool fields)."""
        return [records.conversation_item(m) for m in self.get_messages(session_id)]

    def clear_messages(self, session_id: str) -> None:
        """Delete all messages of a session and zero its counters (the session stays)."""
        check_id("session_id", session_id)

        def write(conn: Conn) -> None:
            if not self._sql.update_session(conn, _key(session_id), "message_count = 0, "
                                            "tool_call_count = 0", [], session_id):
                raise SessionNotFound(session_id)
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))

        self._execute_write(write)

    def pop_message(self, session_id: str) -> dict[str, Any] | None:
        """Delete the session's newest message and return it, in one write.

        The counters stay exact: ``message_count`` drops by one and ``tool_call_count``
        by the calls of that message (counted as :meth:`append_message` counted them).
        Two processes popping one session at once never get the same message: the
        second pops the one before it, or gets None.

        :returns: the deleted message, as :meth:`get_messages` returns it; None if the
            session has no messages.
        :raises SessionNotFound: the session does not exist.
        """
        check_id("session_id", session_id)

        def write(conn: Conn) -> dict[str, Any] | None:
            # PostgreSQL: appenders and other poppers of this session wait for us, so the
            # newest message stays the newest until we commit (SQLite: BEGIN IMMEDIATE).
            self._sql.lock(conn, _key(session_id))
            # Delete and read in one statement: the row we return is the row we removed.
            popped = _rows(conn, f"DELETE FROM messages WHERE id = (SELECT id FROM messages "
                                 "WHERE session_id = ? ORDER BY id DESC LIMIT 1) "
                                 f"RETURNING {records.MESSAGE_SELECT}", (session_id,))
            if not popped:
                if not _exists(conn, session_id):
                    raise SessionNotFound(session_id)
                return None
            message = records.message(popped[0])
            conn.execute("UPDATE sessions SET message_count = message_count - 1, "
                         "tool_call_count = tool_call_count - ? WHERE id = ?",
                         (records.count_tool_calls(message["tool_calls"]), session_id))
            return message

        return self._execute_write(write)

    # -- accounting -------------------------------------------------------------------
    def update_token_counts(self, session_id: str, input_tokens: int = 0,
                            output_tokens: int = 0, *, cache_read_tokens: int = 0,
                            cache_write_tokens: int = 0, reasoning_tokens: int = 0,
                            estimated_cost_usd: float | None = None,
                            actual_cost_usd: float | None = None, model: str | None = None,
                            cost_status: str | None = None, cost_source: str | None = None,
                            pricing_version: str | None = None,
                            billing_provider: str | None = None,
                            billing_base_url: str | None = None,
                            billing_mode: str | None = None, absolute: bool = False) -> None:
        """Add to (or with ``absolute=True`` set) the token counters and costs.

        Cost status, source and pricing version: the latest non-None value wins. Model
        and billing fields: filled in only while unset (the first value wins).

        :raises InvalidArgument: a negative, non-finite or too large value, or an
            increment that would overflow a counter (nothing is written).
        :raises SessionNotFound: the session does not exist.
        """
        self._account(session_id, check_flag("absolute", absolute), False, locals())

    def set_token_counts(self, session_id: str, input_tokens: int = 0, output_tokens: int = 0,
                         *, cache_read_tokens: int = 0, cache_write_tokens: int = 0,
                         reasoning_tokens: int = 0, estimated_cost_usd: float | None = None,
                         actual_cost_usd: float | None = None, model: str | None = None,
                         cost_status: str | None = None, cost_source: str | None = None,
                         pricing_version: str | None = None,
                         billing_provider: str | None = None,
                         billing_base_url: str | None = None,
                         billing_mode: str | None = None) -> None:
        """Set the token counters and estimated cost to exactly these values (None cost
        clears it); other fields as in :meth:`update_token_counts`."""
        self._account(session_id, True, True, locals())

    def _account(self, session_id: str, absolute: bool, exact: bool, args: dict) -> None:
        check_id("session_id", session_id)
        tokens = [check_count(f, args[f]) for f in _TOKEN_FIELDS]
        est = check_cost("estimated_cost_usd", args["estimated_cost_usd"])
        act = check_cost("actual_cost_usd", args["actual_cost_usd"])
        texts = {f: check_text(f, args[f]) for f in _LATEST_WINS + _FIRST_WINS}
        sets = [f"{f} = {f} + ?" if not absolute else f"{f} = ?" for f in _TOKEN_FIELDS]
        values: list[Any] = list(tokens)
        if exact:
            sets.append("estimated_cost_usd = ?")
        elif absolute:
            sets.append("estimated_cost_usd = COALESCE(?, 0.0)")
        else:
            sets.append("estimated_cost_usd = COALESCE(estimated_cost_usd, 0.0) + COALESCE(?, 0.0)")
        values.append(est)
        if act is not None:
            sets.append("actual_cost_usd = ?" if absolute
                        else "actual_cost_usd = COALESCE(actual_cost_usd, 0.0) + ?")
            values.append(act)
        for f in _LATEST_WINS:
            sets.append(f"{f} = COALESCE(?, {f})")
            values.append(texts[f])
        for f in _FIRST_WINS:
            sets.append(f"{f} = COALESCE({f}, ?)")
            values.append(texts[f])
        assignments = ", ".join(sets)

        def write(conn: Conn) -> None:
            if not absolute and not self._sql.refuses_overflow:
                _check_sums(conn, session_id, tokens, est, act)
            if not self._sql.update_session(conn, _key(session_id), assignments, values,
                                            session_id):
                raise SessionNotFound(session_id)

        self._execute_write(write)

    # -- search -----------------------------------------------------------------------
    def search_messages(self, query: str, *, sources: list[str] | None = None,
                        exclude_sources: list[str] | None = None,
                        roles: list[str] | None = None, session_id: str | None = None,
                        limit: int | None = 20, offset: int = 0) -> list[dict[str, Any]]:
        """Full-text search over message content: the best matches among the most recent.

        Hits come in windows of 1,000 matches, newest first: the first window is the
        1,000 most recent messages that match and pass the filters, best match (bm25)
        first, ties newest first; then the 1,000 before them, and so on; on SQLite a
        window stays within one block of 262,144 message ids (ids 1 to 262,144, then
        262,145 to 524,288, ...; fewer matches if fewer are left in the block).
        ``offset`` counts through that order, so pages never repeat or skip a hit; a
        query with at most 1,000 matches is ordered best match first (on SQLite, within
        each block). The time of a search does not grow with the number of
        matches (see :mod:`sessiondb.search`).

        Any text up to 1,000 characters is accepted (quotes, ``-``, ``AND``/``OR``/
        ``NOT``, ``*``, ``:``, unbalanced parentheses): it is sanitized, never a syntax
        error. Each hit has ``id``, ``session_id``, ``role``, ``snippet`` (matches wrapped
        in ``>>> <<<``), ``timestamp``, ``tool_name``, ``source``, ``model``,
        ``session_started`` and ``context`` (the previous message, the match and the next
        one of its session).

        :param sources: only sessions of these sources (``[]``: no hit).
        :param exclude_sources: no session of these sources.
        :param roles: only messages of these roles (``[]`` or None: any).
        :param session_id: only this session's messages.
        :param limit: hits per page; None for all (every match is then ranked).
        :raises InvalidArgument: the query is longer than 1,000 characters.
        :raises SearchIndexError: the full-text index is damaged or being rebuilt.
        """
        check_text("query", query, optional=False)
        limit, offset = check_limit(limit, offset)
        filters = search.Filters(
            sources=check_list("sources", sources),
            exclude_sources=check_list("exclude_sources", exclude_sources),
            roles=check_list("roles", roles), session_id=check_text("session_id", session_id))
        try:
            return self._read(lambda c: self._sql.search(
                c, self.path, query, filters, limit, offset), snapshot=True)
        except (ClosedError, SessionNotFound):
            raise
        except Exception as exc:
            if search_index.is_search_damage(exc):
                raise search_index.search_damage_error(exc, self.path) from exc
            raise

# -- helpers (module level: pure functions of a connection) ---------------------------


def _exists(conn: Conn, session_id: str) -> bool:
    return _first(conn, "SELECT 1 FROM sessions WHERE id = ?", (session_id,)) is not None


def _check_sums(conn: Conn, session_id: str, tokens: list[Any],
                est: float | None, act: float | None) -> None:
    """Refuse increments that would leave a counter unrepresentable: SQLite silently
    turns an INTEGER overflow into an imprecise REAL, and a REAL overflow into Inf."""
    row = conn.execute(f"SELECT {', '.join(_TOKEN_FIELDS)}, estimated_cost_usd, "
                       "actual_cost_usd FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        raise SessionNotFound(session_id)
    for name, cur, add in zip(_TOKEN_FIELDS, row, tokens):
        if add and isinstance(cur, int) and cur + add > _INT64_MAX:
            raise InvalidArgument(f"{name} would exceed 2**63-1 ({cur} + {add}); "
                                  "nothing was written")
    for name, cur, add in (("estimated_cost_usd", row[5], est),
                           ("actual_cost_usd", row[6], act)):
        if add and isinstance(cur, float) and not math.isfinite(cur + add):
            raise InvalidArgument(f"{name} would overflow ({cur} + {add}); "
                                  "nothing was written")


def _lineage(conn: Conn, sql: Dialect, base: str) -> list[tuple[str, str, float]]:
    """``(id, title, started_at)`` of the sessions titled ``base`` or ``base #<digits>``,
    exactly: titles are unique case-sensitively (prefixes, not LIKE: see the dialects'
    ``starts_with``)."""
    if len(base) > MAX_TITLE_LENGTH:
        return []  # no title is that long
    match, args = sql.starts_with("title", base + " #")
    rows = _fetch(conn, f"SELECT id, title, started_at FROM sessions WHERE title = ? "
                        f"OR {match}", (base, *args))
    return [r for r in rows if r[1] == base or split_lineage(r[1]) == base]


def _revision(conn: Conn, session_id: str) -> int | None:
    return _first(conn, "SELECT revision FROM sessions WHERE id = ?", (session_id,))


def _check_title_free(conn: Conn, title: str, session_id: str) -> None:
    other = _first(conn, "SELECT id FROM sessions WHERE title = ? AND id != ?",
                   (title, session_id))
    if other is not None:
        raise TitleConflict(title, other)



