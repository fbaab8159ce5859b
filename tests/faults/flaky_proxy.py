"""A loopback HTTP proxy in front of an S3 endpoint (moto) that injects faults.

    proxy = FlakyProxy("http://127.0.0.1:5000").start()
    proxy.fail_every(3, "503")     # every 3rd request answered 503 SlowDown
    proxy.fail_every(4, "reset")   # every 4th request: the connection is reset (TCP RST)
    proxy.down() / proxy.up()      # the endpoint disappears (connection refused), then returns
    proxy.healthy()                # pass everything through again

Requests are parsed (HTTP/1.1, keep-alive, Content-Length or chunked bodies), forwarded one at
a time to the upstream and answered with a Content-Length body, so a fault hits one whole
request and never leaves a half-forwarded one behind. Counters say what happened.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Hop-by-hop headers: they describe one connection, not the message.
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer",
        "upgrade"}
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet: the counters say what happened
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST: "connection reset by peer".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _proxy(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        fault = proxy.next_fault()
        if fault == "reset":
            self._reset()
            return
        if fault == "503":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(_SLOW_DOWN)
            return
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP
                       and k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            for k, v in response.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            # HEAD answers carry the object's length but no body.
            length = response.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(length or 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy

    def setup(self) -> None:
        super().setup()
        self.server.proxy.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # reset by us or by the client
        self.server.proxy.track(self.connection, False)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FlakyProxy"


class FlakyProxy:
    """A fault-injecting proxy on 127.0.0.1 (see the module docstring)."""

    def __init__(self, upstream: str, port: int = 0):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.port = port
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._every, self._kind = 0, ""
        self.requests = self.faults = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults ------------------------------------------------------------------------------
    def fail_every(self, n: int, kind: str) -> None:
        if kind not in ("503", "reset"):
            raise ValueError(f"kind must be '503' or 'reset', got {kind!r}")
        with self._lock:
            self._every, self._kind = n, kind

    def healthy(self) -> None:
        with self._lock:
            self._every, self._kind = 0, ""
        if self._server is None:
            self.up()

    def next_fault(self) -> str:
        with self._lock:
            self.requests += 1
            if self._every and self.requests % self._every == 0:
                self.faults += 1
                return self._kind
            return ""

    def track(self, conn: socket.socket, opened: bool) -> None:
        with self._lock:
            (self._open.add if opened else self._open.discard)(conn)

    # -- the listener --------------------------------------------------------------------------
    def start(self) -> "FlakyProxy":
        self.up()
        return self

    def up(self) -> None:
        """Listen (again) on the same port."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True,
                                        name="flaky-proxy")
        self._thread.start()

    def down(self) -> None:
        """The endpoint disappears: no listener (connection refused) and every open
        connection reset, so pooled keep-alive connections fail too."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.down()
