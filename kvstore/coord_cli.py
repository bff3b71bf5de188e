"""`kvstore txn|watch|lease|lock|compact`: the coordination API on the command line.

They take the same `--endpoints`, `--timeout` and `--output` options and exit statuses as
the key-value commands (kvstore/client_cli.py), plus:

    kvstore txn [FILE]              a transaction from JSON (the body of POST /v1/txn; FILE
                                    or stdin); exit 0 if the comparisons held, 3 if not
    kvstore watch KEY [--prefix]    print events as they come (one line each; --json: one
                                    JSON object per line); --count N stops after N events
    kvstore lease grant TTL_S       print the new lease's id
    kvstore lease keepalive ID      keep it alive until interrupted (--once: one keepalive)
    kvstore lease revoke ID         revoke it (its keys are deleted)
    kvstore lease list
    kvstore lock NAME [CMD ...]     hold a lock: run CMD while holding it (its exit status is
                                    ours; KVSTORE_LOCK_TOKEN holds the fencing token), or
                                    without CMD print the token and hold until interrupted
    kvstore compact REVISION        drop the history up to REVISION
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
from typing import Any

from kvstore.client import Client, Lock, WatchEvent
from kvstore.client.txn import TxnResult
from kvstore.client_cli import EXIT_OK, EXIT_PRECONDITION_FAILED, EXIT_REJECTED, _handle

EXIT_LEASE_LOST = 4


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add the coordination subcommands (called by client_cli.register with its options)."""
    txn = subparsers.add_parser("txn", parents=[common], help="run a transaction from JSON")
    txn.add_argument("file", nargs="?", default="-", help="JSON file ('-' or absent: stdin)")
    txn.set_defaults(handler=_handle(_txn))

    watch = subparsers.add_parser("watch", parents=[common], help="print a key's events")
    watch.add_argument("key", help="the key (with --prefix: the prefix)")
    watch.add_argument("--prefix", action="store_true", help="every key under KEY")
    watch.add_argument("--start-revision", type=int, default=0, help="from this revision")
    watch.add_argument("--prev-kv", action="store_true", help="show the previous value")
    watch.add_argument("--count", type=int, default=0, help="stop after N events")
    watch.set_defaults(handler=_handle(_watch))

    lease = subparsers.add_parser("lease", help="grant, keep alive, revoke or list leases")
    actions = lease.add_subparsers(dest="lease_command", metavar="ACTION", required=True)
    grant = actions.add_parser("grant", parents=[common], help="grant a lease of TTL_S")
    grant.add_argument("ttl", type=float, help="time to live, seconds")
    grant.set_defaults(handler=_handle(_lease_grant))
    keepalive = actions.add_parser("keepalive", parents=[common], help="keep a lease alive")
    keepalive.add_argument("id", type=int)
    keepalive.add_argument("--once", action="store_true", help="one keepalive, then exit")
    keepalive.set_defaults(handler=_handle(_lease_keepalive))
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a lease")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(handler=_handle(_lease_revoke))
    listing = actions.add_parser("list", parents=[common], help="list leases")
    listing.set_defaults(handler=_handle(_lease_list))

    lock = subparsers.add_parser("lock", parents=[common], help="hold a distributed lock")
    lock.add_argument("name")
    lock.add_argument("run", nargs="*", help="command to run holding it (after --)")
    lock.add_argument("--ttl", type=float, default=10.0, help="lease TTL, seconds")
    lock.set_defaults(handler=_handle(_lock))

    compact = subparsers.add_parser("compact", parents=[common], help="compact the history")
    compact.add_argument("revision", type=int)
    compact.set_defaults(handler=_handle(_compact))


def _print_json(payload: object) -> None:
    print(json.dumps(payload, sort_keys=True), flush=True)


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode("ascii")


async def _txn(client: Client, args: argparse.Namespace) -> int:
    raw = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the transaction is not JSON: {exc}") from None
    if not isinstance(body, dict) or set(body) - {"compare", "success", "failure"}:
        raise ValueError("the transaction must be an object of compare, success, failure")
    result = await client.txn(
        body.get("compare", []), body.get("success", []), body.get("failure", [])
    )
    if args.json:
        _print_json(_txn_json(result))
    else:
        print(f"{'SUCCEEDED' if result.succeeded else 'FAILED'} revision={result.revision}")
        for response in result.responses:
            if response.op == "put":
                print(f"put revision={response.revision}")
            elif response.op == "delete":
                print(f"delete deleted={response.deleted}")
            else:
                for kv in response.kvs:
                    print(f"{response.op} {kv.key}\t{_text(kv.value)}")
    return EXIT_OK if result.succeeded else EXIT_PRECONDITION_FAILED


def _txn_json(result: TxnResult) -> dict[str, Any]:
    return {
        "succeeded": result.succeeded,
        "revision": result.revision,
        "responses": [
            {
                "op": r.op,
                "revision": r.revision,
                "deleted": r.deleted,
                "more": r.more,
                "kvs": [
                    {"key": kv.key, "value": _text(kv.value), "mod_revision": kv.mod_revision}
                    for kv in r.kvs
                ],
            }
            for r in result.responses
        ],
    }


