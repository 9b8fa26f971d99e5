"""Holding something for the length of a call, whatever exception comes.

An exception raised by a signal handler (Ctrl-C's KeyboardInterrupt, or any handler
that raises) lands wherever the interpreter next checks for pending work: as a Python
function is entered, and as a call into C returns. So ``acquire(); try: ... finally:
release()`` keeps what it took when one lands as ``acquire`` returns, and ``with``
blocks of Python context managers when one lands as their ``__exit__`` is entered;
either way the write gate (:mod:`sessiondb.gate`) or the reader room's door would stay
held for good, and every writer or snapshot reader of every process would wait for it.
:func:`held` is the shape without those windows, for the holds outside the write path
(which has its own, :meth:`sessiondb.writes.WritePath._end`).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")

__all__ = ["held"]


def held(enter: Callable[[], Any], body: Callable[[Any], T],
         leave: Callable[[], None]) -> T:
    """``body(enter())``, then ``leave()`` whatever happens.

    ``enter`` runs inside the handler, so that an exception that lands as it returns
    (having taken what the caller does not know it holds) still leaves; ``leave`` must
    therefore be a no-op when nothing is held, and is called once more if an exception
    comes out of it (one landing as it is entered cannot be caught inside it).

    :raises: whatever ``enter`` or ``body`` raise (``body`` does not run if ``enter``
        raised).
    """
    try:
        return body(enter())
    finally:
        try:
            leave()
        except BaseException:
            leave()  # a no-op if the first call got through
            raise
