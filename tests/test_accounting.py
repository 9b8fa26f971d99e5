"""Accounting: token counters, estimated and actual cost, billing fields, bad values."""

from __future__ import annotations

import math

import pytest

from sessiondb import InvalidArgument, InvalidArgumentType, SessionDB

TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
          "reasoning_tokens")
INT64_MAX = 2**63 - 1


@pytest.fixture
def sid(db: SessionDB) -> str:
    return db.create_session("s1", "cli")


def tokens(db: SessionDB, sid: str = "s1") -> tuple[int, ...]:
    s = db.get_session(sid)
    return tuple(s[k] for k in TOKENS)


def test_update_increments_every_counter(db: SessionDB, sid: str) -> None:
    db.update_token_counts(sid, 10, 20, cache_read_tokens=3, cache_write_tokens=4,
                           reasoning_tokens=5)
    assert tokens(db) == (10, 20, 3, 4, 5)
    db.update_token_counts(sid, input_tokens=1, output_tokens=2, cache_read_tokens=3,
                           cache_write_tokens=4, reasoning_tokens=5)
    assert tokens(db) == (11, 22, 6, 8, 10)
    db.update_token_counts(sid)
    assert tokens(db) == (11, 22, 6, 8, 10)


def test_update_absolute_sets(db: SessionDB, sid: str) -> None:
    db.update_token_counts(sid, 100, 100, cache_read_tokens=100)
    db.update_token_counts(sid, 7, 8, reasoning_tokens=9, absolute=True)
    assert tokens(db) == (7, 8, 0, 0, 9)


def test_set_token_counts(db: SessionDB, sid: str) -> None:
    db.update_token_counts(sid, 100, 100, cache_write_tokens=100)
    db.set_token_counts(sid, 1, 2, cache_read_tokens=3, cache_write_tokens=4,
                        reasoning_tokens=5)
    assert tokens(db) == (1, 2, 3, 4, 5)
    db.set_token_counts(sid)
    assert tokens(db) == (0, 0, 0, 0, 0)


def test_counters_are_per_session(db: SessionDB, sid: str) -> None:
    db.create_session("s2", "cli")
    db.update_token_counts(sid, 5, 5)
    assert tokens(db, "s2") == (0, 0, 0, 0, 0)


def test_estimated_cost_increment(db: SessionDB, sid: str) -> None:
    assert db.get_session(sid)["estimated_cost_usd"] is None
    db.update_token_counts(sid, 1, 1)  # no cost: NULL becomes 0.0, never NULL again
    assert db.get_session(sid)["estimated_cost_usd"] == 0.0
    db.update_token_counts(sid, estimated_cost_usd=0.25)
    db.update_token_counts(sid, estimated_cost_usd=0.5)
    db.update_token_counts(sid)
    assert db.get_session(sid)["estimated_cost_usd"] == pytest.approx(0.75)


def test_estimated_cost_absolute_and_set(db: SessionDB, sid: str) -> None:
    db.update_token_counts(sid, estimated_cost_usd=2.0)
    db.update_token_counts(sid, estimated_cost_usd=0.5, absolute=True)
    assert db.get_session(sid)["estimated_cost_usd"] == 0.5
    db.update_token_counts(sid, absolute=True)  # absolute without a cost: 0.0
    assert db.get_session(sid)["estimated_cost_usd"] == 0.0
    db.set_token_counts(sid, estimated_cost_usd=3)
    assert db.get_session(sid)["estimated_cost_usd"] == 3.0
    db.set_token_counts(sid)  # set without a cost clears it
    assert db.get_session(sid)["estimated_cost_usd"] is None


def test_actual_cost(db: SessionDB, sid: str) -> None:
    db.update_token_counts(sid, 1)
    assert db.get_session(sid)["actual_cost_usd"] is None  # None leaves it unset
    db.update_token_counts(sid, actual_cost_usd=1.0)
    db.update_token_counts(sid, actual_cost_usd=0.5)
    assert db.get_session(sid)["actual_cost_usd"] == pytest.approx(1.5)
    db.update_token_counts(sid)
    assert db.get_session(sid)["actual_cost_usd"] == pytest.approx(1.5)
    db.update_token_counts(sid, actual_cost_usd=0.1, absolute=True)
    assert db.get_session(sid)["actual_cost_usd"] == pytest.approx(0.1)
    db.set_token_counts(sid, actual_cost_usd=4)
    assert db.get_session(sid)["actual_cost_usd"] == 4.0
    db.set_token_counts(sid)  # None: unchanged, unlike the estimate
    assert db.get_session(sid)["actual_cost_usd"] == 4.0


@pytest.mark.parametrize("method", ["update", "absolute", "set"])
def test_latest_wins_fields(db: SessionDB, sid: str, method: str) -> None:
    call = {"update": db.update_token_counts,
            "absolute": lambda *a, **k: db.update_token_counts(*a, absolute=True, **k),
            "set": db.set_token_counts}[method]
    call(sid, cost_status="estimated", cost_source="table", pricing_version="v1")
    call(sid, cost_status="final", pricing_version="v2")
    call(sid)
    s = db.get_session(sid)
    assert (s["cost_status"], s["cost_source"], s["pricing_version"]) == \
        ("final", "table", "v2")


