"""The process record (``sessiondb.procs``) and what reads it: ``sessiondb top`` and
``sessiondb stats``. Real processes (spawn), a real terminal (tmux), real damage."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import top_workers
from sessiondb import SessionDB, procs, top
from sessiondb.cli import main as cli
from workers import collect, wait_for

SPAWN = mp.get_context("spawn")
pytestmark = pytest.mark.skipif(not procs.enabled(), reason="no POSIX record locks")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    with SessionDB(path) as db:
        db.create_session("shared", "test")
    return path


def rows(path: Path) -> list[procs.Row]:
    return procs.read_record(path).rows


def by_pid(path: Path) -> dict[int, list[procs.Row]]:
    out: dict[int, list[procs.Row]] = {}
    for r in rows(path):
        out.setdefault(r.pid, []).append(r)
    return out


def cli_json(capsys, *argv: str):
    code = cli([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def finish(procs_: list, release) -> None:
    release.set()
    for p in procs_:
        p.join(60)
    assert [p.exitcode for p in procs_] == [0] * len(procs_)


# -- who holds, who waits --------------------------------------------------------------

@pytest.mark.slow
def test_a_holder_and_two_waiters_in_blocking_order(store: Path, capsys):
    holding, release, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    started = []
    try:
        h = SPAWN.Process(target=top_workers.holder, args=(str(store), holding, release))
        h.start()
        started.append(h)
        assert holding.wait(60)
        waiters = []
        for _ in range(2):  # one after the other, so that their order is known
            w = SPAWN.Process(target=top_workers.writer, args=(str(store), results, release))
            w.start()
            started.append(w)
            waiters.append(w.pid)
            wait_for(lambda: sum(r.state == "waiting" for r in rows(store)) == len(waiters))
        snap = cli_json(capsys, "top", "--db", str(store))
        states = [(r["pid"], r["state"]) for r in snap["rows"]]
        assert states == [(h.pid, "holding"), (waiters[0], "waiting"),
                          (waiters[1], "waiting")]
        assert all(r["state_s"] > 0 for r in snap["rows"])
        assert snap["rows"][1]["state_s"] >= snap["rows"][2]["state_s"]  # longest first
        assert snap["totals"]["holding"] == 1 and snap["totals"]["waiting"] == 2
        assert snap["gate_queue"] == 3  # the holder's ticket and the waiters'
        assert "program" in snap["rows"][0] and snap["rows"][0]["program"]
        # The screen a person reads: the same order, with pids and durations.
        assert cli(["top", "--db", str(store), "--once"]) == 0
        screen = capsys.readouterr().out.splitlines()
        table = [line.split() for line in screen if line.strip().split(" ")[0].isdigit()]
        assert [(int(t[0]), t[-8]) for t in table] == states
        assert "1 holding, 2 waiting, 0 reading" in screen[2]
    finally:
        release.set()
    finish(started, release)
    assert sorted(collect(results, started, 2)) == sorted(waiters)
    wait_for(lambda: rows(store) == [])


@pytest.mark.slow
def test_a_sigkilled_process_leaves_no_row(store: Path):
    results, release = SPAWN.Queue(), SPAWN.Event()
    # The victim has a queue and an event of its own: killed while it held their
    # internal locks (a put, a wait), it would wedge every process sharing them.
    own, never = SPAWN.Queue(), SPAWN.Event()
    victim = SPAWN.Process(target=top_workers.idle, args=(str(store), own, never))
    other = SPAWN.Process(target=top_workers.idle, args=(str(store), results, release))
    victim.start()
    other.start()
    assert collect(own, [victim], 1) + collect(results, [other], 1) == [victim.pid, other.pid]
    assert set(by_pid(store)) == {victim.pid, other.pid}
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)
    # The kernel drops the slot's lock with the process: gone at the next read.
    assert set(by_pid(store)) == {other.pid}
    # Its slot is free for the next process; the row there is the newcomer's.
    newcomer = SPAWN.Process(target=top_workers.idle, args=(str(store), results, release))
    newcomer.start()
    assert collect(results, [newcomer], 1) == [newcomer.pid]
    assert set(by_pid(store)) == {other.pid, newcomer.pid}
    finish([other, newcomer], release)
    assert rows(store) == []


@pytest.mark.slow
def test_counters_add_up_to_what_each_instance_reported(store: Path, capsys):
    results, release = SPAWN.Queue(), SPAWN.Event()
    plan = [(1, 60), (2, 40), (3, 45), (1, 30)]  # (instances, writes) per process
    workers = [SPAWN.Process(target=top_workers.counted,
                             args=(str(store), n, k, results, release)) for n, k in plan]
    for w in workers:
        w.start()
    try:
        reports = dict(collect(results, workers, len(workers)))
        assert set(reports) == {w.pid for w in workers}
        found = by_pid(store)
        assert {pid: len(found[pid]) for pid in found} == \
            {w.pid: n for w, (n, _) in zip(workers, plan)}
        for pid, instances in reports.items():
            for mine in instances:
                row = next(r for r in found[pid] if r.slot == mine["slot"])
                assert {k: getattr(row, k) for k in top_workers.FIGURES} == \
                    {k: mine[k] for k in top_workers.FIGURES}
        everyone = [i for instances in reports.values() for i in instances]
        figures = cli_json(capsys, "stats", "--db", str(store))
        assert figures["processes"] == sum(n for n, _ in plan) == len(figures["per_process"])
        for key in ("writes", "failed_writes", "retries", "timeouts", "contended_writes"):
            assert figures[key] == sum(i[key] for i in everyone), key
        assert figures["writes"] == sum(k + 1 for _, k in plan)  # create_session too
        assert figures["failed_writes"] == len(plan)  # one refused append each
        assert figures["lock_wait_max_s"] == max(i["lock_wait_max_s"] for i in everyone)
        assert figures["lock_hold_max_s"] == max(i["lock_hold_max_s"] for i in everyone)
        assert figures["messages"] == sum(k for _, k in plan)
    finally:
        finish(workers, release)
    assert cli_json(capsys, "stats", "--db", str(store))["processes"] == 0


def test_instances_of_one_process_each_have_a_row_and_give_it_back(store: Path):
    dbs = [SessionDB(store) for _ in range(5)]
    try:
        slots = [db.stats()["procs"]["slot"] for db in dbs]
        assert len(set(slots)) == 5
        assert {r.slot for r in rows(store)} == set(slots)
        assert all(r.pid == os.getpid() and r.this_process for r in rows(store))
        dbs[1].close()
        dbs[3].close()
        assert {r.slot for r in rows(store)} == {slots[0], slots[2], slots[4]}
        reopened = SessionDB(store)  # takes the first free slot again
        dbs.append(reopened)
        assert reopened.stats()["procs"]["slot"] == min(slots[1], slots[3])
    finally:
        for db in dbs:
            db.close()
    assert rows(store) == []


def test_reading_under_another_name_keeps_this_process_rows(store: Path, monkeypatch):
    """One descriptor per file: a second one, closed, would drop this process's locks."""
    def seen_from_outside() -> int:
        code = f"from sessiondb import procs; print(len(procs.read_record({str(store)!r}).rows))"
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, check=True).stdout)

    with SessionDB(store) as db:
        db.append_message("shared", "user", "x")
        assert seen_from_outside() == 1
        monkeypatch.chdir(store.parent)
        assert len(procs.read_record("state.db").rows) == 1  # a relative name
        (store.parent / "alias").symlink_to(store.parent)
        assert len(procs.read_record(store.parent / "alias" / "state.db").rows) == 1
        assert seen_from_outside() == 1


