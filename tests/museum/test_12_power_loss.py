"""Exhibit 12, power loss: the machine stops at any moment; what the disk kept opens, is
consistent, and, with ``durability="full"``, holds every write that was acknowledged.

A power cut is not a killed process: the kernel's page cache goes too, so whatever was
written but not synced may be on the platter, missing, half there or garbage. Each cut
here runs a real workload through the power-loss simulator (``tests/crashvfs.py``: an
apsw VFS shim over the real files that keeps, like SQLite's own crash VFS, every write
since a file's last sync and decides at the cut, per seed, what reached the disk), with
three :class:`~sessiondb.SessionDB` instances on threads, each with its own connections,
gate descriptors and background checkpoint thread. The power goes at a seeded point: the
Nth sync of the ``-wal``, a random write, a write of the database file (inside a
checkpoint), a sync of the database file (the end of a checkpoint), or a truncate of the
``-wal`` (a WAL reset); or after the workload, idle. Small ``checkpoint_every`` and
``wal_limit`` make checkpoints and background WAL resets frequent (``agents`` keeps the
defaults). And across processes: three writer processes, each with its own VFS
reporting to one shared journal (``tests/crashjournal.py``), are stopped at once at a
random moment, which is the cut, then killed. After the reboot (the
surviving bytes become the files, the ``-shm`` is deleted, emptied, stale or garbage) the
store is opened through the public API by ``sessiondb.doctor.check``, which must find
nothing wrong: ``integrity_check``, the full-text index against the messages,
foreign keys, every session's ``message_count`` and the message total against the rows.
Then every write acknowledged before the cut is looked for: messages (by their unique
text), sessions, sessions an acknowledged prune deleted (they must stay deleted), and
every row the store held before the workload. An import that the power cut short
leaves its messages pending for the index, as a kill does: the rerun the README prescribes
(``import_sessions`` again) must then leave doctor satisfied.

Workloads: ``agents`` (appends, ``transaction()`` turns of three appends and a token
update, new sessions), ``checkpoints`` (appends beside a thread forcing
``checkpoint(reset=True)``), ``prune`` (``prune_sessions`` of old sessions beside
appends), ``import`` (``import_sessions`` batches beside appends), ``hermes`` (the first
open of a hermes-agent ``state.db`` converts it, then appends) and ``migration`` (the
first open of a schema-1 store upgrades it, then appends). Every cut runs with both
settings; odd seeds claim powersafe overwrite (as SQLite's Unix VFS does by default),
even ones claim nothing, so torn writes garble whole sectors. ``full`` must come through
every cut intact and complete; ``normal`` must come through intact on a powersafe disk,
and is only counted on the other kind: SQLite pads a WAL commit to the end of its sector
only when it syncs that commit, so under NORMAL a torn sector can destroy the end of a
transaction that a checkpoint already copied into the database (``tests/
test_crashvfs.py`` stages it: a transaction half applied).

What it found: with ``durability="normal"`` (``synchronous=NORMAL``, sessiondb's only
setting before this exhibit) a power cut loses the acknowledged writes since the last
sync of the ``-wal``: with the default checkpoint interval, most writes of a short run
(10,405 of 12,931 in 157 of 250 cuts of the ``agents`` soak), with frequent checkpoints
fewer. In a soak of 3,080 cuts, ``full`` lost nothing and was never damaged, nor was
``normal`` on a powersafe disk; ``normal`` on a disk tearing whole sectors was damaged
in 4 of its 770 cuts (``prune`` and ``import``: FTS5's own check or doctor found the
half-applied transaction described above). And a conversion of a hermes-agent file
that the power interrupts before its tables swap leaves a hermes-agent file (with the
copy made so far), which the next open finishes converting.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import apsw
import pytest

import museum_workers
from crashjournal import replay
from crashvfs import POLICIES, CrashVFS, Disk, restore
from maintenance_workers import build as build_prunable
from sessiondb import SessionDB, SessionDBError, doctor, schema
from test_compat_hermes_file import build_hermes_db, hermes_message
from workers import wait_for

pytestmark = pytest.mark.slow

SETTINGS = ("full", "normal")
PROCESSES = 3
SPAWN = multiprocessing.get_context("spawn")
#: Small, so that checkpoints and background WAL resets happen every few writes; the
#: ``agents`` workload runs with the defaults instead (a checkpoint every 50 writes).
SMALL = dict(checkpoint_every=8, wal_limit=96 * 1024, reset_timeout=0.2,
             journal_size_limit=32 * 1024)
#: Where the power may go, per workload: (op, kind) of crashvfs.Trigger.
TRIGGERS = {
    "agents": [("sync", "wal"), ("write", "any"), ("write", "wal"), ("write", "db")],
    "checkpoints": [("write", "db"), ("sync", "db"), ("truncate", "wal"), ("sync", "wal")],
    "prune": [("write", "any"), ("sync", "wal"), ("write", "db")],
    "import": [("write", "any"), ("sync", "wal"), ("write", "db")],
    "hermes": [("write", "any"), ("sync", "wal"), ("sync", "db"), ("write", "db")],
    "migration": [("write", "any"), ("sync", "wal"), ("sync", "db"), ("write", "db")],
}
WORKLOADS = tuple(TRIGGERS)


# -- what was acknowledged ---------------------------------------------------------------


@dataclass
class Ledger:
    """Writes whose call returned while the power was still on."""

    messages: set[str] = field(default_factory=set)       # unique contents
    sessions: set[str] = field(default_factory=set)
    pruned: set[str] = field(default_factory=set)         # deleted by an acknowledged prune
    errors: list[str] = field(default_factory=list)       # calls that failed before the cut


@dataclass
class Template:
    """A store each cut starts from (closed, no ``-wal``), and what is in it: durable
    before the cut, so no setting may lose it (but a prune may delete the prunable)."""

    path: Path
    messages: dict[str, str]   # content -> session
    sessions: set[str]
    prunable: set[str]         # ended and older than 90 days


class Run:
    """One cut: the store, the simulated disk, the instances, the ledger."""

    def __init__(self, path: Path, disk: Disk, vfs: CrashVFS, durability: str,
                 seed: int, template: Template) -> None:
        self.path, self.disk, self.vfs, self.durability = path, disk, vfs, durability
        self.template = template
        self.options = {} if template.path.stem == "agents" else SMALL
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.stores: list[SessionDB] = []
        self._mu = threading.Lock()
        self._tags = iter(range(10**9))

    def open(self) -> SessionDB | None:
        try:
            db = SessionDB(self.path, vfs=self.vfs.name, durability=self.durability,
                           write_timeout=10.0, **self.options)
        except Exception as exc:  # noqa: BLE001 - judged by when it happened
            self.failed("open", exc)
            return None
        with self._mu:
            self.stores.append(db)
        return db

    def tag(self, what: str) -> str:
        with self._mu:
            return f"{what}-{next(self._tags)}"

    def acked(self, call: Callable[[], Any], then: Callable[[], None]) -> bool:
        """Run ``call``; if it returned while the power was on, record it with ``then``.
        False once the power is off (the workload then stops)."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - judged by when it happened
            self.failed(getattr(call, "__name__", "call"), exc)
            return self.disk.powered
        if self.disk.powered:
            with self._mu:
                then()
            return True
        return False

    def failed(self, what: str, exc: BaseException) -> None:
        if self.disk.powered:  # after the cut anything may fail: the machine is off
            self.ledger.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        for db in self.stores:
            try:
                db.close()
            except Exception:  # noqa: BLE001 - after the cut, closing may fail: no matter
                pass


