"""uvicorn's h11 protocol with a header-read timeout and JSON protocol errors.

uvicorn times out idle keep-alive connections but not a request whose line and headers
arrive a byte at a time, so such clients could hold every connection slot. Here
each request's headers must be complete within `header_timeout` seconds of the connection
opening (or of the previous response); otherwise the server answers 408 and closes. A
request h11 cannot parse (e.g. `Content-Length: abc`) gets a JSON 400 like every other error.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _json_error(status: int, message: str, kind: str) -> tuple[list, bytes]:
    body = json.dumps({"error": message, "type": kind}).encode()
    return [(b"content-type", b"application/json"), (b"connection", b"close"),
            (b"content-length", str(len(body)).encode())], body


def guarded_h11(header_timeout: float) -> type:
    """An H11Protocol class whose requests must send their headers within header_timeout s."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:      # the request line and headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()                                 # the next request on this connection

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE and self.cycle is None or (
                    self.cycle is not None and self.cycle.response_complete):
                try:
                    headers, body = _json_error(408, f"the request headers did not arrive within "
                                                f"{header_timeout} s (dconnx serve --header-timeout)",
                                                "HeaderTimeout")
                    self.transport.write(self.conn.send(h11.Response(status_code=408, headers=headers,
                                                                     reason=b"Request Timeout")))
                    self.transport.write(self.conn.send(h11.Data(data=body)))
                    self.transport.write(self.conn.send(h11.EndOfMessage()))
                except h11.LocalProtocolError:
                    pass
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            headers, body = _json_error(400, f"invalid HTTP request: {msg.rstrip('.')}", "ProtocolError")
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                                 reason=b"Bad Request")))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return GuardedH11Protocol
