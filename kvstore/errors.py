"""One error tree for the whole project, one registry of codes, one table of HTTP statuses.

    KVStoreError                        (internal: a bug, 500)
    ├── RaftError                       our own core refused something (raised by kvstore.raft)
    │   ├── ProposalDroppedError        not the leader, or a transfer is in progress
    │   ├── CompactedError              the asked-for log index is below the snapshot
    │   └── UnavailableIndexError       the asked-for log index is not in the log yet
    ├── StorageError                    a disk problem
    │   ├── CorruptionError             a damaged file: names the file and the byte offset
    │   ├── ResourceExhaustedError      EMFILE, ENFILE, ENOMEM: nothing written; retried (503)
    │   │   └── DiskFullError           ENOSPC: writes refused until space is free (507)
    │   └── FatalDiskError              a failed write or fsync: the process must end
    ├── ClusterError                    answers from (or about) the cluster
    │   ├── NotLeaderError              this node is not the leader; carries a hint (421/307)
    │   ├── NoLeaderError               no leader known right now (503)
    │   ├── UnavailableError            the cluster cannot answer now (503)
    │   ├── TooManyConnectionsError     the node holds all the client connections it may (503)
    │   ├── OverloadedError             too many pending proposals: back off (429)
    │   └── DeadlineExceededError       a deadline passed; for a write the outcome is unknown (504)
    ├── RequestError                    the caller's fault; retrying cannot help
    │   ├── BadRequestError             malformed input (400)
    │   │   ├── MethodNotAllowedError   no such method on that path (405, with Allow)
    │   │   └── RequestTimeoutError     the request did not arrive in time (408)
    │   ├── PayloadTooLargeError        body, key or value over its limit (413)
    │   ├── NotFoundError               no such key (404)
    │   │   └── NoRouteError            no such endpoint (404)
    │   ├── PreconditionFailedError     a compare-and-set did not match (412)
    │   └── SessionExpiredError         request id older than the session remembers (409)
    └── ProtocolError                   a malformed frame, or a message from another cluster

The contract of this boundary, in one place:
- every class has a `code` of its own (a subclass defining none is refused at import), and
  `ERRORS` maps each code back to its class;
- `to_json()` is the body every answer carries, `{"error": {"code", "message", ...fields}}`,
  and `from_json(status, body)` turns it back into the same class with the same fields (the
  server writes with the first, the client reads with the second);
- `HTTP_STATUS` and `http_status(error)` say which HTTP status a code travels with. The
  classes themselves know nothing of HTTP: the Raft core and storage raise them without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

# code -> class: filled by KVStoreError.__init_subclass__ as the classes are defined.
ERRORS: dict[str, type[KVStoreError]] = {}


class KVStoreError(Exception):
    """Base of every error kvstore raises on purpose."""

    code: ClassVar[str] = "internal"
    # Extra attributes carried in the JSON body beside code and message (see to_json).
    json_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must define a code of its own")
        if cls.code in ERRORS:
            raise TypeError(f"error code {cls.code!r} of {cls.__name__} is already used")
        ERRORS[cls.code] = cls

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()

    def to_json(self) -> dict[str, object]:
        """The answer's JSON body: code, message and this class's `json_fields` (when set)."""
        error: dict[str, object] = {"code": self.code, "message": self.message}
        for name in self.json_fields:
            value = getattr(self, name, None)
            if value is not None:
                error[name] = value
        return {"error": error}


ERRORS[KVStoreError.code] = KVStoreError


# --- the Raft core -------------------------------------------------------------------------


class RaftError(KVStoreError):
    """The Raft core refused an operation."""

    code = "raft_error"


class ProposalDroppedError(RaftError):
    """The proposal was dropped: this node is not the leader or a transfer is in progress."""

    code = "proposal_dropped"


class ConfChangeRefusedError(RaftError):
    """A membership change cannot be made now or at all (one already in flight, an invalid
    change, a learner not caught up); nothing was changed."""

    code = "conf_change_refused"


class CompactedError(RaftError):
    """The requested log index has been compacted into a snapshot."""

    code = "compacted"


class UnavailableIndexError(RaftError):
    """The requested log index is beyond the end of the log."""

    code = "index_unavailable"


# --- storage -------------------------------------------------------------------------------


class StorageError(KVStoreError):
    """A storage problem."""

    code = "storage_error"


class CorruptionError(StorageError):
    """A file is damaged; the node must not vote or serve until an operator acts."""

    code = "corruption"

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"corrupt data in {path} at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class ResourceExhaustedError(StorageError):
    """A write found no file descriptor, memory or (DiskFullError) space: nothing of it was
    stored, and the same write may succeed later. A shortage that passes, not a damaged
    disk: the node retries instead of ending (a failed fsync is never this)."""

    code = "resource_exhausted"


class DiskFullError(ResourceExhaustedError):
    """The disk is full: new writes are refused until space is free."""

    code = "disk_full"


class FatalDiskError(StorageError):
    """A write or fsync failed; the data on disk is in doubt and the process must end."""

    code = "fatal_disk_error"


# --- the cluster ---------------------------------------------------------------------------


class ClusterError(KVStoreError):
    """The cluster could not serve the request now; retrying elsewhere or later may help."""

    code = "cluster_error"

    json_fields: ClassVar[tuple[str, ...]] = ("retry_after_ms",)

    def __init__(self, message: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int | None:
        """`retry_after_s` in whole milliseconds, as the JSON body carries it."""
        return None if self.retry_after_s is None else round(self.retry_after_s * 1000)


class NotLeaderError(ClusterError):
    """This node is not the leader."""

    code = "not_leader"
    json_fields: ClassVar[tuple[str, ...]] = (*ClusterError.json_fields, "leader", "leader_id")

    def __init__(
        self, message: str = "", *, leader_id: int = 0, leader_url: str | None = None
    ) -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_url = leader_url

    @property
    def leader(self) -> str | None:
        return self.leader_url


class NoLeaderError(ClusterError):
    """No leader is known right now (an election is under way)."""

    code = "no_leader"


class UnavailableError(ClusterError):
    """The cluster cannot answer right now."""

    code = "unavailable"


class TooManyConnectionsError(ClusterError):
    """The node holds as many client connections as it allows (from this address or in
    all); the connection is closed after this answer."""

    code = "too_many_connections"


class OverloadedError(ClusterError):
    """Too many requests are pending; back off and retry."""

    code = "overloaded"


class DeadlineExceededError(ClusterError):
    """The deadline passed before an answer; for a write, the outcome is unknown."""

    code = "timeout"

    def __init__(
        self, message: str = "", *, attempts: int = 0, outcome_unknown: bool = False
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.outcome_unknown = outcome_unknown


# --- the caller ----------------------------------------------------------------------------


class RequestError(KVStoreError):
    """The request itself is wrong; retrying it cannot succeed."""

    code = "request_error"


class BadRequestError(RequestError):
    """The request is malformed."""

    code = "bad_request"


class MethodNotAllowedError(BadRequestError):
    """The path exists but not with this method; `allow` lists the methods it takes."""

    code = "method_not_allowed"

    def __init__(self, message: str = "", *, allow: str = "") -> None:
        super().__init__(message)
        self.allow = allow


class RequestTimeoutError(BadRequestError):
    """The request head or body did not arrive in time; the connection is closed."""

    code = "request_timeout"


class PayloadTooLargeError(RequestError):
    """A request body or value is over its configured limit (413).

    An over-long key is a BadRequestError (400): keys are part of the URL, not the body."""

    code = "too_large"


class UnauthenticatedError(RequestError):
    """Authentication is on and the request proves no known identity: no credentials, an
    unknown or revoked token, or a client certificate naming no user (401)."""

    code = "unauthenticated"


class PermissionDeniedError(RequestError):
    """The authenticated user's roles do not grant what the request needs (403)."""

    code = "permission_denied"


