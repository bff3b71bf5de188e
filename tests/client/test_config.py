"""ClientConfig is the one place the client's defaults are written: docs/client.md's table
and the `kvstore get/put/...` help must say the same."""

from __future__ import annotations

import argparse
import enum
from dataclasses import fields
from pathlib import Path

from kvstore.client import ClientConfig
from kvstore.client_cli import register


def _documented_defaults() -> dict[str, str]:
    """{knob: default cell} from docs/client.md's ClientConfig table; a row naming two knobs
    ("`a`, `b` | 1, 2") gives one entry each."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "client.md").read_text()
    found: dict[str, str] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = [name.strip().strip("`") for name in cells[0].split(",")]
        values = [value.strip().strip("`") for value in cells[1].split(",")]
        if len(names) == len(values):
            found.update(zip(names, values, strict=True))
    return found


def _text(value: object) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def test_docs_client_md_lists_every_knob_with_the_dataclass_default() -> None:
    documented = _documented_defaults()
    defaults = ClientConfig()
    assert set(documented) == {f.name for f in fields(ClientConfig)}
    for name, cell in documented.items():
        assert cell == _text(getattr(defaults, name)), name


def test_the_cli_defaults_come_from_client_config() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["get", "k"])
    assert args.timeout == ClientConfig().timeout_s
    assert args.consistency == ClientConfig().read_consistency.value
