"""Exhibit 1, SIGKILL chaos: writers die at any instruction, and no acknowledged write is
lost, none is doubled, and no counter drifts.

Eight writer processes append to a few shared sessions while the test SIGKILLs a random
writer every ~0.3 s and starts a replacement. A kill can land anywhere: inside the write
gate, between ``BEGIN IMMEDIATE`` and ``COMMIT``, halfway through a WAL frame, in a
checkpoint. Each writer keeps a ledger of the writes it was told were committed (one
line per write, written only after ``append_message`` returned). Afterwards every
ledger entry is in the store exactly once, under the id the call returned; every
session's ``message_count`` equals its rows; both integrity checks pass; the writers
still alive at the end stop cleanly. How long calls waited is reported, not asserted.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import apsw
import pytest

import museum_workers
import workers
from sessiondb import SessionDB
from sessiondb.writes import percentile

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")

WRITERS = 8
SESSIONS = [f"chaos-{n}" for n in range(4)]


class Ledger:
    """Every writer's ledger file, parsed."""

    def __init__(self, paths: list[Path]) -> None:
        self.acks: dict[str, tuple[int, str, float]] = {}   # token -> (id, session, took)
        self.ends: dict[str, tuple[int, float]] = {}        # ledger name -> (writes, wait)
        self.errors: list[str] = []
        self.torn = 0
        for path in paths:
            text = path.read_text() if path.exists() else ""
            lines = text.split("\n")
            if lines[-1]:  # a kill can only cut the last line short
                self.torn += 1
            for line in lines[:-1]:
                kind, _, rest = line.partition(" ")
                if kind == "ack":
                    token, mid, sid, took = rest.split()
                    assert token not in self.acks, f"token {token} acknowledged twice"
                    self.acks[token] = (int(mid), sid, float(took))
                elif kind == "end":
                    writes, wait = rest.split()
                    self.ends[path.name] = (int(writes), float(wait))
                elif kind == "err":
                    self.errors.append(f"{path.name}: {rest}")
                else:
                    raise AssertionError(f"unreadable ledger line in {path.name}: {line!r}")


def fts_integrity(path: Path) -> None:
    """FTS5's own check, the second form also against the ``messages`` table it indexes
    (https://sqlite.org/fts5.html#the_integrity_check_command); raises if damaged."""
    conn = apsw.Connection(str(path))
    try:
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES('integrity-check')")
        conn.execute("INSERT INTO messages_fts(messages_fts, rank) "
                     "VALUES('integrity-check', 1)")
    finally:
        conn.close()


@pytest.mark.parametrize("duration, kills", [
    pytest.param(10.0, 30, id="10s"),
    pytest.param(60.0, 200, id="60s", marks=pytest.mark.soak),
])
def test_sigkill_chaos(tmp_path: Path, exhibit, duration: float, kills: int):
    path = tmp_path / "state.db"
    stop_path = tmp_path / "stop"
    with SessionDB(path) as db:
        for sid in SESSIONS:
            db.create_session(sid, "chaos")
    rng = random.Random(20240401)
    ledgers: list[Path] = []
    alive: list[tuple[int, multiprocessing.process.BaseProcess, Path]] = []
    all_procs: list[multiprocessing.process.BaseProcess] = []
    died_on_their_own: list[str] = []
    # One byte per writer, 1 while it is inside append_message (no lock: SIGKILL-safe).
    in_call = SPAWN.RawArray("b", WRITERS + kills)

    def start_writer() -> None:
        n = len(ledgers)
        ledger = tmp_path / f"ledger-{n:04d}"
        ledgers.append(ledger)
        proc = SPAWN.Process(target=museum_workers.chaos_writer,
                             args=(str(path), n, str(ledger), SESSIONS, 1000 + n,
                                   str(stop_path), in_call))
        proc.start()
        alive.append((n, proc, ledger))
        all_procs.append(proc)

    done_kills = mid_call = 0
    began = time.monotonic()
    try:
        for _ in range(WRITERS):
            start_writer()
        # The killer: exactly ``kills`` kills, one every ~duration/kills seconds (jittered).
        interval = duration / kills
        for _ in range(kills):
            time.sleep(interval * rng.uniform(0.5, 1.5))
            # Prefer a writer caught inside a call (the kills that matter), then one that
            # is writing at all (a kill during interpreter start-up proves little).
            calling = [w for w in alive if in_call[w[0]]]
            writing = [w for w in alive if w[2].exists() and w[2].stat().st_size > 0]
            victim = rng.choice(calling or writing or alive)
            n, proc, ledger = victim
            if proc.exitcode is not None:
                died_on_their_own.append(f"{ledger.name}: exit code {proc.exitcode}")
            else:
                os.kill(proc.pid, signal.SIGKILL)
                done_kills += 1
                mid_call += in_call[n]  # still inside the call when the kill was sent
            proc.join(30)
            alive.remove(victim)
            start_writer()
        elapsed = time.monotonic() - began
        stop_path.touch()
        for _, proc, _ in alive:
            proc.join(60)
        survivors = {ledger.name: proc.exitcode for _, proc, ledger in alive}
    finally:
        stop_path.touch()
        for proc in all_procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)

    ledger = Ledger(ledgers)
    assert ledger.errors == [], "a writer raised:\n" + "\n".join(ledger.errors)
    assert died_on_their_own == []
    assert done_kills == kills
    assert survivors == {name: 0 for name in survivors}, "a surviving writer failed"
    assert set(ledger.ends) == set(survivors), "a survivor stopped without its end line"

    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT id, session_id, content FROM messages").fetchall()
        counters = conn.execute(
            "SELECT s.id, s.message_count, (SELECT COUNT(*) FROM messages m "
            "WHERE m.session_id = s.id) FROM sessions s").fetchall()
    finally:
        conn.close()
    in_db: dict[str, tuple[int, str]] = {}
    seen = Counter()
    for mid, sid, content in rows:
        token = content.split(" ", 1)[0]
        seen[token] += 1
        in_db[token] = (mid, sid)
    assert [t for t, n in seen.items() if n > 1] == [], "a write is in the store twice"
    lost = [t for t in ledger.acks if t not in in_db]
    moved = [t for t, (mid, sid, _) in ledger.acks.items()
             if t in in_db and in_db[t] != (mid, sid)]
    assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
    assert moved == [], f"rows under another id or session than acknowledged: {moved[:5]}"
    assert sorted(c[0] for c in counters) == sorted(SESSIONS)
    assert [(sid, kept) for sid, kept, real in counters if kept != real] == []
    assert workers.integrity(path) == [("ok",)]
    fts_integrity(path)

    waits = [took for _, _, took in ledger.acks.values()]
    survivor_waits = [took for token, (_, _, took) in ledger.acks.items()
                      if f"ledger-{int(token[1:].split('-')[0]):04d}" in survivors]
    exhibit(f"SIGKILL chaos, {duration:.0f} s",
            "every acknowledged write there exactly once; counters exact; integrity ok",
            kills=done_kills, kills_mid_call=mid_call, writers_started=len(ledgers), acked=len(ledger.acks),
            lost=len(lost), committed_unacked=len(in_db) - len(ledger.acks),
            longest_wait_s=round(max(waits), 3), p99_wait_s=round(percentile(waits, 99), 4),
            survivors_longest_wait_s=round(max(survivor_waits, default=0.0), 3),
            duration_s=round(elapsed, 1))
