"""Which Host headers are answered: this machine's own names, the --host bound and each --allowed-host.

A page on another site can point its own host name at 127.0.0.1 (DNS rebinding) and then read this
server's answers from a browser on this machine; its requests still carry that site's name in the
Host header. Starlette's TrustedHostMiddleware refuses them; its plain-text refusal is answered
here in JSON, naming the host and the flag that would allow it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import DistmnistError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # as they appear in a Host header (IPv6 in brackets)


def allowed_hosts(bound: str, extra: Iterable[str]) -> list[str]:
    """The names answered: this machine's, the address bound (--host) and each --allowed-host."""
    return list(dict.fromkeys([*LOCAL_HOSTS, host_name(bound), *map(host_pattern, extra)]))


def host_pattern(name: str) -> str:
    """An --allowed-host: a name or address, *.domain, or * for any; refused with one line otherwise."""
    bare = name.strip("[]")
    if bare == "*" or is_ipv6(bare):
        return host_name(bare)
    rest = bare[2:] if bare.startswith("*.") else bare
    if not rest or any(c in rest for c in "*:/ "):
        raise DistmnistError(f"--allowed-host {name!r}: give a host name or address without port or scheme "
                             "(example.org, 192.168.1.20), *.example.org, or * for any")
    return bare.lower()


def is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def host_name(name: str) -> str:
    """A host name or address as a Host header carries it, without its port: IPv6 in brackets."""
    bare = name.strip("[]")
    return f"[{bare}]" if is_ipv6(bare) else name.lower()


class TrustedHosts:
    """TrustedHostMiddleware, with its refusal in JSON: 400 {"error": "..."} naming the Host sent."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]):
        self.check = TrustedHostMiddleware(app, allowed_hosts=list(hosts), www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.check(scope, receive, send)
            return
        refused = False

        async def answer(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 400 and not is_json(message):
                refused = True  # the middleware's own refusal: the app's 400s are JSON already
                await send_json(send, 400, refusal(scope))
            elif not refused:
                await send(message)

        await self.check(scope, receive, answer)


def is_json(start: Message) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"application/json")
               for name, value in start.get("headers", []))


def refusal(scope: Scope) -> str:
    host = Headers(scope=scope).get("host")
    if host is None:
        return "no Host header: this server answers requests for its own names only"
    return (f"Host {host[:100]!r} is not served here (only this machine's names and those given "
            "to serve with --allowed-host NAME)")


async def send_json(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer {"error": message} through an ASGI send."""
    body = json.dumps({"error": message}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})
