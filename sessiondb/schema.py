"""The schema and its migration ladder, versioned by ``PRAGMA user_version``.

A fresh file is brought to :data:`SCHEMA_VERSION` step by step, each step one write
transaction through the normal write path (:func:`sessiondb.conversion.ensure_schema`
runs the ladder on open, and converts a hermes-agent file).

Lookups use real indexed columns (never JSON extraction). Messages are ordered by their
integer key, which also serves keyset pagination. ``messages_fts`` is an FTS5
external-content index over ``messages.content`` kept in sync by triggers
(https://sqlite.org/fts5.html#external_content_tables); past one block of message ids
it is cut into one such table per block (:mod:`sessiondb.fts_tables`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import apsw

from .errors import DatabaseOpenError, ForeignDatabaseError, SchemaTooNewError
from .hermes_schema import hermes_version

SCHEMA_VERSION = 5

#: ``PRAGMA application_id`` of a sessiondb store: the bytes ``SsDB``
#: (https://sqlite.org/fileformat2.html#application_id). Set when a store is created,
#: and on the first open of a store made before it was (those, and converted hermes-agent
#: files, have 0); a file with another non-zero id belongs to another application.
APPLICATION_ID = 0x53734442

#: The full-text index table (also recreated by sessiondb.search_index.rebuild). Its
#: content is read through a view of the messages of its range of ids (all of them, until
#: the index is cut into tables by id block: sessiondb.fts_tables), so that FTS5's own
#: content check ('integrity-check' with rank 1) compares each table with its messages.
#: Stores made before 0.8 read ``messages`` itself.
FTS_TABLE = """CREATE VIRTUAL TABLE messages_fts USING fts5(
    content, content='messages_fts_rows_0', content_rowid='id'
)"""
FTS_ROWS = "CREATE VIEW messages_fts_rows_0 AS SELECT id, content FROM messages"
_PREFIX_OPTION = re.compile(r"prefix\s*=\s*'?([\d\s,]+)", re.IGNORECASE)


def fts_table(prefixes: tuple[int, ...] = (), name: str = "messages_fts",
              content: str = "messages_fts_rows_0") -> str:
    """A full-text table named ``name`` over the view ``content``, with FTS5 prefix
    indexes of these lengths, if any (https://sqlite.org/fts5.html#prefix_indexes)."""
    sql = FTS_TABLE.replace("TABLE messages_fts ", f"TABLE {name} ", 1).replace(
        "'messages_fts_rows_0'", f"'{content}'", 1)
    if not prefixes:
        return sql
    return sql.replace("content_rowid='id'", "content_rowid='id', prefix='"
                       + " ".join(map(str, prefixes)) + "'")


def index_prefixes(conn: apsw.Connection) -> tuple[int, ...]:
    """The prefix index lengths of the full-text table (``()`` when it has none)."""
    row = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'messages_fts'").fetchone()
    return tuple(sorted({int(n) for option in _PREFIX_OPTION.findall(row[0] if row else "")
                         for n in re.findall(r"\d+", option)}))

# The indexes of v1. The conversion of a hermes-agent file (sessiondb.conversion) keeps
# hermes-agent's session indexes (the same) and makes the message indexes on its new
# messages table.
SESSION_INDEXES = """
CREATE INDEX idx_sessions_source ON sessions(source);
CREATE INDEX idx_sessions_parent ON sessions(parent_session_id);
CREATE INDEX idx_sessions_started ON sessions(started_at DESC);
CREATE UNIQUE INDEX idx_sessions_title_unique ON sessions(title) WHERE title IS NOT NULL;
"""
#: The names of the message indexes (:func:`message_indexes`).
MESSAGE_INDEX_NAMES = ("idx_messages_session", "idx_messages_session_ts")


def message_indexes(table: str = "messages") -> str:
    """The DDL of the message indexes, on ``table``."""
    return (f"CREATE INDEX idx_messages_session ON {table}(session_id, id);\n"
            f"CREATE INDEX idx_messages_session_ts ON {table}(session_id, timestamp);\n")


_INDEXES = SESSION_INDEXES + message_indexes()

#: The columns of ``messages``, as declared (the conversion of a hermes-agent file makes
#: its new table from them, sessiondb.conversion).
MESSAGE_COLUMNS = (
    "id INTEGER PRIMARY KEY AUTOINCREMENT",
    "session_id TEXT NOT NULL REFERENCES sessions(id)",
    "role TEXT NOT NULL",
    "content TEXT",
    "tool_call_id TEXT",
    "tool_calls TEXT",
    "tool_name TEXT",
    "timestamp REAL NOT NULL",
    "token_count INTEGER",
    "finish_reason TEXT",
    "reasoning TEXT",
    "reasoning_details TEXT",
    "codex_reasoning_items TEXT",
    "metadata TEXT",
)


def messages_table(name: str = "messages", extra: tuple[str, ...] = ()) -> str:
    """``CREATE TABLE`` of the messages table under ``name``, with ``extra`` column
    definitions at the end."""
    return f"CREATE TABLE {name} (\n    " + ",\n    ".join(MESSAGE_COLUMNS + extra) + "\n)"


# Column order follows the hermes-agent lineage (see README, "Coming from hermes-agent"),
# so rows read naturally to code written against it.
_V1 = f"""
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    user_id TEXT,
    model TEXT,
    model_config TEXT,
    system_prompt TEXT,
    parent_session_id TEXT REFERENCES sessions(id),
    started_at REAL NOT NULL,
    ended_at REAL,
    end_reason TEXT,
    message_count INTEGER DEFAULT 0,
    tool_call_count INTEGER DEFAULT 0,
    input_tokens INTEGER DEFAULT 0,
    output_tokens INTEGER DEFAULT 0,
    cache_read_tokens INTEGER DEFAULT 0,
    cache_write_tokens INTEGER DEFAULT 0,
    reasoning_tokens INTEGER DEFAULT 0,
    billing_provider TEXT,
    billing_base_url TEXT,
    billing_mode TEXT,
    estimated_cost_usd REAL,
    actual_cost_usd REAL,
    cost_status TEXT,
    cost_source TEXT,
    pricing_version TEXT,
    title TEXT
);

{messages_table()};
{_INDEXES}
{FTS_ROWS};
{FTS_TABLE};
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
"""

# v2: a damaged full-text index must not stop messages from being written (see
# sessiondb.search_index). The triggers maintain the index only while no
# 'fts_damaged' row says it is damaged; a rebuild deletes that row.
_WHEN_INDEX_OK = "WHEN NOT EXISTS (SELECT 1 FROM sessiondb_meta WHERE key = 'fts_damaged')"
_FTS_TRIGGER_NAMES = ("messages_fts_insert", "messages_fts_delete", "messages_fts_update")
_V2_META = "CREATE TABLE sessiondb_meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;"
_V2_TRIGGERS = f"""
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages {_WHEN_INDEX_OK} BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages {_WHEN_INDEX_OK} BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages {_WHEN_INDEX_OK} BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
"""
_V2 = (_V2_META + "".join(f"DROP TRIGGER {name};" for name in _FTS_TRIGGER_NAMES)
       + _V2_TRIGGERS)

# v3: coordination (sessiondb.coordination) and optimistic revisions (#5).
# A session's revision counts changes to its own fields, made by any code path (a trigger,
# not the API, so every writer agrees); an UPDATE that stores the same values does not
# count, so it never makes another editor's expected revision stale. Counters (messages,
# tokens, cost) are not fields an editor edits and do not count either.
_EDITABLE = ("user_id", "model", "model_config", "system_prompt", "parent_session_id",
             "ended_at", "end_reason", "title")
_CHANGED = " OR ".join(f"new.{c} IS NOT old.{c}" for c in _EDITABLE)
# A lease row outlives its holders: ``token`` is the last fencing token handed out for
# the name, so tokens keep increasing across releases. The holder's process identity
# (host, boot id, pid, pid start time) lets a same-host process reclaim a lease whose
# holder died before its TTL. A claim row is one work item; ``token`` counts its claims.
_V3 = f"""
ALTER TABLE sessions ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
CREATE TRIGGER sessions_revision AFTER UPDATE OF {", ".join(_EDITABLE)} ON sessions
WHEN new.revision IS old.revision AND ({_CHANGED}) BEGIN
    UPDATE sessions SET revision = old.revision + 1 WHERE id = new.id;
END;

CREATE TABLE sessiondb_leases (
    name TEXT PRIMARY KEY,
    token INTEGER NOT NULL,
    owner TEXT,
    ttl REAL,
    acquired_at REAL,
    expires_at REAL,
    host TEXT,
    boot_id TEXT,
    pid_ns INTEGER,
    pid INTEGER,
    pid_start INTEGER
) WITHOUT ROWID;
CREATE INDEX sessiondb_leases_owner ON sessiondb_leases(owner) WHERE owner IS NOT NULL;

CREATE TABLE sessiondb_claims (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload TEXT,
    session_id TEXT,
    state TEXT NOT NULL DEFAULT 'ready'
        CHECK (state IN ('ready', 'claimed', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    available_at REAL NOT NULL,
    token INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    ttl REAL,
    claimed_at REAL,
    expires_at REAL,
    host TEXT,
    boot_id TEXT,
    pid_ns INTEGER,
    pid INTEGER,
    pid_start INTEGER,
    finished_at REAL,
    last_error TEXT
);
CREATE INDEX sessiondb_claims_ready ON sessiondb_claims(queue, id) WHERE state = 'ready';
CREATE INDEX sessiondb_claims_held ON sessiondb_claims(owner) WHERE state = 'claimed';
"""

# v4: the full-text index can be (re)built in short steps while everyone keeps writing
# (sessiondb.search_index). ``sessiondb_fts_pending`` holds id ranges of messages that
# are not in the index yet, kept disjoint; the triggers leave a message alone while its id
# lies in one of them (in the index and the table alike: an index entry is only ever
# deleted with the content it was made from), and the stepper indexes each range in
# short transactions. A bulk import defers its messages this way, so writers' messages
# outside the ranges are indexed at once as before.
_PENDING = """CREATE TABLE sessiondb_fts_pending (
    lo INTEGER PRIMARY KEY,
    hi INTEGER NOT NULL
)"""


def indexed_condition(row: str) -> str:
    """The trigger condition: the index is not marked damaged and ``row``'s id is in no
    pending range (the range starting at or before it ends before it)."""
    return (f"{_WHEN_INDEX_OK[5:]} AND NOT COALESCE((SELECT hi >= {row}.id FROM "
            f"sessiondb_fts_pending WHERE lo <= {row}.id ORDER BY lo DESC LIMIT 1), 0)")


#: The index triggers of v4 (also recreated by a rebuild, sessiondb.search_index).
FTS_TRIGGERS = f"""
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages WHEN {indexed_condition("new")} BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages WHEN {indexed_condition("old")} BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages WHEN {indexed_condition("old")} BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
"""
DROP_FTS_TRIGGERS = "".join(f"DROP TRIGGER IF EXISTS {name};" for name in _FTS_TRIGGER_NAMES)
_V4_FTS = f"{_PENDING};{DROP_FTS_TRIGGERS}{FTS_TRIGGERS}"

# v4, also lists and counts at any size (sessiondb.listing):
# - Listing indexes hold the list order (started_at DESC, id) and every column a list
#   filters on (source, ended_at), so a page is picked from an index alone: no session
#   row is read to skip it, and a row may be large (a system prompt spills onto overflow
#   pages that must be walked to reach the columns after it). One index per kind of
#   list: all sessions or all but some sources (a scan in order), one source (a range),
#   the active ones (a partial index: 5% of a year's sessions). The v1 indexes
#   idx_sessions_started and idx_sessions_source stay: hermes-agent creates them again
#   each time it opens a converted file, and the planner prefers these ones, which
#   give the whole order.
# - The number of messages is kept by triggers in sessiondb_totals, so that every
#   writer keeps it, foreign ones too, and message_count() reads one row instead of
#   counting a million index entries (18 ms). Rejected: SUM(sessions.message_count),
#   which reads every session row and trusts counters a foreign writer may not keep.
#   Cost: about 2% of an append with the full-text triggers (7% without them), and
#   a bulk DELETE of messages loses SQLite's truncate optimization (already lost to
#   the full-text triggers). A REPLACE that deletes a message without recursive
#   triggers would not count it out: nothing here does; doctor checks the total.
_LISTING_INDEXES = """
CREATE INDEX idx_sessions_listing ON sessions(started_at DESC, id, source, ended_at);
CREATE INDEX idx_sessions_source_listing ON sessions(source, started_at DESC, id, ended_at);
CREATE INDEX idx_sessions_active_listing ON sessions(started_at DESC, id, source, ended_at)
    WHERE ended_at IS NULL;
"""
#: The table of the message total (v4, above).
TOTALS = "sessiondb_totals"


def message_totals(table: str = "messages", count: bool = True) -> str:
    """The DDL of the message total kept by triggers on ``table`` (v4, above), starting
    from a count of ``table``'s rows, or from 0 with ``count=False`` (the conversion's
    copy table, empty when it is made)."""
    start = f"SELECT 'messages', COUNT(*) FROM {table}" if count else "VALUES ('messages', 0)"
    return f"""
CREATE TABLE {TOTALS} (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO {TOTALS} (name, value) {start};
CREATE TRIGGER messages_total_insert AFTER INSERT ON {table} BEGIN
    UPDATE {TOTALS} SET value = value + 1 WHERE name = 'messages';
END;
CREATE TRIGGER messages_total_delete AFTER DELETE ON {table} BEGIN
    UPDATE {TOTALS} SET value = value - 1 WHERE name = 'messages';
END;
"""


_V4_LISTING = _LISTING_INDEXES + message_totals()
_V4 = _V4_FTS + _V4_LISTING

#: The statement that reads the message total kept by the v4 triggers.
MESSAGE_TOTAL_SQL = "SELECT value FROM sessiondb_totals WHERE name = 'messages'"

# v5: the full-text index may be cut into tables by id block (sessiondb.fts_tables). A
# v4 store is a v5 store whose index is one table (its tail, from the lowest id): no
# change to make; the version keeps a library that knows one table only from opening a
# store it would search partly and rebuild wrongly.
_V5 = "SELECT 1"

#: MIGRATIONS[n] brings a store from version n to n + 1.
MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4, _V5]