def test_a_fork_child_publishes_under_its_own_pid(store: Path):
    db = SessionDB(store)
    parent_slot = db.stats()["procs"]["slot"]
    pid = os.fork()
    if pid == 0:  # the child: its first call reopens, with a slot of its own
        code = 1
        try:
            db.append_message("shared", "user", "from the child")
            mine = db.stats()["procs"]["slot"]
            seen = {r.pid: r.slot for r in procs.read_record(store).rows}
            code = 0 if seen.get(os.getpid()) == mine != parent_slot else 3
            db.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [(r.pid, r.slot) for r in rows(store)] == [(os.getpid(), parent_slot)]
    db.append_message("shared", "user", "from the parent")
    db.close()


def test_a_snapshot_block_shows_as_reading(store: Path):
    with SessionDB(store) as db:
        with db.snapshot():
            db.message_count()
            (row,) = rows(store)
            assert row.state == "reading" and row.state_s > 0
        assert [r.state for r in rows(store)] == ["idle"]


def test_off_by_option_or_environment(store: Path, monkeypatch):
    with SessionDB(store, procs=False) as db:
        db.append_message("shared", "user", "unpublished")
        assert db.stats()["procs"] is None and rows(store) == []
    monkeypatch.setenv("SESSIONDB_PROCS", "0")
    with SessionDB(store) as db:
        assert db.stats()["procs"] is None and rows(store) == []


