"""Reading LangGraph's configs for :class:`~sessiondb.adapters.langgraph.SessionDBSaver`:
the ids a ``RunnableConfig`` names, checked into sessiondb's typed errors, and the configs
the saver returns. Pure functions; no LangGraph import."""

from __future__ import annotations

import uuid
from typing import Any, Mapping, Sequence

from ..errors import InvalidArgument, InvalidArgumentType
from ..text import check_id, check_text


def configurable(config: Any) -> Mapping[str, Any]:
    """``config["configurable"]`` (empty if missing)."""
    if not isinstance(config, Mapping):
        raise InvalidArgumentType("config must be a dict (a RunnableConfig), not "
                                  f"{type(config).__name__}")
    conf = config.get("configurable")
    if conf is None:
        return {}
    if not isinstance(conf, Mapping):
        raise InvalidArgumentType("config['configurable'] must be a dict, not "
                                  f"{type(conf).__name__}")
    return conf


def one_id(name: str, value: Any) -> str:
    """A thread or run id: a str, or an int or UUID taken as its text (LangGraph's
    examples use both)."""
    if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool):
        value = str(value)
    return check_id(name, value)


def ids(name: str, values: Any) -> list[str]:
    """A list of ids (a str alone is refused: it is not a list of its characters)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, set, frozenset)):
        raise InvalidArgumentType(f"{name} must be a list of ids, not "
                                  f"{type(values).__name__}")
    return [one_id(name, v) for v in values]


def thread_id(conf: Mapping[str, Any], required: bool = True) -> str | None:
    """The thread a config names; None, if not ``required``, when it names none."""
    if conf.get("thread_id") is None:
        if not required:
            return None
        raise InvalidArgument("config['configurable']['thread_id'] is required: the "
                              "thread to checkpoint, e.g. {'configurable': {'thread_id': "
                              "'chat-1'}}")
    return one_id("thread_id", conf["thread_id"])


def namespace(conf: Mapping[str, Any], default: str | None = "") -> str | None:
    """The checkpoint namespace a config names, else ``default``."""
    value = check_text("checkpoint_ns", conf.get("checkpoint_ns"))
    return default if value is None else value


def checkpoint_id(conf: Mapping[str, Any]) -> str | None:
    """The checkpoint a config names, or None."""
    return check_text("checkpoint_id", conf.get("checkpoint_id")) or None


def config(thread_id: str, ns: str, checkpoint_id: str) -> dict[str, Any]:
    """The config naming a stored checkpoint."""
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                             "checkpoint_id": checkpoint_id}}


def matches(metadata: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Every item of ``wanted`` is in ``metadata`` (equal values), as LangGraph's
    in-memory saver filters."""
    return all(metadata.get(key) == value for key, value in wanted.items())
