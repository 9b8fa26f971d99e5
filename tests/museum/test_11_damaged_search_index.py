"""Exhibit 11: a damaged full-text index.

In public: one corrupt FTS page, and every insert failed ("database disk image is
malformed"), because the index is maintained by triggers on the messages table: the
agent could no longer save a single turn, though its messages were fine.

Here only the FTS shadow tables are damaged (three ways). Appending (and deleting) keeps
working, in
this process and in another one that had the store open before the damage; search says
the index is damaged with a typed error; ``sessiondb doctor`` reports it and
``sessiondb doctor --repair`` rebuilds the index without touching a message.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import apsw
import pytest

import workers
from sessiondb import SearchIndexError, SessionDB, doctor
from sessiondb.cli import main as cli

SPAWN = multiprocessing.get_context("spawn")

DAMAGE = {
    # how: SQL run behind sessiondb's back on the FTS shadow tables only
    "garbage structure record": "UPDATE messages_fts_data SET block = x'00ff00ff00ff' "
                                "WHERE id = 10",
    "random index blocks": "UPDATE messages_fts_data SET block = randomblob(length(block)) "
                           "WHERE id > 10",
    "a shadow table dropped": "DROP TABLE messages_fts_data",
}


def append_worker(path: str, count: int, results) -> None:
    with SessionDB(path) as db:
        ids = [db.append_message("s", "assistant", f"from another process {i}")
               for i in range(count)]
    results.put(ids)


def damage(path: Path, sql: str) -> None:
    conn = apsw.Connection(str(path))
    conn.execute(sql)
    conn.close()


def messages_table(path: Path) -> list[tuple]:
    return workers.read_only(path, "SELECT * FROM messages ORDER BY id")


@pytest.mark.parametrize("how", list(DAMAGE))
def test_appends_survive_a_damaged_index_and_repair_rebuilds_it(db_path: Path, how: str,
                                                               exhibit, capsys):
    db = SessionDB(db_path)
    db.create_session("s", "cli")
    db.create_session("gone", "cli")
    db.append_message("gone", "user", "to be deleted after the damage")
    for i in range(300):
        db.append_message("s", "user", f"hello world number {i} alpha beta")
    assert len(db.search_messages("alpha")) == 20  # the default page

    damage(db_path, DAMAGE[how])

    new = [db.append_message("s", "user", f"written after the damage {i} gamma")
           for i in range(5)]
    assert db.delete_session("gone")  # deleting messages works too
    results = SPAWN.Queue()
    (others,) = workers.run_all(SPAWN, append_worker, [(str(db_path), 5, results)], results)
    assert db.get_session("s")["message_count"] == 310
    assert [m["id"] for m in db.get_messages("s")][-10:] == new + others
    with pytest.raises(SearchIndexError) as caught:
        db.search_messages("gamma")
    assert "doctor --repair" in str(caught.value)
    db.close()

    report = doctor.check(db_path)
    assert not report["ok"] and report["fts_index"] != "ok"
    before = messages_table(db_path)
    assert cli(["doctor", "--repair", "--db", str(db_path)]) == 0
    assert "healthy" in capsys.readouterr().out
    assert messages_table(db_path) == before  # not one message touched

    with SessionDB(db_path) as db:
        assert len(db.search_messages("gamma")) == 5  # indexed again, new ones included
        assert len(db.search_messages("process")) == 5
        assert len(db.search_messages("alpha", limit=500)) == 300
        db.append_message("s", "user", "indexed as usual delta")
        assert len(db.search_messages("delta")) == 1
    assert doctor.check(db_path)["ok"]
    assert workers.integrity(db_path) == [("ok",)]
    exhibit(f"full-text index damaged: {how}",
            "appends kept working (2 processes), search raised SearchIndexError, "
            "doctor --repair rebuilt it", appended_after_damage=10, messages_changed=0)
