"""`python -m kvstore.verify` on good, bad and malformed history files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.verify.__main__ import main
from kvstore.verify.history import Operation, OpKind, write_history


def _write(path: Path, final: str) -> Path:
    write_history(
        path,
        [
            Operation(1, OpKind.PUT, "k", "v1", None, 0, 10, True, None),
            Operation(1, OpKind.PUT, "k", "v2", None, 20, 30, True, None),
            Operation(2, OpKind.GET, "k", None, None, 40, 50, True, final),
        ],
    )
    return path


def test_a_good_history_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(_write(tmp_path / "h.jsonl", "v2"))]) == 0
    assert "linearizability: ok" in capsys.readouterr().out


def test_a_stale_read_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(_write(tmp_path / "h.jsonl", "v1"))]) == 1
    out = capsys.readouterr().out
    assert "linearizability: violation" in out and "lost writes: FAILED" in out


def test_a_malformed_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text('{"process": 1}\n')
    assert main([str(path)]) == 2
    assert "h.jsonl:1: missing field(s)" in capsys.readouterr().err
