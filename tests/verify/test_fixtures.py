"""The linearizability checker agrees with every known verdict in ../shared/fixtures.

The fixtures (Jepsen's etcd histories and Porcupine's KV logs) live beside the repository,
in `<repo>/../shared/fixtures/linearizability/`; the tests skip, saying so, when that folder
is missing. Any disagreement fails with the list of files.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvstore.verify.fixtures import Fixture, load_fixtures
from kvstore.verify.linearizability import Verdict, check_linearizability, deadline_after

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "linearizability"
# Per history; the whole set takes about 2 s on the 2-core CI machine.
BUDGET_S = 60.0


@pytest.fixture(scope="module")
def fixtures() -> list[Fixture]:
    if not (FIXTURES / "expected.tsv").exists():
        pytest.skip(f"no linearizability fixtures at {FIXTURES.resolve()} (needs ../shared)")
    return load_fixtures(FIXTURES)


def _disagreements(fixtures: list[Fixture], **options: object) -> list[str]:
    wrong = []
    for fixture in fixtures:
        result = check_linearizability(
            fixture.history,
            initial=fixture.initial,
            deadline=deadline_after(time.monotonic, BUDGET_S),
            **options,  # type: ignore[arg-type]
        )
        expected = Verdict.OK if fixture.linearizable else Verdict.VIOLATION
        if result.verdict is not expected:
            wrong.append(f"{fixture.name}: expected {expected.value}, got {result.verdict.value}")
    return wrong


def test_every_fixture_is_listed_and_parsed(fixtures: list[Fixture]) -> None:
    assert len(fixtures) == 108
    assert sum(not f.linearizable for f in fixtures) == 82
    assert all(f.history for f in fixtures)


def test_checker_agrees_with_every_expected_verdict(fixtures: list[Fixture]) -> None:
    wrong = _disagreements(fixtures)
    assert not wrong, "checker disagrees with expected.tsv:\n" + "\n".join(wrong)


def test_small_kv_logs_agree_when_checked_as_one_history(fixtures: list[Fixture]) -> None:
    """The search without partitioning (state = the whole map), as Porcupine tests it.

    The c50 logs are left out: unpartitioned, they are out of reach here as in Porcupine.
    """
    small = [f for f in fixtures if f.name.startswith(("kv/c01", "kv/c10"))]
    assert len(small) == 4
    wrong = _disagreements(small, partition_by_key=False)
    assert not wrong, "unpartitioned checker disagrees:\n" + "\n".join(wrong)


def test_violations_are_explained(fixtures: list[Fixture]) -> None:
    bad = next(f for f in fixtures if f.name == "kv/c01-bad.txt")
    result = check_linearizability(bad.history, initial=bad.initial)
    assert result.violations
    explanation = result.violations[0].explanation
    assert explanation is not None and explanation.stuck
    assert "none of these can go next" in result.describe()
