"""Optimistic revisions (issue #5): a session's revision counts changes to its fields;
updates may pass ``expected_revision`` and get ``StaleRevision`` on conflict; an update
that changes nothing is never a conflict and does not move the revision. Concurrent
editors in real processes are in ``test_coordination_mp.py``."""

from __future__ import annotations

import pytest

from sessiondb import (
    InvalidArgument, InvalidArgumentType, SessionDB, SessionNotFound, StaleRevision,
    TitleConflict,
)


def revision(db: SessionDB, sid: str = "s") -> int:
    return db.get_session(sid)["revision"]


def test_every_field_change_moves_the_revision_by_one(db: SessionDB) -> None:
    db.create_session("s", "cli", model="m")
    assert revision(db) == 0
    assert db.update_system_prompt("s", "p") == 1
    assert db.set_model("s", "m2", {"t": 1}) == 2
    assert db.set_session_title("s", "Title") is True and revision(db) == 3
    assert db.end_session("s", "done") == 4
    assert db.reopen_session("s") == 5
    assert db.update_session("s", user_id="u", title="Other") == 6  # one update, one step


def test_counters_and_messages_do_not_move_it(db: SessionDB) -> None:
    db.create_session("s", "cli", model="m")
    db.append_message("s", "user", "hello", tool_calls=[{"id": 1}])
    db.update_token_counts("s", 10, 20, estimated_cost_usd=0.1)
    db.set_token_counts("s", 1, 2)
    db.clear_messages("s")
    assert revision(db) == 0


def test_an_update_that_changes_nothing_is_not_a_change(db: SessionDB) -> None:
    db.create_session("s", "cli")
    db.update_system_prompt("s", "p")
    assert db.update_system_prompt("s", "p") == 1
    assert db.set_session_title("s", None) is True and revision(db) == 1
    assert db.update_session("s") == 1


def test_a_stale_expected_revision_is_refused_and_nothing_written(db: SessionDB) -> None:
    db.create_session("s", "cli")
    seen = revision(db)
    db.update_system_prompt("s", "theirs")  # another editor
    with pytest.raises(StaleRevision) as info:
        db.update_system_prompt("s", "mine", expected_revision=seen)
    err = info.value
    assert (err.session_id, err.expected, err.actual) == ("s", 0, 1)
    assert "expected_revision=1" in str(err)
    for stale_call in (lambda: db.set_session_title("s", "T", expected_revision=seen),
                       lambda: db.end_session("s", "x", expected_revision=seen),
                       lambda: db.update_session("s", expected_revision=seen, model="m")):
        with pytest.raises(StaleRevision):
            stale_call()
    session = db.get_session("s")
    assert (session["system_prompt"], session["title"], session["ended_at"],
            session["model"], session["revision"]) == ("theirs", None, None, None, 1)
    assert db.update_system_prompt("s", "mine", expected_revision=1) == 2


def test_a_stale_revision_with_nothing_to_change_is_no_conflict(db: SessionDB) -> None:
    """Two editors making the same edit: the second is not told it lost."""
    db.create_session("s", "cli")
    db.update_session("s", title="Agreed")
    assert db.update_session("s", expected_revision=0, title="Agreed") == 1
    assert db.set_session_title("s", "Agreed", expected_revision=0) is True


def test_a_stale_revision_inside_a_transaction_undoes_only_itself(db: SessionDB) -> None:
    db.create_session("s", "cli")
    db.update_system_prompt("s", "v1")
    with db.transaction():
        db.append_message("s", "user", "kept")
        with pytest.raises(StaleRevision):
            db.update_system_prompt("s", "lost", expected_revision=0)
    assert db.message_count("s") == 1 and db.get_session("s")["system_prompt"] == "v1"


def test_update_session_checks_its_arguments(db: SessionDB) -> None:
    db.create_session("s", "cli")
    db.create_session("t", "cli", title="Taken")
    with pytest.raises(SessionNotFound):
        db.update_session("missing", title="x")
    with pytest.raises(InvalidArgumentType):
        db.update_session("s", started_at=1.0)
    with pytest.raises(InvalidArgumentType):
        db.update_session("s", expected_revision="0", title="x")
    with pytest.raises(InvalidArgument):
        db.update_session("s", expected_revision=-1, title="x")
    with pytest.raises(TitleConflict):
        db.update_session("s", title="Taken")
    with pytest.raises(InvalidArgumentType):
        db.update_session("s", model_config={1, 2})
    assert revision(db) == 0


def test_the_revision_travels_through_export_and_import(db: SessionDB, tmp_path) -> None:
    db.create_session("s", "cli")
    db.update_system_prompt("s", "p")
    exported = db.export_session("s")
    assert exported["revision"] == 1
    with SessionDB(tmp_path / "other.db") as other:
        other.import_sessions(exported)
        assert other.get_session("s")["revision"] == 1
