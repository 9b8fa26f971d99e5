"""The GIN indexes of the search column, one per band of message ids.

A GIN index reads the whole posting list of every lexeme it is asked for, whatever
range of ids the query wants: the newest thousand matches of a word in a tenth of a
million messages cost its hundred thousand postings. So the search column is indexed
in *bands*: partial GIN indexes ``messages_fts_b<lo>_<hi>`` (``WHERE id >= lo AND id <
hi``, :data:`BAND_IDS` ids each, older ones merged :data:`MERGE` to one, see
:func:`plan`) and one open *tail* ``messages_fts_t<lo>`` (``WHERE id
>= lo``) above them. A message is in exactly one of them, so an append updates one GIN
index, as before. The search (:mod:`sessiondb.pg.search`) asks each band it needs, with
the band's predicate written into its statement (never prepared, so the planner sees
the constants and proves the partial index usable); the newest band holds only its own
postings.

**The layout is read from the catalog** (:func:`layout`): the valid indexes, by name.
Nothing else records it, so a crash between two steps leaves nothing to repair but an
invalid index, which the next :func:`roll` drops. The index ``idx_messages_fts`` of
schema version 1 (all messages) counts as a tail from id 0 until the roll replaces it.

**Rolling** (:func:`roll`): the tail starts at least half a band above the newest id,
so it is normally empty and appends land in a closed band. When the newest id comes
within a quarter band of the tail (:func:`wants_roll`), a roll builds the bands the
layout of :func:`plan` wants and does not have (newest first), then the new tail, then
drops what the plan no longer wants (older tails, bands merged into wider ones). Until
the new indexes are valid the old ones serve, so no id is ever without an index. A
search that sees a roll is due starts it in a daemon thread of its process, on a
connection of its own (:func:`start_roll`); a row of ``sessiondb_meta``
(``fts_roll_until``, a time) keeps two processes from rolling at once, and expires if
the roller dies (a build it left half done is an invalid index, dropped and built
again by the next roll).

The roll also builds the index of word pairs (:mod:`sessiondb.pg.pairs`) when it
is missing, after the bands: a store migrated to schema version 3 gets it there.

**Locks.** Builds are ``CREATE INDEX CONCURRENTLY``, drops ``DROP INDEX
CONCURRENTLY``: each holds ``SHARE UPDATE EXCLUSIVE`` on ``messages`` while it runs,
which blocks neither reads nor writes (only ``VACUUM`` and other schema changes of the
table wait), and each waits for the transactions already running. A build scans the
table twice: on a million messages (3 GB) 5-20 s per band at 2 CPUs shared with other
work, 183-190 s for a whole layout. The migration to schema version 2 holds no lock on
``messages`` on a store with messages; on an empty one it replaces the index of
version 1 (``ACCESS EXCLUSIVE`` on the empty table, milliseconds).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable, NamedTuple

import psycopg

from . import pairs

__all__ = ["BAND_IDS", "Segment", "layout", "plan", "wants_roll", "roll", "start_roll",
           "LAYOUT_SQL"]

#: Ids per band of the GIN index (the narrowest; see :func:`plan`).
BAND_IDS = 16_384
#: Bands merged into one of the next width.
MERGE = 8
#: Widths of bands: BAND_IDS, MERGE times it, ...
LEVELS = 4
#: Seconds a roll claims the store for (another process may roll after that).
ROLL_CLAIM = 900.0
#: Seconds between two roll attempts of one process on one store (a roll that fails,
#: e.g. cancelled by a statement_timeout, is not tried again at every search).
ROLL_RETRY = 300.0
#: The index of schema version 1: every message.
LEGACY = "idx_messages_fts"

_NAME = re.compile(r"^messages_fts_(?:b(\d+)_(\d+)|t(\d+))$")

#: The search column's GIN indexes on ``messages``: name, valid (usable), ready, and
#: whether a CREATE INDEX CONCURRENTLY is building it now.
#: ``{table}``: ``messages``, or schema-qualified.
LAYOUT_SQL = (
    "SELECT c.relname::text, i.indisvalid, i.indisready, EXISTS (SELECT 1 FROM "
    "pg_catalog.pg_stat_progress_create_index p WHERE p.index_relid = c.oid) "
    "FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
    "WHERE i.indrelid = '{table}'::regclass AND (c.relname = 'idx_messages_fts' "
    r"OR c.relname ~ '^messages_fts_(b\d+_\d+|t\d+)$')")


class Segment(NamedTuple):
    """A range of ids served by one index: ``lo`` <= id < ``hi`` (None: no end)."""

    lo: int
    hi: int | None
    #: the index's predicate, written into a statement that wants it used ("" for an
    #: index of every message, or none at all)
    where: str
    index: str | None


def _span(name: str) -> tuple[int, int | None] | None:
    if name == LEGACY:
        return 0, None
    m = _NAME.match(name)
    if m is None:
        return None
    return (int(m.group(1)), int(m.group(2))) if m.group(1) else (int(m.group(3)), None)


def _where(lo: int, hi: int | None, name: str) -> str:
    if name == LEGACY:
        return ""
    return f"m.id >= {lo}" + (f" AND m.id < {hi}" if hi is not None else "")


def layout(names: list[str]) -> list[Segment]:
    """The segments of ids, newest first, covering every id from 0 up, given the names
    of the valid indexes: the newest tail, then below each segment's start the
    narrowest index holding the id before it (a band, or an older tail); ids below all
    of them (or between, where indexes were dropped by hand) get a segment without an
    index."""
    spans = [(span, name) for span, name in ((_span(n), n) for n in names)
             if span is not None and (span[1] is None or span[1] > span[0])]
    tails = [(lo, name) for (lo, hi), name in spans if hi is None]
    if tails:
        lo, name = max(tails)
        segments = [Segment(lo, None, _where(lo, None, name), name)]
    else:  # no tail: the ids above the newest band have no index
        lo = max((hi for (_, hi), _ in spans), default=0)
        segments = [Segment(lo, None, "", None)]
    at = lo
    while at > 0:
        holding = [(lo, hi, name) for (lo, hi), name in spans
                   if lo < at and (hi is None or hi >= at)]
        if holding:
            lo, hi, name = max(holding, key=lambda h: h[0])
            segments.append(Segment(lo, at, _where(lo, hi, name), name))
        else:
            lo = max((hi for (_, hi), _ in spans if hi is not None and hi < at), default=0)
            segments.append(Segment(lo, at, "", None))
        at = lo
    return segments


def band_size(names: list[str]) -> int:
    """The ids per band of the store: the newest band's, else :data:`BAND_IDS`."""
    spans = [s for s in map(_span, names) if s is not None and s[1] is not None]
    if not spans:
        return BAND_IDS
    lo, hi = max(spans, key=lambda s: s[1])
    return hi - lo