# -- the workloads: each a list of thread bodies -----------------------------------------


Step = Callable[[SessionDB], tuple[Callable[[], Any], Callable[[], None]]]


def thread(run: Run, count: int, step: Step) -> Callable[[], None]:
    """A thread body: open an instance, then ``count`` times run the call ``step(db)``
    makes, and record what it returns with it once acknowledged, until the power goes."""
    def body() -> None:
        db = run.open()
        if db is None:
            return
        for _ in range(count):
            if not run.acked(*step(db)):
                return
    return body


def appender(run: Run, sid: str, count: int = 24) -> Callable[[], None]:
    """Appends and turns (three appends and a token update in one transaction)."""
    rng = random.Random(run.rng.random())

    def step(db: SessionDB) -> tuple[Callable[[], Any], Callable[[], None]]:
        contents = [run.tag(f"{sid}-{n}") for n in range(1 if rng.random() < 0.6 else 3)]

        def append() -> None:
            if len(contents) == 1:
                db.append_message(sid, "user", contents[0])
                return
            with db.transaction():
                for content in contents:
                    db.append_message(sid, "assistant", content)
                db.update_token_counts(sid, input_tokens=5, output_tokens=7)
        return append, lambda: run.ledger.messages.update(contents)
    return thread(run, count, step)


