"""One error tree for the whole project; each error knows its HTTP status and stable code.

    KVStoreError
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
    │   ├── OverloadedError             too many pending proposals: back off (429)
    │   └── DeadlineExceededError       a deadline passed; for a write the outcome is unknown (504)
    ├── RequestError                    the caller's fault; retrying cannot help
    │   ├── BadRequestError             malformed input (400)
    │   ├── PayloadTooLargeError        body, key or value over its limit (413)
    │   ├── NotFoundError               no such key (404)
    │   ├── PreconditionFailedError     a compare-and-set did not match (412)
    │   └── SessionExpiredError         request id older than the session remembers (409)
    └── ProtocolError                   a malformed frame, or a message from another cluster

Only `kvstore.server.http` turns these into HTTP responses (via `http_status` and `code`);
the client library turns HTTP responses back into these types.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error kvstore raises on purpose."""

    http_status: int = 500
    code: str = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()

    def to_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}}


# --- the Raft core -------------------------------------------------------------------------


class RaftError(KVStoreError):
    """The Raft core refused an operation."""

    code = "raft_error"


class ProposalDroppedError(RaftError):
    """The proposal was dropped: this node is not the leader or a transfer is in progress."""

    http_status = 503
    code = "proposal_dropped"


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

    http_status = 503
    code = "resource_exhausted"


class DiskFullError(ResourceExhaustedError):
    """The disk is full: new writes are refused until space is free."""

    http_status = 507
    code = "disk_full"


class FatalDiskError(StorageError):
    """A write or fsync failed; the data on disk is in doubt and the process must end."""

    code = "fatal_disk_error"


# --- the cluster ---------------------------------------------------------------------------


class ClusterError(KVStoreError):
    """The cluster could not serve the request now; retrying elsewhere or later may help."""

    http_status = 503
    code = "unavailable"

    def __init__(self, message: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotLeaderError(ClusterError):
    """This node is not the leader."""

    http_status = 421
    code = "not_leader"

    def __init__(
        self, message: str = "", *, leader_id: int = 0, leader_url: str | None = None
    ) -> None:
        super().__init__(message)
        self.leader_id = leader_id
        self.leader_url = leader_url

    def to_json(self) -> dict[str, object]:
        body = super().to_json()
        error = body["error"]
        assert isinstance(error, dict)
        error["leader"] = self.leader_url
        error["leader_id"] = self.leader_id
        return body


class NoLeaderError(ClusterError):
    """No leader is known right now (an election is under way)."""

    code = "no_leader"


class UnavailableError(ClusterError):
    """The cluster cannot answer right now."""

    code = "unavailable"


class OverloadedError(ClusterError):
    """Too many requests are pending; back off and retry."""

    http_status = 429
    code = "overloaded"


class DeadlineExceededError(ClusterError):
    """The deadline passed before an answer; for a write, the outcome is unknown."""

    http_status = 504
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

    http_status = 400
    code = "bad_request"


class BadRequestError(RequestError):
    """The request is malformed."""

    code = "bad_request"


class PayloadTooLargeError(RequestError):
    """A request body or value is over its configured limit (413).

    An over-long key is a BadRequestError (400): keys are part of the URL, not the body."""

    http_status = 413
    code = "too_large"


class NotFoundError(RequestError):
    """No such key."""

    http_status = 404
    code = "not_found"


class PreconditionFailedError(RequestError):
    """A compare-and-set or create-only condition did not hold."""

    http_status = 412
    code = "precondition_failed"

    def __init__(self, message: str = "", *, current_revision: int | None = None) -> None:
        super().__init__(message)
        # The key's mod_revision when the condition was checked (0: absent), when known.
        self.current_revision = current_revision


class SessionExpiredError(RequestError):
    """The request id is older than the client's session remembers: not applied now, and
    whether an earlier attempt of it applied is unknown."""

    http_status = 409
    code = "session_expired"


class ProtocolError(KVStoreError):
    """A peer sent a malformed frame or belongs to another cluster."""

    http_status = 400
    code = "protocol_error"
