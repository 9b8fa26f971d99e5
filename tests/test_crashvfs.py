"""The power-loss simulator itself (``tests/crashvfs.py``): before it can prove anything
about sessiondb it must show that it finds what SQLite documents. Under plain apsw
connections through it, with seeded cuts at random writes: ``synchronous=OFF`` corrupts
databases (a checkpoint copies pages from a WAL that was never synced), ``NORMAL`` loses
recent commits but never corrupts, ``FULL`` loses nothing
(https://sqlite.org/pragma.html#pragma_synchronous). And the parts of the model one by
one: unsynced writes vanish, synced ones stay, torn sectors, directory entries, the
``-shm`` after a reboot."""

from __future__ import annotations

import os
import random
from pathlib import Path

import apsw
import pytest

from crashvfs import SECTOR, CrashVFS, Disk, Inode, Model, _survivor, CutFigures


def run_cuts(tmp_path: Path, synchronous: str, cuts: int) -> tuple[int, int, int]:
    """``cuts`` seeded cuts of 120 inserts each; (acknowledged, lost, damaged stores)."""
    acked_total = lost = damaged = 0
    for seed in range(cuts):
        path = tmp_path / f"{synchronous}-{seed}.db"
        conn = apsw.Connection(str(path))
        conn.pragma("journal_mode", "wal")
        conn.execute("CREATE TABLE t(x)")
        conn.close()
        disk = Disk(seed=seed)
        vfs = CrashVFS(disk)
        try:
            conn = apsw.Connection(str(path), vfs=vfs.name)
            conn.pragma("synchronous", synchronous)
            conn.pragma("wal_autocheckpoint", 20)
            rng = random.Random(seed)
            disk.arm("write", "any", rng.randint(1, 240))
            acked = 0
            for i in range(120):
                conn.execute("INSERT INTO t VALUES (?)", (rng.randbytes(rng.randint(10, 900)),))
                if disk.powered:
                    acked = i + 1
            conn.close()
            disk.reboot()
        finally:
            vfs.unregister()
        acked_total += acked
        try:
            conn = apsw.Connection(str(path))
            try:
                ok = conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                rows = conn.execute("SELECT COUNT(*) FROM t").fetchall()[0][0]
            finally:
                conn.close()
        except apsw.Error:
            ok, rows = False, acked
        damaged += not ok
        lost += max(0, acked - rows)
    return acked_total, lost, damaged


def test_it_finds_what_sqlite_documents_for_each_synchronous_setting(tmp_path: Path):
    acked, lost, damaged = run_cuts(tmp_path, "FULL", 20)
    assert acked > 0 and lost == 0 and damaged == 0
    acked, lost, damaged = run_cuts(tmp_path, "NORMAL", 20)
    assert lost > 0 and damaged == 0, "NORMAL: recent commits lost, never a damaged store"
    acked, lost, damaged = run_cuts(tmp_path, "OFF", 20)
    assert damaged > 0, "OFF: the simulator must be able to corrupt a database"


def test_unsynced_writes_vanish_and_synced_ones_stay():
    model = Model()
    model.opened(1, "/d/f", "db", True, False, lambda: b"old!")
    model.write(1, 0, b"new!")
    model.sync_begins(1, 7)
    model.write(1, 4, b"late")     # during the sync: not covered by it
    model.sync_ends(1, 7, apsw.SQLITE_SYNC_NORMAL)
    model.write(1, 8, b"more")
    files, figures = model.crash(random.Random(1), "drop")
    assert files == {"/d/f": b"new!"} and figures.dropped == 2
    files, figures = model.crash(random.Random(1), "keep")
    assert files == {"/d/f": b"new!latemore"} and figures.applied == 2


