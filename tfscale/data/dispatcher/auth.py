"""Token authentication of dispatcher calls: the call metadata, its check, the token file.

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
    "read_token_file",
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


class TokenAuth(grpc.ServerInterceptor):
    """Rejects every call without `authorization: Bearer <token>` as UNAUTHENTICATED.

    Args:
      token: the token calls must present.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        metadata = dict(details.invocation_metadata or ())
        presented = metadata.get(AUTH_METADATA_KEY, "")
        if isinstance(presented, str):
            presented = presented.encode()
        # In constant time, so that response times do not reveal the token byte by byte.
        if not hmac.compare_digest(presented, self._expected):
            return self._deny
        return continuation(details)