@pytest.mark.slow
def test_the_bench_runs_sessiondb_with_the_record_off_beside_it(tmp_path: Path):
    from sessiondb.bench.run import UNRECORDED, Scenario, run_one

    scenario = Scenario("fast", 2, 0.5)
    before = os.environ.get("SESSIONDB_PROCS")
    sizes = {}
    for strategy in ("sessiondb", UNRECORDED):
        run = run_one(scenario, strategy, str(tmp_path), seed=1)
        assert not run.failed and all(w.commits for w in run.writers), run.failed
        sizes[strategy] = procs.sidecar(tmp_path / f"fast-{strategy}.db").stat().st_size
    # Two writers and two readers took slots; unrecorded, only the parent (its setup).
    assert sizes == {"sessiondb": procs.HEADER + 4 * procs.SLOT,
                     UNRECORDED: procs.HEADER + procs.SLOT}
    assert os.environ.get("SESSIONDB_PROCS") == before  # the parent's is left as it was


# -- a damaged, foreign or unusable record ---------------------------------------------

def test_a_truncated_record_is_rebuilt_and_writers_never_notice(store: Path):
    with SessionDB(store) as db:
        sidecar = procs.sidecar(store)
        for size in (0, 10, procs.HEADER + 7):
            os.truncate(sidecar, size)
            db.append_message("shared", "user", f"after truncating to {size}")
            assert db.stats()["procs"]["error"] is None
        # Its own slot is written again at its next write; the header by the next open.
        with SessionDB(store) as other:
            other.append_message("shared", "user", "a second instance")
            assert {r.slot for r in rows(store)} == {db.stats()["procs"]["slot"],
                                                     other.stats()["procs"]["slot"]}
        assert db.message_count() == 4
    # (Read only now: opening and closing the file in a process that holds slots
    # would drop its record locks, see sessiondb.procs.)
    assert sidecar.read_bytes()[:8] == procs.MAGIC


def test_a_foreign_record_is_a_typed_error_for_readers_and_rebuilt_by_writers(
        store: Path, capsys):
    sidecar = procs.sidecar(store)
    sidecar.write_bytes(b"#!/bin/sh\necho not a process record\n" * 40)
    with pytest.raises(procs.ProcessRecordError, match="not a sessiondb process record"):
        procs.read_record(store)
    assert cli(["stats", "--db", str(store)]) == 2
    assert "not a sessiondb process record" in capsys.readouterr().err
    assert cli(["top", "--db", str(store), "--once"]) == 0  # top says so and goes on
    assert "process record unreadable" in capsys.readouterr().out
    with SessionDB(store) as db:  # the writer rewrites the header and publishes
        db.append_message("shared", "user", "written")
        assert [r.pid for r in rows(store)] == [os.getpid()]


def test_a_record_of_a_newer_layout_is_left_alone(store: Path):
    sidecar = procs.sidecar(store)
    newer = struct.pack("<8sII", procs.MAGIC, procs.VERSION + 1, procs.SLOT)
    sidecar.write_bytes(newer.ljust(4096, b"\0"))
    with SessionDB(store) as db:
        db.append_message("shared", "user", "written")
        assert db.stats()["procs"] is None
    with pytest.raises(procs.ProcessRecordError, match="newer sessiondb"):
        procs.read_record(store)
    assert sidecar.read_bytes()[:16] == newer


def test_damaged_slot_of_a_live_process_is_counted_not_shown(store: Path):
    with SessionDB(store) as db:
        slot = db.stats()["procs"]["slot"]
        scribble = ("import os; fd = os.open({!r}, os.O_WRONLY); "
                    "os.pwrite(fd, b'JUNK' * 8, {})").format(
                        str(procs.sidecar(store)), procs.HEADER + slot * procs.SLOT)
        subprocess.run([sys.executable, "-c", scribble], check=True)  # another program
        record = procs.read_record(store)
        assert record.rows == [] and record.damaged == 1
        db.append_message("shared", "user", "still written")


def test_an_unusable_record_leaves_the_store_working(tmp_path: Path, store: Path):
    sidecar = procs.sidecar(store)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"do not touch")
    sidecar.unlink()  # (made by the fixture's store)
    sidecar.symlink_to(target)
    with SessionDB(store) as db:  # never followed: unpublished, not refused
        db.append_message("shared", "user", "written")
        assert db.stats()["procs"] is None
    assert target.read_bytes() == b"do not touch"
    sidecar.unlink()
    sidecar.mkdir()
    with SessionDB(store) as db:
        db.append_message("shared", "user", "written")
        assert db.stats()["procs"] is None


def test_publishing_that_fails_never_fails_a_write(store: Path, monkeypatch):
    db = SessionDB(store)
    real = os.pwrite

    def failing(fd: int, data: bytes, offset: int) -> int:
        if fd == db._engine._slot._fd:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    for i in range(3):
        db.append_message("shared", "user", f"message {i}")
    with db.transaction():
        db.append_message("shared", "user", "in a block")
    monkeypatch.undo()
    assert "No space left" in db.stats()["procs"]["error"]
    assert db.message_count() == 4
    db.close()


