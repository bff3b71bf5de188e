"""The build's architecture rules, checked by walking each module's syntax tree.

Determinism: the deterministic parts of kvstore (the Raft core, the key-value state machine,
the simulator, the history checkers, the codec and the replica) must not reach for real I/O,
threads or the wall clock, and must not draw from the module-level `random` generator: every
source of randomness is an injected `random.Random`, so a simulation seed replays exactly
(docs/architecture.md §1).

Layers: every import of one kvstore module by another, wherever it is written (top level,
inside a function, under `if TYPE_CHECKING:`, relative or absolute), must follow an arrow of
`ALLOWED_IMPORTS`, the table docs/architecture.md §1 shows. Importing a module by a string
(importlib) is out of scope for both rules.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kvstore"
CHECKED_PACKAGES = ("raft", "sim", "kv", "verify")
CHECKED_FILES = ("codec.py", "replica.py", "keepalive.py")
FORBIDDEN_MODULES = frozenset({"asyncio", "socket", "threading", "time"})
# Names in `random` that are not the hidden global generator and may be used freely.
ALLOWED_RANDOM_NAMES = frozenset({"Random", "SystemRandom"})


def checked_modules() -> list[Path]:
    """Every Python file the rules apply to (those that exist today)."""
    paths: list[Path] = []
    for package in CHECKED_PACKAGES:
        paths.extend(sorted((ROOT / package).rglob("*.py")))
    for name in CHECKED_FILES:
        if (ROOT / name).exists():
            paths.append(ROOT / name)
    return paths


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def find_violations(source: str, filename: str = "<module>") -> list[str]:
    """Describe each forbidden import or module-level random call in `source`."""
    tree = ast.parse(source, filename)
    problems: list[str] = []
    random_aliases: set[str] = set()  # names bound to the `random` module itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) in FORBIDDEN_MODULES:
                    problems.append(f"{filename}:{node.lineno}: import {alias.name}")
                if alias.name == "random":
                    random_aliases.add(alias.asname or "random")
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            if _top(node.module) in FORBIDDEN_MODULES:
                problems.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            if node.module == "random":
                for alias in node.names:
                    if alias.name not in ALLOWED_RANDOM_NAMES:
                        problems.append(
                            f"{filename}:{node.lineno}: from random import {alias.name}"
                        )
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if (
            isinstance(node.value, ast.Name)
            and node.value.id in random_aliases
            and node.attr not in ALLOWED_RANDOM_NAMES
        ):
            problems.append(f"{filename}:{node.lineno}: uses random.{node.attr}")
    return problems


@pytest.mark.parametrize("path", checked_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_keeps_the_determinism_rules(path: Path) -> None:
    assert find_violations(path.read_text(), str(path)) == []


def test_the_rules_cover_the_simulator_and_the_core() -> None:
    names = {str(p.relative_to(ROOT)) for p in checked_modules()}
    assert "sim/__init__.py" in names
    assert "raft/types.py" in names
    assert "codec.py" in names


BAD_SAMPLES = [
    "import asyncio",
    "import socket as s",
    "import time",
    "import threading",
    "from time import monotonic",
    "from asyncio import sleep as nap",
    "import asyncio.events",
    "from threading import Thread",
    "import random\nx = random.random()",
    "import random\nrandom.choice([1, 2])",
    "import random as r\nr.shuffle([])",
    "from random import randint",
    "from random import choice as pick",
    "import random\nf = random.randint\n",
    "import random\nrandom.seed(3)",
    "def f():\n    import time\n    return time.time()",
]


@pytest.mark.parametrize("source", BAD_SAMPLES)
def test_the_checker_flags_a_bad_module(source: str) -> None:
    assert find_violations(source) != []


GOOD_SAMPLES = [
    "import random\nrng = random.Random(7)\nrng.random()",
    "from random import Random\nRandom(1).choice([1])",
    "import dataclasses, hashlib, heapq",
    "from kvstore.raft import types",
    "def f(rng):\n    return rng.randint(1, 2)",
    "from . import time_helpers",
]


@pytest.mark.parametrize("source", GOOD_SAMPLES)
def test_the_checker_accepts_a_good_module(source: str) -> None:
    assert find_violations(source) == []


def test_the_checker_fails_on_a_bad_file_on_disk(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('"""A module that breaks the rules."""\nimport time\n\nNOW = time.time()\n')
    assert find_violations(bad.read_text(), str(bad)) == [f"{bad}:2: import time"]


# --- Layers: which component may import which ---------------------------------------------------

# Every kvstore module belongs to the component of the longest prefix below that names it or
# a package above it ("kvstore" itself matches only the package's __init__). A module that
# matches none fails the test, so a new top-level module has to be placed in a layer.
COMPONENTS: Mapping[str, str] = {
    "kvstore": "api",  # the package __init__: lazy re-export of the client
    "kvstore.errors": "errors",
    "kvstore.frozen": "frozen",  # the cheaper __init__ of the per-write frozen values
    "kvstore.request_id": "request_id",
    "kvstore.raft.types": "raft.types",
    "kvstore.raft.storage": "raft.types",  # the Storage Protocol, written in raft.types terms
    "kvstore.raft.confchange": "raft.types",  # membership changes as plain values
    "kvstore.raft": "raft",
    "kvstore.codec": "codec",
    "kvstore.kv": "kv",
    "kvstore.storage": "storage",
    "kvstore.verify": "verify",
    "kvstore.replica": "replica",
    "kvstore.keepalive": "replica",  # the keepalive policy both drivers share, beside Replica
    "kvstore.sim": "sim",
    "kvstore.client": "client",
    "kvstore.server": "server",
    "kvstore.chaos": "chaos",
    "kvstore.testing": "testing",  # a local cluster for applications' tests
    "kvstore.client_cli": "cli",
    "kvstore.backup_cli": "cli",
    "kvstore.coord_cli": "cli",
    "kvstore.member_cli": "cli",
    "kvstore.auth_cli": "cli",
    "kvstore.cli": "cli",
    "kvstore.__main__": "cli",
}

# component -> the other components it may import (its own modules it always may). Read it
# bottom-up: errors and frozen.py know nothing of ours, the Raft types only frozen.py; the core (raft), the codec, the
# state machine (kv) and storage sit on them (kv and the client share the request id's text
# form, kvstore/request_id.py, which knows only errors); replica joins raft, storage and kv; the
# simulator and the server each drive a replica; chaos drives real servers through the client.
# "api" is the package root (`__version__`, and `Client` loaded on first use).
ALLOWED_IMPORTS: Mapping[str, frozenset[str]] = {
    "errors": frozenset(),
    "frozen": frozenset(),
    "request_id": frozenset({"errors", "frozen"}),
    "raft.types": frozenset({"frozen"}),
    "raft": frozenset({"raft.types", "errors"}),
    "codec": frozenset({"raft.types", "errors"}),
    "kv": frozenset({"raft.types", "request_id", "errors", "frozen"}),
    "storage": frozenset({"raft.types", "codec", "errors"}),
    "verify": frozenset({"errors"}),
    "replica": frozenset({"raft", "raft.types", "storage", "kv", "errors", "frozen"}),
    "sim": frozenset(
        {"replica", "raft", "raft.types", "storage", "kv", "codec", "verify", "errors"}
    ),
    "server": frozenset(
        {"replica", "raft", "raft.types", "storage", "kv", "codec", "errors", "api"}
    ),
    "client": frozenset({"request_id", "errors"}),
    "chaos": frozenset(
        {"server", "client", "storage", "kv", "raft.types", "codec", "verify", "errors"}
    ),
    "testing": frozenset({"server", "client"}),
    "cli": frozenset({"server", "client", "chaos", "errors", "api"}),
    "api": frozenset({"client"}),
}


def component_of(module: str) -> str | None:
    """The component `module` belongs to, or None when COMPONENTS does not place it."""
    if module == "kvstore":
        return COMPONENTS["kvstore"]
    best = ""
    for prefix in COMPONENTS:
        if prefix != "kvstore" and (module == prefix or module.startswith(prefix + ".")):
            best = max(best, prefix, key=len)
    return COMPONENTS[best] if best else None


def module_name(relative_path: str) -> tuple[str, bool]:
    """("kvstore.raft.node", False) for "kvstore/raft/node.py"; True for a package __init__."""
    parts = relative_path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


@functools.cache  # the real tree is walked several times with one file changed
def imported_modules(
    source: str, module: str, is_package: bool, known: frozenset[str]
) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, relative imports resolved.

    `from a import b` counts as importing `a.b` when that is a module in `known`, else `a`.
    """
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return found


def layer_violations(sources: Mapping[str, str]) -> list[str]:
    """Check every import between the modules of `sources` ({"kvstore/x/y.py": text}).

    Returns one line per import that no arrow of ALLOWED_IMPORTS allows, and one per module
    COMPONENTS does not place.
    """
    names = {path: module_name(path) for path in sources}
    known = frozenset(name for name, _ in names.values())
    problems: list[str] = []
    for path, source in sorted(sources.items()):
        module, is_package = names[path]
        source_component = component_of(module)
        if source_component is None:
            problems.append(f"{path}: {module} is in no component; add it to COMPONENTS")
            continue
        for line, target in imported_modules(source, module, is_package, known):
            if target != "kvstore" and not target.startswith("kvstore."):
                continue
            target_component = component_of(target)
            if target_component == source_component:
                continue
            if target_component not in ALLOWED_IMPORTS[source_component]:
                problems.append(
                    f"{path}:{line}: {source_component} may not import {target_component}"
                    f" ({module} imports {target})"
                )
    return problems


def kvstore_sources() -> dict[str, str]:
    return {
        str(path.relative_to(ROOT.parent)): path.read_text() for path in sorted(ROOT.rglob("*.py"))
    }


def test_imports_follow_the_layer_table() -> None:
    assert layer_violations(kvstore_sources()) == []


