"""`kvstore get|put|delete|cas|list|status`: the client library on the command line (etcdctl-like).

Every subcommand takes `--endpoints` (comma-separated client URLs; default $KVSTORE_ENDPOINTS
or the local cluster `kvstore cluster` starts), `--timeout` (the per-call deadline, seconds)
and `--output table|json` (`--json` for short: machine-readable output). Values go to stdout as raw bytes; errors go to stderr
with an exit status that says what happened:

    0 success   1 key not found   3 precondition failed (cas / conditional write)
    4 cluster unavailable or deadline exceeded (for a write: outcome unknown)
    5 request rejected (bad key, value too large, ...)   2 usage error (argparse)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from kvstore.client import Client, ClientConfig, KeyValue, NodeStatus
from kvstore.client.config import Consistency
from kvstore.errors import (
    ClusterError,
    KVStoreError,
    NotFoundError,
    PreconditionFailedError,
)

DEFAULT_ENDPOINTS = "http://127.0.0.1:7001,http://127.0.0.1:7002,http://127.0.0.1:7003"
ENDPOINTS_ENV = "KVSTORE_ENDPOINTS"

# https:// endpoints: (flag, variable, help).
_TLS_FLAGS = (
    ("--ca", "KVSTORE_CA", "CA file (PEM) that signs the nodes' certificates"),
    ("--cert", "KVSTORE_CERT", "client certificate file (PEM) to present"),
    ("--key", "KVSTORE_KEY", "the key file (PEM) of --cert"),
)

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_PRECONDITION_FAILED = 3
EXIT_UNAVAILABLE = 4
EXIT_REJECTED = 5

_STATUS_TIMEOUT_S = 1.0


def endpoints_arg(text: str) -> str:
    """`--endpoints`: comma-separated http(s)://host:port URLs, checked before any call, so a
    typo is a usage error (exit 2) rather than a request retried until its deadline."""
    urls = [part.strip() for part in text.split(",")]
    if not text.strip():
        raise argparse.ArgumentTypeError("no endpoint given")
    for url in urls:
        if not url:
            raise argparse.ArgumentTypeError(f"an empty endpoint in {text!r}")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise argparse.ArgumentTypeError(f"{url!r}: the scheme must be http or https")
        try:
            port = parsed.port
        except ValueError:
            raise argparse.ArgumentTypeError(f"{url!r}: the port is not a number") from None
        if not parsed.hostname:
            raise argparse.ArgumentTypeError(f"{url!r}: no host")
        if port is None:
            raise argparse.ArgumentTypeError(f"{url!r}: no port")
    return ",".join(urls)


def timeout_arg(text: str) -> float:
    """`--timeout`: a finite number of seconds above zero."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds above 0")
    return seconds


