"""Run schemathesis with every check over /v1/openapi.json of a local cluster (`make fuzz-http`).

    python bench/fuzz_http.py --schemathesis .venv-fuzz/bin/schemathesis [--size 3] [--max-time 120]

Starts a LocalCluster (one node by default) under a temporary directory, runs
`schemathesis run --checks all` against the leader with bench/schemathesis.toml, then checks
that every node is still running and that no node logged a traceback, and stops the nodes
by PID. schemathesis is not a project dependency: `make fuzz-http` installs it into its
own virtualenv (.venv-fuzz). The exit status is schemathesis's, or 1 if a node died or
logged a traceback. Only 127.0.0.1 is used.

Known and accepted (bench/schemathesis-baseline.json): the coverage phase sends If-Match
together with If-None-Match as a "schema-valid" request (OpenAPI cannot say that two header
parameters exclude each other; the server answers 400 as documented), and it sends
`Kvstore-Request-Id: 0`, which does not match the documented pattern, as a positive value
when its generator finds none (schemathesis 4.32; the case's metadata records a pool miss).
Both are reported as ST202; the baseline keeps them from failing the run. A baseline entry
is coarse (operation, check and status: "positive data rejected with 400 on PUT/DELETE"),
so read the run's ST202 cases before trusting a green run after a change to those two.
Some runs also report ST201 for a request with an undeclared header
(`x-schemathesis-unknown-property`) answered 200: RFC 9110 has a recipient ignore header
fields it does not know, so that is not a failure either. It is not in the baseline (an
entry would accept every 200 to a schema-violating PUT): this script passes a run whose
only failures are such cases, read from schemathesis's output.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from kvstore.server.localcluster import LocalCluster

_CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
# The accepted failures (see the module docstring); --update-baseline rewrites it.
_BASELINE = Path(__file__).resolve().parent / "schemathesis-baseline.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schemathesis", default=".venv-fuzz/bin/schemathesis")
    parser.add_argument("--size", type=int, default=1, help="nodes in the cluster (default 1)")
    parser.add_argument("--max-time", type=int, default=120, help="seconds of fuzzing")
    parser.add_argument("--seed", type=int, default=1)
    # One worker: with two, hypothesis (under CPython 3.11) sometimes fails inside ast.parse
    # ("AST constructor recursion depth mismatch"), an error of the tool, not of the API.
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--update-baseline", action="store_true", help="accept this run's failures"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvstore-fuzz-") as base:
        cluster = LocalCluster(Path(base), args.size)
        with cluster:
            leader = cluster.wait_for_leader(timeout_s=20)
            url = cluster.client_url(leader) + "/v1/openapi.json"
            command = [
                str(Path(args.schemathesis).resolve()),
                "--config-file",
                str(_CONFIG),
                "run",
                "--checks",
                "all",
                "--workers",
                str(args.workers),
                "--max-time",
                str(args.max_time),
                "--seed",
                str(args.seed),
                "--max-redirects",
                "3",
                "--baseline",
                str(_BASELINE),
                *(["--baseline-update"] if args.update_baseline else []),
                url,
            ]
            print("+", " ".join(command), flush=True)
            run = subprocess.run(command, cwd=base, stdout=subprocess.PIPE, text=True)
            print(run.stdout, end="", flush=True)
            status = run.returncode
            if status != 0 and _only_undeclared_headers(run.stdout):
                print("fuzz_http: the only failures are undeclared headers answered normally")
                status = 0
            dead = [node for node in cluster.ids if cluster.pid(node) is None]
            tracebacks = [
                node
                for node in cluster.ids
                if "Traceback" in cluster.log_path(node).read_text(errors="replace")
            ]
        if dead or tracebacks:
            print(f"fuzz_http: nodes died: {dead}; nodes with tracebacks: {tracebacks}")
            return status or 1
    return status


_UNDECLARED_HEADER = "Invalid component: in header - object with unexpected properties"


def _only_undeclared_headers(output: str) -> bool:
    """Whether every failure schemathesis printed is an ST201 whose only fault is an
    undeclared header (see the module docstring): then the run passed."""
    lines = [line.strip() for line in output.splitlines()]
    failures = [line for line in lines if re.match(r"- ST\d+ ", line)]
    components = [line for line in lines if line.startswith("Invalid component:")]
    errors = any(line.startswith("Errors:") for line in lines)
    return (
        bool(failures)
        and not errors
        and all(line.startswith("- ST201 ") for line in failures)
        and len(components) == len(failures)
        and all(line == _UNDECLARED_HEADER for line in components)
    )


if __name__ == "__main__":
    sys.exit(main())