def creator(run: Run, count: int = 10) -> Callable[[], None]:
    def step(db: SessionDB) -> tuple[Callable[[], Any], Callable[[], None]]:
        sid = run.tag("new")
        return (lambda: db.create_session(sid, "cli", title=sid),
                lambda: run.ledger.sessions.add(sid))
    return thread(run, count, step)


def checkpointer(run: Run, count: int = 12) -> Callable[[], None]:
    return thread(run, count, lambda db: (lambda: db.checkpoint(reset=True), lambda: None))


def pruner(run: Run) -> Callable[[], None]:
    return thread(run, 1, lambda db: (lambda: db.prune_sessions(older_than_days=90),
                                      lambda: run.ledger.pruned.update(run.template.prunable)))


def importer(run: Run, batches: int = 4) -> Callable[[], None]:
    def step(db: SessionDB) -> tuple[Callable[[], Any], Callable[[], None]]:
        batch = []
        for _ in range(4):
            sid = run.tag("imp")
            batch.append({"id": sid, "source": "import", "started_at": 1000.0,
                          "messages": [{"role": "user", "content": f"{sid}-{k} imported",
                                        "timestamp": 1000.0 + k} for k in range(6)]})

        def remember() -> None:
            for s in batch:
                run.ledger.sessions.add(s["id"])
                run.ledger.messages.update(m["content"] for m in s["messages"])
        return lambda: db.import_sessions(batch), remember
    return thread(run, batches, step)


def workload(name: str, run: Run) -> list[Callable[[], None]]:
    if name == "agents":
        return [appender(run, "live-0"), appender(run, "live-1"), creator(run)]
    if name == "checkpoints":
        return [appender(run, "live-0"), appender(run, "live-1"), checkpointer(run)]
    if name == "prune":
        return [pruner(run), appender(run, "live-0"), appender(run, "live-1")]
    if name == "import":
        return [importer(run), appender(run, "live-0"), appender(run, "live-1", 12)]
    # hermes, migration: the first open converts or upgrades the file, then writes
    return [appender(run, "live-0"), appender(run, "live-1", 12)]


# -- the stores each cut starts from ------------------------------------------------------


def _live_sessions(path: Path) -> None:
    with SessionDB(path) as db:
        for sid in ("live-0", "live-1", "live-2"):
            db.create_session(sid, "cli")


