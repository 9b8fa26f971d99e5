"""The benchmark is a product: its quick mode runs and writes valid JSON. (Its figures
are never asserted here: timings on a shared machine are not pass/fail.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sessiondb import cli


@pytest.mark.slow
def test_bench_quick_runs_and_writes_valid_json(tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--quick", "--duration", "1", "--writers", "2",
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "== convoy" in printed and "== fast" in printed and "ratios:" in printed
    assert "== async-loop" in printed and "loop lag (aio)" in printed
    doc = json.loads(out.read_text())
    assert {"python", "apsw", "sqlite_apsw", "sqlite_stdlib", "cpus", "options"} <= set(
        doc["header"])
    strategies = {(r["scenario"], r["strategy"]) for r in doc["runs"]}
    assert strategies == {(s, k) for s in ("convoy", "fast")
                          for k in ("serial", "naive", "seedfix", "sessiondb")} | {
        ("async-loop", "aio"), ("async-loop", "sync-on-loop"), ("async-loop", "no-db")}
    for run in doc["runs"]:
        assert run["integrity"] == "ok" and run["lost_writes"] == 0 and not run["failed"]
        assert run["commits"] == len(run["raw"]["latencies_s"]) > 0
        assert {"p50", "p90", "p99", "p99.9", "max"} == set(run["latency_s"])
        assert len(run["per_process_commits"]) == run["writers"]
        if run["scenario"] == "async-loop":
            assert run["loop_calls"] > 0 and run["loop_errors"] == 0
            assert run["loop_wakeups"] == len(run["raw"]["loop_lag_s"]) > 0
            assert {"p50", "p90", "p99", "p99.9", "max"} == set(run["loop_lag_s"])
