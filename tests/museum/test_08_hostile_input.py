"""Exhibit 8: hostile input. Every public method of :class:`SessionDB`, called with
whatever a buggy caller or a crafted transcript can hand it: ids and titles of any text,
content with NUL and lone surrogates, 10 MB strings, ``tool_calls`` that are not JSON,
negative or huge token counts, NaN costs, full-text query soup, wrong types.

What must hold for every call:

* it succeeds, or raises one of the library's *input* errors (:class:`InvalidArgument`,
  :class:`InvalidArgumentType`, :class:`SessionNotFound`, :class:`IntegrityViolation`;
  :class:`ConfigurationError` only for a call a ``snapshot()`` or ``transaction()``
  block does not allow, e.g. a write inside a snapshot). Never a raw ``apsw`` error,
  ``OverflowError``, ``UnicodeEncodeError``, ``RecursionError`` or a JSON error; never
  an error that blames the environment (:class:`StorageError`, :class:`SearchIndexError`,
  busy/timeout) for what was bad input, which sends the user to ``sessiondb doctor``
  for nothing;
* a call that raised changed nothing: every row of ``sessions``, ``messages`` and
  ``sqlite_sequence``, read through a separate read-only connection, is as before;
* a call that succeeded left the store readable: listing, exporting, searching and the
  title lookups still work afterwards (no poisoned rows);
* at the end: ``PRAGMA integrity_check``, ``PRAGMA foreign_key_check`` and the FTS5
  index against its content table (``'integrity-check'`` with ``rank = 1``) are clean.

The strategy table must name every public method, so a method added later fails
:func:`test_strategy_table_covers_the_public_api` until it gets a strategy here.
"""

from __future__ import annotations

import inspect
import json
import reprlib
import string
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import apsw
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sessiondb import (
    Claim, ClosedError, ConfigurationError, CoordinationError, IntegrityViolation,
    InvalidArgument, InvalidArgumentType, Lease, SessionDB, SessionDBError, SessionNotFound,
    StaleRevision,
)
from sessiondb.text import lineage_number, split_lineage

EXAMPLES = 2500
# Coordination answers ("held by", "no longer yours", "at the cap") and stale revisions
# are answers about the state of the store, not failures.
INPUT_ERRORS = (InvalidArgument, InvalidArgumentType, SessionNotFound, IntegrityViolation,
                CoordinationError, StaleRevision)
NAN, INF = float("nan"), float("inf")
INT64_MAX = 2**63 - 1


# -- hostile values ------------------------------------------------------------------

class Booby(Exception):
    """Raised by :class:`Hostile`; must never escape the library."""


class Hostile:
    """An argument whose ``repr``, ``str`` and truth value all raise: a library that
    formats or tests a rejected value instead of naming its type lets this escape."""

    def __repr__(self) -> str:
        raise Booby("repr")

    def __str__(self) -> str:
        raise Booby("str")

    def __bool__(self) -> bool:
        raise Booby("bool")


class Deep(list):
    """A list nested 50,000 deep (json.dumps hits the recursion limit), with a short
    repr so that a failing example can still be printed."""

    def __repr__(self) -> str:
        return "Deep(<50000 levels>)"


def _deep() -> Deep:
    inner: list = []
    outer = Deep([inner])
    for _ in range(50_000):
        nxt: list = []
        inner.append(nxt)
        inner = nxt
    return outer


def _cyclic_list() -> list:
    items: list = [1]
    items.append(items)
    return items


def _cyclic_dict() -> dict:
    d: dict = {"a": 1}
    d["self"] = d
    return d


EXISTING = ["s1", "s2", "s3", "S1", "s", "missing", "n1"]
NASTY_TEXT = [
    "", " ", "\x00", "a\x00b", "s1\x00", "\ud800", "a\udfffb", "\udc80\ud800", "%", "_",
    "s%", "s_", "\\", "'", '"', "T", "T #2", "T #0", "T #", "T #99999999999999999999999",
    "x" * 1025, "y" * 101, "\u202e\u200b", "\n\t\r", "NULL", "' OR 1=1 --",
    "'); DROP TABLE sessions; --", "\U0010ffff", "\ufeff", "é", "ß", "İ",
]
TEXT = st.one_of(st.sampled_from(NASTY_TEXT),
                 st.text(st.characters(exclude_categories=()), max_size=40))
WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=6),
    st.builds(bytearray, st.binary(max_size=4)), st.builds(object), st.builds(Hostile),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                         max_size=2),
    st.sets(st.integers(), max_size=2), st.complex_numbers(), st.just(Path("s1")),
    st.just(b"s1"), st.just(Decimal("1.5")),
)
INTS = st.one_of(
    st.integers(-3, 10**6),
    st.sampled_from([-1, 0, 2**31, INT64_MAX - 1, INT64_MAX, 2**63, 2**64, -2**63,
                     -2**63 - 1, 10**30, 2**1100]),
    st.integers(),
)
FLOATS = st.one_of(st.floats(), st.sampled_from([NAN, INF, -INF, -0.0, 1e308, 5e-324, -1.0]))
JSON_OK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
NOT_JSON = st.one_of(
    st.sets(st.integers(), min_size=1, max_size=3), st.builds(object), st.builds(Hostile),
    st.binary(min_size=1, max_size=4), st.sampled_from([NAN, INF, -INF]),
    st.builds(_cyclic_list), st.builds(_cyclic_dict), st.builds(_deep),
    st.just({(1, 2): 3}), st.just({"k": {1, 2}}), st.just([NAN]), st.just({NAN: 1}),
    st.just(10**5000), st.complex_numbers(), st.just(Decimal("1.5")),
)
FTS_SOUP = st.one_of(TEXT, st.lists(st.sampled_from([
    '"', "(", ")", "*", ":", "^", "-", "+", "AND", "OR", "NOT", "NEAR", "NEAR(", "hello",
    "world", "content:", "{content}", "messages_fts", "rank", "MATCH", " ", "\x00", "'",
    "{", "}", ",", ".", "\ud800", "*hello", "hel*", "\\", "é", "\u200b",
]), max_size=16).map("".join))


# -- calls ---------------------------------------------------------------------------

# reprlib cuts a long string inside a list or dict before it formats it: hypothesis
# formats every explicit example (to report it should it fail), and the plain repr of
# {"big": BIG} wrote out 10 MB of "\x00" escapes to keep 200 characters of them.
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlevel = 60, 200, 60, 4
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 10


def _safe_repr(value: Any) -> str:
    if isinstance(value, str) and len(value) > 60:
        return f"{value[:20]!r}...<{len(value)} chars>"
    try:
        text = _SHORT.repr(value)
    except Exception:
        return f"<{type(value).__name__} with a raising repr>"
    return text if len(text) <= 200 else text[:200] + "..."


