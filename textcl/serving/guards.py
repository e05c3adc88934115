"""What the server checks before a request reaches the app: the Host header, the API key of a write, and how long a
client may take to send its request.

- `HostCheck` refuses a Host header naming a host the server was not started for (DNS rebinding: a web page
  whose name an attacker points at 127.0.0.1 would otherwise read and write this machine's index from a
  browser). A rebinding page always reaches the server through a *name*, so IP literals are always allowed;
  names are allowed when they are `localhost`, the `--host` given, this machine's own name on a wildcard
  `--host`, or in `--allowed_hosts` (`*` turns the check off). Starlette's TrustedHostMiddleware answers in
  plain text and allows no IP literals, so this is a few lines by hand.
- `KeyCheck` answers a write without the right key with 401/403 before its body is read, so a client without
  the key learns nothing from the body's parsing (400, 413).
- `deadline_protocol` closes a connection whose request (headers and body) has not fully arrived within
  `seconds`: uvicorn bounds idle keep-alive connections but not a request sent a byte at a time.

Every refusal is JSON `{"detail": "one line"}`, like the app's own errors.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

LOOPBACK_NAMES = ("localhost",)
WILDCARDS = ("", "0.0.0.0", "::")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def allowed_host_names(host: str, extra: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The host names (lower case) a Host header may carry for a server listening on `host`; `*` allows any."""
    names = {*LOOPBACK_NAMES, *(name.strip().lower() for name in extra if name.strip())}
    if host in WILDCARDS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    elif not is_ip(host):
        names.add(host.lower())
    return names


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def host_name(header: str) -> str:
    """The host of a Host header, without its port: `[::1]:8000` -> `::1`, `Example.org:80` -> `example.org`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: a request whose Host is not allowed (see the module docstring) gets a JSON 400."""

    def __init__(self, app: ASGIApp, allowed: set[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            name = host_name(Headers(scope=scope).get("host", ""))
            if not is_ip(name) and name not in self.allowed:
                detail = (f"the Host header {name!r} is not a name of this server; if it is, start the server "
                          f"with --allowed_hosts {name or 'NAME'}")
                return await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
        await self.app(scope, receive, send)


class KeyCheck:
    """ASGI middleware: a write (POST/PUT/PATCH/DELETE under `prefix`) needs `Authorization: Bearer <api_key>`;
    without it 401, with another key 403, answered before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/documents") -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8")
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in WRITE_METHODS and scope["path"].startswith(self.prefix):
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                response = JSONResponse({"detail": "writes need an API key: send the header Authorization: Bearer "
                                         "KEY"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
            if not hmac.compare_digest(given.strip().encode("utf-8"), self.api_key):
                return await JSONResponse({"detail": "wrong API key"}, status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


def deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, or h11 without it) that closes a connection when a request has not
    fully arrived `seconds` after the connection opened or the previous response was sent."""

    class DeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        timer: asyncio.TimerHandle | None = None
        waiting_after: Any = None  # the request cycle that was current when the clock started

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.start_clock()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if self.timer is not None and cycle is not None and cycle is not self.waiting_after and not cycle.more_body:
                self.stop_clock()  # the whole request is in: the app may take as long as it needs

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.start_clock()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_clock()
            super().connection_lost(exc)

        def start_clock(self) -> None:
            self.stop_clock()
            self.waiting_after = getattr(self, "cycle", None)
            self.timer = asyncio.get_running_loop().call_later(seconds, self.too_slow)

        def stop_clock(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def too_slow(self) -> None:
            self.timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return DeadlineProtocol
