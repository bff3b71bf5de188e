"""`kvstore member list|add|promote|remove` and `kvstore leader transfer`: the membership admin
API (docs/api.md, "Membership") from the command line, through the client library.

Exit statuses are the client CLI's (kvstore/client_cli.py): 0 done, 4 no node reachable,
5 refused (a 4xx such as `conf_change_refused`, with the server's message on stderr)."""

from __future__ import annotations

import argparse

from kvstore.client import Client
from kvstore.client_cli import EXIT_OK, _handle, _print_json


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add the membership subcommands (called by client_cli.register with its options)."""
    member = subparsers.add_parser("member", help="list, promote or remove cluster members")
    actions = member.add_subparsers(dest="member_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[common], help="voters, learners and lag")
    listing.set_defaults(handler=_handle(_list))
    add = actions.add_parser(
        "add",
        parents=[common],
        help="add a learner under a new id (start it with `kvstore serve --join`)",
    )
    add.add_argument("name", help="the member's name (a name held by a member: it replaces it)")
    add.add_argument("peer_address", help="host:port of its peer port")
    add.add_argument("--client-url", default="", help="its client URL")
    add.add_argument("--promote", action="store_true", help="the leader promotes it once caught up")
    add.set_defaults(handler=_handle(_add))
    promote = actions.add_parser("promote", parents=[common], help="promote a caught-up learner")
    promote.add_argument("id", type=int)
    promote.set_defaults(handler=_handle(_promote))
    remove = actions.add_parser("remove", parents=[common], help="remove a member for good")
    remove.add_argument("id", type=int, nargs="?", help="the member's id")
    remove.add_argument(
        "--name",
        help="the member that goes by this name (its slot: a pod's ordinal + 1), instead of "
        "an id; refused while two members share it (a replacement in progress)",
    )
    remove.set_defaults(handler=_handle(_remove))

    leader = subparsers.add_parser("leader", help="leadership")
    leader_actions = leader.add_subparsers(dest="leader_command", metavar="ACTION", required=True)
    transfer = leader_actions.add_parser(
        "transfer", parents=[common], help="hand leadership to a voter"
    )
    transfer.add_argument("id", type=int, help="the voter to lead")
    transfer.set_defaults(handler=_handle(_transfer))


def _print_members(document: dict[str, object], as_json: bool) -> None:
    if as_json:
        _print_json(document)
        return
    members = document.get("members")
    rows = [("ID", "NAME", "ROLE", "PEER", "LAG")]
    if isinstance(members, dict):
        for member, info in sorted(members.items(), key=lambda item: int(item[0])):
            info = info if isinstance(info, dict) else {}
            leader = " (leader)" if str(document.get("leader_id")) == member else ""
            rows.append(
                (
                    member,
                    str(info.get("name", member)),
                    f"{info.get('role', '?')}{leader}",
                    str(info.get("peer_address", "-")),
                    str(info.get("lag", "-")),
                )
            )
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    removed = document.get("removed")
    if removed:
        print(f"removed (never reused): {', '.join(map(str, removed))}")  # type: ignore[call-overload]


async def _list(client: Client, args: argparse.Namespace) -> int:
    _print_members(await client.members(), args.json)
    return EXIT_OK


async def _add(client: Client, args: argparse.Namespace) -> int:
    answer = await client.add_member(
        args.name, args.peer_address, client_url=args.client_url, promote=args.promote
    )
    if args.json:
        _print_json(answer)
    else:
        print(f"added member {answer.get('id')} (learner) as {args.name!r}")
        members = answer.get("members")
        if isinstance(members, dict):
            _print_members(members, False)
    return EXIT_OK


async def _promote(client: Client, args: argparse.Namespace) -> int:
    _print_members(await client.promote_member(args.id), args.json)
    return EXIT_OK


async def _remove(client: Client, args: argparse.Namespace) -> int:
    if (args.id is None) == (args.name is None):
        raise ValueError("member remove needs an id or --name NAME (not both)")
    member = args.id if args.name is None else _member_named(await client.members(), args.name)
    _print_members(await client.remove_member(member), args.json)
    return EXIT_OK


def _member_named(document: dict[str, object], name: str) -> int:
    """The id of the one member (voter or learner) named `name`; ValueError if there is
    none, or several (a replacement in progress: the operator must choose by id)."""
    members = document.get("members")
    found = sorted(
        int(member)
        for member, info in (members.items() if isinstance(members, dict) else ())
        if isinstance(info, dict) and str(info.get("name", member)) == name
    )
    if not found:
        raise ValueError(f"no member is named {name!r} (`kvstore member list` shows the names)")
    if len(found) > 1:
        raise ValueError(
            f"members {', '.join(map(str, found))} are all named {name!r} (a replacement in "
            "progress): remove one by its id"
        )
    return found[0]


async def _transfer(client: Client, args: argparse.Namespace) -> int:
    leader = await client.transfer_leader(args.id)
    if args.json:
        _print_json({"leader_id": leader})
    else:
        print(f"leader: {leader}")
    return EXIT_OK
