"""kvstore.verify is pure code: no clock, no sockets, no threads, no event loop (design §2)."""

from __future__ import annotations

import ast
from pathlib import Path

import kvstore.verify

FORBIDDEN = {"asyncio", "socket", "threading", "time", "random"}


def test_verify_modules_import_nothing_impure() -> None:
    package = Path(kvstore.verify.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