#: Runs a write function in one write transaction and returns what it returned.
WriteRunner = Callable[[Callable[[apsw.Connection], Any]], Any]


def user_version(conn: apsw.Connection) -> int:
    return int(conn.pragma("user_version"))


def build_schema(conn: apsw.Connection, run_write: WriteRunner) -> None:
    """Create the current schema in a brand-new store that no other process can see yet
    (see :func:`sessiondb.connection.create_store`), so no lock is needed."""
    for version in range(user_version(conn), SCHEMA_VERSION):
        run_write(migrate_from(version))
    stamp(conn, run_write)


def application_id(conn: apsw.Connection) -> int:
    return int(conn.pragma("application_id"))


def stamp(conn: apsw.Connection, run_write: WriteRunner) -> None:
    """Give a store that has none sessiondb's :data:`APPLICATION_ID`, through the write
    path (it changes the file's header)."""
    if application_id(conn) != APPLICATION_ID:
        run_write(_stamp)


def _stamp(conn: apsw.Connection) -> None:
    if application_id(conn) == 0:  # else another process stamped it first
        conn.pragma("application_id", APPLICATION_ID)


def refuse_unusable(conn: apsw.Connection, path: Path) -> int:
    """Refuse, before anything is written, a store newer than this library or a
    database that holds other tables and no sessiondb schema; return the version.

    The version and the table names are read by one statement, so from one snapshot:
    read one after the other, a migration committed by another process in between
    would show tables without a version, and a fresh store would be taken for a
    foreign database.

    :raises ForeignDatabaseError: the file's ``application_id`` is another application's.
    :raises SchemaTooNewError: ``user_version`` is above :data:`SCHEMA_VERSION`.
    :raises DatabaseOpenError: foreign tables and no schema version (a hermes-agent
        ``state.db`` of schema 6 is not foreign: :mod:`sessiondb.conversion` converts it).
    :raises HermesSchemaError: a hermes-agent ``state.db`` of another schema version.
    """
    found, names, app = conn.execute(
        "SELECT (SELECT user_version FROM pragma_user_version), "
        "(SELECT json_group_array(name) FROM sqlite_schema "
        " WHERE type = 'table' AND name NOT LIKE 'sqlite%'), "
        "(SELECT application_id FROM pragma_application_id)").fetchone()
    refuse_foreign_application(path, int(app))
    found = int(found)
    _refuse_newer(path, found)
    if found == 0:
        names = json.loads(names)
        if hermes_version(conn, path, names) is None:  # a hermes-agent file is converted
            _refuse_foreign_names(path, names)
    return found