def make_template(name: str, directory: Path) -> Template:
    path = directory / f"{name}.db"
    if name == "prune":
        build_prunable(path, sessions=16, per=5, old_share=0.5)
    elif name == "hermes":
        build_hermes_db(path)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.executescript("INSERT INTO sessions (id, source, started_at) VALUES "
                           "('live-0', 'cli', 1.0), ('live-1', 'cli', 2.0);")
        for n in range(120):
            hermes_message(conn, "x", "user", f"hermes-{n} legacy words", 300.0 + n)
        conn.close()
    elif name == "migration":
        conn = apsw.Connection(str(path))
        conn.pragma("journal_mode", "wal")
        conn.execute(schema.MIGRATIONS[0])
        conn.pragma("user_version", 1)
        for sid in ("live-0", "live-1", "old"):
            conn.execute("INSERT INTO sessions(id, source, started_at) VALUES (?, 'cli', 1.0)",
                         (sid,))
        for n in range(120):
            conn.execute("INSERT INTO messages(session_id, role, content, timestamp) "
                         "VALUES ('old', 'user', ?, 1.0)", (f"v1-{n} written by 0.1.0",))
        conn.execute("UPDATE sessions SET message_count = 120 WHERE id = 'old'")
        conn.close()
    if name in ("agents", "checkpoints", "import", "prune", "processes"):
        _live_sessions(path)
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        messages = dict(conn.execute("SELECT content, session_id FROM messages "
                                     "WHERE content IS NOT NULL"))
        sessions = {r[0] for r in conn.execute("SELECT id FROM sessions")}
        prunable = {r[0] for r in conn.execute(
            "SELECT id FROM sessions WHERE ended_at IS NOT NULL "
            "AND started_at < unixepoch() - 90 * 86400")}
    finally:
        conn.close()
    return Template(path, messages, sessions, prunable)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Template]:
    directory = tmp_path_factory.mktemp("power-templates")
    return {name: make_template(name, directory) for name in WORKLOADS}


# -- one cut ------------------------------------------------------------------------------


@dataclass
class Outcome:
    acked: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)
    figures: Any = None
    cut_by: str = ""
    psow: bool = False  # the disk claimed (and kept) powersafe overwrite
    reruns: int = 0     # imports cut short, finished by their rerun
    conversions_redone: int = 0  # conversions that never committed, done at the next open


def cut_once(name: str, template: Template, directory: Path, durability: str, seed: int,
             trigger: tuple[str, str, int] | None) -> Outcome:
    path = directory / f"{name}-{durability}-{seed}.db"
    shutil.copyfile(template.path, path)
    disk = Disk(seed=seed, psow=bool(seed % 2))
    vfs = CrashVFS(disk)
    run = Run(path, disk, vfs, durability, seed, template)
    outcome = Outcome(psow=disk.psow)
    try:
        if trigger is not None:
            disk.arm(*trigger)
        threads = [threading.Thread(target=body, daemon=True)
                   for body in workload(name, run)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "a workload thread hangs"
        outcome.events = Counter(disk.events)
        disk.cut(reason="after the workload")
        outcome.cut_by = disk.cut_by
        run.close()
        outcome.figures = disk.reboot()
    finally:
        vfs.unregister()
    outcome.errors = run.ledger.errors
    inspect(path, run.ledger, template, outcome)
    return outcome


def inspect(path: Path, ledger: Ledger, template: Template, outcome: Outcome) -> None:
    """After the reboot: reopened through the public API, the store opens, converts or
    upgrades if it must, and doctor finds nothing wrong; then count what was lost."""
    report = doctor.check(path, deep=True)
    if "has not converted yet" in (report["open_error"] or ""):
        # The power went before the conversion's swap committed: still a hermes-agent
        # file (with the copy made so far), and the next open finishes converting it.
        outcome.conversions_redone += 1
        SessionDB(path).close()
        report = doctor.check(path, deep=True)
    outcome.problems = []
    if (report["fts_index"] or "").endswith("or one that was cut short)"):
        # An import cut short leaves its messages pending for the index, as after a
        # kill (doctor then checks the index no further); the rerun the README
        # prescribes finishes it, then all must be well.
        outcome.reruns += 1
        _fts_structure(path, outcome)
        try:
            with SessionDB(path) as db:
                db.import_sessions([], skip_existing=True)
        except SessionDBError as exc:
            outcome.problems.append(f"the import's rerun failed: {exc!r}")
        report = doctor.check(path, deep=True)
    outcome.problems += report["problems"]
    if report["opened"] and not outcome.problems:
        outcome.lost = _lost(path, ledger, template, outcome)


def _fts_structure(path: Path, outcome: Outcome) -> None:
    """FTS5's check of the index's own structure (without comparing it with the
    messages, some of which it does not hold yet)."""
    conn = apsw.Connection(str(path))
    try:
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    except apsw.Error as exc:
        outcome.problems.append(f"full-text index damaged: {exc!r}")
    finally:
        conn.close()


def cut_processes(template: Template, directory: Path, durability: str, seed: int
                  ) -> Outcome:
    """One cut of :data:`PROCESSES` writer processes (see
    :func:`test_power_loss_across_processes`)."""
    stem = directory / f"processes-{durability}-{seed}"
    path, journal = stem.with_suffix(".db"), stem.with_suffix(".journal")
    shutil.copyfile(template.path, path)
    rng = random.Random(seed)
    psow = bool(seed % 2)
    ledgers = [stem.with_suffix(f".ledger{k}") for k in range(PROCESSES)]
    procs = [SPAWN.Process(target=museum_workers.power_writer, daemon=True, args=(
        str(path), str(journal), str(ledgers[k]), f"live-{k}", seed * 10 + k, durability,
        psow, {**SMALL, "write_timeout": 10.0})) for k in range(PROCESSES)]
    outcome = Outcome(cut_by="every process stopped at a random moment", psow=psow)
    for p in procs:
        p.start()
    try:
        wait_for(lambda: all(ledger.exists() and ledger.read_bytes().startswith(b"ready")
                             for ledger in ledgers) or not all(p.is_alive() for p in procs),
                 timeout=120)
        time.sleep(rng.uniform(0.0, 0.4))
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGSTOP)
        outcome.errors = [f"writer {k} ended (exit code {p.exitcode}) before the cut"
                          for k, p in enumerate(procs) if not p.is_alive()]
        length = journal.stat().st_size
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
            p.join(30)
    model = replay(str(journal), length, {str(path): ("db", template.path.read_bytes())})
    survivors, outcome.figures = model.crash(rng, POLICIES[seed % len(POLICIES)], psow)
    outcome.figures.shm = restore(survivors, rng)
    outcome.events = model.counts
    ledger = Ledger()
    for file in ledgers:
        lines = file.read_text().split("\n")[:-1]  # a kill may cut the last line short
        ledger.messages.update(line[4:] for line in lines if line.startswith("ack "))
    inspect(path, ledger, template, outcome)
    return outcome