class Call:
    """One call of a public method: ``Call("get_session", "s1")``."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs
        self.result: Any = None

    def run(self, db: SessionDB) -> Any:
        self.result = getattr(db, self.name)(*self.args, **self.kwargs)
        return self.result

    def __repr__(self) -> str:
        parts = [_safe_repr(a) for a in self.args]
        parts += [f"{k}={_safe_repr(v)}" for k, v in self.kwargs.items()]
        return f"db.{self.name}({', '.join(parts)})"


class Stopped(Call):
    """A call that starts a helper (``heartbeat``, ``deadline``), stopped at once."""

    def run(self, db: SessionDB) -> Any:
        helper = super().run(db)
        helper.stop() if hasattr(helper, "stop") else helper.cancel()
        return helper


class Drained(Call):
    """A call that returns an iterator (``iter_export``), iterated to its end."""

    def run(self, db: SessionDB) -> Any:
        self.result = list(super().run(db))
        return self.result


class Block(Call):
    """``with db.transaction():``, ``with db.snapshot():`` or ``with db.fenced(x):``
    around one inner call; the inner error (a checked one) either leaves the block or is
    caught inside it."""

    def __init__(self, name: str, inner: Call, reraise: bool, *args: Any) -> None:
        super().__init__(name, *args)
        self.inner, self.reraise = inner, reraise
        self.inner_error: BaseException | None = None

    def run(self, db: SessionDB) -> Any:
        self.inner_error = None
        with getattr(db, self.name)(*self.args):
            self.inner_error = checked(db, self.inner, in_block=True)
            if self.inner_error is not None and self.reraise:
                raise self.inner_error

    def __repr__(self) -> str:
        how = "re-raised" if self.reraise else "caught inside"
        return f"with db.{self.name}(): {self.inner!r}  # error {how}"


class Arg:
    """How to draw one argument: a ``valid`` value, or (when the call picks this argument
    to attack) a ``hostile`` one. Attacking one or two arguments per call and keeping
    the others valid lets the bad value get past the first check and reach SQLite.
    ``valid=None``: an optional argument that is only passed to attack."""

    def __init__(self, valid: st.SearchStrategy | None, hostile: st.SearchStrategy) -> None:
        self.valid, self.hostile = valid, st.one_of(hostile, WRONG)


def fields(required: dict[str, Arg], optional: dict[str, Arg]) -> st.SearchStrategy:
    """Draw ``(required values, optional values)``: 0-2 of all the fields hostile, the
    rest valid; an optional field that is not attacked may be left out."""
    names = sorted(required) + sorted(optional)
    # Built once here, not inside draw_fields: a strategy made afresh on every draw is
    # validated afresh too: a quarter of the time spent generating examples.
    # The same strategies draw the same values from the same choices.
    pick = st.sets(st.sampled_from(names), max_size=2) if names else st.just(set())
    keep = st.booleans()

    @st.composite
    def draw_fields(draw: Callable) -> tuple[dict[str, Any], dict[str, Any]]:
        attacked = draw(pick)
        req = {k: draw(a.hostile if k in attacked else a.valid) for k, a in required.items()}
        opt = {k: draw(a.hostile) for k, a in optional.items() if k in attacked}
        opt.update({k: draw(a.valid) for k, a in optional.items()
                    if k not in attacked and a.valid is not None and draw(keep)})
        return req, opt

    return draw_fields()


def record(required: dict[str, Arg], optional: dict[str, Arg]) -> st.SearchStrategy:
    return fields(required, optional).map(lambda f: {**f[0], **f[1]})


def call(name: str, *positional: Arg, kind: type = Call, **keywords: Arg
         ) -> st.SearchStrategy["Call"]:
    required = {f"{i}": a for i, a in enumerate(positional)}
    return fields(required, keywords).map(
        lambda f: kind(name, *[f[0][k] for k in sorted(f[0], key=int)], **f[1]))


VALID_ID = st.sampled_from(EXISTING)
PLAIN = st.one_of(st.sampled_from(["cli", "hello", "T", "T #3", "m", "s1", "x y"]),
                  st.text("abc #1", min_size=1, max_size=6))
SESSION_ID = Arg(VALID_ID, TEXT)
NEW_ID = Arg(st.sampled_from(["n1", "n2", "s1", "s2"]), TEXT)
SOURCE = Arg(st.sampled_from(["cli", "telegram"]), TEXT)
OPT_TEXT = Arg(st.none() | PLAIN, TEXT)
ROLE = Arg(st.sampled_from(["user", "assistant", "tool", "system"]), TEXT)
TITLE = Arg(st.none() | PLAIN, TEXT)
JSON_ARG = Arg(st.none() | JSON_OK,
               st.one_of(NOT_JSON, st.lists(NOT_JSON | JSON_OK, min_size=1, max_size=3),
                         st.dictionaries(TEXT, NOT_JSON | JSON_OK, min_size=1, max_size=3)))
COUNT = Arg(st.integers(0, 1000), st.one_of(INTS, FLOATS))
OPT_COUNT = Arg(st.none() | st.integers(0, 1000), st.one_of(INTS, FLOATS))
COST = Arg(st.none() | st.floats(0, 10), st.one_of(INTS, FLOATS))
TIME = Arg(st.floats(0, 2e9), st.one_of(INTS, FLOATS))
LIMIT = Arg(st.none() | st.integers(-1, 50), st.one_of(INTS, FLOATS))
OFFSET = Arg(st.integers(0, 5), st.one_of(INTS, FLOATS))
FLAG = Arg(st.booleans(), st.none())
PREFIXES = Arg(st.none() | st.lists(st.integers(1, 4), max_size=2),
               st.one_of(st.lists(INTS, min_size=1, max_size=2), TEXT, INTS))
# A progress callback: None or a callable; anything else is hostile (None is valid).
PROGRESS = Arg(st.none() | st.just(lambda p: None),
               st.one_of(st.booleans(), st.integers(), TEXT, st.lists(st.integers())))
ACTIVE = Arg(st.none() | st.booleans(), st.none())
STR_LIST = Arg(st.none() | st.lists(st.sampled_from(["cli", "telegram", "user", "tool"]),
                                    max_size=3),
               st.one_of(st.lists(TEXT, max_size=4), st.tuples(TEXT), st.sets(TEXT, max_size=2),
                         st.lists(WRONG, min_size=1, max_size=2), TEXT))
QUERY = Arg(st.sampled_from(["hello", "deploy container", "hel*", '"hello world"', "ok"]),
            FTS_SOUP)
DAYS = Arg(st.floats(0, 1e5), st.one_of(INTS, FLOATS))

SESSION_FIELDS = dict(model=OPT_TEXT, model_config=JSON_ARG, system_prompt=OPT_TEXT,
                      user_id=OPT_TEXT, parent_session_id=Arg(st.none() | VALID_ID, TEXT),
                      title=TITLE)
# Unknown session fields must be refused by name, whatever they hold.
SESSION_FIELDS_PLUS = dict(SESSION_FIELDS, bogus=Arg(None, TEXT), started_at=Arg(None, TEXT))
ACCOUNTING = dict(
    input_tokens=COUNT, output_tokens=COUNT, cache_read_tokens=COUNT,
    cache_write_tokens=COUNT, reasoning_tokens=COUNT, estimated_cost_usd=COST,
    actual_cost_usd=COST, model=OPT_TEXT, cost_status=OPT_TEXT, cost_source=OPT_TEXT,
    pricing_version=OPT_TEXT, billing_provider=OPT_TEXT, billing_base_url=OPT_TEXT,
    billing_mode=OPT_TEXT,
)
MESSAGE_FIELDS = dict(
    tool_name=OPT_TEXT, tool_calls=JSON_ARG, tool_call_id=OPT_TEXT, token_count=OPT_COUNT,
    finish_reason=OPT_TEXT, reasoning=OPT_TEXT, reasoning_details=JSON_ARG,
    codex_reasoning_items=JSON_ARG, metadata=JSON_ARG,
)
IMPORTED_MESSAGE = record(
    {"role": ROLE, "timestamp": TIME},
    dict(MESSAGE_FIELDS, content=OPT_TEXT, id=OPT_COUNT, session_id=SESSION_ID))
IMPORTED_SESSION = record(
    {"id": NEW_ID, "source": SOURCE, "started_at": TIME},
    dict(SESSION_FIELDS, ended_at=Arg(st.none() | st.floats(0, 2e9), TIME.hostile),
         end_reason=OPT_TEXT, message_count=COUNT, tool_call_count=COUNT,
         **{k: v for k, v in ACCOUNTING.items() if k != "model"},
         messages=Arg(st.lists(IMPORTED_MESSAGE, max_size=3), st.none())))
IMPORT_DATA = Arg(IMPORTED_SESSION | st.lists(IMPORTED_SESSION, max_size=3),
                  st.lists(WRONG, min_size=1, max_size=2))

# Coordination: a few names and owners, so that calls meet each other's leases and claims.
# ``wait`` and ``seconds`` are attacked with invalid values only: a valid large wait for a
# held lease is a legitimate (long) wait, not hostile input.
NAME = Arg(st.sampled_from(["L1", "L2", "session:s1"]), TEXT)
OWNER = Arg(st.sampled_from(["o1", "o2"]), TEXT)
QUEUE = Arg(st.sampled_from(["q1", "q2"]), TEXT)
TTL = Arg(st.floats(1, 60), st.one_of(INTS, FLOATS))
OPT_TTL = Arg(st.none() | st.floats(1, 60), st.one_of(INTS, FLOATS))
NOT_SECONDS = st.sampled_from([0, 0.0, -1, -1.0, NAN, INF, -INF])
WAIT = Arg(st.just(0.0), NOT_SECONDS)
DELAY = Arg(st.just(0.0) | st.floats(0, 5), NOT_SECONDS)
REVISION = Arg(st.none() | st.integers(0, 3), st.one_of(INTS, FLOATS))
LEASE = Arg(st.builds(Lease, NAME.valid, OWNER.valid, st.integers(0, 4), st.just(30.0),
                      st.just(0.0), st.just(2e9)),
            st.builds(Lease, TEXT | WRONG, TEXT | WRONG, INTS | WRONG, FLOATS | WRONG,
                      FLOATS, FLOATS))
CLAIM = Arg(st.builds(Claim, st.integers(0, 4), QUEUE.valid, st.none(), st.none(), OWNER.valid,
                      st.integers(0, 4), st.integers(1, 3), st.just(3), st.just(30.0),
                      st.just(2e9)),
            st.builds(Claim, INTS | WRONG, TEXT, WRONG, WRONG, TEXT | WRONG, INTS | WRONG,
                      INTS, INTS, FLOATS | WRONG, FLOATS))
HOLDING = Arg(LEASE.valid | CLAIM.valid, st.none())

STRATEGIES: dict[str, st.SearchStrategy[Call]] = {
    "create_session": call("create_session", NEW_ID, SOURCE, **SESSION_FIELDS_PLUS),
    "ensure_session": call("ensure_session", NEW_ID, source=SOURCE, **SESSION_FIELDS_PLUS),
    "get_session": call("get_session", SESSION_ID),
    "list_sessions": call("list_sessions", source=OPT_TEXT, exclude_sources=STR_LIST,
                          active=ACTIVE, limit=LIMIT, offset=OFFSET),
    "end_session": call("end_session", SESSION_ID, reason=OPT_TEXT),
    "reopen_session": call("reopen_session", SESSION_ID),
    "update_system_prompt": call("update_system_prompt", SESSION_ID, OPT_TEXT),
    "set_model": call("set_model", SESSION_ID, OPT_TEXT, model_config=JSON_ARG),
    "delete_session": call("delete_session", SESSION_ID),
    "resolve_session_id": call("resolve_session_id", SESSION_ID),
    "session_count": call("session_count", source=OPT_TEXT),
    "message_count": call("message_count", session_id=Arg(st.none() | VALID_ID, TEXT)),
    "set_session_title": call("set_session_title", SESSION_ID, TITLE),
    "get_session_title": call("get_session_title", SESSION_ID),
    "get_session_by_title": call("get_session_by_title", Arg(PLAIN, TEXT)),
    "resolve_session_by_title": call("resolve_session_by_title", Arg(PLAIN, TEXT)),
    "get_next_title_in_lineage": call("get_next_title_in_lineage", Arg(PLAIN, TEXT)),
    "append_message": call("append_message", SESSION_ID, ROLE, content=OPT_TEXT,
                           **MESSAGE_FIELDS),
    "get_messages": call("get_messages", SESSION_ID, after_id=OPT_COUNT, limit=LIMIT),
    "get_messages_as_conversation": call("get_messages_as_conversation", SESSION_ID),
    "clear_messages": call("clear_messages", SESSION_ID),
    "pop_message": call("pop_message", SESSION_ID),
    "update_token_counts": call("update_token_counts", SESSION_ID, absolute=FLAG,
                                **ACCOUNTING),
    "set_token_counts": call("set_token_counts", SESSION_ID, **ACCOUNTING),
    "search_messages": call("search_messages", QUERY, sources=STR_LIST,
                            exclude_sources=STR_LIST, roles=STR_LIST,
                            session_id=Arg(st.none() | VALID_ID, TEXT), limit=LIMIT,
                            offset=OFFSET),
    "export_session": call("export_session", SESSION_ID),
    "export_all": call("export_all", source=OPT_TEXT),
    "iter_export": call("iter_export", source=OPT_TEXT, kind=Drained),
    "import_sessions": call("import_sessions", IMPORT_DATA, skip_existing=FLAG,
                            progress=PROGRESS),
    "prune_sessions": call("prune_sessions", older_than_days=DAYS, source=OPT_TEXT,
                           dry_run=FLAG, progress=PROGRESS),
    "rebuild_search_index": call("rebuild_search_index", prefixes=PREFIXES,
                                 progress=PROGRESS),
    "reclaim_space": call("reclaim_space", progress=PROGRESS),
    "optimize_search_index": call("optimize_search_index", progress=PROGRESS),
    "checkpoint": call("checkpoint", reset=FLAG),
    "stats": call("stats"),
    "close": call("close"),
    "update_session": call("update_session", SESSION_ID, expected_revision=REVISION,
                           title=TITLE, model=OPT_TEXT, model_config=JSON_ARG,
                           system_prompt=OPT_TEXT, user_id=OPT_TEXT, bogus=Arg(None, TEXT)),
    "acquire_lease": call("acquire_lease", NAME, OWNER, ttl=TTL, wait=WAIT),
    "acquire_session": call("acquire_session", SESSION_ID, OWNER, ttl=TTL, wait=WAIT),
    "session_holder": call("session_holder", SESSION_ID),
    "renew_lease": call("renew_lease", LEASE, ttl=OPT_TTL),
    "release_lease": call("release_lease", LEASE),
    "get_lease": call("get_lease", NAME),
    "list_leases": call("list_leases", owner=OPT_TEXT),
    "heartbeat": call("heartbeat", HOLDING, interval=Arg(st.none() | st.floats(0.01, 1),
                                                         NOT_SECONDS), kind=Stopped),
    "deadline": call("deadline", HOLDING, Arg(st.floats(5, 60), NOT_SECONDS), kind=Stopped),
    "enqueue": call("enqueue", QUEUE, payload=JSON_ARG, session_id=OPT_TEXT,
                    max_attempts=Arg(st.integers(1, 5), st.one_of(INTS, FLOATS)), delay=DELAY),
    "claim": call("claim", QUEUE, OWNER, ttl=TTL),
    "complete_claim": call("complete_claim", CLAIM),
    "fail_claim": call("fail_claim", CLAIM, error=OPT_TEXT, retry_delay=DELAY),
    "release_claim": call("release_claim", CLAIM),
    "extend_claim": call("extend_claim", CLAIM, ttl=OPT_TTL),
    "reap_claims": call("reap_claims"),
    "get_claim": call("get_claim", Arg(st.integers(0, 5), st.one_of(INTS, FLOATS))),
    "queue_counts": call("queue_counts", queue=OPT_TEXT),
    "list_claims": call("list_claims", queue=OPT_TEXT,
                        state=Arg(st.none() | st.sampled_from(["ready", "dead"]), TEXT),
                        limit=LIMIT, offset=OFFSET),
    "requeue_claim": call("requeue_claim", Arg(st.integers(0, 5), st.one_of(INTS, FLOATS)),
                          max_attempts=Arg(st.none() | st.integers(1, 5),
                                           st.one_of(INTS, FLOATS))),
    "purge_claims": call("purge_claims", older_than_days=DAYS, queue=OPT_TEXT),
}
# A block wraps one inner call of any method above (close left out: closing inside a
# block is not an input problem), whose error either leaves the block or is caught in it.
_INNER = st.one_of([s for name, s in STRATEGIES.items() if name != "close"])
STRATEGIES["transaction"] = st.builds(Block, st.just("transaction"), _INNER, st.booleans())
STRATEGIES["snapshot"] = st.builds(Block, st.just("snapshot"), _INNER, st.booleans())
STRATEGIES["fenced"] = st.builds(Block, st.just("fenced"), _INNER, st.booleans(),
                                 st.one_of(HOLDING.valid, WRONG))
ANY_CALL = st.one_of(list(STRATEGIES.values()))


def public_methods() -> set[str]:
    return {name for name, member in inspect.getmembers(SessionDB)
            if not name.startswith("_") and callable(member)}


# -- the store under attack ------------------------------------------------------------

SEED = [
    {"id": "s1", "source": "cli", "started_at": 1000.0, "title": "T", "model": "m",
     "model_config": {"temperature": 0.5}, "input_tokens": 10, "estimated_cost_usd": 0.25,
     "messages": [
         {"id": 1, "role": "user", "content": "hello world", "timestamp": 1001.0},
         {"id": 2, "role": "assistant", "content": "hello again: deploy the container",
          "tool_calls": [{"id": "c1", "function": {"name": "shell"}}], "timestamp": 1002.0},
         {"id": 3, "role": "tool", "content": "ok", "tool_name": "shell",
          "tool_call_id": "c1", "timestamp": 1003.0},
     ]},
    # Counters a step away from their limits: increments must be refused, not wrap.
    {"id": "s2", "source": "cli", "started_at": 2000.0, "parent_session_id": "s1",
     "title": "T #2", "ended_at": 2500.0, "end_reason": "done",
     "input_tokens": INT64_MAX - 10, "estimated_cost_usd": 1e308,
     "messages": [{"id": 4, "role": "user", "content": "near the limits", "timestamp": 2001.0}]},
    {"id": "s3", "source": "telegram", "started_at": 1.0, "ended_at": 2.0},
]


class Escaped(AssertionError):
    """The library let something other than an input error out (or wrote partially)."""


def checked(db: SessionDB, call: Call, in_block: bool = False) -> BaseException | None:
    """Run ``call``; return the input error it raised, or None; fail on anything else."""
    try:
        call.run(db)
    except Escaped:
        raise
    except Exception as exc:
        if isinstance(exc, INPUT_ERRORS):
            return exc
        if isinstance(exc, ConfigurationError) and (in_block or isinstance(call, Block)):
            return exc  # a write inside snapshot(), a checkpoint inside transaction() ...
        kind = "a raw " if not isinstance(exc, SessionDBError) else "a misleading "
        raise Escaped(f"{call!r} raised {kind}{type(exc).__module__}."
                      f"{type(exc).__qualname__}: {_safe_repr(str(exc))}") from exc
    return None


class Arena:
    """A seeded store, a read-only connection that fingerprints it, and a plain writer
    that puts the seed back when a successful call changed it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = SessionDB(path)
        self.db.import_sessions(SEED)
        self.reader = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        self.reader.set_busy_timeout(5000)
        self.read_at: int | None = None  # the reader's data_version when it last read rows
        self.rows: tuple = ()
        self.seed = self.fingerprint()
        self.tally: Counter[str] = Counter()

    def fingerprint(self) -> tuple:
        """Every row of every table a call may write, as of one snapshot.

        The rows are read again only when ``PRAGMA data_version`` moved since the reader
        last read them. It moves whenever another connection commits to the database
        (https://sqlite.org/pragma.html#pragma_data_version), and this read-only reader
        never writes; it is read before the rows, so a commit landing in between makes
        the next call re-read them. An unmoved data_version thus proves that the rows
        last read are the rows now. Most calls commit nothing (they raise, or only
        read), so most comparisons need no re-read. Rejected: a digest computed in SQL,
        which would still read every row (the 10 MB ones too) twice per call."""
        self.reader.execute("BEGIN")
        try:
            version = self.reader.execute("PRAGMA data_version").fetchone()[0]
            if version != self.read_at:
                self.rows = tuple(
                    self.reader.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                    for table in ("sessions", "messages", "sqlite_sequence",
                                  "sessiondb_leases", "sessiondb_claims"))
                self.read_at = version
            return self.rows
        finally:
            self.reader.execute("COMMIT")

    def reset(self) -> None:
        check_integrity(self.path)
        writer = apsw.Connection(str(self.path))
        try:
            writer.set_busy_timeout(5000)
            # The wipe need not reach the disk before the import after it, which syncs:
            # one fsync per reset fewer, which counts when other tests load the disk.
            writer.execute("PRAGMA synchronous = OFF")
            writer.execute("BEGIN IMMEDIATE; DELETE FROM messages; DELETE FROM sessions; "
                           "DELETE FROM sqlite_sequence; DELETE FROM sessiondb_leases; "
                           "DELETE FROM sessiondb_claims; COMMIT")
        finally:
            writer.close()
        self.db.import_sessions(SEED)
        assert self.fingerprint() == self.seed

    def attack(self, call: Call) -> None:
        before = self.fingerprint()
        if before != self.seed:
            self.reset()
            before = self.seed
        error = checked(self.db, call)
        if error is None and isinstance(call, Block):
            error = call.inner_error  # caught inside the block: must be undone anyway
        self.tally[call.name] += 1
        self.tally["raised" if error is not None else "succeeded"] += 1
        if error is not None:
            if self.fingerprint() != before:
                raise Escaped(f"partial write: {call!r} raised {error!r} but changed the store")
        elif call.name == "close":
            with pytest.raises(ClosedError):
                self.db.session_count()
            self.db = SessionDB(self.path)
        elif call.name == "append_message":
            self.check_round_trip(call)
        elif call.name in RESULT_CHECKS:
            RESULT_CHECKS[call.name](self.db, call.args[0], call.result)
        self.probe()

    def check_round_trip(self, call: Call) -> None:
        """What an append accepted reads back unchanged (NUL, emoji, JSON and all)."""
        sent = inspect.signature(SessionDB.append_message).bind(
            self.db, *call.args, **call.kwargs)
        sent.apply_defaults()
        got = self.db.get_messages(sent.arguments["session_id"])[-1]
        for key in ("role", "content", "tool_name", "tool_call_id", "token_count",
                    "finish_reason", "reasoning"):
            assert got[key] == sent.arguments[key], key
        for key in ("tool_calls", "reasoning_details", "codex_reasoning_items", "metadata"):
            assert got[key] == json.loads(json.dumps(sent.arguments[key])), key

    def probe(self) -> None:
        """The reads every user makes keep working after any call (no poisoned rows)."""
        db = self.db
        sessions = db.list_sessions(limit=None)
        db.export_all()
        db.search_messages("hello OR near OR hostile")  # "hostile": the 10 MB message
        for s in sessions:
            if s["title"] is not None:
                db.resolve_session_by_title(split_lineage(s["title"]))
                db.get_next_title_in_lineage(s["title"])
            db.get_messages_as_conversation(s["id"])

    def close(self) -> None:
        self.reader.close()
        self.db.close()


