"""`kvstore role|user|token`: users, roles and tokens on the command line (admin).

They take the same `--endpoints`, `--timeout`, `--output`, TLS and `--token` options and exit
statuses as the key-value commands (kvstore/client_cli.py):

    kvstore role put NAME [--read P] [--write P] [--admin P]   (each repeatable; P a prefix,
                                    "" the whole key space; write includes read, admin both)
    kvstore role delete NAME        (removed from every user too)
    kvstore user put NAME [--role R]...   create or replace (the roles must exist)
    kvstore user delete NAME        (its tokens go with it)
    kvstore token create USER       print a new token (shown only now; its id to stderr)
    kvstore token delete ID
    kvstore role|user|token list    users, roles and token ids
"""

from __future__ import annotations

import argparse
import json
import sys

from kvstore.client import Client
from kvstore.client_cli import EXIT_OK, _handle


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    role = subparsers.add_parser("role", help="roles: permissions on key prefixes (admin)")
    role_commands = role.add_subparsers(dest="role_command", metavar="COMMAND", required=True)
    put = role_commands.add_parser("put", parents=[common], help="create or replace a role")
    put.add_argument("name")
    for access in ("read", "write", "admin"):
        put.add_argument(
            f"--{access}", action="append", default=[], metavar="PREFIX",
            help=f"{access} on keys under PREFIX (repeatable; '' = every key)",
        )  # fmt: skip
    put.set_defaults(handler=_handle(_role_put))
    delete = role_commands.add_parser("delete", parents=[common], help="delete a role")
    delete.add_argument("name")
    delete.set_defaults(handler=_handle(_role_delete))

    user = subparsers.add_parser("user", help="users and their roles (admin)")
    user_commands = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    put = user_commands.add_parser("put", parents=[common], help="create or replace a user")
    put.add_argument("name")
    put.add_argument("--role", action="append", default=[], help="a role (repeatable)")
    put.set_defaults(handler=_handle(_user_put))
    delete = user_commands.add_parser("delete", parents=[common], help="delete a user")
    delete.add_argument("name")
    delete.set_defaults(handler=_handle(_user_delete))

    token = subparsers.add_parser("token", help="bearer tokens of users (admin)")
    token_commands = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = token_commands.add_parser("create", parents=[common], help="a new token for USER")
    create.add_argument("user")
    create.set_defaults(handler=_handle(_token_create))
    delete = token_commands.add_parser("delete", parents=[common], help="revoke a token")
    delete.add_argument("id")
    delete.set_defaults(handler=_handle(_token_delete))

    for commands in (role_commands, user_commands, token_commands):
        listing = commands.add_parser("list", parents=[common], help="users, roles and tokens")
        listing.set_defaults(handler=_handle(_list))


async def _role_put(client: Client, args: argparse.Namespace) -> int:
    permissions = [(p, a) for a in ("read", "write", "admin") for p in getattr(args, a)]
    await client.auth_put_role(args.name, permissions)
    print(f"OK role {args.name}")
    return EXIT_OK


async def _role_delete(client: Client, args: argparse.Namespace) -> int:
    await client.auth_delete_role(args.name)
    print(f"OK deleted role {args.name}")
    return EXIT_OK


async def _user_put(client: Client, args: argparse.Namespace) -> int:
    await client.auth_put_user(args.name, args.role)
    print(f"OK user {args.name}")
    return EXIT_OK


async def _user_delete(client: Client, args: argparse.Namespace) -> int:
    await client.auth_delete_user(args.name)
    print(f"OK deleted user {args.name}")
    return EXIT_OK


async def _token_create(client: Client, args: argparse.Namespace) -> int:
    token, token_id = await client.auth_new_token(args.user)
    if args.json:
        print(json.dumps({"token": token, "id": token_id, "user": args.user}))
    else:
        print(token)
        print(f"id {token_id} (kvstore token delete {token_id} revokes it)", file=sys.stderr)
    return EXIT_OK


async def _token_delete(client: Client, args: argparse.Namespace) -> int:
    await client.auth_delete_token(args.id)
    print(f"OK deleted token {args.id}")
    return EXIT_OK


async def _list(client: Client, args: argparse.Namespace) -> int:
    described = await client.auth_show()
    if args.json:
        print(json.dumps(described))
        return EXIT_OK
    for name, permissions in described.get("roles", {}).items():
        shown = " ".join(f"{p['access']}:{p['prefix']!r}" for p in permissions)
        print(f"role  {name}\t{shown}")
    for name, roles in described.get("users", {}).items():
        print(f"user  {name}\t{' '.join(roles)}")
    for token in described.get("tokens", []):
        print(f"token {token['id']}\t{token['user']}")
    return EXIT_OK
