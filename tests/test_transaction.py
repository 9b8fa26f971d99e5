"""db.transaction(): several calls as one atomic write, savepoints inside it."""

from __future__ import annotations

import threading

import pytest

from sessiondb import (
    ConfigurationError, IntegrityViolation, InvalidArgument, InvalidArgumentType, SessionDB,
    SessionNotFound, SessionDBError, TitleConflict, WriteTimeout,
)


class Boom(Exception):
    pass


def test_calls_are_grouped_and_committed(db: SessionDB, db_path) -> None:
    with db.transaction() as tx:
        assert tx is db
        db.create_session("s1", "cli")
        mid = db.append_message("s1", "user", "hello")
        db.update_token_counts("s1", 5, 7)
        # Reads inside the block see the block's own writes.
        assert db.get_session("s1")["message_count"] == 1
        assert [m["id"] for m in db.get_messages("s1")] == [mid]
    with SessionDB(db_path) as other:
        s = other.get_session("s1")
        assert (s["message_count"], s["input_tokens"], s["output_tokens"]) == (1, 5, 7)


def test_exception_leaving_the_block_rolls_back_everything(db: SessionDB, db_path) -> None:
    db.create_session("kept", "cli")
    with pytest.raises(Boom):
        with db.transaction():
            db.create_session("s1", "cli")
            db.append_message("s1", "user", "gone")
            db.append_message("kept", "user", "also gone")
            db.set_session_title("kept", "gone too")
            raise Boom
    assert db.get_session("s1") is None
    assert db.get_session("kept")["message_count"] == 0
    assert db.get_session("kept")["title"] is None
    assert db.message_count() == 0
    assert db.search_messages("gone") == []
    with SessionDB(db_path) as other:
        assert other.session_count() == 1


def test_library_error_leaving_the_block_rolls_back(db: SessionDB) -> None:
    with pytest.raises(SessionNotFound):
        with db.transaction():
            db.create_session("s1", "cli")
            db.append_message("ghost", "user", "x")
    assert db.session_count() == 0


def test_caught_failure_inside_undoes_only_itself(db: SessionDB) -> None:
    db.create_session("other", "cli", title="Taken")
    with db.transaction():
        db.create_session("s1", "cli")
        db.append_message("s1", "user", "kept")
        with pytest.raises(SessionNotFound):
            db.append_message("ghost", "user", "x")
        with pytest.raises(TitleConflict):
            db.set_session_title("s1", "Taken")
        with pytest.raises(InvalidArgumentType):
            db.append_message("s1", "user", "x", metadata={"bad": object()})
        db.append_message("s1", "assistant", "also kept")
    s = db.get_session("s1")
    assert s["message_count"] == 2
    assert s["title"] is None
    assert [m["content"] for m in db.get_messages("s1")] == ["kept", "also kept"]


def test_a_long_block_goes_on_after_each_failed_call(db: SessionDB) -> None:
    # 200 calls in one block (on PostgreSQL one savepoint each), every tenth failing in
    # turn on a missing session, a title taken (a unique index) and a counter overflowing
    # (on PostgreSQL the server refuses it: the statement itself fails).
    db.create_session("s", "cli")
    db.create_session("other", "cli", title="Taken")
    most = 2 ** 63 - 1
    failing = [(SessionNotFound, lambda: db.append_message("ghost", "user", "x")),
               (TitleConflict, lambda: db.set_session_title("s", "Taken")),
               (InvalidArgument, lambda: db.update_token_counts("s", 1))]
    with db.transaction():
        db.update_token_counts("s", most)
        for i in range(200):
            if i % 10 == 5:
                error, call = failing[i // 10 % 3]
                with pytest.raises(error):
                    call()
            else:
                db.append_message("s", "user", f"m{i}")
    s = db.get_session("s")
    assert (s["message_count"], s["input_tokens"], s["title"]) == (180, most, None)
    assert [m["content"] for m in db.get_messages("s")] == [
        f"m{i}" for i in range(200) if i % 10 != 5]


def test_a_call_that_waits_too_long_for_a_lock_inside_a_block_fails_alone(
        db_path, backend: str) -> None:
    if backend == "sqlite":
        pytest.skip("a SQLite block holds the write lock from its start: no call in it waits")
    with SessionDB(db_path, write_timeout=0.5) as mine, SessionDB(db_path) as other:
        mine.create_session("mine", "cli")
        mine.create_session("held", "cli")
        held, release = threading.Event(), threading.Event()

        def hold() -> None:  # another writer holds the session "held" (its lock)
            with other.transaction():
                other.append_message("held", "user", "the holder's")
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert held.wait(30)
            with mine.transaction():
                mine.append_message("mine", "user", "before")
                with pytest.raises(WriteTimeout):  # lock_timeout, inside the block
                    mine.append_message("held", "user", "waited too long")
                mine.append_message("mine", "user", "after")
        finally:
            release.set()
            holder.join(30)
        assert [m["content"] for m in mine.get_messages("mine")] == ["before", "after"]
        assert [m["content"] for m in mine.get_messages("held")] == ["the holder's"]


def test_failed_delete_inside_is_undone_alone(db: SessionDB) -> None:
    db.create_session("parent", "cli")
    db.append_message("parent", "user", "stays")
    db.create_session("child", "cli", parent_session_id="parent")
    with db.transaction():
        db.append_message("child", "user", "new")
        with pytest.raises(IntegrityViolation):
            db.delete_session("parent")
    assert db.message_count("parent") == 1
    assert db.message_count("child") == 1


def test_nested_transaction_refused(db: SessionDB) -> None:
    with db.transaction():
        db.create_session("s1", "cli")
        with pytest.raises(ConfigurationError):
            with db.transaction():
                pass  # pragma: no cover
        db.append_message("s1", "user", "after the refusal")
    assert db.message_count("s1") == 1


def test_usable_again_after_each_outcome(db: SessionDB) -> None:
    with pytest.raises(Boom):
        with db.transaction():
            db.create_session("a", "cli")
            raise Boom
    with db.transaction():
        db.create_session("b", "cli")
    db.create_session("c", "cli")
    with db.transaction():
        pass
    assert sorted(s["id"] for s in db.list_sessions()) == ["b", "c"]


def test_a_read_that_fails_inside_a_block_undoes_only_itself(db: SessionDB) -> None:
    # On PostgreSQL a failed statement fails the whole transaction unless it ran in a
    # savepoint: the block's writes would then be lost at its COMMIT, silently.
    db.create_session("s", "cli")
    with db.transaction():
        db.append_message("s", "user", "before")
        with pytest.raises(SessionDBError):
            db._read(lambda c: c.execute("SELECT * FROM no_such_table").fetchall())
        db.append_message("s", "user", "after")
    assert [m["content"] for m in db.get_messages("s")] == ["before", "after"]


def test_a_write_that_swallows_a_failed_statement_is_not_reported_committed(
        db: SessionDB) -> None:
    db.create_session("s", "cli")

    def write(conn) -> None:
        conn.execute("UPDATE sessions SET title = 'x' WHERE id = 's'")
        try:
            conn.execute("SELECT * FROM no_such_table")
        except Exception:
            pass  # a rule must not do this; if one does, nothing may be reported done

    if db.backend == "sqlite":  # SQLite's transaction survives a failed statement
        db._execute_write(write)
        assert db.get_session("s")["title"] == "x"
    else:  # PostgreSQL's does not: COMMIT rolls back, and that is an error here
        with pytest.raises(SessionDBError, match="rolled back"):
            db._execute_write(write)
        assert db.get_session("s")["title"] is None
