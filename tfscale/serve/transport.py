"""What the serving servers (replica and router) share on the wire.

gRPC: `grpc_server` (thread pool, message limits, token auth with health
checks exempt) and `listen` (bind with or without TLS); `time_left` (a
call's deadline). HTTP: `HTTP_STATUS` (gRPC code -> HTTP status, TF
Serving's mapping), `TIMEOUT_HEADER`, and `JsonHandler`, the base of both
REST handlers.

Example:

```python
server = grpc_server(max_threads=64, max_message_bytes=64 << 20, auth_token=None)
port = listen(server, "127.0.0.1", 0, tls_cert_file=None, tls_key_file=None, what="replica")
server.start()
```
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import logging
import threading
from typing import Mapping
from typing import Optional

import grpc

from tfscale.data.dispatcher import auth

__all__ = [
    "HTTP_STATUS",
    "JsonHandler",
    "TIMEOUT_HEADER",
    "grpc_server",
    "listen",
    "serve_http",
    "time_left",
]

# REST: seconds a request may take, queue included (gRPC calls carry their deadline).
TIMEOUT_HEADER = "tfscale-timeout-s"
# Health probes (kubelet's, a load balancer's) carry no token.
_NO_AUTH = ("/grpc.health.v1.Health/",)

# gRPC status -> HTTP status of the REST form.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def grpc_server(max_threads: int, max_message_bytes: int, auth_token: Optional[str]) -> grpc.Server:
    """A gRPC server (not started, no port yet); with a token, every call but
    health checks must present it."""
    return grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_threads),
        interceptors=[auth.TokenAuth(auth_token, exempt=_NO_AUTH)] if auth_token else [],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )


def listen(
    server: grpc.Server,
    host: str,
    port: int,
    *,
    tls_cert_file: Optional[str],
    tls_key_file: Optional[str],
    what: str,
) -> int:
    """Binds `host:port` (TLS with both files); returns the port bound.

    Raises:
      OSError: the address cannot be bound, or a TLS file read.
      ValueError: a certificate without its key, or the reverse.
    """
    credentials = auth.server_credentials(tls_cert_file, tls_key_file)
    address = f"{host}:{port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as e:  # gRPC's "Failed to bind to address"
        raise OSError(f"Could not bind the {what} to {address}: {e}") from None


def serve_http(
    host: str, port: int, handler: type[http.server.BaseHTTPRequestHandler], name: str
) -> http.server.ThreadingHTTPServer:
    """An HTTP server on `host:port` (0: a free port), answering in a daemon thread.

    Stop it with `shutdown()` then `server_close()`.
    """
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def time_left(context: grpc.ServicerContext) -> Optional[float]:
    """A call's time left in seconds; None when it has no deadline.

    gRPC answers a very large number, not None, for a call without a deadline.
    """
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e7 else max(remaining, 0.0)


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 handler answering JSON (`send`, `send_error_json`), logging at debug."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        logging.debug("rest: " + format, *args)

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Answers `status` with `body` and the extra `headers`."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status: int, message: str) -> None:
        """Answers `{"error": message}`, TF Serving's REST error form."""
        self.send(status, json.dumps({"error": message}).encode())