def _lost(path: Path, ledger: Ledger, template: Template, outcome: Outcome) -> int:
    """Acknowledged writes missing; rows from before the workload missing are problems."""
    with SessionDB(path) as db:
        messages = set(db._read(lambda c: [r[0] for r in c.execute(
            "SELECT content FROM messages")]))
        sessions = set(db._read(lambda c: [r[0] for r in c.execute("SELECT id FROM sessions")]))
    # Durable long before the power cut: lost under no setting (pruned ones excepted).
    old = {m for m, sid in template.messages.items()
           if m not in messages and sid not in template.prunable}
    old |= template.sessions - sessions - template.prunable
    if old:
        outcome.problems.append(f"{len(old)} rows from before the workload lost: "
                                f"{sorted(old)[:3]}")
    outcome.acked = len(ledger.messages) + len(ledger.sessions) + len(ledger.pruned)
    return (len(ledger.messages - messages) + len(ledger.sessions - sessions)
            + len(ledger.pruned & sessions))


# -- the exhibit -------------------------------------------------------------------------


def seeded_cuts(name: str, template: Template, directory: Path, durability: str,
                cuts: int, base_seed: int) -> list[Outcome]:
    """In one process: the first cut runs to the end of the workload and counts its
    events, which bound where the seeded triggers of the others fall."""
    calibration = cut_once(name, template, directory, durability, base_seed, None)
    outcomes = [calibration]
    for k in range(1, cuts):
        seed = base_seed + k
        rng = random.Random(seed * 7919)
        op, kind = rng.choice(TRIGGERS[name])
        seen = sum(v for (o, kd), v in calibration.events.items()
                   if o == op and (kind == "any" or kd == kind))
        trigger = (op, kind, rng.randint(1, max(1, seen))) if seen else None
        outcomes.append(cut_once(name, template, directory, durability, seed, trigger))
    return outcomes


