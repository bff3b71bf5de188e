"""The error registry (kvstore.errors): one code per class, a JSON body that reads back into
the same class with the same fields, one table of HTTP statuses."""

from __future__ import annotations

import pytest

from kvstore import errors
from kvstore.errors import (
    ERRORS,
    ClusterError,
    DeadlineExceededError,
    DiskFullError,
    KVStoreError,
    NotLeaderError,
    PreconditionFailedError,
    RequestError,
    from_json,
    http_status,
)


def _all_classes() -> list[type[KVStoreError]]:
    found: list[type[KVStoreError]] = [KVStoreError]
    pending = [KVStoreError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


def test_every_class_has_a_code_of_its_own_in_the_registry() -> None:
    classes = _all_classes()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "two classes share a code"
    for cls in classes:
        assert ERRORS[cls.code] is cls


def test_a_subclass_without_a_code_or_with_a_taken_one_is_refused() -> None:
    with pytest.raises(TypeError, match="must define a code"):
        type("Nameless", (RequestError,), {})
    with pytest.raises(TypeError, match="already used"):
        type("Twin", (RequestError,), {"code": "not_found"})


@pytest.mark.parametrize("cls", [c for c in _all_classes() if c.__module__ == errors.__name__])
def test_to_json_reads_back_as_the_same_class(cls: type[KVStoreError]) -> None:
    error = cls.__new__(cls)
    KVStoreError.__init__(error, "what happened")
    back = from_json(http_status(cls), error.to_json())
    assert type(back) is cls and back.message == "what happened"


def test_fields_travel_with_the_code() -> None:
    back = from_json(412, PreconditionFailedError("no", current_revision=7).to_json())
    assert isinstance(back, PreconditionFailedError) and back.current_revision == 7
    hint = NotLeaderError("follower", leader_id=3, leader_url="http://n3:7001")
    back = from_json(307, hint.to_json())
    assert isinstance(back, NotLeaderError)
    assert (back.leader_id, back.leader_url) == (3, "http://n3:7001")
    back = from_json(503, ClusterError("busy", retry_after_s=0.05).to_json())
    assert isinstance(back, ClusterError) and back.retry_after_s == pytest.approx(0.05)
    assert isinstance(from_json(504, {}), DeadlineExceededError)


def test_statuses_come_from_one_table_with_the_nearest_ancestor() -> None:
    assert http_status(DiskFullError) == 507
    assert http_status(errors.ResourceExhaustedError) == 503
    assert http_status(errors.NoRouteError) == 404  # NotFoundError's
    assert http_status(errors.UnavailableError) == 503  # ClusterError's
    assert http_status(KVStoreError("bug")) == 500
    # A body without a known code (a proxy's page) still becomes a typed error.
    assert type(from_json(404, {"error": {"code": "from_the_future"}})) is errors.NotFoundError
    assert type(from_json(502, {})) is KVStoreError