def refuse_foreign_application(path: Path, found: int) -> None:
    """:raises ForeignDatabaseError: ``found`` is neither 0 nor :data:`APPLICATION_ID`."""
    if found not in (0, APPLICATION_ID):
        raise ForeignDatabaseError(str(path), found)


def migrate_from(version: int) -> Callable[[apsw.Connection], None]:
    """The write function that takes a store at ``version`` to the next one (nothing if
    another process got there first)."""
    def migrate(conn: apsw.Connection) -> None:
        if user_version(conn) != version:  # another process got here first
            return
        conn.execute(MIGRATIONS[version])
        conn.pragma("user_version", version + 1)
    return migrate


def _refuse_newer(path: Path, found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaTooNewError(str(path), found, SCHEMA_VERSION)


def _refuse_foreign(conn: apsw.Connection, path: Path) -> None:
    """Refuse a database with foreign tables; describe a hermes-agent file as such."""
    names = _table_names(conn)
    version = hermes_version(conn, path, names)
    if version is not None:
        begun = (COPY_TABLE in names) * (
            " (a conversion was begun and cut short: the next open carries it on)")
        raise DatabaseOpenError(
            f"{path} is a hermes-agent state.db (schema version {version}) that sessiondb "
            f"has not converted yet{begun}; nothing was changed. Opening it with SessionDB "
            "(or sessiondb.compat.hermes.SessionDB) converts it in place", str(path))
    _refuse_foreign_names(path, names)


def _table_names(conn: apsw.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type='table' AND name NOT LIKE 'sqlite%'")]


def _refuse_foreign_names(path: Path, names: list[str]) -> None:
    if names:
        raise DatabaseOpenError(
            f"{path} is a SQLite database with other tables ({', '.join(sorted(names)[:5])}) "
            "and no sessiondb schema; refusing to modify it. Use a new file",
            str(path),
        )


def complete_conversion(conn: apsw.Connection) -> None:
    """The end of the conversion of a hermes-agent file, once its tables are sessiondb's
    (sessiondb.conversion): the full-text table and its triggers, ``sessiondb_meta`` and
    the later migrations, every message pending for the full-text index (built
    afterwards in short steps, :mod:`sessiondb.search_index`; the engine finishes it on
    open), and the schema version. hermes-agent's full-text triggers must be gone and
    its index table set aside (:func:`set_aside_index`). What the conversion made
    before, each in a transaction of its own, is not made again: the session indexes
    (:func:`missing_session_indexes`, made here for a file whose copy began without
    them) and the message total (counted here for such a file)."""
    for ddl in missing_session_indexes(conn):
        conn.execute(ddl)
    conn.execute(f"DROP VIEW IF EXISTS messages_fts_rows_0; {FTS_ROWS}; {FTS_TABLE}")
    conn.execute(_V2_META.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    conn.execute(_V2_TRIGGERS)
    counted = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?",
                           (TOTALS,)).fetchone() is not None
    # In this transaction: no writer may see the v2 triggers index a deferred message.
    for version in range(2, SCHEMA_VERSION):
        if MIGRATIONS[version] is _V4:  # its indexes made above
            conn.execute(_V4_FTS + ("" if counted else message_totals()))
        else:
            conn.execute(MIGRATIONS[version])
    conn.execute(PEND_EVERY_MESSAGE)
    conn.execute("INSERT OR REPLACE INTO sessiondb_meta (key, value) VALUES (?, ?)",
                 (REBUILDING, CONVERSION))
    conn.pragma("user_version", SCHEMA_VERSION)


def missing_session_indexes(conn: apsw.Connection) -> list[str]:
    """The statements that give a hermes-agent file sessiondb's indexes of ``sessions``
    (v1's and v4's listing ones) and no other, each to run in a transaction of its own
    (an index of 131,000 sessions took 0.1-0.4 s to make, measured): an index of the
    same name and definition is kept (hermes-agent's are v1's), one of another
    definition made again; the others are dropped last, once sessiondb's are there (a
    unique one under another name keeps titles unique until then)."""
    found = dict(conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'index' "
                              "AND tbl_name = 'sessions' AND sql IS NOT NULL").fetchall())
    made, out = [], []
    wanted = (SESSION_INDEXES + _LISTING_INDEXES).split(";")
    for ddl in filter(None, (d.strip() for d in wanted)):
        name = re.search(r"INDEX (\w+)", ddl)[1]
        made.append(name)
        have = found.get(name)
        if have is None:
            out.append(ddl)
        elif have.split() != ddl.split():
            out.append(f'DROP INDEX "{name}"; {ddl}')
    quoted = ('"' + name.replace('"', '""') + '"' for name in found if name not in made)
    return out + [f"DROP INDEX {name}" for name in quoted]


#: The messages table that the conversion of a hermes-agent file fills while it runs
#: (sessiondb.conversion).
COPY_TABLE = "sessiondb_messages_new"
#: ``sessiondb_meta`` key present while the whole index is being rebuilt (its value says
#: why); search refuses to answer from a partial index meanwhile.
REBUILDING = "fts_rebuilding"
#: Its value after the conversion of a hermes-agent file: any process that opens the
#: store then helps finish the index (sessiondb.engine).
CONVERSION = "converting a hermes-agent state.db"
_JUNK = "sessiondb_fts_junk"
#: Every message left to the index: one pending range from the lowest id to the highest,
#: none in an empty store. Two lookups of the key's ends: ``min(id), max(id)`` together,
#: or a ``count(*)``, read every row (on 10 million messages a lock held for 21 s).
PEND_EVERY_MESSAGE = (
    "INSERT INTO sessiondb_fts_pending (lo, hi) SELECT (SELECT min(id) FROM messages), "
    "(SELECT max(id) FROM messages) WHERE EXISTS (SELECT 1 FROM messages)")


def set_aside_index(conn: apsw.Connection, name: str = "messages_fts") -> None:
    """Rename a full-text index table (the tail by default), if there is one, to a free
    ``sessiondb_fts_junk_<n>`` name: dropping a large index is one long statement, so
    its shadow tables are emptied later in short steps (sessiondb.search_index) and the
    empty table dropped. The index triggers must be gone first: a rename rewrites the
    triggers that name the table to name the new one. A table too damaged to rename (a
    shadow table missing) is dropped instead, in this one statement.
    """
    if not conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?", (name,)).fetchone():
        return
    taken = set(junk_tables(conn))
    n = next(i for i in range(1, len(taken) + 2) if f"{_JUNK}_{i}" not in taken)
    conn.execute("SAVEPOINT sessiondb_set_aside")
    try:
        conn.execute(f'ALTER TABLE "{name}" RENAME TO {_JUNK}_{n}')
    except apsw.Error:
        conn.execute("ROLLBACK TO sessiondb_set_aside")
        conn.execute(f'DROP TABLE "{name}"')
    conn.execute("RELEASE sessiondb_set_aside")


def junk_tables(conn: apsw.Connection) -> list[str]:
    """The set-aside index tables still to be emptied and dropped."""
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name GLOB ? "
        "AND sql LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name", (f"{_JUNK}_[0-9]*",))]
