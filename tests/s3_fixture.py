"""An S3-compatible endpoint on 127.0.0.1 for tests: moto's server behind a tiny HTTP proxy that can
answer the next N PUTs with 503 SlowDown (a transient failure the client must retry), or go away for a
window (an outage: every new connection reset as soon as it is accepted, and counted; open ones closed)."""
from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """Forwards every request to `upstream_port`; counts requests; injects 503s on demand."""

    def __init__(self, port: int, upstream_port: int):
        self.port, self.upstream_port = port, upstream_port
        self.open_connections: set[socket.socket] = set()
        self.fail_next_puts = 0
        self.injected = 0
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                with proxy.lock:
                    proxy.open_connections.add(self.connection)

            def finish(self):
                with proxy.lock:
                    proxy.open_connections.discard(self.connection)
                super().finish()

            def _forward(self):
                body = self._read_body()
                if proxy.down.is_set():  # a request on a connection opened before the outage: no answer
                    with proxy.lock:
                        proxy.refused += 1
                    self.close_connection = True
                    return
                with proxy.lock:
                    proxy.requests[self.command] = proxy.requests.get(self.command, 0) + 1
                    fail = self.command == "PUT" and proxy.fail_next_puts > 0
                    if fail:
                        proxy.fail_next_puts -= 1
                        proxy.injected += 1
                if fail:
                    payload = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                drop = ("content-length", "transfer-encoding", "expect")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        class Server(ThreadingHTTPServer):
            def verify_request(self, request, client_address):
                """During an outage: reset the connection at once (SO_LINGER 0: an RST, not a FIN), count it."""
                if not proxy.down.is_set():
                    return True
                with proxy.lock:
                    proxy.refused += 1
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return False

        self.down, self.refused = threading.Event(), 0
        self.server = Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def outage(self, seconds: float) -> threading.Thread:
        """For `seconds`, reset every new connection as it is accepted (counted in `refused`) and close the
        open ones; then serve again. Returns the thread that ends it (join it to wait)."""
        self.down.set()
        with self.lock:
            for conn in list(self.open_connections):
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def end():
            time.sleep(seconds)
            self.down.clear()

        thread = threading.Thread(target=end, daemon=True)
        thread.start()
        return thread

    def stop(self):
        self.server.shutdown()
