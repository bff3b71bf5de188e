"""Majority-quorum arithmetic as pure functions (Raft §5.2, §5.3).

Kept free of any node state so that joint consensus (two majority configs) can later be built
by combining two calls, and so that property tests can compare them with naive models.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


def majority(voter_count: int) -> int:
    """The smallest number of voters that forms a quorum."""
    return voter_count // 2 + 1


def committed_index(voters: Collection[int], match_index: Mapping[int, int]) -> int:
    """The largest index that a majority of `voters` has in its log (Raft §5.3).

    A voter missing from `match_index` counts as having nothing (index 0). An empty voter set
    commits nothing (0 is the safe answer; joint configs will combine two calls).
    """
    if not voters:
        return 0
    indexes = sorted((match_index.get(voter, 0) for voter in voters), reverse=True)
    return indexes[majority(len(indexes)) - 1]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    """WON once a majority granted, LOST once a majority can no longer grant (Raft §5.2)."""
    granted = 0
    rejected = 0
    for voter in voters:
        vote = votes.get(voter)
        if vote is None:
            continue
        if vote:
            granted += 1
        else:
            rejected += 1
    quorum = majority(len(voters))
    if granted >= quorum:
        return VoteResult.WON
    if len(voters) - rejected < quorum:
        return VoteResult.LOST
    return VoteResult.PENDING


def quorum_active(voters: Collection[int], active: Collection[int]) -> bool:
    """True when a majority of `voters` is in `active` (check-quorum, Raft §6.2 dissertation)."""
    count = sum(1 for voter in voters if voter in active)
    return count >= majority(len(voters))
