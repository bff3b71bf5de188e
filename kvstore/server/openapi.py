"""The OpenAPI 3.1 document of the HTTP API, served at GET /v1/openapi.json.

Kept beside the handlers (kvstore/server/http.py) and written by hand: it is the contract the
client library and curl users read, so it says what the API promises, not what a generator
inferred. tests/server check that every route of the app is described here.
"""

from __future__ import annotations

from typing import Any

# No C0 controls, DEL or C1 controls (U+0080..U+009F): the server refuses them (400).
_NO_CONTROLS = "[^\\u0000-\\u001f\\u007f-\\u009f]"
_KEY = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": "UTF-8 (percent-encoded in the URL; an escape that is not UTF-8 is 400), "
    "at most 1024 bytes, no control characters (C0, DEL, C1); may contain '/'",
    "schema": {"type": "string", "minLength": 1, "maxLength": 1024, "pattern": f"^{_NO_CONTROLS}+$"},
}
_CONSISTENCY = {
    "name": "consistency",
    "in": "query",
    "required": False,
    "description": "linearizable (default, ReadIndex) or stale (local state, any node)",
    "schema": {"type": "string", "enum": ["linearizable", "stale"]},
}
_WRITE_HEADERS = [
    {
        "name": "Kvstore-Request-Id",
        "in": "header",
        "description": "<client_id>:<seq>; a retry with the same id applies once and "
        "returns the first answer. The server makes one up when absent.",
        "schema": {
            "type": "string",
            "pattern": "^[A-Za-z0-9_.-]{1,64}:[1-9][0-9]{0,18}$",
            "examples": ["client-7:1"],
        },
    },
    {
        "name": "Kvstore-Acked-Below",
        "in": "header",
        "description": "the client holds the answers of every seq below this (with "
        "Kvstore-Request-Id only)",
        "schema": {"type": "integer", "minimum": 0, "maximum": 18446744073709551615},
    },
    {
        "name": "If-Match",
        "in": "header",
        "description": 'compare-and-set on the key\'s mod_revision: N, "N" or W/"N" (the ETag '
        "of a read), 0 = the key is absent; at most 18446744073709551615. Together with "
        "If-None-Match it is 400.",
        "schema": {
            "type": "string",
            "pattern": '^(W/)?"[0-9]{1,19}"$|^[0-9]{1,19}$',
            "examples": ['"1"', "0"],
        },
    },
]


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_WRITE_ERRORS = {
    "307": _error("not the leader: Location is the leader's same URL (curl -L follows)"),
    "400": _error("bad_request: invalid key or header"),
    "409": _error(
        "session_expired: the request id is below what its session remembers; outcome unknown"
    ),
    "412": _error("precondition_failed: includes current_revision"),
    "408": _error("request_timeout: the body did not arrive in time (connection closed)"),
    "413": _error("too_large: body or value over the limit"),
    "429": _error("overloaded: too many pending writes; Retry-After"),
    "503": _error("no_leader or unavailable; Retry-After"),
    "504": _error("timeout: the outcome of the write is unknown; retry with the same id"),
    "507": _error("disk_full: writes refused until space is free"),
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvstore",
            "version": "1",
            "description": "Raft-replicated key-value store",
        },
        "paths": _key_value_paths()
        | _operations_paths()
        | _coordination_paths()
        | _membership_paths(),
        "components": _components(),
    }


def _key_value_paths() -> dict[str, Any]:
    paths = _kv_paths()
    key = paths["/v1/kv/{key}"]
    key["get"]["parameters"] = [*key["get"]["parameters"], _REVISION]
    key["head"] = key["get"] | {"summary": "GET without the body (headers only)"}
    lease = {"name": "lease", "in": "query", "description": "attach the key to this lease",
             "schema": {"type": "integer", "minimum": 0}}  # fmt: skip
    key["put"]["parameters"] = [*key["put"]["parameters"], lease]
    paths["/v1/kv"]["delete"] = {
        "summary": "Delete every key under a non-empty prefix, in one revision",
        "parameters": [{"name": "prefix", "in": "query", "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 1024}}],
        "responses": {"200": {"description": "revision and deleted"}} | _WRITE_ERRORS,
    }  # fmt: skip
    return paths


def _kv_paths() -> dict[str, Any]:
    return {
        "/v1/kv/{key}": {
            "get": {
                "summary": "Read a key (raw bytes); revision headers and ETag",
                "parameters": [_KEY, _CONSISTENCY],
                "responses": {
                    "200": {
                        "description": "the value",
                        "content": {"application/octet-stream": {}},
                    },
                    "400": _error("bad_request: invalid key or consistency"),
                    "404": _error("not_found"),
                    "503": _error("no_leader"),
                    "504": _error("timeout: the read could not be confirmed in time"),
                },
            },
            "put": {
                "summary": "Write a key; If-None-Match: * creates only",
                "parameters": [
                    _KEY,
                    *_WRITE_HEADERS,
                    {
                        "name": "If-None-Match",
                        "in": "header",
                        "description": "* = create only; together with If-Match it is 400",
                        "schema": {"const": "*"},
                    },
                ],
                "requestBody": {"content": {"application/octet-stream": {}}},
                "responses": {
                    "200": {
                        "description": "written",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/PutResult"}
                            }
                        },
                    },
                    **_WRITE_ERRORS,
                },
            },
            "delete": {
                "summary": "Delete a key",
                "parameters": [_KEY, *_WRITE_HEADERS],
                "responses": {
                    "200": {"description": "deleted", "content": {"application/json": {}}},
                    "404": _error("not_found"),
                    **_WRITE_ERRORS,
                },
            },
        },
        "/v1/kv": {
            "get": {
                "summary": "List keys by prefix",
                "parameters": [
                    {
                        "name": "prefix",
                        "in": "query",
                        "description": "at most 1024 bytes of UTF-8, no control characters",
                        "schema": {
                            "type": "string",
                            "maxLength": 1024,
                            "pattern": f"^{_NO_CONTROLS}*$",
                        },
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                    {
                        "name": "start",
                        "in": "query",
                        "description": "the first key of the page (a previous answer's next)",
                        "schema": {"type": "string", "maxLength": 1024},
                    },
                    _REVISION,
                    _CONSISTENCY,
                ],
                "responses": {
                    "200": {
                        "description": "items (values base64) and more",
                        "content": {"application/json": {}},
                    },
                    "400": _error("bad_request: invalid prefix, limit or consistency"),
                    "503": _error("no_leader; Retry-After"),
                    "504": _error("timeout: the read could not be confirmed in time"),
                },
            }
        },
    }


_REVISION = {
    "name": "revision",
    "in": "query",
    "description": "read the store as it was at this revision (while the history keeps it)",
    "schema": {"type": "integer", "minimum": 0},
}


def _json_post(summary: str, required: list[str], **errors: Any) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "content": {
                    "application/json": {"schema": {"type": "object", "required": required}}
                }
            },
            "responses": {"200": {"description": "done", "content": {"application/json": {}}}}
            | {status: _error(text) for status, text in errors.items()}
            | _WRITE_ERRORS,
        }
    }


