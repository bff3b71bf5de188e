"""`kvstore snapshot save FILE` and `kvstore snapshot restore FILE`: backup and restore.

`save` asks the nodes named by `--endpoints`, in turn, for a fresh snapshot
(`GET /v1/snapshot`, kvstore/server/backup.py), writes it to FILE.part as it arrives, checks
it (magic, length, crc32 of the body, as a node checks its own snapshot files), fsyncs it and
only then renames it to FILE: a FILE that exists is whole. `restore` verifies FILE and makes a
new node's data directory from it; every node of the new cluster is restored from the same
file (`kvstore cluster --restore FILE` does all of a local cluster's). A damaged file is
reported with its name and the offset of the damage, and exits 2.

Exit status: 0 done; 1 no node could give a snapshot; 2 bad usage, a damaged file, or a data
directory that is not empty.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from kvstore.client.transport import tls_context
from kvstore.client_cli import _TLS_FLAGS, DEFAULT_ENDPOINTS, ENDPOINTS_ENV, endpoints_arg
from kvstore.errors import KVStoreError

_READ_BYTES = 1 << 20
_TIMEOUT_S = 120.0
EXIT_OK = 0
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snapshot = subparsers.add_parser(
        "snapshot",
        help="save a live cluster's state to a file, or restore a new node from one",
        description="Backup and restore (etcd's snapshot save / restore).",
    )
    commands = snapshot.add_subparsers(dest="snapshot_command", metavar="COMMAND")
    save = commands.add_parser(
        "save", help="save a consistent snapshot of a live cluster to FILE"
    )
    save.add_argument("file", help="where to write the snapshot")
    save.add_argument(
        "--endpoints",
        type=endpoints_arg,
        default=os.environ.get(ENDPOINTS_ENV, DEFAULT_ENDPOINTS),
        help=f"comma-separated client URLs, tried in turn (default: ${ENDPOINTS_ENV} or "
        f"{DEFAULT_ENDPOINTS})",
    )
    save.add_argument(
        "--timeout",
        type=float,
        default=_TIMEOUT_S,
        help="seconds to wait for each node's answer (default %(default)s)",
    )
    save.add_argument(
        "--token",
        dest="auth_token",
        default=os.environ.get("KVSTORE_TOKEN", ""),
        help="bearer token for nodes with --auth: an admin's (default $KVSTORE_TOKEN)",
    )
    for flag, variable, help_text in _TLS_FLAGS:
        save.add_argument(
            flag,
            dest="tls_" + flag.lstrip("-"),
            default=os.environ.get(variable, ""),
            help=f"{help_text} (default ${variable})",
        )
    save.set_defaults(handler=_save)
    restore = commands.add_parser(
        "restore", help="make a new node's data directory from a saved snapshot"
    )
    restore.add_argument("file", help="a file written by `kvstore snapshot save`")
    restore.add_argument(
        "--data-dir", required=True, help="the new node's data directory (absent or empty)"
    )
    restore.add_argument(
        "--voters",
        type=_voters_arg,
        help="comma-separated node ids of the new cluster (default: the snapshot's members); "
        "give every node of the new cluster the same",
    )
    restore.set_defaults(handler=_restore)
    snapshot.set_defaults(handler=lambda args: _usage(snapshot))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _voters_arg(text: str) -> tuple[int, ...]:
    try:
        voters = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ids like 1,2,3") from None
    if not voters or any(v < 1 for v in voters) or len(set(voters)) != len(voters):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct ids >= 1")
    return voters


def _save(args: argparse.Namespace) -> int:
    from kvstore.server.backup import verify_snapshot_file

    urls = [url.rstrip("/") for url in args.endpoints.split(",")]
    opener = _opener(args, urls)
    part = args.file + ".part"
    failures: list[str] = []
    for url in urls:
        try:
            headers = _download(opener, f"{url}/v1/snapshot", part, args.timeout, args.auth_token)
        except (OSError, urllib.error.URLError) as exc:
            failures.append(f"{url}: {_reason(exc)}")
            _remove(part)
            continue
        try:
            snapshot = verify_snapshot_file(part)
        except KVStoreError as exc:
            _remove(part)
            print(f"kvstore snapshot save: {url} sent a damaged snapshot: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        os.replace(part, args.file)
        _fsync_directory(os.path.dirname(os.path.abspath(args.file)))
        size = os.path.getsize(args.file)
        print(
            f"saved {args.file}: index {snapshot.metadata.index} term "
            f"{snapshot.metadata.term}, {size} bytes, members "
            f"{list(snapshot.metadata.conf_state.voters)}, from {url} "
            f"({headers.get('Kvstore-Snapshot-Index', '?')})"
        )
        return EXIT_OK
    print("kvstore snapshot save: no node gave a snapshot:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def _opener(args: argparse.Namespace, urls: list[str]) -> urllib.request.OpenerDirector:
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if any(url.startswith("https://") for url in urls):
        context = tls_context(args.tls_ca, args.tls_cert, args.tls_key)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def _download(
    opener: urllib.request.OpenerDirector, url: str, path: str, timeout_s: float, token: str
) -> dict[str, str]:
    """GET `url` into `path`, fsynced; the response's headers."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with opener.open(request, timeout=timeout_s) as response:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            while chunk := response.read(_READ_BYTES):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        return dict(response.headers.items())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        return f"HTTP {exc.code}: {message or exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _restore(args: argparse.Namespace) -> int:
    from kvstore.server.backup import restore_data_dir

    try:
        snapshot = restore_data_dir(args.file, args.data_dir, args.voters)
    except (KVStoreError, ValueError, OSError) as exc:
        print(f"kvstore snapshot restore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    metadata = snapshot.metadata
    print(
        f"restored {args.file} (index {metadata.index}, term {metadata.term}) into "
        f"{args.data_dir}; members {list(metadata.conf_state.voters)}: start each with its "
        "--id, and --peers naming exactly these ids"
    )
    return EXIT_OK
