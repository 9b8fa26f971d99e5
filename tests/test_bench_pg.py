"""``sessiondb bench --db URL`` runs end to end on the test PostgreSQL server with tiny
durations and writes valid JSON. (Its figures are never asserted here: timings on a
shared machine are not pass/fail.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sessiondb import cli


@pytest.mark.slow
def test_pg_bench_runs_and_writes_valid_json(pg_url: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pg.json"
    code = cli.main(["bench", "--db", pg_url, "--duration", "0.5", "--writers", "2",
                     "--only", "convoy-row", "--only", "agent-64", "--only", "overhead",
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "== convoy-row" in printed and "== agent-64" in printed
    assert "side by side" in printed and "goals" in printed
    doc = json.loads(out.read_text())
    assert {"server_version", "settings", "psycopg"} <= set(doc["header"]["postgresql"])
    assert {"fsync", "synchronous_commit"} <= set(doc["header"]["postgresql"]["settings"])
    cases = {(r["scenario"], r["backend"], r["client"]) for r in doc["runs"]}
    assert cases == {
        ("convoy-row", "sqlite", "sessiondb"), ("convoy-row", "postgresql", "sessiondb"),
        ("convoy-row", "postgresql", "psycopg"),
        ("agent-64", "sqlite", "sessiondb"), ("agent-64", "postgresql", "sessiondb"),
        ("agent-64", "postgresql", "psycopg"),
        ("overhead", "sqlite", "sessiondb"), ("overhead", "postgresql", "psycopg"),
        ("overhead", "postgresql", "sessiondb"), ("overhead", "postgresql", "sessiondb-append"),
        ("overhead", "postgresql", "psycopg-same"),
    }
    for run in doc["runs"]:
        assert run["integrity"] == "ok" and run["lost_writes"] == 0 and not run["failed"], run
        assert run["commits"] == len(run["raw"]["latencies_s"]) > 0
        assert len(run["per_process_commits"]) == run["writers"]
        if run["backend"] == "postgresql":
            assert run["pool"]["wait_timeouts"] == 0
    a64 = [r for r in doc["runs"] if r["scenario"] == "agent-64"]
    assert all(r["processes"] == 2 and r["writers"] == 2 for r in a64)
    overhead = [r for r in doc["runs"] if r["scenario"] == "overhead"]
    assert all(r["writers"] == 1 and len(r["loadavg_1m"]) == 5 for r in overhead)
    goals = {g["goal"].split(":")[0]: g for g in doc["goals"]}
    assert set(goals) == {"agent-16", "convoy-row", "agent-64 (several processes, own pools)",
                          "overhead (append_message against the fewest statements)",
                          "overhead (a transaction() turn against the fewest statements)",
                          "overhead (a transaction() turn against its own statements)"}
    assert goals["agent-16"]["met"] is None  # not run
    assert all(g["met"] in (True, False) for name, g in goals.items() if name != "agent-16")
    assert all(g["figures"]["mean_ratio"] > 0 for name, g in goals.items()
               if name.startswith("overhead"))

    import psycopg  # every schema the run made is gone
    with psycopg.connect(pg_url) as conn:
        left = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE "
                            "'sessiondb_bench_%'").fetchall()
    assert left == []


def test_bench_imports_no_driver_without_a_url() -> None:
    """psycopg is imported only when ``--db`` is given."""
    code = ("import sys, sessiondb.bench, sessiondb.cli; "
            "print('psycopg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_bench_db_refuses_a_file_path(tmp_path: Path, capsys) -> None:
    assert cli.main(["bench", "--db", str(tmp_path / "x.db")]) == 2
    assert "postgresql://" in capsys.readouterr().err


def test_schema_in_url() -> None:
    from sessiondb.bench.pg_workers import split_schema, with_schema

    url = with_schema("postgresql://u:p@h:5/db?sslmode=disable&schema=old", "bench_x")
    assert split_schema(url) == ("postgresql://u:p@h:5/db?sslmode=disable", "bench_x")
    assert split_schema("postgresql://h/db") == ("postgresql://h/db", "sessiondb")