def wants_roll(names: list[str], top: int) -> bool:
    """Whether the newest id ``top`` is within a quarter band of the tail (or there is
    no tail, or the index of schema version 1 is still there)."""
    tails = [s[0] for s in map(_span, names) if s is not None and s[1] is None]
    if not tails or LEGACY in names:
        return True
    return top + band_size(names) // 4 >= max(tails)


def plan(lowest: int, top: int, size: int) -> tuple[int, list[tuple[int, int]]]:
    """Where the tail starts, and the bands ``(lo, hi)`` below it down to the oldest
    message ``lowest``, newest first, for ``size`` ids per band and the newest id
    ``top``.

    The tail starts on a band boundary at least half a band above ``top``. Below it,
    a band is :data:`MERGE` times wider wherever that wider band is aligned on its own
    width and ends at least half that width below the tail (so that it is not soon
    wanted narrower again), up to :data:`LEVELS` widths: the newest ids stay in narrow
    bands (a common word's newest matches cost a narrow band's postings), and the
    indexes stay few (every statement on ``messages`` opens all of them): about
    ``MERGE`` per width, 14 for a million messages.
    """
    start = ((top + size // 2) // size + 1) * size
    bands: list[tuple[int, int]] = []
    hi, floor = start, lowest // size * size
    while hi > floor:
        width = size
        for _ in range(LEVELS - 1):
            wider = width * MERGE
            if hi % wider or hi > start - wider // 2:
                break
            width = wider
        bands.append((hi - width, hi))
        hi -= width
    return start, bands


def roll(conn: psycopg.Connection, schema: str, band: int | None = None,
         progress: Callable[[str], None] | None = None) -> list[str]:
    """Bring the bands up to date: drop the invalid leftovers of interrupted builds,
    build the missing bands below the new tail's start and the new tail, drop the older
    tails; build the index of word pairs if it is missing (:func:`.pairs.build`).
    Returns what was done (empty: another process holds the roll, or nothing was due).

    :param conn: an autocommit connection (``CREATE INDEX CONCURRENTLY`` cannot run in
        a transaction); every statement names the schema (nothing is set in the
        session, which a pooler in transaction mode would not keep).
    :param schema: the store's schema (a checked name).
    :param band: ids per new band; default the store's (:func:`band_size`).
    """
    say = progress or (lambda _: None)
    q = f'"{schema}"'
    table = f"{q}.messages"
    layout_sql = LAYOUT_SQL.format(table=table)
    claim = conn.execute(
        f"INSERT INTO {q}.sessiondb_meta (key, value) VALUES ('fts_roll_until', %s) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value "
        "WHERE sessiondb_meta.value::float8 < %s RETURNING 1",
        [repr(time.time() + ROLL_CLAIM), time.time()]).fetchone()
    if claim is None:
        return []
    done: list[str] = []
    try:
        rows = conn.execute(layout_sql).fetchall()
        for name, valid, ready, building in rows:
            if not valid and not building:  # a build that was interrupted
                conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS {q}."{name}"')
                done.append(f"dropped invalid {name}")
        names = [r[0] for r in rows if r[1]]
        lowest, top = conn.execute(f"SELECT coalesce(min(id), 0), coalesce(max(id), 0) "
                                   f"FROM {table}").fetchone()
        start, wanted = plan(lowest, top, band or band_size(names))
        tail = f"messages_fts_t{start}"
        keep = {tail} | {f"messages_fts_b{lo}_{hi}" for lo, hi in wanted}
        for name, predicate in [(tail, f"id >= {start}")] + [
                (f"messages_fts_b{lo}_{hi}", f"id >= {lo} AND id < {hi}")
                for lo, hi in wanted]:
            if name in names:
                continue
            say(f"building {name}")
            try:
                conn.execute(f'CREATE INDEX CONCURRENTLY "{name}" ON {table} '
                             f"USING gin (content_tsv) WHERE {predicate}")
                done.append(f"built {name}")
            except psycopg.errors.DuplicateTable:
                pass  # built by someone who rolled without the claim (it expired)
        names = [r[0] for r in conn.execute(layout_sql).fetchall() if r[1]]
        if keep <= set(names):
            # Everything the plan wants serves: the rest (older tails, bands merged
            # into wider ones) goes.
            for name in names:
                if name not in keep:
                    say(f"dropping {name}")
                    conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS {q}."{name}"')
                    done.append(f"dropped {name}")
        # The index of word pairs, once the bands serve (a phrase is found without it).
        done += pairs.build(conn, schema, say)
    finally:
        if not conn.closed and conn.info.transaction_status == \
                psycopg.pq.TransactionStatus.IDLE:
            conn.execute(f"UPDATE {q}.sessiondb_meta SET value = '0' "
                         "WHERE key = 'fts_roll_until'")
    return done


_rolling: dict[tuple[Any, ...], tuple[threading.Thread, float]] = {}
_rolling_lock = threading.Lock()
#: The last error of a background roll, per store (for diagnosis).
errors: dict[tuple[Any, ...], BaseException] = {}


def start_roll(raw: psycopg.Connection, schema: str) -> bool:
    """Start :func:`roll` in a daemon thread, on a new connection made with the
    parameters of ``raw``, unless one runs (or failed less than :data:`ROLL_RETRY`
    seconds ago) for this store in this process. Returns whether it started."""
    info = raw.info
    key = (info.host, info.port, info.dbname, schema)
    with _rolling_lock:
        running = _rolling.get(key)
        if running is not None and (running[0].is_alive()
                                    or time.monotonic() < running[1] + ROLL_RETRY):
            return False
        params: dict[str, Any] = {**info.get_parameters(),
                                  "application_name": "sessiondb-fts-roll"}
        if info.password:
            params["password"] = info.password
        thread = threading.Thread(target=_roll_in_background, args=(params, schema, key),
                                  name=f"sessiondb-fts-roll-{schema}", daemon=True)
        _rolling[key] = (thread, time.monotonic())
        thread.start()
        return True


def _roll_in_background(params: dict[str, Any], schema: str, key: tuple[Any, ...]) -> None:
    try:
        with psycopg.connect(**params, autocommit=True) as conn:
            roll(conn, schema)
    except Exception as exc:  # noqa: BLE001 - a background thread has no caller
        errors[key] = exc
