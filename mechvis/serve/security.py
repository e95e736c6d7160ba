"""The security layer of `mechvis serve`, as one ASGI middleware in front of every route.

A local server is reachable from every page the user's browser opens, so each request passes:

- **Host allow-list** on every route: a page on evil.example that resolves its name to 127.0.0.1
  (DNS rebinding) sends `Host: evil.example` and gets 400. The Host's port must be the port the
  server is bound to (the ASGI scope's `server`, else the configured one; no port means 80), so
  another local service's page (`localhost:8080`) cannot pass as this one.
- On state-changing methods (POST, PUT, PATCH, DELETE): an `Origin` (when sent) equal to the
  server's own origin, `Sec-Fetch-Site` (when sent) same-origin, the per-process token in the
  `X-Mechvis-Token` header (403 otherwise) and a JSON body (or an image on the upload route;
  415 otherwise). With a non-loopback bind, reads need the token too.
- Bounded bodies: 1 MiB of JSON, 10 MiB on the image route (413), counted as the body streams in,
  whatever Content-Length says.
- No CORS headers, ever; every response carries a strict Content-Security-Policy
  (`script-src 'self'`), `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`,
  `X-Frame-Options: DENY` and `Cross-Origin-Opener-Policy`/`-Resource-Policy: same-origin`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

TOKEN_HEADER = "x-mechvis-token"
JSON_LIMIT = 1 << 20  # 1 MiB
IMAGE_LIMIT = 10 << 20  # 10 MiB
IMAGE_ROUTE = "/api/images"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
    # plotly.js sets element styles and adds <style> rules from script: inline styles only, no script.
    "style-src 'self' 'unsafe-inline'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'; object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    return host.strip("[]") in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _split_host(value: str) -> str:
    """The host name of a Host header value ('[::1]:5050' → '::1', 'a:1' → 'a')."""
    return _host_and_port(value)[0]


def _host_and_port(value: str) -> tuple[str, int | None]:
    """A Host header value as (name, port): '[::1]:5050' → ('::1', 5050), 'a' → ('a', 80) (HTTP's
    default), 'a:x' → ('a', None) (no valid port: never matches)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        name, rest = value[1:end], value[end + 1 :]
    elif value.count(":") == 1:
        name, rest = value.split(":")
        rest = ":" + rest
    else:
        name, rest = value, ""
    if not rest:
        return name, 80
    digits = rest[1:]
    if not rest.startswith(":") or not digits.isdigit() or len(digits) > 5:
        return name, None
    return name, int(digits)


class SecurityMiddleware:
    """Pure ASGI middleware (it sees the body as it streams, so limits hold for chunked uploads)."""

    def __init__(self, app, *, allowed_hosts: Iterable[str], token: str | None, token_for_reads: bool = False,
                 port: int | None = None) -> None:
        self.app = app
        self.allowed_hosts = {_split_host(host) for host in allowed_hosts}
        self.port = port  # used when the ASGI server does not say which port it listens on
        self.token = token
        self.token_for_reads = token_for_reads

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}

        async def send_secured(message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                message = {**message, "headers": kept + SECURITY_HEADERS}
            await send(message)

        problem = self._check(scope, headers)
        if problem is not None:
            status, detail = problem
            await _reply(send_secured, status, detail)
            return
        limit = IMAGE_LIMIT if scope["path"] == IMAGE_ROUTE else JSON_LIMIT
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _reply(send_secured, 413, f"The request body is larger than {limit // (1 << 20)} MiB.")
            return
        # Read the whole body first (it is bounded), so an oversized one never reaches a route.
        chunks: list[bytes] = []
        received = 0
        if scope["method"] in UNSAFE_METHODS:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                received += len(message.get("body", b""))
                if received > limit:
                    await _reply(send_secured, 413, f"The request body is larger than {limit // (1 << 20)} MiB.")
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        replayed = False

        async def replaying_receive():
            nonlocal replayed
            if chunks and not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replaying_receive if chunks else receive, send_secured)

    def _check(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        name, port = _host_and_port(host)
        server = scope.get("server")
        bound = server[1] if server and server[1] is not None else self.port
        if name not in self.allowed_hosts or (bound is not None and port != int(bound)):
            return 400, "Unknown Host header; open the app at the address `mechvis serve` printed."
        method = scope["method"]
        if method not in UNSAFE_METHODS:
            if self.token_for_reads and scope["path"].startswith("/api/") and not self._token_ok(headers):
                return 403, "Missing or wrong token header."
            return None
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host.lower()}":
            return 403, "Cross-origin request refused."
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return 403, "Cross-site request refused."
        if not self._token_ok(headers):
            return 403, "Missing or wrong token header."
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        wanted = IMAGE_TYPES if scope["path"] == IMAGE_ROUTE else ("application/json",)
        if content_type not in wanted:
            return 415, f"Content-Type must be {' or '.join(wanted)}."
        return None

    def _token_ok(self, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest(headers.get(TOKEN_HEADER, "").encode(), self.token.encode())


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
