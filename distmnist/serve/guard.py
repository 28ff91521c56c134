"""Between the socket and the app: a deadline for each request to arrive, a cap on the connections
served, and uvicorn's own refusals in JSON.

uvicorn waits as long as a client likes for a request's headers and body, serves any number of
connections, and answers what h11 cannot parse (a negative Content-Length, no Host header, headers
over 16 KB) in plain text before the app sees it. This subclass of uvicorn's h11 protocol
(``uvicorn.Config(http=...)``) gives each request ``request_seconds`` from the connection's opening,
or from its first byte on a kept-alive connection, to arrive whole; a client still sending then is
answered 408 and disconnected, one that sent nothing is disconnected. A request on a connection
beyond ``max_connections`` is answered 503. Every answer from here is ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .hosts import send_json


class Connection(h11.Connection):
    """h11's connection, keeping why it refused the client's bytes (uvicorn only says "Invalid HTTP request")."""

    refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as err:
            self.refusal = err
            raise


def raw_json(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response {"error": message} that closes the connection, as bytes for the socket."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def refusal_text(err: h11.RemoteProtocolError | None) -> tuple[int, str]:
    """The status and message for a request h11 could not parse."""
    if err is None:
        return 400, "malformed HTTP request"
    if err.error_status_hint == 431:
        return 431, "request line or headers too long"
    what = str(err).split(": bytearray(")[0]  # h11 quotes the bytes it refused as a Python repr: left out
    return err.error_status_hint, f"malformed HTTP request: {what}"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline per request, a cap on connections and JSON refusals."""

    max_connections = 512  # set by guarded_protocol()
    request_seconds = 10.0
    conn: Connection  # uvicorn's h11 connection, replaced by one that keeps its refusal

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size  # as uvicorn makes its own: None = h11's 16 KB
        self.conn = Connection(h11.SERVER) if size is None else Connection(h11.SERVER, size)
        self.app = self.busy_or(self.app)
        self.deadline: asyncio.TimerHandle | None = None

    def busy_or(self, app: Any) -> Any:
        """The app, or 503 while more than max_connections are open (uvicorn's limit_concurrency, in JSON)."""

        async def within_limit(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and len(self.connections) > self.max_connections:
                await send_json(send, 503, f"busy: over {self.max_connections} connections open; try again",
                                headers={"retry-after": "1", "connection": "close"})
                return
            await app(scope, receive, send)

        return within_limit

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_watching()
        super().connection_lost(exc)

    def watch(self) -> None:
        """Run the deadline while a request is awaited or arriving; stop it once it is all here."""
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            if self.deadline is None:
                self.deadline = self.loop.call_later(self.request_seconds, self.too_slow)
        else:
            self.stop_watching()

    def stop_watching(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def too_slow(self) -> None:
        """The deadline passed with the request not all here: 408 if any of it came, then close."""
        self.deadline = None
        if self.transport.is_closing():
            return
        receiving_body = self.conn.their_state is h11.SEND_BODY and self.cycle is not None
        if receiving_body and self.cycle.response_started:  # answered already (413 unread): only close
            self.cycle.keep_alive = False
            if not self.cycle.response_complete:
                return
        elif receiving_body or self.conn.trailing_data[0]:
            self.transport.write(raw_json(408, f"the request did not arrive within {self.request_seconds:g} s "
                                               "(--request-timeout)"))
            if receiving_body:  # the app waiting for the body hears that the client is gone
                self.cycle.disconnected = True
                self.cycle.message_event.set()
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn when h11 refuses the client's bytes: the refusal in JSON, then close."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # else garbage after an answer: only close
            status, message = refusal_text(self.conn.refusal)
            self.transport.write(raw_json(status, message))
        self.transport.close()


def guarded_protocol(max_connections: int, request_seconds: float) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"max_connections": max_connections, "request_seconds": request_seconds})
