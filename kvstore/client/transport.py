"""The one HTTP exchange the client makes per attempt, behind a small Protocol.

`Transport.request()` sends one request to one endpoint and returns the whole answer, or
raises `TransportError` when no HTTP answer came back. It never retries and never follows
redirects: those decisions belong to the retry loop in `kvstore.client.core`. Tests inject a
fake `Transport` to run the client without a server; `AiohttpTransport` is the real one, with
one pooled `aiohttp.ClientSession` per client.

`TransportError.maybe_sent` is what exactly-once bookkeeping needs: False only when the
request certainly never left (the connection was refused or could not be made), so a write
that failed that way certainly did not apply.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import yarl

from kvstore.errors import UnavailableError


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    # Header names in lower case; one value per name (the last one wins).
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class TransportError(UnavailableError):
    """No HTTP answer came back from an endpoint (refused, reset, timed out)."""

    code = "transport_error"

    def __init__(self, message: str, *, maybe_sent: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        # False only when the request certainly never reached the server.
        self.maybe_sent = maybe_sent
        self.timed_out = timed_out


def tls_context(ca_file: str = "", cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """The context of https:// endpoints: TLS 1.2 at least, the server's certificate checked
    against `ca_file` (or the system's trust store) and its host name; a client certificate
    presented when `cert_file` is given."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


class Transport(Protocol):
    async def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float,
    ) -> HttpResponse:
        """Send one request to `endpoint` + `path` (already percent-encoded); no redirects."""
        ...

    async def close(self) -> None: ...


class AiohttpTransport:
    """`Transport` over one pooled aiohttp session, created lazily inside the running loop."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 0.5,
        max_connections: int = 100,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        # Made now, so that a missing or bad file fails at construction, not on a call.
        self._ssl = tls_context(ca_file, cert_file, key_file)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, ttl_dns_cache=60, ssl=self._ssl
            )
            # No cookies, no automatic decompression surprises: the API is plain bytes and JSON.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def request(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_s: float,
    ) -> HttpResponse:
        url = yarl.URL(endpoint.rstrip("/") + path, encoded=True)
        if query:
            url = url.with_query(query)
        timeout = aiohttp.ClientTimeout(
            total=timeout_s, connect=min(self._connect_timeout_s, timeout_s)
        )
        try:
            async with self._get_session().request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                payload = await response.read()
                answer_headers = {name.lower(): value for name, value in response.headers.items()}
                return HttpResponse(response.status, answer_headers, payload)
        except aiohttp.ClientConnectorCertificateError as exc:
            # The server's certificate did not check out: nothing was sent.
            raise TransportError(
                f"{endpoint}: TLS: {exc.certificate_error}", maybe_sent=False
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            # Includes connection refused: nothing was sent. aiohttp's own text ("Cannot
            # connect to host ... ssl:default [...]") says less than the OS error does.
            error = exc.os_error
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise TransportError(
                f"{endpoint}: cannot connect: {reason.lower()}", maybe_sent=False
            ) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise TransportError(
                f"{endpoint}: connect timed out", maybe_sent=False, timed_out=True
            ) from exc
        except TimeoutError as exc:
            raise TransportError(
                f"{endpoint}: no answer within {timeout_s:.3f}s", maybe_sent=True, timed_out=True
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            # Reset, disconnected, malformed answer: the request may have been processed.
            raise TransportError(
                f"{endpoint}: {type(exc).__name__}: {exc}", maybe_sent=True
            ) from exc

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
