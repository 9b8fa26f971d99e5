"""bm25 within a window of search hits (see :mod:`sessiondb.search`): what FTS5 gives of
each row, and the score made of it.

The score is FTS5's bm25 (k1 = 1.2, b = 0.75, https://sqlite.org/fts5.html
#the_bm25_function), except for the number of messages containing each phrase, which is
counted over the newest :data:`IDF_SLICE` messages instead of the whole index (see
:func:`idf`). A phrase that :mod:`sessiondb.search_prefix` wrote as an OR of words
counts as one phrase: its occurrences in a row are those of its words together.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Callable, Iterable, Sequence

import apsw

from . import fts_tables
from .backend import first as _first

#: Newest messages over which each phrase's document frequency is counted for bm25.
IDF_SLICE = 10_000
_K1, _B = 1.2, 0.75
RANK_DATA = "sessiondb_rank_data"
_PREPARED: "weakref.WeakSet[apsw.Connection]" = weakref.WeakSet()


def prepare(conn: apsw.Connection) -> None:
    """Register the rank-data function on this connection, once."""
    if conn not in _PREPARED:
        conn.register_fts5_function(RANK_DATA, rank_data)
        _PREPARED.add(conn)


def rank_sql(groups: str | None) -> str:
    """The SQL expression of a row's rank data; ``groups`` as
    :func:`sessiondb.search_prefix.group_spec` gives it (digits and spaces), or None
    when every phrase is its own."""
    return f"{RANK_DATA}(messages_fts, '{groups}')" if groups else f"{RANK_DATA}(messages_fts)"


def rank_data(api: apsw.FTS5ExtensionApi, groups: str | None = None) -> str:
    """What bm25 needs of a row, as text: the index's rows and tokens, the row's tokens,
    then each phrase's occurrences in the row (an FTS5 auxiliary function).

    With ``groups``, consecutive phrases of the query count as one each (a prefix
    written as an OR of its words): a group's occurrences are the sum of its phrases',
    and those of the largest group are the row's instances (every phrase's) less the
    other groups', so that a prefix of a thousand words does not cost a thousand calls
    per row.
    """
    if groups is None:
        counts = [sum(map(len, api.phrase_locations(i))) for i in range(api.phrase_count)]
    else:
        sizes, largest = _groups(groups)
        counts = []
        start = 0
        for index, size in enumerate(sizes):
            counts.append(0 if index == largest else sum(
                len(offsets) for phrase in range(start, start + size)
                for offsets in api.phrase_locations(phrase)))
            start += size
        counts[largest] = api.inst_count - sum(counts)
    return (f"{api.row_count} {api.column_total_size(-1)} {api.column_size(-1)} "
            + " ".join(map(str, counts)))


@functools.lru_cache(maxsize=64)
def _groups(spec: str) -> tuple[tuple[int, ...], int]:
    sizes = tuple(map(int, spec.split()))
    return sizes, max(range(len(sizes)), key=sizes.__getitem__)


class Scorer:
    """bm25 of rank data (see :func:`rank_data`), with each phrase's document
    frequency counted over the newest :data:`IDF_SLICE` messages."""

    def __init__(self, conn: apsw.Connection,
                 phrases: Callable[[str], Sequence[str] | None], sample: str,
                 excluded: Sequence[bool] | None = None) -> None:
        """:param phrases: the query's phrases as run on an index table, given its
        name (:func:`idf`); None when they cannot be counted.
        :param sample: a row's rank data (for the number of phrases).
        :param excluded: for each phrase, whether it comes after ``NOT`` (a match
        holds none of it, so its term of the score is 0 whatever its IDF: it is not
        counted); None when not known."""
        fields = sample.split()
        count = len(fields) - 3
        # An index cut into tables: each row's data has its own table's rows and
        # tokens; the whole index's are used instead, so that the scores do not depend
        # on how the index is cut (with one table they are the same).
        self.totals = index_totals(conn) if len(fts_tables.tables(conn)) > 1 else None
        self.idf = [1.0] * count
        skip = list(excluded) if excluded is not None and len(excluded) == count \
            else [False] * count
        if count - sum(skip) > 1:  # one phrase scored: every score alike, scaled
            rows = int(fields[0]) if self.totals is None else self.totals[0]
            self.idf = idf(conn, phrases, count, rows, skip) or self.idf

    def order(self, window: Iterable[tuple[int, str]]) -> list[int]:
        """The ids of ``window`` best first, ties newest first."""
        return [rowid for _, _, rowid in sorted(
            (self.score(data), -rowid, rowid) for rowid, data in window)]

    def score(self, data: str) -> float:
        """FTS5's bm25 (fts5_aux.c, fts5Bm25Function) with these IDFs: lower is better."""
        rows, tokens, length, *freqs = map(int, data.split())
        if self.totals is not None:
            rows, tokens = self.totals
        avgdl = tokens / rows if rows else 1.0
        norm = _K1 * (1 - _B + _B * length / avgdl)
        score = 0.0
        for weight, freq in zip(self.idf, freqs):
            score += weight * ((freq * (_K1 + 1.0)) / (freq + norm))
        return -1.0 * score


def idf(conn: apsw.Connection, phrases: Callable[[str], Sequence[str] | None],
        count: int, index_rows: int, skip: Sequence[bool] = ()) -> list[float] | None:
    """Each phrase's IDF as FTS5's bm25 computes it, ``log((N - n + 0.5) / (n + 0.5))``
    (at least 1e-6), over the newest :data:`IDF_SLICE` ids: ``N`` of them, ``n`` the
    messages among them containing the phrase (in a store no larger: the index's rows
    and every message containing it, so exactly FTS5's). The slice is counted in each
    index table it reaches (:mod:`sessiondb.fts_tables`), with the phrases as run on
    that table (``phrases(name)``). None when a phrase cannot be counted (or the
    phrases are not ``count``); the caller then weighs every phrase alike. A phrase
    whose ``skip`` is true is not counted (its IDF is given as 1.0)."""
    top = _first(conn, "SELECT max(id) FROM messages", ())
    slice_lo = (top or 0) - IDF_SLICE + 1
    if _first(conn, "SELECT 1 FROM messages WHERE id < ? LIMIT 1", (slice_lo,)) is None:
        rows, bound = index_rows, None
    else:
        # The slice's ids, not its rows: counting them reads every message of it (a few
        # ms), and recent ids have few gaps (deletions prune the oldest sessions).
        rows, bound = IDF_SLICE, slice_lo
    hits = [0] * count
    for table in fts_tables.tables(conn):
        if bound is not None and table.hi is not None and table.hi <= bound:
            break
        run = phrases(table.name)
        if run is None or len(run) != count:
            return None
        for i, phrase in enumerate(run):
            if i < len(skip) and skip[i]:
                continue
            try:
                hits[i] += _first(conn, fts_tables.on(
                    table.name, "SELECT count(*) FROM messages_fts WHERE messages_fts "
                                "MATCH ? AND rowid >= ?"), (phrase, bound or 0))
            except apsw.SQLError:
                return None
    out = []
    for i, n in enumerate(hits):
        value = math.log((rows - n + 0.5) / (n + 0.5))
        out.append(1.0 if i < len(skip) and skip[i] else value if value > 0.0 else 1e-6)
    return out


def index_totals(conn: apsw.Connection) -> tuple[int, int]:
    """The rows and tokens of every table of the index together
    (:func:`sessiondb.fts_tables.averages`)."""
    rows = tokens = 0
    for table in fts_tables.tables(conn):
        n, t = fts_tables.averages(conn, table.name)
        rows += n
        tokens += t
    return rows, tokens