async def _watch(client: Client, args: argparse.Namespace) -> int:
    if args.start_revision < 0 or args.count < 0:
        raise ValueError("--start-revision and --count must be >= 0")
    key, prefix = (None, args.key) if args.prefix else (args.key, None)
    seen = 0
    async with client.watch(
        key=key, prefix=prefix, start_revision=args.start_revision, prev_kv=args.prev_kv
    ) as watch:
        async for event in watch:
            if not isinstance(event, WatchEvent):
                continue
            _print_event(event, args)
            seen += 1
            if args.count and seen >= args.count:
                break
    return EXIT_OK


def _print_event(event: WatchEvent, args: argparse.Namespace) -> None:
    if args.json:
        body: dict[str, Any] = {
            "type": event.type,
            "key": event.key,
            "value": _text(event.value),
            "revision": event.revision,
            "version": event.kv.version,
        }
        if event.prev is not None:
            body["prev_value"] = _text(event.prev.value)
        _print_json(body)
        return
    line = f"{event.type.upper()} {event.key} revision={event.revision}"
    if event.type == "put":
        line += f"\t{_text(event.value)}"
    if event.prev is not None:
        line += f"\tprev={_text(event.prev.value)}"
    print(line, flush=True)


async def _lease_grant(client: Client, args: argparse.Namespace) -> int:
    ttl_ms = round(args.ttl * 1000)
    lease_id = await client.lease_grant(ttl_ms)
    if args.json:
        _print_json({"id": lease_id, "ttl_ms": ttl_ms})
    else:
        print(lease_id)
    return EXIT_OK


async def _lease_keepalive(client: Client, args: argparse.Namespace) -> int:
    while True:
        ttl_ms = await client.lease_keepalive(args.id)
        if args.json:
            _print_json({"id": args.id, "ttl_ms": ttl_ms})
        else:
            print(f"lease {args.id} kept alive, ttl_ms={ttl_ms}", flush=True)
        if args.once:
            return EXIT_OK
        await asyncio.sleep(max(0.01, ttl_ms / 3000))


async def _lease_revoke(client: Client, args: argparse.Namespace) -> int:
    deleted = await client.lease_revoke(args.id)
    if args.json:
        _print_json({"id": args.id, "deleted": deleted})
    else:
        print(f"OK revoked, keys deleted={deleted}")
    return EXIT_OK


async def _lease_list(client: Client, args: argparse.Namespace) -> int:
    leases = await client.leases()
    if args.json:
        _print_json(
            [
                {
                    "id": lease.id,
                    "ttl_ms": lease.ttl_ms,
                    "keys": list(lease.keys),
                    "key_count": lease.key_count,
                    "remaining_ms": lease.remaining_ms,
                }
                for lease in leases
            ]
        )
        return EXIT_OK
    for lease in leases:
        remaining = "" if lease.remaining_ms is None else f" remaining_ms={lease.remaining_ms}"
        print(f"{lease.id} ttl_ms={lease.ttl_ms} keys={lease.key_count}{remaining}")
    return EXIT_OK


async def _lock(client: Client, args: argparse.Namespace) -> int:
    command = [part for part in args.run if part != "--"] if args.run else []
    lock = Lock(client, args.name, ttl_s=args.ttl)
    token = await lock.acquire()
    try:
        if not command:
            if args.json:
                _print_json({"name": args.name, "token": token})
            else:
                print(f"locked {args.name} token={token}", flush=True)
            await _until_interrupted(lock)
            return EXIT_OK if not lock.lease.lost.is_set() else EXIT_LEASE_LOST
        env = dict(os.environ, KVSTORE_LOCK_TOKEN=str(token))
        process = await asyncio.create_subprocess_exec(*command, env=env)
        waiting = asyncio.ensure_future(process.wait())
        lost = asyncio.ensure_future(lock.lease.lost.wait())
        await asyncio.wait((waiting, lost), return_when=asyncio.FIRST_COMPLETED)
        lost.cancel()
        if not waiting.done():
            print(f"kvstore: lock {args.name}: the lease was lost; stopping the command",
                  file=sys.stderr)  # fmt: skip
            process.terminate()
            await waiting
            return EXIT_LEASE_LOST
        return waiting.result()
    finally:
        await lock.release()


async def _until_interrupted(lock: Lock) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(lock.lease.lost.wait())
    try:
        await asyncio.wait((stopped, lost), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        lost.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _compact(client: Client, args: argparse.Namespace) -> int:
    if args.revision < 1:
        print("kvstore: compact: the revision must be >= 1", file=sys.stderr)
        return EXIT_REJECTED
    oldest = await client.compact(args.revision)
    if args.json:
        _print_json({"oldest_revision": oldest})
    else:
        print(f"OK oldest_revision={oldest}")
    return EXIT_OK