_ASCII_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _resolved_id(db: SessionDB, prefix: str, found: str | None) -> None:
    # A NUL once ended LIKE's pattern and value: "a\0y" resolved to session "a\0x".
    if found is not None:
        assert found.translate(_ASCII_FOLD).startswith(prefix.translate(_ASCII_FOLD))
        assert db.get_session(found) is not None


def _resolved_title(db: SessionDB, title: str, found: str | None) -> None:
    if found is not None:
        got = db.get_session(found)["title"]
        assert got == title or (split_lineage(got) == title and lineage_number(got))


def _titled(db: SessionDB, title: str, found: dict | None) -> None:
    assert found is None or found["title"] == title


def _next_title(db: SessionDB, title: str, found: str) -> None:
    assert split_lineage(found) == split_lineage(title)
    assert db.get_session_by_title(found) is None  # free


# Answers that hostile text must not bend (checked when the call succeeded).
RESULT_CHECKS: dict[str, Callable[[SessionDB, Any, Any], None]] = {
    "resolve_session_id": _resolved_id, "resolve_session_by_title": _resolved_title,
    "get_session_by_title": _titled, "get_next_title_in_lineage": _next_title,
}


def check_integrity(path: Path) -> None:
    conn = apsw.Connection(str(path))
    try:
        conn.set_busy_timeout(5000)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES('integrity-check', 1)")
    finally:
        conn.close()


