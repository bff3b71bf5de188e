"""The `kvstore` command: one entry point whose subcommands live beside what they drive.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`handler` (a function taking the parsed namespace and returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from kvstore import __version__

# Modules that contribute subcommands, in the order `kvstore --help` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "kvstore.server.cli",
    "kvstore.client_cli",
    "kvstore.backup_cli",
    "kvstore.chaos.cli",
)


class IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that lets options stand between positional arguments.

    Plain argparse matches positionals greedily: in `kvstore put k --json v` it takes `k`
    as the key and the (optional) value as absent, then rejects `v`. Parsing intermixed reads
    every option first and the positionals after, as etcdctl and git do."""

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or not self._can_intermix():
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args calls parse_known_args itself: the flag stops the loop.
        self._intermixing = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


    def _can_intermix(self) -> bool:
        """argparse cannot intermix around sub-commands, a REMAINDER positional (`kvstore
        cluster -- flags`) or a mutually exclusive group holding a positional."""
        if self._subparsers is not None:
            return False
        if any(action.nargs in (argparse.REMAINDER, argparse.PARSER) for action in self._actions):
            return False
        return not any(
            not action.option_strings
            for group in self._mutually_exclusive_groups
            for action in group._group_actions
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore", description="A fault-tolerant, Raft-replicated key-value store."
    )
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=IntermixedParser
    )
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    completion = subparsers.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script: `source <(kvstore completion bash)` in "
        "~/.bashrc; in zsh, `autoload -U bashcompinit && bashcompinit` first.",
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(handler=lambda args: _print_completion(parser))
    return parser


def _print_completion(parser: argparse.ArgumentParser) -> int:
    print(completion_script(parser))
    return 0


def completion_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for every subcommand and its options, read from the
    parser itself so it never disagrees with it (zsh runs it through bashcompinit)."""
    subcommands: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                options = [o for a in subparser._actions for o in a.option_strings]
                subcommands[name] = sorted(o for o in options if o.startswith("--"))
    cases = "\n".join(
        f'        {name}) opts="{" ".join(options)}" ;;' for name, options in subcommands.items()
    )
    return f"""# kvstore completion (bash; zsh: autoload -U bashcompinit && bashcompinit)
_kvstore() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" opts
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "{" ".join(subcommands)} --help --version" -- "$cur"))
        return
    fi
    case "${{COMP_WORDS[1]}}" in
{cases}
        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F _kvstore kvstore"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    status: int = handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
