"""Run every benchmark, print their tables, write ``bench/results/latest.json``.

    uv run --group bench python -m bench [--only engine_overhead,streaming] [--runs 2000]

A benchmark whose services are missing (Postgres, Redis) is skipped with the reason; one that
fails is reported and the others still run. The exit code is 0 unless every benchmark failed:
benchmarks measure, they never gate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import distributed, engine_overhead, parallel_waits, streaming
from bench.common import RESULTS, Skipped, environment

BENCHMARKS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "engine_overhead": engine_overhead.main,
    "parallel_waits": parallel_waits.main,
    "distributed": lambda argv: _distributed(argv),
    "streaming": streaming.main,
}


def _distributed(argv: list[str]) -> dict[str, Any]:
    # ``distributed.main`` exits on a skip (for the command line); here a skip is a result.
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=distributed.DEFAULT_RUNS)
    args = parser.parse_args(argv)
    results = distributed.measure(args.runs, 32)
    print(distributed.report(results), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated names: " + ", ".join(BENCHMARKS))
    parser.add_argument(
        "--runs", type=int, default=distributed.DEFAULT_RUNS, help="runs for the distributed benchmark"
    )
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}: choose from {', '.join(BENCHMARKS)}")

    report: dict[str, Any] = {"environment": environment(), "benchmarks": {}}
    failed = 0
    for name in chosen:
        print(f"\n== {name}", flush=True)
        began = time.perf_counter()
        argv = ["--runs", str(args.runs)] if name == "distributed" else []
        entry: dict[str, Any]
        try:
            entry = {"status": "ok", "results": BENCHMARKS[name](argv)}
        except Skipped as exc:
            print(f"skipped: {exc}", flush=True)
            entry = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:
            failed += 1
            traceback.print_exc()
            entry = {"status": "failed", "error": str(exc)[:4000]}
        entry["seconds"] = round(time.perf_counter() - began, 1)
        report["benchmarks"][name] = entry

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "latest.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}", flush=True)
    return 1 if failed == len(chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