# -- the exhibit -----------------------------------------------------------------------

def test_strategy_table_covers_the_public_api() -> None:
    missing = public_methods() - set(STRATEGIES)
    assert not missing, f"give these public methods a hostile strategy: {sorted(missing)}"
    stale = set(STRATEGIES) - public_methods()
    assert not stale, f"no such public methods any more: {sorted(stale)}"


BIG = ("\x00hostile " * 1_111_112)[:10_000_000]  # 10 MB of text, a NUL every 9 chars
BIG_SURROGATE = BIG[:1_000_000] + "\ud800"
MANY = ["cli"] * 40_000  # more than SQLite's 32,766 bound variables

# Run before the drawn examples: the 10 MB strings (too slow to draw every time), and
# each input that once escaped the library untyped or misleadingly typed.
EXPLICIT = [
    Call("append_message", "s1", "user", BIG, metadata={"big": BIG}),
    Call("append_message", "s1", "user", BIG_SURROGATE),
    Call("create_session", "n1", "cli", system_prompt=BIG, model_config={"k": BIG}),
    Call("create_session", BIG, "cli"),
    Call("create_session", "n1", "cli", title=BIG),
    Call("update_system_prompt", "s1", BIG),
    Call("set_session_title", "s1", BIG),
    Call("search_messages", BIG),
    Call("search_messages", '"' + BIG[:2_000_000] + '" OR hello*'),
    Call("resolve_session_id", BIG),
    Call("get_session_by_title", BIG),
    Call("resolve_session_by_title", BIG),
    Call("get_next_title_in_lineage", BIG),
    Call("get_messages", BIG),
    Call("list_sessions", exclude_sources=[BIG]),
    Call("import_sessions", {"id": "n1", "source": "cli", "started_at": 1.0, "messages": [
        {"role": "user", "content": BIG, "timestamp": 1.0}]}),
    Call("list_sessions", exclude_sources=MANY),
    Call("search_messages", "hello", sources=MANY, roles=MANY),
    Call("list_sessions", limit=2**64),
    Call("search_messages", "hello", offset=2**63),
    Call("get_messages", "s1", limit=-2**64),
    Call("prune_sessions", 2**1100),
    Call("update_token_counts", "s2", 100, estimated_cost_usd=1e308),
    Call("import_sessions", {"id": "n1", "source": "cli", "started_at": 2**70}),
    Call("import_sessions", {"id": "n1", "source": "cli", "started_at": 1.0,
                             "title": "x" * 200}),
    Call("import_sessions", {"id": "n1", "source": "cli", "started_at": 1.0,
                             "input_tokens": -5}),
    Call("import_sessions", {"id": "n1", "source": "cli", "started_at": 1.0,
                             "parent_session_id": ["s1"]}),
    Call("resolve_session_id", "s1\x00"),
    Call("resolve_session_id", "S\x00x"),
    Call("list_sessions", active=Hostile()),
    Call("checkpoint", reset=Hostile()),
    Block("transaction", Call("append_message", "s1", "user", "\ud800"), False),
    Block("snapshot", Call("delete_session", "s1"), True),
]


def test_hostile_input(tmp_path: Path, exhibit: Callable[..., None]) -> None:
    arena = Arena(tmp_path / "state.db")

    def attack(call: Call) -> None:
        arena.attack(call)

    for explicit in reversed(EXPLICIT):
        attack = example(call=explicit)(attack)
    attack = settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example],
    )(given(call=ANY_CALL)(attack))

    try:
        attack()
    finally:
        arena.close()
    check_integrity(arena.path)

    methods = sorted(public_methods())
    unexercised = [m for m in methods if not arena.tally[m]]
    assert not unexercised, f"no example reached {unexercised}: {arena.tally}"
    exhibit(f"hostile input (hypothesis over {len(methods)} public methods)",
            "only typed errors, no partial writes, integrity ok",
            examples=arena.tally["raised"] + arena.tally["succeeded"], methods=len(methods),
            typed_errors=arena.tally["raised"], raw_errors=0, partial_writes=0)