def _coordination_paths() -> dict[str, Any]:
    """Transactions, compaction, leases and watches (docs/api.md has the bodies)."""
    watch_parameters = [
        {"name": name, "in": "query", "schema": {"type": "string", "maxLength": 1024}}
        for name in ("key", "prefix")
    ] + [
        {"name": name, "in": "query", "schema": {"type": kind}}
        for name, kind in (
            ("start_revision", "integer"),
            ("prev_kv", "boolean"),
            ("progress_ms", "integer"),
        )
    ]
    return {
        "/v1/txn": _json_post(
            "Compare, then the success or failure operations, in one revision",
            [],
        ),
        "/v1/compact": _json_post("Drop the history up to a revision", ["revision"]),
        "/v1/lease/grant": _json_post("Grant a lease of ttl_ms", ["ttl_ms"]),
        "/v1/lease/keepalive": _json_post(
            "Renew a lease (on the leader)", ["id"], **{"404": "no such lease"}
        ),
        "/v1/lease/revoke": _json_post("Revoke a lease and delete its keys", ["id"]),
        "/v1/leases": {
            "get": {
                "summary": "Every lease and its keys",
                "responses": {"200": {"description": "leases"}},
            }
        },
        "/v1/watch": {
            "get": {
                "summary": "Stream a key's or a prefix's events (NDJSON lines)",
                "parameters": watch_parameters,
                "responses": {
                    "200": {"description": "events", "content": {"application/x-ndjson": {}}},
                    "400": _error("bad_request: need exactly one of key and prefix"),
                    "410": _error("revision_compacted: includes oldest_revision"),
                    "429": _error("overloaded: too many watches on this node"),
                },
            }
        },
    }


def _membership_paths() -> dict[str, Any]:
    """Membership admin routes (kvstore/server/membership.py; docs/api.md "Membership")."""
    refused = "conf_change_refused: nothing changed (see docs/api.md)"
    return {
        "/v1/members": {
            "get": {
                "summary": "Voters, learners, removed ids and (on the leader) each one's lag",
                "responses": {"200": {"description": "members"}},
            }
        },
        "/v1/members/add": _json_post(
            "Add a learner under a new id (name, peer_address, client_url, promote); the "
            "answer holds its id and the address book it starts with",
            ["name", "peer_address"],
            **{"409": refused},
        ),
        "/v1/members/promote": _json_post(
            "Promote a caught-up learner to voter", ["id"], **{"409": refused}
        ),
        "/v1/members/remove": _json_post(
            "Remove a member; its id is never used again", ["id"], **{"409": refused}
        ),
        "/v1/leader/transfer": _json_post(
            "Hand leadership to a voter", ["to"], **{"409": refused}
        ),
    }


def _operations_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": {
                "summary": "The process is alive",
                "responses": {"200": {"description": "ok"}},
            }
        },
        "/readyz": {
            "get": {
                "summary": "A leader is known and this node applied what it knows is committed",
                "responses": {
                    "200": {"description": "ready"},
                    "503": {"description": "not ready"},
                },
            }
        },
        "/v1/status": {
            "get": {
                "summary": "Role, term, leader, indexes; peers on the leader",
                "responses": {"200": {"description": "status"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format",
                "responses": {"200": {"description": "metrics"}},
            }
        },
        "/v1/snapshot": {
            "get": {
                "summary": "A fresh snapshot of the whole store (backup; docs/operations.md)",
                "responses": {
                    "200": {
                        "description": "a snapshot file with Kvstore-Snapshot-Index and -Term",
                        "content": {"application/vnd.kvstore.snapshot": {}},
                    },
                    "503": {"description": "another save runs on this node"},
                },
            }
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI"}},
            }
        },
    }


def _components() -> dict[str, Any]:
    return {
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "leader": {"type": ["string", "null"]},
                        },
                        "required": ["code", "message"],
                    }
                },
            },
            "PutResult": {
                "type": "object",
                "properties": {
                    name: {"type": "integer"}
                    for name in ("revision", "create_revision", "mod_revision", "version")
                }
                | {"key": {"type": "string"}},
            },
        }
    }
