"""Client authentication and authorization on a real cluster (kvstore/server/auth.py):
401 and 403 with JSON errors for unauthenticated and unauthorized requests, which change
nothing; roles on key prefixes enforced alike by every node; tokens and client certificates;
the root token as the bootstrap; open health endpoints; audit lines."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvstore.client import Client, ClientConfig
from kvstore.errors import PermissionDeniedError, UnauthenticatedError
from kvstore.server.localcluster import LocalCluster

ROOT_TOKEN = "root-token-of-the-test-0123456789"


def _request(
    cluster: LocalCluster,
    node: int,
    method: str,
    path: str,
    token: str = "",
    data: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    context = ssl.create_default_context(cafile=cluster.ca_file)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(cluster.client_url(node) + path, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=5.0) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, dict(error.headers), json.loads(body) if body else None


def _all_applied(cluster: LocalCluster, timeout_s: float = 15.0) -> None:
    """Wait until every node has applied what the leader had committed when called: a
    change of users, roles or tokens applies on each node once that node has applied it
    (docs/security.md), and the checks below ask each node."""
    leader = cluster.wait_for_leader(timeout_s)
    status = cluster.status(leader)
    assert status is not None
    commit = status["commit_index"]

    def applied() -> bool:
        statuses = [cluster.status(node) for node in cluster.ids]
        return all(s is not None and s["applied_index"] >= commit for s in statuses)

    cluster.wait_until(applied, timeout_s, "every node applied the auth changes")


async def test_tokens_certificates_and_roles_on_every_node(tmp_path: Path) -> None:
    root_file = tmp_path / "root.token"
    root_file.write_text(ROOT_TOKEN + "\n")
    cluster = LocalCluster(
        tmp_path / "cluster",
        3,
        tls=True,
        extra_args=["--auth", "true", "--auth-root-token-file", str(root_file)],
    )
    base = {"ca_file": cluster.ca_file, "timeout_s": 5.0}
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(cluster.wait_for_leader, 15.0)
        async with Client(
            cluster.client_urls, config=ClientConfig(**base, token=ROOT_TOKEN)
        ) as root:
            await root.auth_put_role("app-rw", [("app/", "write")])
            await root.auth_put_role("reader", [("app/", "read")])
            await root.auth_put_role("ops", [("", "admin")])
            await root.auth_put_user("alice", ["app-rw"])
            await root.auth_put_user("bob", ["reader"])
            await root.auth_put_user("admin", ["ops"])  # the CN of client-admin.pem
            alice_token, _ = await root.auth_new_token("alice")
            bob_token, bob_id = await root.auth_new_token("bob")
            shown = await root.auth_show()
            assert shown["users"]["bob"] == ["reader"]
            assert {t["user"] for t in shown["tokens"]} == {"alice", "bob"}
            assert all(len(t["id"]) == 16 for t in shown["tokens"])

        alice = ClientConfig(**base, token=alice_token)
        bob = ClientConfig(**base, token=bob_token)
        async with Client(cluster.client_urls, config=alice) as client:
            await client.put("app/x", b"1")
            with pytest.raises(PermissionDeniedError):
                await client.put("other/x", b"1")
            with pytest.raises(PermissionDeniedError):
                await client.auth_new_token("alice")  # admin only
        async with Client(cluster.client_urls, config=bob) as client:
            assert (await client.get("app/x")).value == b"1"
            with pytest.raises(PermissionDeniedError):
                await client.put("app/x", b"2")
        async with Client(cluster.client_urls, config=ClientConfig(**base)) as client:
            with pytest.raises(UnauthenticatedError):
                await client.get("app/x")

        # Every node enforces the same rules, on raw requests too; refusals change nothing.
        await asyncio.to_thread(_all_applied, cluster)
        for node in cluster.ids:
            code, headers, body = await asyncio.to_thread(
                _request, cluster, node, "PUT", "/v1/kv/app/x", "", b"evil"
            )
            assert code == 401 and body["error"]["code"] == "unauthenticated"
            assert headers["WWW-Authenticate"].startswith("Bearer")
            code, _, body = await asyncio.to_thread(
                _request, cluster, node, "PUT", "/v1/kv/app/x", "wrong-token", b"evil"
            )
            assert code == 401
            code, _, body = await asyncio.to_thread(
                _request, cluster, node, "GET", "/v1/kv?prefix=", bob_token
            )
            assert code == 403 and body["error"]["code"] == "permission_denied"
            for open_path in ("/healthz", "/v1/status", "/metrics"):
                code, _, _ = await asyncio.to_thread(_request, cluster, node, "GET", open_path)
                assert code == 200, open_path
        async with Client(cluster.client_urls, config=bob) as client:
            assert (await client.get("app/x")).value == b"1"

        # A client certificate (CN admin) authenticates as the user admin: no token needed.
        certs = cluster.certs_dir
        with_cert = ClientConfig(
            **base,
            cert_file=str(certs / "client-admin.pem"),
            key_file=str(certs / "client-admin-key.pem"),
        )
        async with Client(cluster.client_urls, config=with_cert) as client:
            await client.put("anything", b"ok")
            await client.auth_delete_token(bob_id)
        await asyncio.to_thread(_all_applied, cluster)
        async with Client(cluster.client_urls, config=bob) as client:
            with pytest.raises(UnauthenticatedError):
                await client.get("app/x")

        scraped = [
            (await asyncio.to_thread(_request, cluster, node, "GET", "/metrics"))[2].decode()
            for node in cluster.ids
        ]
        for code in ("unauthenticated", "permission_denied"):
            assert all(f'kvstore_auth_denied_total{{code="{code}"}}' in text for text in scraped)
        logs = "".join(cluster.log_path(i).read_text(errors="replace") for i in cluster.ids)
        assert "event=auth_denied code=unauthenticated" in logs
        assert "event=auth_denied code=permission_denied" in logs
        assert "event=auth_change op=put_user name=alice" in logs and "by=root" in logs
        assert "event=auth_change op=delete_token" in logs and "by=admin" in logs
        assert ROOT_TOKEN not in logs and alice_token not in logs
    finally:
        await asyncio.to_thread(cluster.stop)