@pytest.mark.parametrize("method", ["update", "set"])
def test_first_wins_backfill(db: SessionDB, sid: str, method: str) -> None:
    call = db.update_token_counts if method == "update" else db.set_token_counts
    call(sid, model="m-1", billing_provider="p1", billing_base_url="https://a",
         billing_mode="api")
    call(sid, model="m-2", billing_provider="p2", billing_base_url="https://b",
         billing_mode="sub")
    s = db.get_session(sid)
    assert (s["model"], s["billing_provider"], s["billing_base_url"], s["billing_mode"]) == \
        ("m-1", "p1", "https://a", "api")


def test_model_given_at_creation_is_not_replaced(db: SessionDB) -> None:
    db.create_session("s2", "cli", model="created")
    db.update_token_counts("s2", 1, model="later")
    assert db.get_session("s2")["model"] == "created"


def test_empty_string_model_counts_as_set(db: SessionDB, sid: str) -> None:
    db.update_token_counts(sid, model="")
    db.update_token_counts(sid, model="real")
    assert db.get_session(sid)["model"] == ""


BAD_VALUES = [
    ({"input_tokens": -1}, InvalidArgument),
    ({"output_tokens": 2**63}, InvalidArgument),
    ({"cache_read_tokens": 10**30}, InvalidArgument),
    ({"reasoning_tokens": True}, InvalidArgumentType),
    ({"cache_write_tokens": 1.0}, InvalidArgumentType),
    ({"input_tokens": "5"}, InvalidArgumentType),
    ({"input_tokens": None}, InvalidArgumentType),
    ({"estimated_cost_usd": float("nan")}, InvalidArgument),
    ({"estimated_cost_usd": float("inf")}, InvalidArgument),
    ({"estimated_cost_usd": -0.01}, InvalidArgument),
    ({"estimated_cost_usd": True}, InvalidArgumentType),
    ({"estimated_cost_usd": "0.1"}, InvalidArgumentType),
    ({"actual_cost_usd": float("nan")}, InvalidArgument),
    ({"actual_cost_usd": -1}, InvalidArgument),
    ({"actual_cost_usd": False}, InvalidArgumentType),
    ({"model": 3}, InvalidArgumentType),
    ({"cost_status": ["final"]}, InvalidArgumentType),
    ({"billing_provider": "bad \ud800"}, InvalidArgument),
]
BAD_IDS = ["neg", "2**63", "1e30", "bool", "float", "str", "none", "est-nan", "est-inf",
           "est-neg", "est-bool", "est-str", "act-nan", "act-neg", "act-bool", "model-int",
           "status-list", "surrogate"]


@pytest.mark.parametrize("method", ["update", "absolute", "set"])
@pytest.mark.parametrize("kwargs, error", BAD_VALUES, ids=BAD_IDS)
def test_bad_values_raise_and_write_nothing(db: SessionDB, sid: str, method: str, kwargs,
                                            error) -> None:
    db.update_token_counts(sid, 1, 2, estimated_cost_usd=0.5, actual_cost_usd=0.25)
    before = db.get_session(sid)
    # Valid values next to the bad one must not be written either.
    good = {"output_tokens": 99, "model": "m", "cost_status": "s", **kwargs}
    with pytest.raises(error):
        if method == "update":
            db.update_token_counts(sid, **good)
        elif method == "absolute":
            db.update_token_counts(sid, absolute=True, **good)
        else:
            db.set_token_counts(sid, **good)
    assert db.get_session(sid) == before


@pytest.mark.parametrize("field", TOKENS)
def test_increment_past_int64_refused(db: SessionDB, sid: str, field: str) -> None:
    db.update_token_counts(sid, **{field: INT64_MAX - 1})
    db.update_token_counts(sid, **{field: 1})
    assert db.get_session(sid)[field] == INT64_MAX
    before = db.get_session(sid)
    with pytest.raises(InvalidArgument):
        db.update_token_counts(sid, **{field: 1})
    after = db.get_session(sid)
    assert after == before
    assert isinstance(after[field], int)


def test_cost_overflow_refused(db: SessionDB, sid: str) -> None:
    db.update_token_counts(sid, estimated_cost_usd=1e308, actual_cost_usd=1e308)
    before = db.get_session(sid)
    with pytest.raises(InvalidArgument):
        db.update_token_counts(sid, estimated_cost_usd=1e308)
    with pytest.raises(InvalidArgument):
        db.update_token_counts(sid, actual_cost_usd=1e308)
    after = db.get_session(sid)
    assert after == before
    assert math.isfinite(after["estimated_cost_usd"]) and math.isfinite(after["actual_cost_usd"])