# -- the terminal, as a person sees it -------------------------------------------------

def tmux_or_skip() -> str:
    tmux = shutil.which("tmux")
    if tmux is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing: .ci/run installs it")
        pytest.skip("tmux is not installed (apt-get install tmux); .ci/run installs it")
    return tmux


@pytest.mark.slow
def test_top_in_a_terminal(store: Path, tmp_path: Path):
    tmux = tmux_or_skip()
    holding, release, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    h = SPAWN.Process(target=top_workers.holder, args=(str(store), holding, release))
    h.start()
    assert holding.wait(60)
    w = SPAWN.Process(target=top_workers.writer, args=(str(store), results, release))
    w.start()
    wait_for(lambda: any(r.state == "waiting" for r in rows(store)))
    name = f"sessiondb-top-{os.getpid()}"
    env = dict(os.environ, TERM="xterm-256color", TMUX="")
    command = f"{sys.executable} -m sessiondb top --db {store}"
    base = [tmux, "-L", name, "-f", "/dev/null"]
    subprocess.run([*base, "new-session", "-d", "-s", name, "-x", "150", "-y", "30",
                    command], check=True, env=env)

    def screen() -> str:
        return subprocess.run([*base, "capture-pane", "-p", "-t", name], capture_output=True,
                              text=True, env=env).stdout

    try:
        wait_for(lambda: f"{w.pid}" in screen() and "waiting" in screen())
        lines = screen().splitlines()
        assert lines[0].startswith("sessiondb top: ") and f"{store.name} " in lines[0]
        mine = [line for line in lines if line.strip().startswith((str(h.pid), str(w.pid)))]
        assert [line.split()[0] for line in mine] == [str(h.pid), str(w.pid)]
        assert "holding" in mine[0] and "waiting" in mine[1]
        assert "1 holding, 1 waiting" in lines[2]
        assert "q quit" in screen()
        subprocess.run([*base, "send-keys", "-t", name, "p"], check=True, env=env)
        wait_for(lambda: "PAUSED" in screen())
        subprocess.run([*base, "send-keys", "-t", name, "p"], check=True, env=env)
        wait_for(lambda: "PAUSED" not in screen())
        release.set()  # the holder commits, the waiter writes, both close
        wait_for(lambda: "no process has the store open" in screen())
        subprocess.run([*base, "send-keys", "-t", name, "q"], check=True, env=env)
        wait_for(lambda: subprocess.run([*base, "has-session", "-t", name], env=env,
                                        capture_output=True).returncode != 0)
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, env=env)
        finish([h, w], release)


# -- PostgreSQL: the server's view -----------------------------------------------------

def test_top_on_postgresql_shows_who_blocks_whom(pg_url: str, capsys):
    psycopg = pytest.importorskip("psycopg")
    with SessionDB(pg_url) as db:
        db.create_session("s", "test")
    holder = psycopg.connect(pg_url, application_name="the-holder")
    waiter = psycopg.connect(pg_url, application_name="the-waiter")
    try:
        holder.execute("SELECT pg_advisory_lock(4242)")
        blocked = threading.Thread(target=lambda: waiter.execute(
            "SELECT pg_advisory_lock(4242)"), daemon=True)
        blocked.start()
        waiter_pid = waiter.info.backend_pid

        def view():
            return cli_json(capsys, "top", "--db", pg_url)

        wait_for(lambda: any(r["state"] == "waiting" for r in view()["rows"]))
        snap = view()
        first, second = snap["rows"][:2]
        assert (first["pid"], first["state"], first["application"]) == \
            (holder.info.backend_pid, "holding", "the-holder")
        assert (second["pid"], second["state"], second["blocked_by"]) == \
            (waiter_pid, "waiting", [holder.info.backend_pid])
        assert cli(["top", "--db", pg_url, "--once"]) == 0
        out = capsys.readouterr().out
        assert "pg_stat_activity" in out and "the-waiter" in out
        holder.execute("SELECT pg_advisory_unlock(4242)")
        blocked.join(30)
    finally:
        holder.close()
        waiter.close()


def test_snapshot_frame_is_pure_and_fits_the_width(store: Path):
    with SessionDB(store) as db:
        db.append_message("shared", "user", "x")
        with top.open_store(store) as looker:
            snap = top.snapshot(looker)
        lines = top.frame(snap, width=90, height=8, footer=top.KEYS)
    assert all(len(line) <= 90 for line in lines) and len(lines) <= 8
    assert lines[-1] == top.KEYS
    assert [r["pid"] for r in snap["rows"]] == [os.getpid()]  # the looker is not shown
    assert time.time() - snap["at"] < 600
