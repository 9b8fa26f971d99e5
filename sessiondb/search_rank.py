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
from typing import Iterable, Sequence

import apsw

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

    def __init__(self, conn: apsw.Connection, phrases: Sequence[str] | None,
                 sample: str) -> None:
        fields = sample.split()
        count = len(fields) - 3
        self.idf = [1.0] * count
        if count > 1 and phrases is not None and len(phrases) == count:
            self.idf = idf(conn, phrases, int(fields[0])) or self.idf

    def order(self, window: Iterable[tuple[int, str]]) -> list[int]:
        """The ids of ``window`` best first, ties newest first."""
        return [rowid for _, _, rowid in sorted(
            (self.score(data), -rowid, rowid) for rowid, data in window)]

    def score(self, data: str) -> float:
        """FTS5's bm25 (fts5_aux.c, fts5Bm25Function) with these IDFs: lower is better."""
        rows, tokens, length, *freqs = map(int, data.split())
        avgdl = tokens / rows if rows else 1.0
        norm = _K1 * (1 - _B + _B * length / avgdl)
        score = 0.0
        for weight, freq in zip(self.idf, freqs):
            score += weight * ((freq * (_K1 + 1.0)) / (freq + norm))
        return -1.0 * score


def idf(conn: apsw.Connection, phrases: Sequence[str], index_rows: int
        ) -> list[float] | None:
    """Each phrase's IDF as FTS5's bm25 computes it, ``log((N - n + 0.5) / (n + 0.5))``
    (at least 1e-6), over the newest :data:`IDF_SLICE` ids: ``N`` of them, ``n`` the
    messages among them containing the phrase (in a store no larger: the index's rows
    and every message containing it, so exactly FTS5's). None when a phrase cannot be
    counted; the caller then weighs every phrase alike."""
    top = _first(conn, "SELECT max(id) FROM messages", ())
    slice_lo = (top or 0) - IDF_SLICE + 1
    if _first(conn, "SELECT 1 FROM messages WHERE id < ? LIMIT 1", (slice_lo,)) is None:
        rows, bound = index_rows, None
    else:
        # The slice's ids, not its rows: counting them reads every message of it (a few
        # ms), and recent ids have few gaps (deletions prune the oldest sessions).
        rows, bound = IDF_SLICE, slice_lo
    out = []
    for phrase in phrases:
        try:
            hits = _first(conn, "SELECT count(*) FROM messages_fts WHERE messages_fts "
                                "MATCH ? AND rowid >= ?", (phrase, bound or 0))
        except apsw.SQLError:
            return None
        value = math.log((rows - hits + 0.5) / (hits + 0.5))
        out.append(value if value > 0.0 else 1e-6)
    return out