class NotFoundError(RequestError):
    """No such key."""

    code = "not_found"


class NoRouteError(NotFoundError):
    """No such endpoint."""

    code = "no_route"


class PreconditionFailedError(RequestError):
    """A compare-and-set or create-only condition did not hold."""

    code = "precondition_failed"
    json_fields: ClassVar[tuple[str, ...]] = ("current_revision",)

    def __init__(self, message: str = "", *, current_revision: int | None = None) -> None:
        super().__init__(message)
        # The key's mod_revision when the condition was checked (0: absent), when known.
        self.current_revision = current_revision


class SessionExpiredError(RequestError):
    """The request id is older than the client's session remembers: not applied now, and
    whether an earlier attempt of it applied is unknown."""

    code = "session_expired"


class RevisionCompactedError(RequestError):
    """The revision asked for (a watch's start, a read's) is older than the history keeps."""

    code = "revision_compacted"
    json_fields: ClassVar[tuple[str, ...]] = ("oldest_revision",)

    def __init__(self, message: str = "", *, oldest_revision: int | None = None) -> None:
        super().__init__(message)
        # The oldest revision still kept: watch or read from it or later.
        self.oldest_revision = oldest_revision


class ConflictError(RequestError):
    """The request conflicts with the current state (a lease id already in use)."""

    code = "conflict"