@pytest.mark.parametrize("psow", [False, True])
def test_a_torn_write_garbles_whole_sectors_unless_the_disk_is_powersafe(psow: bool):
    old = bytes(range(256)) * (4 * SECTOR // 256)
    inode = Inode(old)
    inode.pending.append((SECTOR + 100, b"\xff" * 10))  # inside the second sector
    outcomes = set()
    for seed in range(60):
        figures = CutFigures()
        out = _survivor(inode, random.Random(seed), "torn", psow, SECTOR, figures)
        assert len(out) == len(old)
        assert out[:SECTOR] == old[:SECTOR] and out[2 * SECTOR:] == old[2 * SECTOR:]
        outside = out[SECTOR:SECTOR + 100] + out[SECTOR + 110:2 * SECTOR]
        outcomes.add((figures.garbled_sectors > 0, outside != old[SECTOR:SECTOR + 100]
                      + old[SECTOR + 110:2 * SECTOR]))
    if psow:   # garbage only within the bytes written
        assert (True, False) in outcomes and not any(beyond for _, beyond in outcomes)
    else:      # garbage across the whole sector, beyond the bytes written
        assert (True, True) in outcomes


def test_a_new_file_survives_only_once_its_directory_is_synced():
    model = Model()
    model.opened(1, "/d/x-wal", "wal", False, True, lambda: b"")
    model.write(1, 0, b"frames")
    kept = {model.crash(random.Random(s), "keep")[0]["/d/x-wal"] for s in range(20)}
    assert kept == {None, b"frames"}  # the creation may not have reached the directory
    model.sync_begins(1, 1)
    model.sync_ends(1, 1, apsw.SQLITE_SYNC_NORMAL)  # SQLite's first sync of a new -wal
    assert {model.crash(random.Random(s), "drop")[0]["/d/x-wal"] for s in range(20)} == {
        b"frames"}
    model.deleted("/d/x-wal", syncdir=False)
    assert {model.crash(random.Random(s), "drop")[0]["/d/x-wal"] for s in range(20)} == {
        None, b"frames"}  # an unsynced deletion may come undone


def test_the_shm_is_reset_at_reboot_and_sqlite_rebuilds_it(tmp_path: Path):
    path = tmp_path / "s.db"
    fates = set()
    for seed in range(12):
        disk = Disk(seed=seed)
        vfs = CrashVFS(disk)
        try:
            conn = apsw.Connection(str(path), vfs=vfs.name)
            conn.pragma("journal_mode", "wal")
            conn.pragma("synchronous", "FULL")
            conn.execute("CREATE TABLE IF NOT EXISTS t(x)")
            conn.execute("INSERT INTO t VALUES (?)", (seed,))
            disk.cut()
            conn.close()
            fates.add(disk.reboot().shm)
        finally:
            vfs.unregister()
        conn = apsw.Connection(str(path))
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [
            (n,) for n in range(seed + 1)]
        conn.close()
    assert fates <= {"deleted", "empty", "stale", "garbage"} and len(fates) >= 3
    assert os.path.exists(path)


def half_applied(tmp_path: Path, synchronous: str, psow: bool) -> dict[int, str]:
    """Stage the worst case for a disk without powersafe overwrite: transaction 2
    (row 1 again, and a new row 1000) is synced and copied into the database by a
    checkpoint; a reader keeps the WAL from starting over, so transaction 3 is appended
    in the sector where transaction 2 ends; the power goes while that sector is being
    written, and it becomes garbage. Returns the rows 1, 1000 and 2000 after the reboot."""
    path = tmp_path / f"{synchronous}-{psow}.db"
    conn = apsw.Connection(str(path))
    conn.pragma("page_size", 1024)
    conn.pragma("journal_mode", "wal")
    conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT); CREATE INDEX tv ON t(v)")
    with conn:
        for k in range(1, 201):  # several leaf pages: row 1 and row 1000 on different ones
            conn.execute("INSERT INTO t VALUES (?, ?)", (k, f"value-{k:04d}-" + "x" * 80))
    conn.close()
    disk = Disk(seed=1, psow=psow)
    vfs = CrashVFS(disk)
    try:
        writer = apsw.Connection(str(path), vfs=vfs.name)
        writer.pragma("synchronous", synchronous)
        writer.wal_autocheckpoint(0)
        reader = apsw.Connection(str(path), vfs=vfs.name)
        writer.execute("UPDATE t SET v = 'a1' WHERE k = 1")
        writer.execute("BEGIN; UPDATE t SET v = 'a2' WHERE k = 1; "
                       "INSERT INTO t VALUES (1000, 'zzz'); COMMIT")
        reader.execute("BEGIN; SELECT count(*) FROM t").fetchall()
        frames, done = writer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        assert frames == done > 0
        writer.execute("INSERT INTO t VALUES (2000, 'after the checkpoint')")
        disk.cut(policy="garbage")
        reader.execute("COMMIT")
        reader.close()
        writer.close()
        disk.reboot()
    finally:
        vfs.unregister()
    conn = apsw.Connection(str(path))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return dict(conn.execute("SELECT k, v FROM t WHERE k IN (1, 1000, 2000)"))
    finally:
        conn.close()


def test_normal_can_half_apply_a_transaction_on_a_disk_that_tears_whole_sectors(
        tmp_path: Path):
    """Why ``durability="normal"`` promises nothing on such a disk: SQLite pads a WAL
    commit to the end of its sector only when it syncs that commit (FULL). Under NORMAL
    the checkpoint syncs the WAL where it stands, the next commit is written into the
    same sector, and tearing that sector destroys the end of transaction 2 in the WAL,
    which recovery then drops, while the database file already holds what the checkpoint
    copied of it: row 1 as transaction 1 left it beside transaction 2's row 1000, a state
    that never existed (integrity_check cannot see it). SQLite's Unix VFS claims
    powersafe overwrite, and with it NORMAL only loses transaction 3."""
    assert half_applied(tmp_path, "NORMAL", psow=False) == {1: "a1", 1000: "zzz"}
    assert half_applied(tmp_path, "NORMAL", psow=True) == {1: "a2", 1000: "zzz"}
    assert half_applied(tmp_path, "FULL", psow=False) == {
        1: "a2", 1000: "zzz", 2000: "after the checkpoint"}
