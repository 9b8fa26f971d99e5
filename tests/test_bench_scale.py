"""The scale benchmark is a product: on a tiny store it runs end to end and its JSON holds
every figure. (Its timings are never asserted: a shared machine is not pass/fail.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sessiondb import cli
from sessiondb.bench.run import scenarios
from sessiondb.bench.scale import plan

_DIST = {"p50", "p90", "p99", "max"}
_MAINTENANCE = {"rebuild_search_index", "export", "import", "round_trip", "prune_sessions",
                "reclaim_space", "hermes_conversion"}


def _timed(entry: dict) -> None:
    assert set(entry["latency_s"]) == _DIST
    assert entry["latency_s"]["max"] >= entry["latency_s"]["p99"] >= 0


@pytest.mark.slow
def test_scale_benchmark_runs_end_to_end_and_reports_every_figure(tmp_path: Path, capsys):
    out = tmp_path / "scale.json"
    work = tmp_path / "work"
    work.mkdir()
    code = cli.main(["bench", "--only", "scale", "--messages", "2000", "--repeats", "2",
                     "--workdir", str(work), "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "scale benchmark" in printed.out and "== maintenance" in printed.out
    assert "[3/4] maintain" in printed.err  # progress goes to stderr
    assert list(work.iterdir()) == []  # the working files are gone

    doc = json.loads(out.read_text())
    assert {"python", "apsw", "sqlite_apsw", "cpus", "platform", "date", "options"} <= set(
        doc["header"])
    assert doc["header"]["options"]["messages"] == 2000
    [run] = doc["runs"]
    assert run["failed"] == ""
    assert (run["scenario"], run["messages"], run["sessions"]) == ("scale", 2000, 40)

    imp, txn = run["ingest"]["import"], run["ingest"]["transaction"]
    assert imp["messages"] + txn["messages"] == 2000 == run["store"]["messages"]
    assert imp["messages_per_s"] > 0 and imp["wall_messages_per_s"] > 0
    assert imp["progress"]["calls"] >= 1
    assert imp["rows_messages_per_s"] > 0 and 0 < imp["rows_s"] <= imp["duration_s"]
    assert "rows phase (the rows in, before the index catch-up):" in printed.out
    assert "; rows phase (JSON decoding included, beside the appender)" in printed.out
    assert txn["messages_per_s"] > 0 and txn["messages_per_transaction"] == 50
    assert run["ingest"]["optimize"]["pages"] == 0  # one table of 2,000 ids: none sealed
    assert run["store"]["sessions"] == 40 and run["store"]["db_bytes"] > 0

    # every search shape and every listing shape, in the measuring functions' own format
    shapes, calls = run["search"]["shapes"], run["listing"]["calls"]
    for name in ("common word", "two-word phrase", "a OR b", "a NOT b", "rare word",
                 "common word offset=100"):
        assert name in shapes
    assert any(name.startswith("prefix") for name in shapes)
    assert any("session_id" in name for name in shapes)
    for name in ("list_sessions", "list_sessions active=True", "list_sessions offset=10000",
                 "session_count", "message_count", "message_count session",
                 "get_messages 50 first"):
        assert name in calls
    assert len(calls) >= 15 and len(shapes) >= 13
    for figures in (*shapes.values(), *calls.values()):
        assert figures["n"] == 2
        assert figures["max_ms"] >= figures["p99_ms"] >= figures["p50_ms"] >= 0
    assert shapes["common word"]["hits"] == 20  # the most common word is everywhere

    m = run["maintenance"]
    assert set(m) == _MAINTENANCE
    for name in _MAINTENANCE - {"round_trip"}:
        op = m[name]
        assert op["error"] == "" and op["duration_s"] >= 0
        assert op["writer"]["errors"] == 0 and op["writer"]["crashed"] == ""
        _timed(op["writer"])
        # When the longest wait began, from the operation's start (a call that began
        # just before it counts).
        assert -60 < op["writer"]["max_at_s"] <= op["duration_s"] + 1
    for name in ("rebuild_search_index", "prune_sessions", "reclaim_space"):
        assert m[name]["progress"]["calls"] >= 0
    for name in ("export", "import"):
        assert m[name]["peak_rss_bytes"] >= m[name]["baseline_rss_bytes"] > 0
    assert m["export"]["messages"] >= 2000 and m["export"]["file_bytes"] > 0
    assert m["import"]["imported"] == m["export"]["sessions"]
    assert m["round_trip"]["equal"] and m["round_trip"]["sampled"] == 20
    assert m["round_trip"]["sessions"] == [40, 40]
    prune = m["prune_sessions"]
    assert prune["pruned"] == prune["expected"] > 0
    # the writers of the rebuild, the export and the prune added a session each
    assert prune["sessions_after"] == 40 - prune["pruned"] + 3
    for sizes in (prune["sizes_before"], prune["sizes_after"],
                  m["reclaim_space"]["sizes_after"]):
        assert set(sizes) == {"db_bytes", "wal_bytes", "free_bytes"}
    assert "given_back_bytes" in m["reclaim_space"]
    hermes = m["hermes_conversion"]
    assert hermes["converted"] and hermes["lost_writes"] == 0
    assert hermes["built"]["messages"] == 2000
    assert hermes["writer"]["kind"] == "hermes" and hermes["writer"]["calls"] >= 1
    assert run["rss"]["peak_bytes"] > 0


def test_scale_runs_only_when_asked_for(capsys):
    assert all(s.name != "scale" for q in (True, False) for s in scenarios(q))
    assert cli.main(["bench", "--only", "scale", "--only", "convoy"]) == 2
    assert "on its own" in capsys.readouterr().err
    assert cli.main(["bench", "--only", "scale", "--messages", "999"]) == 2


def test_the_store_is_sessions_of_fifty_with_a_transaction_sample():
    assert plan(1_000_000) == {"messages": 1_000_000, "sessions": 20_000,
                               "import_sessions": 19_600, "transaction_sessions": 400}
    assert plan(2_049) == {"messages": 2_000, "sessions": 40, "import_sessions": 36,
                           "transaction_sessions": 4}
