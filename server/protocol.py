"""Below the ASGI app: the listening socket and the HTTP/1.1 protocol uvicorn runs for `loopgpt serve`.

- The socket is bound before the model loads, so a taken port is one sentence and exit 2, not a load followed by
  uvicorn's `[Errno 98]` and a torch thread's abort.
- uvicorn times out idle keep-alive connections but not a request's headers: a client sending them at a byte a
  second holds its connection forever (slowloris). Here a request's line and headers must arrive within
  `--header-timeout` seconds of the connection opening (or of the previous response), and within MAX_HEADER_BYTES;
  otherwise the answer is 408 (or 431) and the connection closes. A reverse proxy in front (nginx's
  `client_header_timeout`, an ingress) bounds this before the request reaches us; this bound holds without one.
- uvicorn's httptools protocol frames every body of unknown length as chunked, which HTTP/1.0 does not have.
  A streamed response to an HTTP/1.0 request is sent close-delimited instead (RFC 9112 section 6.3: the body ends
  when the connection closes), with one `connection: close` header. (uvicorn's h11 protocol already does this.)

    python -m pytest tests/test_server_reliability.py -q
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

log = logging.getLogger("loopgpt.server")
MAX_HEADER_BYTES = 64 << 10  # request line and headers; nginx's default large_client_header_buffers is 4 x 8k
REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class ListenError(ValueError):
    """The address cannot be bound; the message says what to change."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds one), for uvicorn to listen on."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    return sock


class CloseDelimitedCycle(RequestResponseCycle):
    """httptools' request cycle for an HTTP/1.0 request: a body of unknown length ends with the connection."""

    close_delimited = False

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            # The connection is the server's to manage: an app's `connection: keep-alive` (sse-starlette sends one)
            # beside the `connection: close` of HTTP/1.0 would be two answers to one question.
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": headers}
            sized = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in headers)
            if not sized and self.scope["method"] != "HEAD" and message["status"] not in (204, 304):
                self.close_delimited, self.chunked_encoding = True, False
        elif message["type"] == "http.response.body" and self.close_delimited:
            self.expected_content_length = len(message.get("body", b""))  # each piece is exactly its own size
        await super().send(message)


class GuardedHTTP(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol with a deadline and a size limit on each request's headers."""

    header_timeout = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._header_timer = None
        self._await_headers()

    def _await_headers(self) -> None:
        """From now on, a request's headers must be complete within header_timeout; a new cycle means they were."""
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._before, self._header_bytes = self.cycle, 0
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _waiting(self) -> bool:
        """No request is running and the next one's headers are not complete yet."""
        return self.cycle is self._before and (self.cycle is None or self.cycle.response_complete)

    def _headers_late(self) -> None:
        if self._waiting() and not self.transport.is_closing():
            self._refuse(408, f"the request's headers did not arrive within {self.header_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        log.debug("closing %s: %s", self.client, message)
        error = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                           "code": "request_timeout" if status == 408 else "headers_too_large"}}
        body = json.dumps(error).encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, REASONS[status], len(body), body))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        waiting = self._waiting()
        super().data_received(data)
        if waiting and self._waiting() and not self.transport.is_closing():  # still no complete headers
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, f"the request's line and headers exceed {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if type(cycle) is RequestResponseCycle and cycle.scope.get("http_version") == "1.0":
            cycle.__class__ = CloseDelimitedCycle  # before its task first runs (it was only created)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


if AutoHTTPProtocol is not HttpToolsProtocol:  # h11: frames HTTP/1.0 itself, and has no on_headers_complete
    del GuardedHTTP.on_headers_complete


def uvicorn_config(app: Any, header_timeout: float, **kw: Any) -> uvicorn.Config:
    """uvicorn's Config with GuardedHTTP (its header deadline set); `kw` are uvicorn.Config's own."""
    protocol = type("GuardedHTTP", (GuardedHTTP,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, http=protocol, **kw)
