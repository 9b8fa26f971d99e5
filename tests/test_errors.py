"""The error tree, closed instances, and bad input: a typed library error, nothing written."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import apsw
import pytest

import sessiondb
from sessiondb import Claim, Lease
from sessiondb import (
    ClosedError, ConfigurationError, DatabaseOpenError, InvalidArgument, InvalidArgumentType,
    SessionDB, SessionDBError,
)
from sessiondb import errors

ERROR_NAMES = [n for n in sessiondb.__all__ if n.endswith("Error") or n in {
    "InvalidArgument", "InvalidTitle", "TitleConflict", "InvalidArgumentType",
    "SessionNotFound", "IntegrityViolation", "WriteTimeout"}]


# -- the tree ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ERROR_NAMES)
def test_every_error_is_a_sessiondb_error(name: str) -> None:
    cls = getattr(sessiondb, name)
    assert issubclass(cls, SessionDBError)
    assert getattr(errors, name) is cls


def test_tree_shape() -> None:
    e = errors
    assert issubclass(e.InvalidArgument, ValueError)
    assert issubclass(e.InvalidTitle, e.InvalidArgument)
    assert issubclass(e.TitleConflict, e.InvalidArgument)
    assert issubclass(e.InvalidArgumentType, TypeError)
    assert not issubclass(e.InvalidArgumentType, ValueError)
    assert issubclass(e.SchemaTooNewError, e.DatabaseOpenError)
    assert issubclass(e.WriteTimeout, e.DatabaseBusyError)
    assert issubclass(e.DiskFullError, e.StorageError)
    assert issubclass(e.CorruptDatabaseError, e.StorageError)
    for name in ERROR_NAMES:
        assert not issubclass(getattr(e, name), apsw.Error)


def test_errors_carry_facts() -> None:
    assert errors.SessionNotFound("abc").session_id == "abc"
    conflict = errors.TitleConflict("T", "s1")
    assert (conflict.title, conflict.session_id) == ("T", "s1")
    timeout = errors.WriteTimeout(1.5, 7)
    assert (timeout.waited_s, timeout.attempts) == (1.5, 7)
    assert "1.50" in str(timeout) and "7" in str(timeout)
    too_new = errors.SchemaTooNewError("/x.db", 9, 1)
    assert (too_new.path, too_new.found, too_new.supported) == ("/x.db", 9, 1)


# One instance of every error class with a constructor of its own, for pickling.
EXAMPLES = [
    errors.DatabaseOpenError("m", "/x.db"), errors.SchemaTooNewError("/x.db", 9, 3),
    errors.TitleConflict("T", "s1"), errors.SessionNotFound("s1"), errors.WriteTimeout(1.5, 7),
    errors.HoldTimeout(2.0, 1.0), errors.WalDeletedError("m", "/x.db", "/x.mark", None),
    errors.HermesSchemaError("/x.db", 5), errors.StaleRevision("s1", 1, 2),
    errors.LeaseHeld("job", "a", 2e9, 3), errors.LeaseLost("job", 3, "released"),
    errors.ClaimLost(7, 2, "expired"), errors.CapExceeded("a", "claims", 5, 5),
    errors.DeadlineExceeded("job", 1.5), errors.InvalidArgument("bad"),
]


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_errors_survive_pickling(exc: Exception) -> None:
    """Workers of a process pool send their exceptions back pickled."""
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    assert back.__dict__ == exc.__dict__


@pytest.mark.parametrize("raw, mapped", [
    (apsw.FullError("full"), errors.DiskFullError),
    (apsw.CorruptError("bad"), errors.CorruptDatabaseError),
    (apsw.NotADBError("nope"), errors.CorruptDatabaseError),
    (apsw.ConstraintError("fk"), errors.IntegrityViolation),
    (apsw.BusyError("busy"), errors.DatabaseBusyError),
    (apsw.LockedError("locked"), errors.DatabaseBusyError),
    (apsw.IOError("io"), errors.StorageError),
    (apsw.SQLError("sql"), errors.StorageError),
])
def test_translate(raw: apsw.Error, mapped: type) -> None:
    out = errors.translate(raw, "/p.db")
    assert type(out) is mapped
    assert "/p.db" in str(out)
    plain = ValueError("x")
    assert errors.translate(plain) is plain


@pytest.mark.sqlite_only
def test_apsw_errors_are_chained(db: SessionDB) -> None:
    # A foreign-key failure inside the store surfaces translated, original as __cause__.
    db.import_sessions({"id": "p", "source": "cli", "started_at": 1.0})
    with pytest.raises(errors.IntegrityViolation) as info:
        db.import_sessions({"id": "c", "source": "cli", "started_at": 2.0,
                            "parent_session_id": "missing"})
    assert isinstance(info.value.__cause__, apsw.Error)


# -- closing ------------------------------------------------------------------------

LEASE = Lease("l", "o", 1, 30.0, 0.0, 2e9)
CLAIM = Claim(1, "q", None, None, "o", 1, 1, 5, 30.0, 2e9)
CLOSED_CALLS = {
    "create_session": lambda db: db.create_session("s", "cli"),
    "ensure_session": lambda db: db.ensure_session("s"),
    "get_session": lambda db: db.get_session("s"),
    "list_sessions": lambda db: db.list_sessions(),
    "end_session": lambda db: db.end_session("s", "x"),
    "reopen_session": lambda db: db.reopen_session("s"),
    "update_system_prompt": lambda db: db.update_system_prompt("s", "p"),
    "set_model": lambda db: db.set_model("s", "m"),
    "delete_session": lambda db: db.delete_session("s"),
    "resolve_session_id": lambda db: db.resolve_session_id("s"),
    "session_count": lambda db: db.session_count(),
    "message_count": lambda db: db.message_count(),
    "set_session_title": lambda db: db.set_session_title("s", "t"),
    "get_session_title": lambda db: db.get_session_title("s"),
    "get_session_by_title": lambda db: db.get_session_by_title("t"),
    "resolve_session_by_title": lambda db: db.resolve_session_by_title("t"),
    "get_next_title_in_lineage": lambda db: db.get_next_title_in_lineage("t"),
    "append_message": lambda db: db.append_message("s", "user", "x"),
    "get_messages": lambda db: db.get_messages("s"),
    "get_messages_as_conversation": lambda db: db.get_messages_as_conversation("s"),
    "clear_messages": lambda db: db.clear_messages("s"),
    "pop_message": lambda db: db.pop_message("s"),
    "update_token_counts": lambda db: db.update_token_counts("s", 1),
    "set_token_counts": lambda db: db.set_token_counts("s", 1),
    "search_messages": lambda db: db.search_messages("x"),
    "export_session": lambda db: db.export_session("s"),
    "export_all": lambda db: db.export_all(),
    "iter_export": lambda db: db.iter_export(),
    "import_sessions": lambda db: db.import_sessions([]),
    "prune_sessions": lambda db: db.prune_sessions(1),
    "rebuild_search_index": lambda db: db.rebuild_search_index(),
    "reclaim_space": lambda db: db.reclaim_space(),
    "optimize_search_index": lambda db: db.optimize_search_index(),
    "checkpoint": lambda db: db.checkpoint(),
    "stats": lambda db: db.stats(),
    "update_session": lambda db: db.update_session("s", title="t"),
    "acquire_lease": lambda db: db.acquire_lease("l", "o"),
    "acquire_session": lambda db: db.acquire_session("s", "o"),
    "session_holder": lambda db: db.session_holder("s"),
    "renew_lease": lambda db: db.renew_lease(LEASE),
    "release_lease": lambda db: db.release_lease(LEASE),
    "get_lease": lambda db: db.get_lease("l"),
    "list_leases": lambda db: db.list_leases(),
    "fenced": lambda db: db.fenced(LEASE).__enter__(),
    "heartbeat": lambda db: db.heartbeat(LEASE).check(),
    "deadline": lambda db: db.deadline(LEASE, 0.001).call(lambda: None),
    "enqueue": lambda db: db.enqueue("q"),
    "claim": lambda db: db.claim("q", "o"),
    "complete_claim": lambda db: db.complete_claim(CLAIM),
    "fail_claim": lambda db: db.fail_claim(CLAIM),
    "release_claim": lambda db: db.release_claim(CLAIM),
    "extend_claim": lambda db: db.extend_claim(CLAIM),
    "reap_claims": lambda db: db.reap_claims(),
    "get_claim": lambda db: db.get_claim(1),
    "queue_counts": lambda db: db.queue_counts(),
    "list_claims": lambda db: db.list_claims(),
    "requeue_claim": lambda db: db.requeue_claim(1),
    "purge_claims": lambda db: db.purge_claims(),
    "transaction": lambda db: db.transaction().__enter__(),
    "snapshot": lambda db: db.snapshot().__enter__(),
}


def test_closed_calls_cover_the_public_api() -> None:
    public = {name for name, member in inspect.getmembers(SessionDB)
              if not name.startswith("_") and callable(member)} - {"close"}
    assert public <= set(CLOSED_CALLS), f"add to CLOSED_CALLS: {public - set(CLOSED_CALLS)}"


@pytest.mark.parametrize("name", sorted(CLOSED_CALLS))
def test_every_call_after_close_raises_closed_error(db_path: Path, name: str) -> None:
    store = SessionDB(db_path)
    store.close()
    with pytest.raises(ClosedError):
        CLOSED_CALLS[name](store)


def test_close_is_idempotent_and_repr_says_so(db_path: Path) -> None:
    store = SessionDB(db_path)
    store.create_session("s", "cli")
    store.close()
    store.close()
    assert "closed" in repr(store)
    with SessionDB(db_path) as again:
        assert again.get_session("s")["id"] == "s"


def test_context_manager_closes_even_on_error(db_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with SessionDB(db_path) as store:
            store.create_session("s", "cli")
            raise RuntimeError("boom")
    with pytest.raises(ClosedError):
        store.get_session("s")
    with SessionDB(db_path) as again:
        assert again.session_count() == 1


def test_close_inside_context_manager(db_path: Path) -> None:
    with SessionDB(db_path) as store:
        store.close()
    with pytest.raises(ClosedError):
        store.session_count()


# -- opening ---------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("write_timeout", 0), ("write_timeout", -1), ("write_timeout", "5"),
    ("write_timeout", True), ("busy_timeout", 0), ("reset_timeout", float("nan")),
    ("checkpoint_every", -1), ("checkpoint_every", 1.5), ("wal_limit", -1),
    ("journal_size_limit", "big"),
])
@pytest.mark.sqlite_only
def test_bad_options_refused_before_touching_disk(db_path: Path, option: str, value) -> None:
    with pytest.raises(ConfigurationError):
        SessionDB(db_path, **{option: value})
    assert not db_path.exists()


def test_directory_path_refused(tmp_path: Path) -> None:
    with pytest.raises(DatabaseOpenError) as info:
        SessionDB(tmp_path)
    assert info.value.path == str(tmp_path)


def test_non_database_file_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    data = b"these are not the bytes of a SQLite database\n" * 200
    path.write_bytes(data)
    with pytest.raises(DatabaseOpenError):
        SessionDB(path)
    assert path.read_bytes() == data


# -- bad inputs: a typed library error, and nothing written -----------------------------

NAN = float("nan")
BAD_CALLS = [
    ("create-int-id", lambda db: db.create_session(123, "cli"), InvalidArgumentType),
    ("create-bytes-id", lambda db: db.create_session(b"s", "cli"), InvalidArgumentType),
    ("create-empty-id", lambda db: db.create_session("", "cli"), InvalidArgument),
    ("create-none-id", lambda db: db.create_session(None, "cli"), InvalidArgument),
    ("create-long-id", lambda db: db.create_session("x" * 1025, "cli"), InvalidArgument),
    ("create-surrogate-id", lambda db: db.create_session("\ud800", "cli"), InvalidArgument),
    ("create-empty-source", lambda db: db.create_session("n", ""), InvalidArgument),
    ("create-none-source", lambda db: db.create_session("n", None), InvalidArgument),
    ("create-config-object",
     lambda db: db.create_session("n", "cli", model_config={"x": object()}),
     InvalidArgumentType),
    ("create-config-nan", lambda db: db.create_session("n", "cli", model_config={"t": NAN}),
     InvalidArgumentType),
    ("create-prompt-surrogate",
     lambda db: db.create_session("n", "cli", system_prompt="a\udc00"), InvalidArgument),
    ("create-parent-int", lambda db: db.create_session("n", "cli", parent_session_id=5),
     InvalidArgumentType),
    ("create-title-int", lambda db: db.create_session("n", "cli", title=0),
     InvalidArgumentType),
    ("append-bytes-id", lambda db: db.append_message(b"s1", "user", "x"),
     InvalidArgumentType),
    ("append-empty-id", lambda db: db.append_message("", "user", "x"), InvalidArgument),
    ("append-surrogate", lambda db: db.append_message("s1", "user", "\ud800"),
     InvalidArgument),
    ("append-calls-set", lambda db: db.append_message("s1", "assistant", tool_calls=[{1, 2}]),
     InvalidArgumentType),
    ("append-calls-nan", lambda db: db.append_message("s1", "assistant", tool_calls=[NAN]),
     InvalidArgumentType),
    ("append-metadata-object", lambda db: db.append_message("s1", "user", metadata=object()),
     InvalidArgumentType),
    ("append-metadata-cycle", lambda db: db.append_message("s1", "user", metadata=_cycle()),
     InvalidArgumentType),
    ("tokens-nan-cost", lambda db: db.update_token_counts("s1", 1, estimated_cost_usd=NAN),
     InvalidArgument),
    ("tokens-nan-actual", lambda db: db.set_token_counts("s1", 1, actual_cost_usd=NAN),
     InvalidArgument),
    ("end-int-reason", lambda db: db.end_session("s1", 5), InvalidArgumentType),
    ("end-none-id", lambda db: db.end_session(None), InvalidArgument),
    ("reopen-empty-id", lambda db: db.reopen_session(""), InvalidArgument),
    ("prompt-surrogate", lambda db: db.update_system_prompt("s1", "\udfff"), InvalidArgument),
    ("model-int", lambda db: db.set_model("s1", 5), InvalidArgumentType),
    ("model-config-object", lambda db: db.set_model("s1", "m", {"x": object()}),
     InvalidArgumentType),
    ("title-int", lambda db: db.set_session_title("s1", 5), InvalidArgumentType),
    ("title-falsy-int", lambda db: db.set_session_title("s1", 0), InvalidArgumentType),
    ("title-list", lambda db: db.set_session_title("s1", []), InvalidArgumentType),
    ("title-id-int", lambda db: db.set_session_title(5, "t"), InvalidArgumentType),
    ("delete-int", lambda db: db.delete_session(5), InvalidArgumentType),
    ("clear-empty", lambda db: db.clear_messages(""), InvalidArgument),
    ("prune-negative", lambda db: db.prune_sessions(-1), InvalidArgument),
    ("prune-source-int", lambda db: db.prune_sessions(1, source=3), InvalidArgumentType),
    ("import-str", lambda db: db.import_sessions("data"), InvalidArgumentType),
    ("import-surrogate-content", lambda db: db.import_sessions(
        {"id": "n", "source": "cli", "started_at": 1.0,
         "messages": [{"role": "user", "content": "\ud800", "timestamp": 1.0}]}),
     InvalidArgument),
]
BAD_READS = [
    ("get-int", lambda db: db.get_session(5), InvalidArgumentType),
    ("get-none", lambda db: db.get_session(None), InvalidArgument),
    ("messages-int", lambda db: db.get_messages(5), InvalidArgumentType),
    ("conversation-int", lambda db: db.get_messages_as_conversation(5), InvalidArgumentType),
    ("search-int", lambda db: db.search_messages(5), InvalidArgumentType),
    ("search-none", lambda db: db.search_messages(None), InvalidArgument),
    ("search-surrogate", lambda db: db.search_messages("\ud800"), InvalidArgument),
    ("search-sources-str", lambda db: db.search_messages("x", sources="cli"),
     InvalidArgumentType),
    ("search-roles-int", lambda db: db.search_messages("x", roles=[1]), InvalidArgumentType),
    ("search-session-int", lambda db: db.search_messages("x", session_id=1),
     InvalidArgumentType),
    ("search-limit-str", lambda db: db.search_messages("x", limit="5"), InvalidArgumentType),
    ("search-offset-neg", lambda db: db.search_messages("x", offset=-1), InvalidArgument),
    ("list-limit-str", lambda db: db.list_sessions(limit="5"), InvalidArgumentType),
    ("list-limit-float", lambda db: db.list_sessions(limit=2.0), InvalidArgumentType),
    ("list-offset-neg", lambda db: db.list_sessions(offset=-1), InvalidArgument),
    ("list-offset-none", lambda db: db.list_sessions(offset=None), InvalidArgumentType),
    ("list-active-str", lambda db: db.list_sessions(active="yes"), InvalidArgumentType),
    ("list-active-int", lambda db: db.list_sessions(active=0), InvalidArgumentType),
    ("list-exclude-str", lambda db: db.list_sessions(exclude_sources="cli"),
     InvalidArgumentType),
    ("list-source-int", lambda db: db.list_sessions(source=1), InvalidArgumentType),
    ("resolve-none", lambda db: db.resolve_session_id(None), InvalidArgument),
    ("resolve-int", lambda db: db.resolve_session_id(5), InvalidArgumentType),
    ("count-int", lambda db: db.session_count(5), InvalidArgumentType),
    ("message-count-int", lambda db: db.message_count(5), InvalidArgumentType),
    ("export-int", lambda db: db.export_session(5), InvalidArgumentType),
    ("export-all-int", lambda db: db.export_all(5), InvalidArgumentType),
    ("by-title-int", lambda db: db.get_session_by_title(5), InvalidArgumentType),
    ("resolve-title-none", lambda db: db.resolve_session_by_title(None), InvalidArgument),
    ("next-title-int", lambda db: db.get_next_title_in_lineage(5), InvalidArgumentType),
]


def _cycle() -> dict:
    d: dict = {}
    d["self"] = d
    return d


@pytest.fixture
def seeded(db: SessionDB) -> SessionDB:
    db.create_session("s1", "cli", title="T", model="m")
    db.append_message("s1", "user", "hello", tool_calls=[{"id": "c"}])
    db.update_token_counts("s1", 1, 2, estimated_cost_usd=0.1)
    return db


@pytest.mark.parametrize("call, error", [(c, e) for _, c, e in BAD_CALLS],
                         ids=[n for n, _, _ in BAD_CALLS])
def test_bad_write_raises_typed_error_and_writes_nothing(seeded: SessionDB, call,
                                                         error) -> None:
    before = seeded.export_all()
    with pytest.raises(error) as info:
        call(seeded)
    assert isinstance(info.value, SessionDBError)
    assert seeded.export_all() == before


@pytest.mark.parametrize("call, error", [(c, e) for _, c, e in BAD_READS],
                         ids=[n for n, _, _ in BAD_READS])
def test_bad_read_raises_typed_error(seeded: SessionDB, call, error) -> None:
    with pytest.raises(error) as info:
        call(seeded)
    assert isinstance(info.value, SessionDBError)


def test_store_still_works_after_errors(seeded: SessionDB) -> None:
    for _, call, error in BAD_CALLS + BAD_READS:
        with pytest.raises(error):
            call(seeded)
    seeded.append_message("s1", "assistant", "still fine")
    assert seeded.get_session("s1")["message_count"] == 2
    assert seeded.stats()["writes"] >= 1