CONSISTENCIES = tuple(consistency.value for consistency in Consistency)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client subcommands to the `kvstore` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoints",
        type=endpoints_arg,
        default=os.environ.get(ENDPOINTS_ENV, DEFAULT_ENDPOINTS),
        help=f"comma-separated client URLs (default: ${ENDPOINTS_ENV} or {DEFAULT_ENDPOINTS})",
    )
    defaults = ClientConfig()  # the one place the client's defaults are written
    common.add_argument(
        "--timeout",
        type=timeout_arg,
        default=defaults.timeout_s,
        help="deadline per call, seconds (default %(default)s)",
    )
    common.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table: for people (the default); json: one JSON document, for scripts",
    )
    common.add_argument("--json", action="store_true", help="the same as --output json")
    for flag, variable, help_text in _TLS_FLAGS:
        common.add_argument(
            flag,
            dest="tls_" + flag.lstrip("-"),  # not `key`: that is the key of get/put/...
            default=os.environ.get(variable, ""),
            help=f"{help_text} (default ${variable})",
        )

    common.add_argument(
        "--token",
        dest="auth_token",
        default=os.environ.get("KVSTORE_TOKEN", ""),
        help="bearer token for nodes with --auth (default $KVSTORE_TOKEN)",
    )

    get = subparsers.add_parser("get", parents=[common], help="read a key")
    get.add_argument("key")
    get.add_argument(
        "--consistency", choices=CONSISTENCIES, default=defaults.read_consistency.value
    )
    get.add_argument("--raw", action="store_true", help="print the value without a newline")
    get.add_argument("--revision", type=int, help="the value as it was at this revision")
    get.set_defaults(handler=_handle(_get))

    put = subparsers.add_parser("put", parents=[common], help="write a key")
    put.add_argument("key")
    put.add_argument("value", nargs="?", default="-", help="the value; '-' or absent: stdin")
    put.add_argument("--if-revision", type=int, help="only if the key's mod_revision is this")
    put.add_argument("--create-only", action="store_true", help="only if the key is absent")
    put.add_argument("--lease", type=int, default=0, help="attach the key to this lease")
    put.set_defaults(handler=_handle(_put))

    cas = subparsers.add_parser("cas", parents=[common], help="compare-and-set a key")
    cas.add_argument("key")
    cas.add_argument("value", help="the new value; '-': stdin")
    expected = cas.add_mutually_exclusive_group(required=True)
    expected.add_argument("--mod-revision", type=int, help="expected mod_revision (0: absent)")
    expected.add_argument("--create", action="store_true", help="only if the key is absent")
    cas.set_defaults(handler=_handle(_cas))

    delete = subparsers.add_parser("delete", parents=[common], help="delete a key")
    delete.add_argument("key")
    delete.add_argument("--if-revision", type=int, help="only if the key's mod_revision is this")
    delete.add_argument("--prefix", action="store_true", help="every key under KEY")
    delete.set_defaults(handler=_handle(_delete))

    listing = subparsers.add_parser("list", parents=[common], help="list keys by prefix")
    listing.add_argument("prefix", nargs="?", default="")
    listing.add_argument("--limit", type=int)
    listing.add_argument("--keys-only", action="store_true")
    listing.add_argument("--start", help="from this key on (a previous page's next)")
    listing.add_argument("--revision", type=int, help="the keys as they were at this revision")
    listing.add_argument("--all", action="store_true", help="follow every page")
    listing.add_argument(
        "--consistency", choices=CONSISTENCIES, default=defaults.read_consistency.value
    )
    listing.set_defaults(handler=_handle(_list))

    status = subparsers.add_parser("status", parents=[common], help="status of every endpoint")
    status.set_defaults(handler=_handle(_status))

    from kvstore import auth_cli, coord_cli

    coord_cli.register(subparsers, common)
    auth_cli.register(subparsers, common)


Action = Callable[[Client, argparse.Namespace], Awaitable[int]]


def _handle(action: Action) -> Callable[[argparse.Namespace], int]:
    """Run `action` with a Client for the parsed arguments; map errors to exit statuses."""

    def handler(args: argparse.Namespace) -> int:
        args.json = args.json or args.output == "json"

        async def run() -> int:
            config = ClientConfig(
                timeout_s=args.timeout,
                ca_file=args.tls_ca,
                cert_file=args.tls_cert,
                key_file=args.tls_key,
                token=args.auth_token,
            )
            async with Client(args.endpoints, config=config) as client:
                return await action(client, args)

        try:
            return asyncio.run(run())
        except KVStoreError as exc:
            print(f"kvstore: {_describe(args, exc)}", file=sys.stderr)
            return _exit_status(exc)
        except ValueError as exc:
            print(f"kvstore: {exc}", file=sys.stderr)
            return EXIT_REJECTED
        except OSError as exc:  # ssl.SSLError included
            print(f"kvstore: cannot load the TLS files: {exc}", file=sys.stderr)
            return 2

    return handler


def _describe(args: argparse.Namespace, error: KVStoreError) -> str:
    """One line for an error: what was asked (`get "k"`), then what matters about the
    answer. The client's message already names the endpoint and the code once."""
    what = args.command
    key = getattr(args, "key", None)
    if key is not None:
        what = f"{what} {json.dumps(key)}"
    if isinstance(error, NotFoundError):
        return f"{what}: key not found [{error.code}]"
    if isinstance(error, PreconditionFailedError):
        current = error.current_revision
        state = "the key is absent" if not current else f"current revision {current}"
        return f"{what}: precondition failed: {state} [{error.code}]"
    return f"{what}: {error}"


def _exit_status(error: KVStoreError) -> int:
    if isinstance(error, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, PreconditionFailedError):
        return EXIT_PRECONDITION_FAILED
    if isinstance(error, ClusterError):
        return EXIT_UNAVAILABLE
    return EXIT_REJECTED


def _value_arg(value: str) -> bytes:
    return sys.stdin.buffer.read() if value == "-" else value.encode("utf-8")


def _print_json(payload: object) -> None:
    print(json.dumps(payload, sort_keys=True))


def _key_value_json(item: KeyValue) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "key": item.key,
        "create_revision": item.create_revision,
        "mod_revision": item.mod_revision,
        "version": item.version,
        "revision": item.revision,
    }
    try:
        payload["value"] = item.value.decode("utf-8")
    except UnicodeDecodeError:
        payload["value_base64"] = base64.b64encode(item.value).decode("ascii")
    return payload