def test_the_layer_table_names_only_known_components() -> None:
    components = set(COMPONENTS.values())
    assert set(ALLOWED_IMPORTS) == components
    for allowed in ALLOWED_IMPORTS.values():
        assert allowed <= components


# A small module set shaped like the real one, for showing what the checker rejects.
_SYNTHETIC_BASE = {
    "kvstore/__init__.py": "",
    "kvstore/errors.py": "",
    "kvstore/raft/__init__.py": "",
    "kvstore/raft/types.py": "",
    "kvstore/raft/node.py": "from kvstore.raft.types import Entry\nfrom kvstore import errors\n",
    "kvstore/storage/__init__.py": "",
    "kvstore/storage/disk.py": "from kvstore.raft.types import Entry\n",
    "kvstore/server/__init__.py": "",
    "kvstore/server/http.py": "from kvstore.raft.node import RawNode\n",
}


def test_the_synthetic_base_is_clean() -> None:
    assert layer_violations(_SYNTHETIC_BASE) == []


UPWARD_IMPORTS = [
    ("kvstore/raft/node.py", "from kvstore.server.http import HttpApi"),
    ("kvstore/raft/node.py", "import kvstore.server.http"),
    ("kvstore/raft/node.py", "from kvstore.server import http"),
    ("kvstore/raft/node.py", "from ..server import http"),
    ("kvstore/raft/node.py", "from ..storage.disk import DiskStorage"),
    ("kvstore/raft/node.py", "def f():\n    from kvstore.storage import disk\n"),
    (
        "kvstore/raft/node.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kvstore.storage.disk\n",
    ),
    ("kvstore/raft/types.py", "from kvstore.errors import RaftError"),
    ("kvstore/storage/disk.py", "from kvstore.raft.node import RawNode"),
    ("kvstore/storage/disk.py", "from ..raft import node"),
    ("kvstore/raft/__init__.py", "from ..server import http"),
    ("kvstore/errors.py", "from kvstore import raft"),
    ("kvstore/errors.py", "import kvstore"),
]


@pytest.mark.parametrize(("path", "line"), UPWARD_IMPORTS)
def test_the_layer_checker_rejects_an_import_against_the_table(path: str, line: str) -> None:
    sources = dict(_SYNTHETIC_BASE)
    sources[path] = sources[path] + line + "\n"
    problems = layer_violations(sources)
    assert len(problems) == 1 and problems[0].startswith(path + ":"), problems


def test_the_layer_checker_rejects_a_module_in_no_component() -> None:
    sources = dict(_SYNTHETIC_BASE, **{"kvstore/newthing.py": ""})
    assert layer_violations(sources) == [
        "kvstore/newthing.py: kvstore.newthing is in no component; add it to COMPONENTS"
    ]


def test_the_layer_checker_resolves_relative_imports_in_a_package() -> None:
    sources = dict(_SYNTHETIC_BASE)
    sources["kvstore/raft/__init__.py"] = "from .types import Entry\nfrom . import node\n"
    assert layer_violations(sources) == []
    assert imported_modules(
        "from . import node\nfrom .types import Entry\nfrom .. import errors\n",
        "kvstore.raft",
        True,
        frozenset({"kvstore.raft.node", "kvstore.errors"}),
    ) == [(1, "kvstore.raft.node"), (2, "kvstore.raft.types"), (3, "kvstore.errors")]


def test_the_docs_show_the_same_table() -> None:
    """docs/architecture.md §1 repeats ALLOWED_IMPORTS for readers; the two must agree."""
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    documented: dict[str, frozenset[str]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in ALLOWED_IMPORTS:
            continue
        allowed = cells[2]
        names = [] if allowed.startswith("(") else [n.strip() for n in allowed.split(",")]
        documented[cells[0]] = frozenset(names)
    assert documented == dict(ALLOWED_IMPORTS)


def test_the_subcommands_imported_by_name_follow_the_table_too() -> None:
    """kvstore/cli.py imports its subcommand modules by string, which the walk cannot see."""
    from kvstore.cli import SUBCOMMAND_MODULES

    for module in SUBCOMMAND_MODULES:
        component = component_of(module)
        assert component == "cli" or component in ALLOWED_IMPORTS["cli"], module


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("kvstore/raft/node.py", "from kvstore.server.http import HttpApi"),
        ("kvstore/storage/disk.py", "from kvstore.replica import Replica"),
        ("kvstore/kv/state_machine.py", "from ..storage import disk"),
        ("kvstore/codec.py", "def f():\n    import kvstore.client"),
        ("kvstore/client/core.py", "from kvstore.server import metrics"),
    ],
)
def test_an_upward_import_added_to_the_real_tree_fails(path: str, line: str) -> None:
    sources = kvstore_sources()
    sources[path] += "\n" + line + "\n"
    problems = layer_violations(sources)
    assert len(problems) == 1 and problems[0].startswith(path + ":"), problems
