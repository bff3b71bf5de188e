"""The build's architecture rules, checked by walking each module's syntax tree.

The deterministic parts of kvstore (the Raft core, the key-value state machine, the simulator,
the history checkers, the codec and the replica) must not reach for real I/O, threads or the
wall clock, and must not draw from the module-level `random` generator: every source of
randomness is an injected `random.Random`, so a simulation seed replays exactly
(design.md §2). Importing a module by a string (importlib) is out of scope.
"""

from __future__ import annotations

import ast
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
