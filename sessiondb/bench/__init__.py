"""The benchmarks: the multi-process contention benchmark (``sessiondb bench`` or
``python -m benchmarks.contention``, see :mod:`sessiondb.bench.run`); with ``--db URL``
the same scenarios on PostgreSQL beside SQLite (:mod:`sessiondb.bench.pg_run`); and, only
when asked for, the scale benchmark (``--only scale``, :mod:`sessiondb.bench.scale`) and
the frameworks benchmark (``--only frameworks``, :mod:`sessiondb.bench.frameworks`).
See the README."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .run import EXTRA_STRATEGIES, STRATEGIES, benchmark

__all__ = ["add_arguments", "main", "benchmark"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a reduced set (convoy, fast, async-loop; 8 writers, 4 s "
                             "each) in about a minute")
    parser.add_argument("--duration", type=float, help="seconds per scenario (overrides)")
    parser.add_argument("--writers", type=int, help="writer processes per scenario (overrides)")
    parser.add_argument("--only", action="append", metavar="SCENARIO",
                        help="run only this scenario (convoy, agent, burst, fast, gateway, "
                             "async-loop; with --db: convoy, convoy-row, agent-16, burst, "
                             "fast, agent-64, overhead); repeatable. 'scale' runs the scale "
                             "benchmark instead, 'frameworks' the frameworks benchmark "
                             "(neither is part of the default run)")
    parser.add_argument("--strategy", action="append", choices=STRATEGIES + EXTRA_STRATEGIES,
                        dest="strategies",
                        help="run only this strategy (repeatable; default: naive, seedfix, "
                             "sessiondb, sessiondb-normal). 'sessiondb-posix' forces the "
                             "portable gate (classic POSIX locks); with 'sessiondb' beside it "
                             "the run ends with the two gates side by side. "
                             "'sessiondb-unrecorded' is sessiondb with the process record off")
    parser.add_argument("--rounds", type=_at_least(1), default=1, metavar="N",
                        help="run each scenario's strategies N times, alternating their "
                             "order (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every worker (default 1)")
    parser.add_argument("--json", dest="json_file", metavar="FILE",
                        help="write every raw figure as JSON to FILE (schema in the README)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw latency CDFs per strategy (needs the 'bench' extra)")
    parser.add_argument("--db", metavar="URL",
                        help="run the scenarios on PostgreSQL at this postgresql:// URL "
                             "(sessiondb and plain psycopg) beside sessiondb on SQLite, "
                             "in one run, and check the goals; creates and drops schemas "
                             "sessiondb_bench_* in that database (needs the 'postgres' "
                             "extra)")
    frameworks = parser.add_argument_group(
        "the frameworks benchmark (--only frameworks): 8 processes writing one "
        "conversation through the OpenAI Agents SDK, LangGraph and Google ADK, with "
        "sessiondb (and, with --db, on PostgreSQL) beside each framework's own SQLite "
        "backend")
    frameworks.add_argument("--items", type=_at_least(1), default=100, metavar="N",
                            help="writes per process (default 100)")
    scale = parser.add_argument_group("the scale benchmark (--only scale)")
    scale.add_argument("--messages", type=_at_least(1000), default=1_000_000, metavar="N",
                       help="messages in the store, in sessions of 50 (default 1,000,000; "
                            "10,000,000 works too, for hours and about 60 GB of disk)")
    scale.add_argument("--repeats", type=_at_least(1), default=100, metavar="N",
                       help="timed rounds of every read shape (default 100)")
    scale.add_argument("--workdir", metavar="DIR",
                       help="where its temporary files go (default: the system's "
                            "temporary directory); removed at the end. The contention "
                            "benchmark takes it too: put it on a real disk, not tmpfs, "
                            "for the cost of durability to show")


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:,}")
        return value
    return parse


def run(args: argparse.Namespace) -> int:
    if args.only and "frameworks" in args.only:
        return _run_frameworks(args)
    if getattr(args, "db", None):
        return _run_postgres(args)
    if args.only and "scale" in args.only:
        return _run_scale(args)
    from .report import plot, table

    from .gate_compare import compare_gates, gate_table

    doc = benchmark(quick=args.quick, duration=args.duration, writers=args.writers,
                    only=args.only, strategies=tuple(args.strategies or STRATEGIES),
                    seed=args.seed, workdir=args.workdir, rounds=args.rounds)
    print(table(doc))
    doc["gate_comparison"] = compare_gates(doc["runs"])
    if doc["gate_comparison"]:
        print(gate_table(doc["gate_comparison"]))
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        print(f"wrote {args.json_file}", file=sys.stderr)
    if args.plot:
        try:
            plot(doc, args.plot)
        except ImportError:
            print("--plot needs matplotlib: pip install 'sessiondb[bench]'", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}", file=sys.stderr)
    return 1 if any(r["failed"] for r in doc["runs"]) else 0


def _run_postgres(args: argparse.Namespace) -> int:
    from ..backend import is_url

    if not is_url(args.db):
        print(f"--db takes a postgresql:// URL, not {args.db!r}", file=sys.stderr)
        return 2
    if args.strategies or args.plot or (args.only and "scale" in args.only):
        print("--db runs its own clients: no --strategy, --plot or --only scale",
              file=sys.stderr)
        return 2
    from .pg_report import table
    from .pg_run import benchmark as pg_benchmark  # psycopg is imported only here

    doc = pg_benchmark(args.db, quick=args.quick, duration=args.duration,
                       writers=args.writers, only=args.only, seed=args.seed)
    print(table(doc))
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        print(f"wrote {args.json_file}", file=sys.stderr)
    return 1 if any(r["failed"] for r in doc["runs"]) else 0


def _run_frameworks(args: argparse.Namespace) -> int:
    from .frameworks import WRITERS, benchmark as fw_benchmark, table

    if set(args.only) != {"frameworks"} or args.plot or args.strategies:
        print("--only frameworks runs on its own: no other scenario, --strategy or --plot",
              file=sys.stderr)
        return 2
    rows = fw_benchmark(url=getattr(args, "db", None), count=args.items,
                        writers=args.writers or WRITERS)
    print(table(rows))
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as fh:
            json.dump({"runs": rows}, fh)
        print(f"wrote {args.json_file}", file=sys.stderr)
    failed = [r for r in rows if r["backend"].startswith("sessiondb")
              and (r["errors"] or r["lost"] or r["duplicated"] or r["out_of_order"])]
    return 1 if failed else 0


def _run_scale(args: argparse.Namespace) -> int:
    from .scale import scale_benchmark
    from .scale_report import table

    if set(args.only) != {"scale"} or args.plot:
        print("--only scale runs on its own: no other scenario, no --plot", file=sys.stderr)
        return 2
    doc = scale_benchmark(messages=args.messages, repeats=args.repeats, seed=args.seed,
                          workdir=args.workdir)
    print(table(doc))
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        print(f"wrote {args.json_file}", file=sys.stderr)
    return 1 if any(r["failed"] for r in doc["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.contention",
        description="Reproduce the SQLite convoy freeze with real processes, then show "
                    "sessiondb without it.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
