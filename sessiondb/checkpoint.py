"""WAL checkpoint policy: keep the ``-wal`` file small without stalling writers.

SQLite's auto-checkpoint is off (:func:`sessiondb.connection.connection_manual_checkpoints`);
instead every ``checkpoint_every`` writes this instance runs a PASSIVE checkpoint after
leaving the write gate (https://sqlite.org/c3ref/wal_checkpoint_v2.html). PASSIVE never
waits and never blocks anyone, but it cannot copy frames that a reader's snapshot still
needs, so a store whose readers are never all idle would grow its WAL without bound (1.4 -
2.9 GB in 10 s was measured with a reader holding 500 ms transactions back to back).

So when the WAL passes half of ``wal_limit`` a *reset* is attempted. The WAL size is
known after every commit (SQLite's WAL hook reports its frame count, at no cost), so the
check runs after every write, not only every ``checkpoint_every`` writes: with large
messages, 50 writes alone can add more than the whole limit. After a failed reset, the
next attempt waits for the next periodic checkpoint, so a reader that defeats resets
costs writers one ``reset_timeout`` stall per ``checkpoint_every`` writes, not per write.
A reset works like this: the checkpointer
enters the write gate (so this library's writers queue fairly behind it instead of
colliding with it), and runs a TRUNCATE checkpoint with a busy timeout of
``reset_timeout``. That waits for the readers that pin old frames to finish (new readers
no longer need the WAL), then truncates the file to zero bytes. The trade-off, which the
option makes explicit: writers wait up to ``reset_timeout`` while a reset waits for a
long reader. Readers that go through sessiondb are always short; a foreign process that
holds read transactions longer than ``reset_timeout`` back to back can defeat the bound,
and ``stats()["checkpoint"]["resets_failed"]`` then counts the failed attempts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import apsw

from .gate import Gate, GateTimeout


@dataclass
class CheckpointCounters:
    passive_runs: int = 0
    passive_busy: int = 0
    resets_ok: int = 0
    resets_failed: int = 0
    last_wal_frames: int = 0
    last_checkpointed_frames: int = 0
    longest_reset_s: float = 0.0

    def snapshot(self) -> dict[str, float | int]:
        return dict(self.__dict__)


class CheckpointPolicy:
    """Decides when to checkpoint, and how; one per connection.

    :param every: run a PASSIVE checkpoint after this many writes (0 disables).
    :param wal_limit: bytes; above half of it a reset (TRUNCATE) is attempted.
    :param reset_timeout: seconds a reset may wait for readers (and make writers wait).
    :param busy_timeout_ms: the connection's normal busy timeout, restored after a reset.
    """

    def __init__(self, gate: Gate, every: int, wal_limit: int, reset_timeout: float,
                 busy_timeout_ms: int, wal_path: str) -> None:
        self.gate = gate
        self.every = every
        self.wal_limit = wal_limit
        self.reset_timeout = reset_timeout
        self.busy_timeout_ms = busy_timeout_ms
        self.wal_path = wal_path
        self.counters = CheckpointCounters()
        self._since = 0
        self._frame_bytes = 0
        self._hooked: apsw.Connection | None = None
        self._wal_frames = 0        # WAL size in frames after this connection's last commit
        self._reset_backoff = False  # the last reset failed: retry only when periodic

    def after_write(self, conn: apsw.Connection) -> None:
        """Count a committed write; checkpoint when due. Call outside the write gate."""
        if self._hooked is not conn:
            self.attach(conn)
        self._since += 1
        if self.every and self._since >= self.every:
            self.passive(conn)
        elif (self.wal_limit and not self._reset_backoff
              and self._wal_frames * self._frame_size(conn) > self.wal_limit // 2):
            self.passive(conn)

    def attach(self, conn: apsw.Connection) -> None:
        """Follow the WAL size through SQLite's WAL hook (called after each commit of
        this connection, https://sqlite.org/c3ref/wal_hook.html). The hook only records
        the figure: checkpointing there would run inside the write gate."""
        conn.set_wal_hook(self._on_commit)
        self._hooked = conn

    def _on_commit(self, conn: apsw.Connection, dbname: str, frames: int) -> int:
        if dbname == "main":
            self._wal_frames = frames
        return apsw.SQLITE_OK

    def passive(self, conn: apsw.Connection) -> tuple[int, int] | None:
        """Run a PASSIVE checkpoint; escalate to a reset if the WAL is past half the limit.

        :returns: (frames in the WAL, frames checkpointed), or None if another
            checkpoint was running.
        """
        self._since = 0
        try:
            frames, done = conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except (apsw.BusyError, apsw.LockedError):
            self.counters.passive_busy += 1
            return None
        c = self.counters
        c.passive_runs += 1
        c.last_wal_frames, c.last_checkpointed_frames = frames, done
        if self.wal_limit and frames * self._frame_size(conn) > self.wal_limit // 2:
            self.reset(conn)
        return frames, done

    def reset(self, conn: apsw.Connection) -> bool:
        """TRUNCATE checkpoint inside the write gate, waiting up to ``reset_timeout``."""
        start = time.monotonic()
        try:
            self.gate.acquire(self.reset_timeout)
        except GateTimeout:
            self.counters.resets_failed += 1
            self._reset_backoff = True
            return False
        try:
            conn.set_busy_timeout(max(1, int(self.reset_timeout * 1000)))
            try:
                frames, _ = conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
                ok = frames == 0
            except (apsw.BusyError, apsw.LockedError):
                ok = False
            finally:
                conn.set_busy_timeout(self.busy_timeout_ms)
        finally:
            self.gate.release()
        c = self.counters
        if ok:
            c.resets_ok += 1
            c.last_wal_frames = c.last_checkpointed_frames = 0
            self._wal_frames = 0
        else:
            c.resets_failed += 1
        self._reset_backoff = not ok
        c.longest_reset_s = max(c.longest_reset_s, time.monotonic() - start)
        return ok

    def wal_bytes(self) -> int:
        """Current size of the ``-wal`` file (``os.stat`` only; the file is never opened)."""
        try:
            return os.stat(self.wal_path).st_size
        except OSError:
            return 0

    def _frame_size(self, conn: apsw.Connection) -> int:
        if not self._frame_bytes:
            self._frame_bytes = int(conn.pragma("page_size")) + 24
        return self._frame_bytes