class WatchCanceledError(ClusterError):
    """The server ended a watch (a slow watcher, a compaction past it, a shutdown); resume
    from the next revision, on this node or another."""

    code = "watch_canceled"


class LeaseLostError(ClusterError):
    """A lease the client held is no longer certainly alive (no keepalive acknowledged
    within its TTL, or the server revoked it): what it guarded may belong to another."""

    code = "lease_lost"


class ProtocolError(KVStoreError):
    """A peer sent a malformed frame or belongs to another cluster."""

    code = "protocol_error"


# --- the wire: HTTP statuses, and JSON bodies back into errors ------------------------------

# The HTTP status each code travels with; a code not named takes its nearest ancestor's.
HTTP_STATUS: Mapping[type[KVStoreError], int] = {
    KVStoreError: 500,
    ProposalDroppedError: 503,
    ConfChangeRefusedError: 409,
    ResourceExhaustedError: 503,
    DiskFullError: 507,
    ClusterError: 503,
    NotLeaderError: 421,  # the HTTP layer answers 307 with a Location when it knows the leader
    OverloadedError: 429,
    DeadlineExceededError: 504,
    RequestError: 400,
    MethodNotAllowedError: 405,
    RequestTimeoutError: 408,
    PayloadTooLargeError: 413,
    UnauthenticatedError: 401,
    PermissionDeniedError: 403,
    NotFoundError: 404,
    PreconditionFailedError: 412,
    SessionExpiredError: 409,
    RevisionCompactedError: 410,
    ConflictError: 409,
    ProtocolError: 400,
}


def http_status(error: KVStoreError | type[KVStoreError]) -> int:
    """The HTTP status of an error (or class): its own entry in HTTP_STATUS, or the nearest
    ancestor's."""
    cls = error if isinstance(error, type) else type(error)
    for ancestor in cls.__mro__:
        if ancestor in HTTP_STATUS:
            return HTTP_STATUS[ancestor]
    raise AssertionError(f"{cls.__name__} is not a KVStoreError")


def from_json(
    status: int, body: Mapping[str, object], *, message: str | None = None
) -> KVStoreError:
    """The error a JSON body (`{"error": {...}}`) describes, as the class of its code with
    its fields; an unknown or missing code gives the class HTTP_STATUS names for `status`
    (a proxy's page, a newer server). `message` replaces the body's message when given."""
    detail = body.get("error")
    fields: Mapping[str, object] = detail if isinstance(detail, Mapping) else {}
    code = fields.get("code")
    cls = ERRORS.get(code) if isinstance(code, str) else None
    if cls is None:
        cls = _class_for_status(status)
    text = message if message is not None else str(fields.get("message") or f"HTTP {status}")
    error = cls.__new__(cls)
    KVStoreError.__init__(error, text)
    _set_fields(error, fields)
    return error


def _class_for_status(status: int) -> type[KVStoreError]:
    exact = [cls for cls, code_status in HTTP_STATUS.items() if code_status == status]
    if exact:
        # The most general class with that status (ClusterError before its subclasses).
        return min(exact, key=lambda cls: len(cls.__mro__))
    if 400 <= status < 500:
        return RequestError
    return KVStoreError


def _set_fields(error: KVStoreError, fields: Mapping[str, object]) -> None:
    """Give `error` the attributes its constructor would set, from a JSON body."""
    if isinstance(error, ClusterError):
        ms = fields.get("retry_after_ms")
        error.retry_after_s = ms / 1000 if isinstance(ms, int | float) and _is_count(ms) else None
    if isinstance(error, NotLeaderError):
        leader, leader_id = fields.get("leader"), fields.get("leader_id")
        error.leader_url = leader if isinstance(leader, str) and leader else None
        error.leader_id = leader_id if isinstance(leader_id, int) and _is_count(leader_id) else 0
    if isinstance(error, DeadlineExceededError):
        # A node's deadline passed while the request waited: a write may still apply.
        error.attempts, error.outcome_unknown = 0, True
    if isinstance(error, PreconditionFailedError):
        current = fields.get("current_revision")
        error.current_revision = current if isinstance(current, int) and _is_count(current) else None
    if isinstance(error, MethodNotAllowedError):
        error.allow = ""
    if isinstance(error, CorruptionError):
        error.path, error.offset, error.reason = "", 0, error.message


def _is_count(value: object) -> bool:
    """A number >= 0 that is not a bool (JSON has no ints apart from bools to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
