"""Token authentication and TLS of tfscale's gRPC servers: the call metadata, its check, the token file, the server credentials.

A dispatcher started with a token accepts only calls whose metadata carries
`authorization: Bearer <token>` (`TokenAuth`, a server interceptor); a client
sends that with every call (`call_metadata`). Both sides may read the token
from a file (`read_token_file`), which should be readable by its owner only.

Example:

```python
token = read_token_file("/secrets/dispatcher.token")
server = grpc.server(executor, interceptors=[TokenAuth(token)])
stub.Status(pb.StatusRequest(), metadata=call_metadata(token))
```
"""

from __future__ import annotations

import hmac
import os
from typing import Any
from typing import Callable
from typing import Optional

import grpc
from absl import logging

__all__ = [
    "AUTH_METADATA_KEY",
    "Metadata",
    "TokenAuth",
    "call_metadata",
    "presents",
    "read_token_file",
    "server_credentials",
]

Metadata = tuple[tuple[str, str], ...]

AUTH_METADATA_KEY = "authorization"


def call_metadata(token: Optional[str]) -> Metadata:
    """The metadata that presents `token` with a call (none for no token)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


def read_token_file(path: Optional[str]) -> Optional[str]:
    """The token stored in `path` (None for no path); warns if others can read the file.

    Raises:
      OSError: the file cannot be read.
      ValueError: the file is empty.
    """
    if not path:
        return None
    with open(path) as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        token = f.read().strip()
    if mode & 0o044:
        logging.warning(
            "The auth token file %s is readable by its group or others (mode %03o); "
            "run `chmod 600 %s`.",
            path,
            mode,
            path,
        )
    if not token:
        raise ValueError(f"The auth token file {path} is empty")
    return token


def presents(token: str, authorization: Any) -> bool:
    """Whether an `authorization` value (str or bytes, None if absent) presents `token`.

    Compared in constant time, so that response times do not reveal the
    token byte by byte.
    """
    if authorization is None:
        authorization = b""
    if isinstance(authorization, str):
        authorization = authorization.encode()
    return hmac.compare_digest(authorization, f"Bearer {token}".encode())


def server_credentials(
    tls_cert_file: Optional[str], tls_key_file: Optional[str]
) -> Optional[grpc.ServerCredentials]:
    """TLS credentials from a PEM certificate chain and key; None without both.

    Raises:
      ValueError: one of the two files is given without the other.
      OSError: a file cannot be read.
    """
    if bool(tls_cert_file) != bool(tls_key_file):
        raise ValueError(
            f"TLS needs both a certificate and a key. Received: tls_cert_file={tls_cert_file!r}, "
            f"tls_key_file={tls_key_file!r}"
        )
    if not tls_cert_file:
        return None
    with open(tls_cert_file, "rb") as c, open(tls_key_file, "rb") as k:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


class TokenAuth(grpc.ServerInterceptor):
    """Rejects every call without `authorization: Bearer <token>` as UNAUTHENTICATED.

    Args:
      token: the token calls must present.
      exempt: method name prefixes that need no token, e.g.
        `("/grpc.health.v1.Health/",)` for health probes.
    """

    def __init__(self, token: str, exempt: tuple[str, ...] = ()):
        self._token = token
        self._exempt = tuple(exempt)

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        if self._exempt and details.method.startswith(self._exempt):
            return continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if not presents(self._token, metadata.get(AUTH_METADATA_KEY)):
            return self._deny
        return continuation(details)
