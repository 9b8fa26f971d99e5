"""The scale benchmark's data: seeded sessions of Zipf-distributed random words.

A vocabulary of 60,000 random lowercase words (3-10 letters) is drawn with Zipf weights
(the word of rank ``r`` has weight ``1 / r``) into one long text; each message is a slice
of it, 200-2000 bytes, cut at word boundaries. Drawing every word of a million messages
one by one (about 150 million weighted draws) would take minutes of Python, longer than
the import it is meant to feed; slicing a pre-drawn text of a few million words costs a
few microseconds per message and keeps the word frequencies Zipf-shaped.

Sessions are streamed as the dicts :meth:`~sessiondb.SessionDB.import_sessions` reads
(the format of :meth:`~sessiondb.SessionDB.export_session`), one at a time, so that a
million messages are never in memory at once.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any, Iterator

#: Sources and their weights in percent.
SOURCES = (("cli", 50), ("telegram", 25), ("discord", 15), ("cron", 9), ("slack", 1))
PER_SESSION = 50
VOCABULARY = 60_000
YEAR_S = 365 * 86400
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Words in the pre-drawn text: enough that a message slice rarely repeats a neighbour's,
# few enough to draw in a second or two (about 7 bytes a word).
_MIN_STREAM, _MAX_STREAM = 200_000, 4_000_000


def role_of(k: int) -> str:
    """The role of the ``k``-th message of a session: user, assistant, user, tool, ..."""
    return "user" if k % 2 == 0 else ("assistant" if k % 4 == 1 else "tool")


class Corpus:
    """Seeded vocabulary and text; every method draws from the caller's generator.

    :param seed: the seed of the vocabulary and of the text.
    :param messages: how many messages will be drawn (sizes the pre-drawn text).
    """

    def __init__(self, seed: int, messages: int) -> None:
        rng = random.Random(seed)
        words: dict[str, None] = {}
        while len(words) < VOCABULARY:
            words["".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 10)))] = None
        self.words = list(words)
        weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(VOCABULARY)))
        n = max(_MIN_STREAM, min(_MAX_STREAM, messages * 20))
        self.text = " ".join(rng.choices(self.words, cum_weights=weights, k=n))

    def message(self, rng: random.Random) -> str:
        """200-2000 bytes of text, starting and ending at a word boundary."""
        size = rng.randint(200, 2000)
        start = self.text.find(" ", rng.randrange(len(self.text) - 2 * 2100)) + 1
        end = self.text.find(" ", start + size)
        return self.text[start:end]


def source_of(rng: random.Random) -> str:
    """A source drawn with the weights of :data:`SOURCES`."""
    pick = rng.randrange(100)
    for name, weight in SOURCES:
        if pick < weight:
            return name
        pick -= weight
    return SOURCES[0][0]


def session_id(index: int) -> str:
    return f"s{index:07d}"


def sessions(corpus: Corpus, count: int, seed: int, *, now: float | None = None,
             first: int = 0) -> Iterator[dict[str, Any]]:
    """Stream ``count`` session dicts (import format), each with 50 messages.

    Starts are spread evenly over the year before ``now`` (oldest first), 95% of the
    sessions are ended (an hour after their start), every third is titled.

    :param first: index of the first session (ids ``s0000000`` ...).
    """
    rng = random.Random(seed * 7919 + first)
    now = time.time() if now is None else now
    span = YEAR_S / max(count, 1)
    for i in range(first, first + count):
        started = now - YEAR_S + (i - first) * span
        messages = [{"role": role_of(k), "content": corpus.message(rng),
                     "timestamp": started + k} for k in range(PER_SESSION)]
        yield {
            "id": session_id(i),
            "source": source_of(rng),
            "model": "gpt-5",
            "started_at": started,
            "ended_at": None if rng.random() < 0.05 else started + 3600,
            "title": f"title {i}" if i % 3 == 0 else None,
            "messages": messages,
        }


class Timed:
    """An iterator that adds up the time spent producing its items (``spent_s``), so
    that a rate can leave out the time spent generating the data.

    :param items: the iterator to wrap.
    """

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items
        self.spent_s = 0.0
        self.items = 0
        self.messages = 0

    def __iter__(self) -> "Timed":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            item = next(self._items)
        finally:
            self.spent_s += time.perf_counter() - t0
        self.items += 1
        self.messages += len(item.get("messages", ()))
        return item
