"""`tfscale.serve.Admin`: a replica's and a router's control calls, JSON over gRPC.

The calls are few and their answers are small dicts, so they travel as
JSON bytes through gRPC's generic handlers (no proto to compile): a
server registers `handler({"Status": fn, ...})`, a client calls
`call(channel, "Status")`. Each handler takes the decoded request dict and
returns a JSON-able dict; a `ValueError` it raises answers
INVALID_ARGUMENT with its message.

Example:

```python
server.add_generic_rpc_handlers((handler({"Status": lambda request: {"state": "serving"}}),))
call(grpc.insecure_channel(target), "Status")  # {"state": "serving"}
```
"""

from __future__ import annotations

import json
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Optional

import grpc

__all__ = [
    "SERVICE",
    "call",
    "handler",
]

SERVICE = "tfscale.serve.Admin"
Handler = Callable[[dict[str, Any]], Mapping[str, Any]]


def _decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data.decode() or "{}") if data else {}
    if not isinstance(value, dict):
        raise ValueError(f"An admin request must be a JSON object. Received: {value!r:.80}")
    return value


def _encode(value: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(value)).encode()


def handler(methods: Mapping[str, Handler]) -> grpc.GenericRpcHandler:
    """A generic handler serving `methods` (name -> fn) under `SERVICE`."""

    def wrap(fn: Handler) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def serve(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return _encode(fn(_decode(request)))
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        return serve

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {name: grpc.unary_unary_rpc_method_handler(wrap(fn)) for name, fn in methods.items()},
    )


def call(
    channel: grpc.Channel,
    method: str,
    request: Optional[Mapping[str, Any]] = None,
    *,
    timeout_s: Optional[float] = None,
    metadata: tuple = (),
) -> dict[str, Any]:
    """Calls `SERVICE/method` with a JSON request; returns the decoded answer.

    Raises:
      grpc.RpcError: the call failed (its code and details say why).
    """
    stub = channel.unary_unary(f"/{SERVICE}/{method}")
    return _decode(stub(_encode(request or {}), timeout=timeout_s, metadata=metadata))