def power_cuts(name: str, template: Template, directory: Path, cuts: int, base_seed: int
               ) -> dict[str, Any]:
    """``cuts`` cuts per setting, seeds shared by the two settings."""
    totals: dict[str, Any] = {s: Counter() for s in SETTINGS}
    failures: list[str] = []
    torn = Counter()
    for durability in SETTINGS:
        t = totals[durability]
        if name == "processes":
            outcomes = [cut_processes(template, directory, durability, base_seed + k)
                        for k in range(cuts)]
        else:
            outcomes = seeded_cuts(name, template, directory, durability, cuts, base_seed)
        for o in outcomes:
            t["cuts"] += 1
            t["acked"] += o.acked
            t["lost"] += o.lost
            t["cuts losing"] += bool(o.lost)
            if durability == "normal" and not o.psow:
                # SQLite pads a WAL commit to its sector's end only when it syncs it:
                # on a disk that tears whole sectors, NORMAL can half-apply a
                # transaction (tests/test_crashvfs.py stages it). Counted, not failed.
                t["damaged without psow"] += bool(o.problems)
            else:
                t["integrity failures"] += bool(o.problems)
                failures += [f"{durability}: {p}" for p in o.problems]
            t["mid-workload"] += o.cut_by != "after the workload"
            t["import reruns"] += o.reruns
            t["conversions redone"] += o.conversions_redone
            f = o.figures
            torn[f.policy] += 1
            torn["torn writes"] += f.torn
            torn["garbled sectors"] += f.garbled_sectors
            torn["names reverted"] += f.names_reverted
            torn[f"shm {f.shm}"] += 1
            failures += [f"{durability}: {e}" for e in o.errors]
    return {"totals": totals, "torn": torn, "failures": failures}


@pytest.mark.parametrize("cuts", [
    pytest.param(20, id="20"),
    pytest.param(250, id="250", marks=pytest.mark.soak),
])
@pytest.mark.parametrize("name", WORKLOADS)
def test_power_loss(name: str, cuts: int, templates, tmp_path: Path, exhibit):
    check_power_loss(name, cuts, templates[name], tmp_path, exhibit)


@pytest.mark.parametrize("cuts", [
    pytest.param(6, id="6"),
    pytest.param(40, id="40", marks=pytest.mark.soak),
])
def test_power_loss_across_processes(cuts: int, tmp_path: Path, exhibit):
    """Three writer processes, each with its own VFS reporting to one shared journal
    (``crashvfs.Journal``); the power goes at a random moment: every process is stopped
    at once, the journal's length is the cut, and the processes are killed."""
    template = make_template("processes", tmp_path)
    check_power_loss("processes", cuts, template, tmp_path, exhibit)


def check_power_loss(name: str, cuts: int, template: Template, directory: Path,
                     exhibit: Callable[..., None]) -> None:
    result = power_cuts(name, template, directory, cuts,
                        base_seed=1000 * (WORKLOADS + ("processes",)).index(name) + 1000)
    full, normal = result["totals"]["full"], result["totals"]["normal"]
    torn = result["torn"]
    exhibit(
        f"power cut during {name} ({cuts} cuts per setting)",
        "opens; integrity, index, counters ok (normal: on a powersafe disk); "
        "full: nothing acknowledged lost",
        cuts=full["cuts"] + normal["cuts"],
        mid_workload=full["mid-workload"] + normal["mid-workload"],
        acked_full=full["acked"], lost_full=full["lost"],
        acked_normal=normal["acked"], lost_normal=normal["lost"],
        cuts_losing_normal=normal["cuts losing"],
        torn_writes=torn["torn writes"], garbled_sectors=torn["garbled sectors"],
        names_reverted=torn["names reverted"],
        import_reruns=full["import reruns"] + normal["import reruns"],
        conversions_redone=full["conversions redone"] + normal["conversions redone"],
        policies="/".join(f"{p}:{torn[p]}" for p in ("drop", "keep", "mixed", "torn")),
        integrity_failures=full["integrity failures"] + normal["integrity failures"],
        normal_damaged_without_psow=normal["damaged without psow"])
    assert not result["failures"], result["failures"][:5]
    assert full["lost"] == 0, f"durability='full' lost {full['lost']} acknowledged writes"
    assert full["acked"] > 0 and normal["acked"] > 0
