"""The serving router: one address in front of the replicas, balancing every request.

`RouterServer` accepts what a replica accepts (TF Serving's gRPC
`PredictionService` and `ModelService`, the REST predict and model paths)
and forwards each request, unparsed, to the replica a `routing.Router`
chooses (`round_robin`, `least_loaded`, `consistent_hash` or
`power_of_two`, with outlier ejection). gRPC requests travel as raw bytes,
so the router never imports TensorFlow and adds one hop of copying only.

- **Affinity key** (`consistent_hash`): the call metadata (or HTTP header)
  `tfscale-route-key` when a client sends one, else a hash of the request
  body, so the same request goes to the same replica (its caches).
- **Failures**: a replica that cannot be reached (UNAVAILABLE, connection
  refused), or that cancelled a call the client did not (a replica stopped
  without a grace period), is marked down at once and the request is
  retried on another (`retries` times); so is a full queue (RESOURCE_EXHAUSTED), without
  marking anyone down. A health thread checks every replica's readiness
  (`grpc.health.v1`, service `readiness`) each `health_interval_s` and marks
  replicas down and back up; a replica that drains (a rolling reload, a
  shutdown) leaves the rotation before it stops.
- **Errors** that are the client's (INVALID_ARGUMENT, NOT_FOUND, ...) pass
  through with the replica's message; INTERNAL and UNKNOWN count as the
  replica's errors for outlier ejection.
- **Rolling reload**: `reload()` (the admin call `Reload`, `tfscale-serve
  reload`) asks the replicas to load the newest model one at a time; each
  keeps answering with its old model until the new one is warm. With
  `watch_interval_s`, the router polls the replicas' `latest_version` and
  rolls a newer checkpoint over by itself.
- **Health and metrics**: the router's own `grpc.health.v1` (SERVING while
  one replica is up), `/healthz`, `/readyz`, and `/metrics`: the router's
  counters and every replica's, each sample labelled `replica="NAME"`.

Example:

```python
router = RouterServer(RouterOptions(policy="least_loaded")).start()
router.add_replica("replica-0", "127.0.0.1:40001")
router.add_replica("replica-1", "127.0.0.1:40002")
print(router.target)  # clients talk to this address
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import http.server
import json
import logging
import threading
import time
from typing import Any
from typing import Callable
from typing import Optional

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc

from tfscale.data.dispatcher import auth
from tfscale.serve import admin
from tfscale.serve import metrics as metrics_lib
from tfscale.serve import replicas as replicas_lib
from tfscale.serve import routing
from tfscale.serve import transport

__all__ = [
    "ROUTE_KEY",
    "RouterOptions",
    "RouterServer",
]

ROUTE_KEY = "tfscale-route-key"
_FORWARDED_SERVICES = (
    "/tensorflow.serving.PredictionService/",
    "/tensorflow.serving.ModelService/",
)
# Codes that are the replica's fault (outlier detection counts them).
_REPLICA_ERRORS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Codes after which another replica is tried.
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# Metadata a proxy must not copy onto its own call.
_HOP_BY_HOP = ("user-agent", "content-type", "te", "grpc-", ":")
_RELOAD_TIMEOUT_S = 900.0


@dataclasses.dataclass(frozen=True)
class RouterOptions:
    """How the router listens and balances.

    Attributes:
      host: interface to bind; loopback by default.
      port: gRPC port; 0 picks a free one.
      rest_port: REST port; 0 picks a free one, None serves no REST.
      policy: one of `routing.POLICIES`.
      outlier: outlier ejection thresholds; default `replicas.OutlierOptions()`.
      retries: other replicas tried after an unreachable or full one.
      health_interval_s: seconds between readiness checks of every replica.
      watch_interval_s: seconds between checks for a newer model version
        (0: never; reload by hand).
      max_request_bytes: largest request accepted.
      max_threads: gRPC handler threads (requests in flight).
      auth_token: clients must send it; it is passed on to the replicas.
      tls_cert_file: PEM certificate chain; with `tls_key_file`, serve TLS.
      tls_key_file: PEM private key.
      replica_tls_root_cert_file: PEM root certificate to reach the replicas
        over TLS (replicas on other hosts); None talks plain gRPC.
    """

    host: str = "127.0.0.1"
    port: int = 0
    rest_port: Optional[int] = 0
    policy: str = "least_loaded"
    outlier: Optional[replicas_lib.OutlierOptions] = None
    retries: int = 2
    health_interval_s: float = 1.0
    watch_interval_s: float = 0.0
    max_request_bytes: int = 64 << 20
    max_threads: int = 128
    auth_token: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    replica_tls_root_cert_file: Optional[str] = None

    def __post_init__(self):
        if self.policy not in routing.POLICIES:
            raise ValueError(
                f"policy must be one of {routing.POLICIES}. Received: policy={self.policy!r}"
            )
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0. Received: retries={self.retries!r}")
        for name in ("health_interval_s", "watch_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{name} must be a number >= 0. Received: {name}={value!r}")


@dataclasses.dataclass
class _Backend:
    name: str
    target: str
    rest_target: Optional[str]
    channel: grpc.Channel
    health: Any  # health_pb2_grpc.HealthStub


class RouterServer:
    """Forwards requests to replicas; see the module docstring.

    Args:
      options: `RouterOptions`.
    """

    def __init__(self, options: Optional[RouterOptions] = None):
        self._options = options or RouterOptions()
        self._router = routing.Router(policy=self._options.policy, options=self._options.outlier)
        self._backends: dict[str, _Backend] = {}
        self._backends_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._server: Optional[grpc.Server] = None
        self._rest: Optional[http.server.ThreadingHTTPServer] = None
        self._port = 0
        self._rest_port = 0
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._health = health.HealthServicer()
        self.metrics = metrics_lib.Registry()
        self._define_metrics()
        self._keyed = self._options.policy == "consistent_hash"

    # ------------------------------------------------------------------ replicas

    @property
    def router(self) -> routing.Router:
        return self._router

    @property
    def target(self) -> str:
        return f"{self._options.host}:{self._port}"

    @property
    def rest_target(self) -> Optional[str]:
        return None if self._rest is None else f"{self._options.host}:{self._rest_port}"

    def add_replica(self, name: str, target: str, rest_target: Optional[str] = None) -> None:
        """Adds (or replaces) a replica; it takes requests at once.

        Args:
          name: the replica's name in metrics and status.
          target: its gRPC HOST:PORT.
          rest_target: its REST HOST:PORT; None asks the replica (`Status`),
            keeping `target`'s host.
        """
        channel = self._channel(target)
        if rest_target is None:
            status = admin.call(channel, "Status", timeout_s=10.0, metadata=self._metadata())
            rest = status.get("rest_target")
            rest_target = (
                None if not rest else f"{target.rsplit(':', 1)[0]}:{rest.rsplit(':', 1)[1]}"
            )
        backend = _Backend(name, target, rest_target, channel, health_pb2_grpc.HealthStub(channel))
        with self._backends_lock:
            old = self._backends.get(name)
            self._backends[name] = backend
        if name in self._router.replicas.names:
            self._router.mark_up(name)
        else:
            self._router.add(name)
        if old is not None and old.channel is not channel:
            old.channel.close()
        self._update_health()

    def remove_replica(self, name: str) -> None:
        """Removes a replica; requests in flight to it finish."""
        with self._backends_lock:
            backend = self._backends.pop(name, None)
        if backend is not None:
            self._router.remove(name)
            backend.channel.close()
        self._update_health()

    def mark_down(self, name: str) -> None:
        """No request goes to `name` until it is marked up (its process died)."""
        if name in self._router.replicas.names:
            self._router.mark_down(name)
            self._update_health()

    def status(self) -> dict[str, Any]:
        """The policy and every replica's routing state."""
        with self._backends_lock:
            backends = dict(self._backends)
        replicas = []
        for stats in self._router.status():
            backend = backends.get(stats.name)
            replicas.append(
                {
                    "name": stats.name,
                    "target": backend.target if backend else None,
                    "rest_target": backend.rest_target if backend else None,
                    "health": str(stats.health),
                    "outstanding": stats.outstanding,
                    "latency_ms": None if stats.latency_s is None else stats.latency_s * 1e3,
                    "requests": stats.requests,
                    "errors": stats.errors,
                    "ejections": stats.ejections,
                }
            )
        return {"policy": self._options.policy, "target": self.target, "replicas": replicas}

    # ------------------------------------------------------------------ life cycle

    def start(self) -> RouterServer:
        """Listens on gRPC (and REST) and starts the health and watch threads; returns self.

        Raises:
          OSError: an address cannot be bound, or a TLS file read.
          ValueError: a TLS certificate without its key, or the reverse.
        """
        options = self._options
        server = transport.grpc_server(
            options.max_threads, options.max_request_bytes, options.auth_token
        )
        server.add_generic_rpc_handlers(
            (
                _Forward(self._forward),
                admin.handler(
                    {"Status": lambda _: self.status(), "Reload": lambda _: self.reload()}
                ),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self._port = transport.listen(
            server,
            options.host,
            options.port,
            tls_cert_file=options.tls_cert_file,
            tls_key_file=options.tls_key_file,
            what="router",
        )
        server.start()
        self._server = server
        if options.rest_port is not None:
            router = self

            class Handler(_RestProxy):
                proxy = router

            self._rest = transport.serve_http(
                options.host, options.rest_port, Handler, "router-rest"
            )
            self._rest_port = self._rest.server_address[1]
        self._spawn(self._health_loop, "router-health")
        if options.watch_interval_s:
            self._spawn(self._watch_loop, "router-watch")
        self._update_health()
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Stops listening; requests in flight get `grace_s`."""
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._rest is not None:
            self._rest.shutdown()
            self._rest.server_close()
            self._rest = None
        for thread in self._threads:
            thread.join(timeout=5.0)
        with self._backends_lock:
            for backend in self._backends.values():
                backend.channel.close()

    def wait(self) -> None:
        """Blocks until `stop`."""
        self._stopped.wait()

    def reload(self) -> dict[str, Any]:
        """Rolls the newest model over the replicas, one at a time.

        Returns:
          `{"replicas": {name: the replica's answer or {"error": ...}}}`.
        """
        with self._reload_lock:
            with self._backends_lock:
                backends = list(self._backends.values())
            results: dict[str, Any] = {}
            for backend in backends:
                try:
                    results[backend.name] = admin.call(
                        backend.channel,
                        "Reload",
                        timeout_s=_RELOAD_TIMEOUT_S,
                        metadata=self._metadata(),
                    )
                except grpc.RpcError as e:
                    results[backend.name] = {"error": f"{e.code().name}: {e.details()}"}
                    logging.warning("Reload of %s failed: %s", backend.name, e.details())
            self._reloads.inc()
            return {"replicas": results}

    # ------------------------------------------------------------------ forwarding

    def _route_call(
        self,
        send: Callable[[_Backend], Any],
        key: Optional[str],
        api: str,
    ) -> Any:
        """Runs `send(backend)` on routed replicas until one answers; returns its result.

        `send` raises `_Unreachable` for a replica that cannot be reached,
        `_Answered(code, ...)` for a replica's error answer.
        """
        started = time.monotonic()
        attempts = self._options.retries + 1
        for attempt in range(attempts):
            try:
                ticket = self._router.route(key)
            except replicas_lib.NoReplicaAvailable as e:
                self._count(api, "UNAVAILABLE", None, started)
                raise _Answered(grpc.StatusCode.UNAVAILABLE, str(e)) from None
            name = ticket.replica
            backend = self._backends.get(name)
            call_started = time.monotonic()
            try:
                if backend is None:
                    raise _Unreachable(f"replica {name} was removed")
                result = send(backend)
            except _Unreachable as e:
                self._router.finish(ticket, time.monotonic() - call_started, ok=False)
                self.mark_down(name)
                logging.warning("Replica %s is unreachable (%s); marked down", name, e)
                if attempt + 1 < attempts:
                    self._retries.inc()
                    continue
                self._count(api, "UNAVAILABLE", name, started)
                raise _Answered(grpc.StatusCode.UNAVAILABLE, f"replica {name}: {e}") from None
            except _Answered as e:
                ok = e.code not in _REPLICA_ERRORS
                self._router.finish(ticket, time.monotonic() - call_started, ok=ok)
                if e.code in _RETRIED and attempt + 1 < attempts:
                    self._retries.inc()
                    continue
                self._count(api, e.code.name, name, started)
                raise
            self._router.finish(ticket, time.monotonic() - call_started, ok=True)
            self._count(api, "OK", name, started)
            return result
        raise AssertionError("unreachable")

    def _forward(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = tuple(
            (k, v) for k, v in context.invocation_metadata() if not k.startswith(_HOP_BY_HOP)
        )
        key = dict(metadata).get(ROUTE_KEY)
        if key is None and self._keyed:
            key = hashlib.blake2b(request, digest_size=8).hexdigest()
        timeout = transport.time_left(context)

        def send(backend: _Backend) -> tuple[bytes, tuple]:
            stub = backend.channel.unary_unary(method)
            try:
                response, call = stub.with_call(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and _unreachable(e.details() or ""):
                    raise _Unreachable(e.details()) from None
                if code == grpc.StatusCode.CANCELLED and context.is_active():
                    # The replica cancelled it (a server stopped without grace), not
                    # the client: the call did not complete there, so another answers.
                    raise _Unreachable(f"cancelled by the replica: {e.details()}") from None
                raise _Answered(code, e.details() or "", e.trailing_metadata() or ()) from None
            return response, call.trailing_metadata() or ()

        try:
            response, trailing = self._route_call(send, key, "grpc")
        except _Answered as e:
            context.set_trailing_metadata(tuple(e.trailing))
            context.abort(e.code, e.message)
        context.set_trailing_metadata(tuple(trailing))
        return response

    def _rest_forward(
        self, method: str, path: str, body: Optional[bytes], headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        key = headers.get(ROUTE_KEY)
        if key is None and self._keyed and body:
            key = hashlib.blake2b(body, digest_size=8).hexdigest()

        def send(backend: _Backend) -> tuple[int, bytes, dict[str, str]]:
            if backend.rest_target is None:
                raise _Unreachable(f"replica {backend.name} serves no REST")
            host, port = backend.rest_target.rsplit(":", 1)
            connection = http.client.HTTPConnection(host, int(port), timeout=300)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (ConnectionError, OSError) as e:
                raise _Unreachable(str(e)) from None
            finally:
                connection.close()
            out = {k: v for k, v in response.getheaders() if k.lower().startswith("tfscale-")}
            code = _GRPC_OF_HTTP.get(response.status, grpc.StatusCode.UNKNOWN)
            if response.status != 200:
                raise _Answered(code, "", (), http=(response.status, data, out))
            return response.status, data, out

        try:
            return self._route_call(send, key, "rest")
        except _Answered as e:
            if e.http is not None:
                return e.http
            return (
                transport.HTTP_STATUS.get(e.code, 500),
                json.dumps({"error": e.message}).encode(),
                {},
            )

    # ------------------------------------------------------------------ internals

    def _channel(self, target: str) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", self._options.max_request_bytes),
            ("grpc.max_send_message_length", self._options.max_request_bytes),
        ]
        root = self._options.replica_tls_root_cert_file
        if root:
            with open(root, "rb") as f:
                credentials = grpc.ssl_channel_credentials(f.read())
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def _metadata(self) -> tuple:
        return auth.call_metadata(self._options.auth_token)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _define_metrics(self) -> None:
        m = self.metrics
        self._requests = m.counter(
            "tfscale_router_requests_total",
            "Requests answered by the router, by API, status and replica.",
            ("api", "code", "replica"),
        )
        self._latency = m.histogram(
            "tfscale_router_request_latency_seconds", "Request latency at the router.", ("api",)
        )
        self._retries = m.counter(
            "tfscale_router_retries_total", "Requests sent to another replica."
        )
        self._reloads = m.counter("tfscale_router_reloads_total", "Rolling reloads run.")
        up = m.gauge("tfscale_router_replicas_up", "Replicas that take requests.")
        up.set_function(lambda: float(len(self._router.replicas.candidates())))

    def _count(self, api: str, code: str, replica: Optional[str], started: float) -> None:
        self._requests.labels(api=api, code=code, replica=replica or "").inc()
        self._latency.labels(api=api).observe(time.monotonic() - started)

    def _update_health(self) -> None:
        serving = bool(self._router.replicas.candidates())
        status = health_pb2.HealthCheckResponse
        self._health.set("", status.SERVING if serving else status.NOT_SERVING)
        self._health.set("readiness", status.SERVING if serving else status.NOT_SERVING)
        self._health.set("liveness", status.SERVING)

    def ready(self) -> bool:
        """Whether a replica can take a request."""
        return bool(self._router.replicas.candidates())

    def scrape(self) -> str:
        """The router's metrics, then every reachable replica's, labelled `replica="NAME"`."""
        with self._backends_lock:
            backends = [b for b in self._backends.values() if b.rest_target]
        texts = {}
        for backend in backends:
            host, port = backend.rest_target.rsplit(":", 1)
            connection = http.client.HTTPConnection(host, int(port), timeout=2.0)
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                if response.status == 200:
                    texts[backend.name] = response.read().decode()
            except OSError:
                continue  # a replica down: its samples are missing from this scrape
            finally:
                connection.close()
        return self.metrics.render() + _labelled(texts, "replica")

    def _health_loop(self) -> None:
        request = health_pb2.HealthCheckRequest(service="readiness")
        while not self._stopped.wait(self._options.health_interval_s):
            with self._backends_lock:
                backends = list(self._backends.values())
            states = {s.name: s.health for s in self._router.status()}
            for backend in backends:
                try:
                    answer = backend.health.Check(request, timeout=1.0)
                    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    serving = False
                down = states.get(backend.name) == replicas_lib.Health.DOWN
                if serving and down:
                    logging.info("Replica %s is ready again", backend.name)
                    self._router.mark_up(backend.name)
                elif not serving and not down:
                    logging.warning("Replica %s is not ready; marked down", backend.name)
                    self._router.mark_down(backend.name)
            self._update_health()

    def _watch_loop(self) -> None:
        while not self._stopped.wait(self._options.watch_interval_s):
            with self._backends_lock:
                backends = list(self._backends.values())
            behind = False
            for backend in backends:
                try:
                    status = admin.call(
                        backend.channel, "Status", timeout_s=5.0, metadata=self._metadata()
                    )
                except grpc.RpcError:
                    continue
                latest, version = status.get("latest_version"), status.get("version")
                if latest is not None and version is not None and latest > version:
                    behind = True
            if behind:
                logging.info("A newer model version is there; rolling it over the replicas")
                self.reload()


def _labelled(texts: dict[str, str], label: str) -> str:
    """Exposition texts of several processes as one: each family once, samples labelled."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for value, text in texts.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        family = None
        for line in text.split("\n"):  # a label value may hold other line breaks
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split(maxsplit=3)[2]
                if line not in headers.setdefault(family, []):
                    headers[family].append(line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#") and family is not None:
                brace, space = line.find("{"), line.find(" ")
                if brace != -1 and brace < space:
                    line = f'{line[: brace + 1]}{label}="{escaped}",{line[brace + 1 :]}'
                else:
                    line = f'{line[:space]}{{{label}="{escaped}"}}{line[space:]}'
                samples[family].append(line)
    lines = [line for family in headers for line in headers[family] + samples[family]]
    return "".join(f"{line}\n" for line in lines)


class _Unreachable(Exception):
    """The replica could not be reached (the request did not run there)."""


class _Answered(Exception):
    """The replica (or the router) answered with an error status."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing=(), http=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = trailing
        self.http = http


def _unreachable(details: str) -> bool:
    """Whether an UNAVAILABLE status says the request never reached the replica."""
    details = details.lower()
    return any(
        s in details
        for s in ("connection refused", "failed to connect", "connect failed", "socket closed")
    )


class _Forward(grpc.GenericRpcHandler):
    """Serves every method of the forwarded services as bytes in, bytes out."""

    def __init__(self, forward: Callable[[str, bytes, grpc.ServicerContext], bytes]):
        self._forward = forward

    def service(self, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(_FORWARDED_SERVICES):
            return None
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self._forward(method, request, context)
        )


_GRPC_OF_HTTP = {v: k for k, v in transport.HTTP_STATUS.items()}


class _RestProxy(transport.JsonHandler):
    """Forwards TF Serving's REST paths; answers `/metrics`, `/healthz`, `/readyz` itself."""

    proxy: RouterServer

    def do_GET(self):  # noqa: N802
        if self.path == "/metrics":
            return self.send(200, self.proxy.scrape().encode(), metrics_lib.CONTENT_TYPE)
        if self.path == "/healthz":
            return self.send(200, b"ok\n", "text/plain")
        if self.path == "/readyz":
            ready = self.proxy.ready()
            return self.send(200 if ready else 503, b"ok\n" if ready else b"no replica\n")
        self._relay("GET", None)

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.proxy._options.max_request_bytes:
            self.close_connection = True
            return self.send_error_json(
                400,
                f"The body may have at most {self.proxy._options.max_request_bytes} bytes. "
                f"Received: {length}",
            )
        self._relay("POST", self.rfile.read(length))

    def _relay(self, method: str, body: Optional[bytes]) -> None:
        token = self.proxy._options.auth_token
        if token and not auth.presents(token, self.headers.get(auth.AUTH_METADATA_KEY)):
            return self.send_error_json(401, "missing or wrong auth token")
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower()
            in ("content-type", auth.AUTH_METADATA_KEY, ROUTE_KEY, transport.TIMEOUT_HEADER)
        }
        status, data, extra = self.proxy._rest_forward(method, self.path, body, headers)
        self.send(status, data, headers=extra)