async def _get(client: Client, args: argparse.Namespace) -> int:
    item = await client.get(args.key, consistency=args.consistency, revision=args.revision)
    if args.json:
        _print_json(_key_value_json(item))
    else:
        sys.stdout.buffer.write(item.value if args.raw else item.value + b"\n")
        sys.stdout.flush()
    return EXIT_OK


async def _put(client: Client, args: argparse.Namespace) -> int:
    result = await client.put(
        args.key,
        _value_arg(args.value),
        if_revision=args.if_revision,
        create_only=args.create_only,
        lease=args.lease,
    )
    _print_write(args, result.key, result.revision, result.mod_revision, result.version)
    return EXIT_OK


async def _cas(client: Client, args: argparse.Namespace) -> int:
    try:
        result = await client.cas(
            args.key,
            _value_arg(args.value),
            mod_revision=args.mod_revision,
            create_only=args.create,
        )
    except PreconditionFailedError as exc:
        if args.json:
            _print_json(
                {"key": args.key, "succeeded": False, "current_revision": exc.current_revision}
            )
            return EXIT_PRECONDITION_FAILED
        raise
    _print_write(args, result.key, result.revision, result.mod_revision, result.version)
    return EXIT_OK


def _print_write(
    args: argparse.Namespace, key: str, revision: int, mod_revision: int, version: int
) -> None:
    if args.json:
        _print_json(
            {
                "key": key,
                "revision": revision,
                "mod_revision": mod_revision,
                "version": version,
                "succeeded": True,
            }
        )
    else:
        print(f"OK revision={revision} mod_revision={mod_revision} version={version}")


async def _delete(client: Client, args: argparse.Namespace) -> int:
    if args.prefix:
        if args.if_revision is not None:
            raise ValueError("--if-revision does not go with --prefix")
        result = await client.delete_prefix(args.key)
        if args.json:
            _print_json({"prefix": args.key, "revision": result.revision,
                         "deleted": result.deleted})  # fmt: skip
        else:
            print(f"OK revision={result.revision} deleted={result.deleted}")
        return EXIT_OK
    result = await client.delete(args.key, if_revision=args.if_revision)
    if args.json:
        _print_json({"key": result.key, "revision": result.revision, "deleted": True})
    else:
        print(f"OK revision={result.revision}")
    return EXIT_OK


async def _list(client: Client, args: argparse.Namespace) -> int:
    listing = await client.list(
        args.prefix, limit=args.limit, start=args.start, revision=args.revision,
        consistency=args.consistency,
    )  # fmt: skip
    items = list(listing)
    # --all: every page at the first page's revision, so the pages fit together.
    while args.all and listing.next is not None:
        listing = await client.list(
            args.prefix, limit=args.limit, start=listing.next, revision=listing.revision,
            consistency=args.consistency,
        )  # fmt: skip
        items.extend(listing)
    if args.json:
        body = [_key_value_json(item) for item in items]
        _print_json({"revision": listing.revision, "more": listing.more, "items": body,
                     "next": listing.next})  # fmt: skip
        return EXIT_OK
    out = sys.stdout.buffer
    for item in items:
        out.write(item.key.encode("utf-8"))
        out.write(b"\n" if args.keys_only else b"\t" + item.value + b"\n")
    if listing.more:
        print(f"# more keys after {len(items)}; next page: --start {listing.next}",
              file=sys.stderr)  # fmt: skip
    sys.stdout.flush()
    return EXIT_OK


async def _status(client: Client, args: argparse.Namespace) -> int:
    # One frozen node must not hold the whole table for the call's deadline: each endpoint
    # gets at most a second (a live node answers in milliseconds).
    statuses = await client.cluster_status(timeout_s=min(args.timeout, _STATUS_TIMEOUT_S))
    if args.json:
        _print_json(
            {endpoint: (None if s is None else dict(s.raw)) for endpoint, s in statuses.items()}
        )
    else:
        print(_status_table(statuses))
    return EXIT_OK if any(statuses.values()) else EXIT_UNAVAILABLE


def _status_table(statuses: dict[str, NodeStatus | None]) -> str:
    header = ("ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED")
    rows = [header]
    for endpoint, status in statuses.items():
        if status is None:
            rows.append((endpoint, "-", "unreachable", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                endpoint,
                str(status.id),
                status.role,
                str(status.term),
                str(status.leader_id or "-"),
                str(status.commit_index),
                str(status.applied_index),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )
