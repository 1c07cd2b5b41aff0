"""One serving replica: a model behind a dynamic batcher, over gRPC and REST.

`ReplicaServer` serves one `ServableModel` (see `tfscale.serve.model`) with
the APIs that TensorFlow Serving clients speak:

- gRPC `tensorflow.serving.PredictionService` (`Predict`,
  `GetModelMetadata`) and `tensorflow.serving.ModelService`
  (`GetModelStatus`), so a stock TF Serving client works unchanged;
- `grpc.health.v1.Health`: the service `liveness` is SERVING while the
  process answers; `readiness` (and the empty name) is SERVING once the
  model is warmed up and NOT_SERVING while the replica drains;
- REST: `POST /v1/models/NAME[/versions/V]:predict` with `{"instances": ...}`
  or `{"inputs": ...}`, `GET /v1/models/NAME[/metadata]`, `GET /metrics`
  (Prometheus), `GET /healthz` (liveness) and `GET /readyz` (readiness);
- `tfscale.serve.Admin` (JSON over gRPC): `Status` and `Reload`, which the
  router uses to roll a new checkpoint over its replicas.

Requests pass a dynamic batcher (`tfscale.serve.batching`) unless batching
is off. Bad input answers INVALID_ARGUMENT (HTTP 400) naming what was wrong,
an unknown model or version NOT_FOUND (404), a full queue
RESOURCE_EXHAUSTED (429) at once, a request whose deadline passes while
queued DEADLINE_EXCEEDED (504) without being computed; the replica keeps
serving after each.

Every gRPC response carries the trailing metadata `tfscale-queue-ms` and
`tfscale-compute-ms` (time waiting for a batch and time in the model), and
`tfscale-replica` (the replica's name), so a client can tell queueing from
compute; REST responses carry them as headers. A REST request's deadline is
its `tfscale-timeout-s` header (seconds).

Example:

```python
from tfscale.serve import model as model_lib
from tfscale.serve import replica

server = replica.ReplicaServer(
    lambda: model_lib.load("/tmp/tfscale/smoke", name="default"),
    replica.ReplicaOptions(port=0, rest_port=0),
).start()
print(server.target, server.rest_target)  # 127.0.0.1:PORT 127.0.0.1:PORT
server.stop()
```
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import os
import re
import threading
import time
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Optional

import grpc
import numpy as np
import tensorflow as tf
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tfscale.data.dispatcher import auth
from tfscale.serve import admin
from tfscale.serve import batching
from tfscale.serve import metrics as metrics_lib
from tfscale.serve import model as model_lib
from tfscale.serve import tensors
from tfscale.serve import transport

__all__ = [
    "LIVENESS",
    "READINESS",
    "ReplicaOptions",
    "ReplicaServer",
]

LIVENESS = "liveness"
READINESS = "readiness"
QUEUE_MS_KEY = "tfscale-queue-ms"
COMPUTE_MS_KEY = "tfscale-compute-ms"
REPLICA_KEY = "tfscale-replica"
_DEFAULT_MAX_REQUEST_BYTES = 64 << 20
_REST_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_REST_MODEL = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")

Loader = Callable[[], model_lib.ServableModel]


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    """How a replica listens and batches.

    Attributes:
      host: interface to bind; loopback by default.
      port: gRPC port; 0 picks a free one.
      rest_port: REST port; 0 picks a free one, None serves no REST.
      model_name: the name clients ask for.
      name: the replica's name in metrics and response metadata.
      batching: dynamic batching options; None runs each request alone.
      max_request_bytes: largest request accepted (gRPC message or REST body).
      max_threads: gRPC handler threads (concurrent requests in flight).
      auth_token: clients must send it (`authorization: Bearer TOKEN`).
      tls_cert_file: PEM certificate chain; with `tls_key_file`, serve TLS (gRPC).
      tls_key_file: PEM private key.
      slowdown: each batch takes this many times its compute time (the
        replica sleeps the difference): a slow machine, for benchmarks and
        drills of outlier ejection. 1 is normal speed.
    """

    host: str = "127.0.0.1"
    port: int = 0
    rest_port: Optional[int] = 0
    model_name: str = "default"
    name: str = "replica-0"
    batching: Optional[batching.BatchingOptions] = dataclasses.field(
        default_factory=batching.BatchingOptions
    )
    max_request_bytes: int = _DEFAULT_MAX_REQUEST_BYTES
    max_threads: int = 64
    auth_token: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    slowdown: float = 1.0

    def __post_init__(self):
        if not isinstance(self.slowdown, (int, float)) or not 1.0 <= self.slowdown < 1e6:
            raise ValueError(
                f"slowdown must be a number >= 1. Received: slowdown={self.slowdown!r}"
            )


class _Failure(Exception):
    """A request that ends with a status code and one line naming the cause."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class _Served:
    """The model being served and its batcher; replaced as a whole on reload."""

    model: model_lib.ServableModel
    batcher: Optional[batching.DynamicBatcher]


class ReplicaServer:
    """Serves one model over gRPC and REST; see the module docstring.

    Args:
      loader: returns the model to serve; called at `start` and by each
        `reload` (so a reload picks up the newest checkpoint).
      options: `ReplicaOptions`.
    """

    def __init__(self, loader: Loader, options: Optional[ReplicaOptions] = None):
        self._loader = loader
        self._options = options or ReplicaOptions()
        self._served: Optional[_Served] = None
        self._lock = threading.Lock()  # guards _served swaps and reload
        self._reloading = threading.Lock()
        self._server: Optional[grpc.Server] = None
        self._rest: Optional[http.server.ThreadingHTTPServer] = None
        self._port = 0
        self._rest_port = 0
        self._health = health.HealthServicer()
        self._state = "loading"
        self.metrics = metrics_lib.Registry()
        self._define_metrics()

    # ------------------------------------------------------------------ life cycle

    @property
    def target(self) -> str:
        """HOST:PORT of the gRPC server (after `start`)."""
        return f"{self._options.host}:{self._port}"

    @property
    def rest_target(self) -> Optional[str]:
        """HOST:PORT of the REST server, or None without one."""
        return None if self._rest is None else f"{self._options.host}:{self._rest_port}"

    @property
    def model(self) -> model_lib.ServableModel:
        """The model being served."""
        if self._served is None:
            raise RuntimeError("The replica has not loaded its model: call start() first.")
        return self._served.model

    def start(self) -> ReplicaServer:
        """Loads and warms up the model, then listens; returns self.

        Raises:
          model_lib.LoadError: the model cannot be loaded.
          OSError: an address cannot be bound, or a TLS or token file read.
        """
        self._set_health(LIVENESS, True)
        self._set_health(READINESS, False)
        self._served = self._load()
        self._version.set(self._served.model.version)
        self._start_grpc()
        if self._options.rest_port is not None:
            self._start_rest()
        self._state = "serving"
        self._set_health(READINESS, True)
        return self

    def drain(self) -> None:
        """Readiness goes NOT_SERVING; requests keep being answered."""
        self._state = "draining"
        self._set_health(READINESS, False)

    def stop(self, grace_s: float = 1.0) -> None:
        """Stops listening (in-flight requests get `grace_s`) and closes the batcher."""
        self.drain()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._rest is not None:
            self._rest.shutdown()
            self._rest.server_close()
            self._rest = None
        if self._served is not None and self._served.batcher is not None:
            self._served.batcher.close(drain=True)
        self._set_health(LIVENESS, False)

    def reload(self) -> dict[str, Any]:
        """Loads the model again and switches to it once warm; the old one drains.

        Requests keep being answered by the old model while the new one loads
        and warms up; requests already queued on the old batcher finish on it.

        Returns:
          `{"reloaded": bool, "version": int, "previous_version": int}`;
          `reloaded` is False when the loaded version is not newer.
        """
        with self._reloading:
            previous = self.model.version
            served = self._load()
            if served.model.version <= previous:
                if served.batcher is not None:
                    served.batcher.close()
                return {"reloaded": False, "version": previous, "previous_version": previous}
            with self._lock:
                old, self._served = self._served, served
            if old.batcher is not None:
                old.batcher.close(drain=True)  # queued requests finish on the old model
            self._version.set(served.model.version)
            logging.info(
                "Replica %s now serves version %d (was %d)",
                self._options.name,
                served.model.version,
                previous,
            )
            return {
                "reloaded": True,
                "version": served.model.version,
                "previous_version": previous,
            }

    def status(self) -> dict[str, Any]:
        """What the router's `Status` call returns."""
        served = self._served
        latest = None
        if served is not None:
            try:
                latest = model_lib.latest_version(served.model.source)
            except (OSError, ValueError):
                latest = None
        return {
            "name": self._options.name,
            "pid": os.getpid(),
            "state": self._state,
            "model_name": self._options.model_name,
            "version": None if served is None else served.model.version,
            "latest_version": latest,
            "target": self.target,
            "rest_target": self.rest_target,
        }

    # ------------------------------------------------------------------ predict

    def predict(
        self, model_name: str, version: Optional[int], arrays: Mapping[str, np.ndarray], deadline_s
    ) -> tuple[dict[str, np.ndarray], Optional[batching.RequestTiming]]:
        """Runs one request through the batcher; raises `_Failure` with its status."""
        served = self._check_model(model_name, version)
        inputs = _cast(arrays, served.model.signature.inputs)
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        if served.batcher is None:
            start = time.monotonic()
            try:
                outputs = self._run(served.model, inputs)
            except ValueError as e:
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            rows = next(iter(inputs.values())).shape[0]
            run_s = time.monotonic() - start
            self._observe_batch(rows, rows, 0.0, run_s)
            return outputs, batching.RequestTiming(0.0, run_s, rows, rows)
        try:
            future = served.batcher.submit(inputs, deadline=deadline)
        except batching.InvalidRequest as e:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except batching.QueueFull as e:
            raise _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except batching.DeadlineExceeded as e:
            raise _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except batching.BatcherClosed:  # a reload swapped the batcher: the new one takes it
            return self.predict(model_name, version, arrays, deadline_s)
        try:
            outputs = future.result()
        except batching.DeadlineExceeded as e:
            raise _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except ValueError as e:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except Exception as e:  # pylint: disable=broad-except
            logging.exception("The model failed on a batch")
            raise _Failure(grpc.StatusCode.INTERNAL, f"the model failed: {e}") from None
        return outputs, batching.timing(future)

    def _check_model(self, model_name: str, version: Optional[int]) -> _Served:
        with self._lock:
            served = self._served
        if model_name != self._options.model_name:
            raise _Failure(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: model {model_name!r}; this server serves "
                f"{self._options.model_name!r}",
            )
        if version is not None and version != served.model.version:
            raise _Failure(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found: model {model_name!r} version {version}; "
                f"the version served is {served.model.version}",
            )
        return served

    # ------------------------------------------------------------------ internals

    def _load(self) -> _Served:
        servable = self._loader()
        options = self._options.batching
        sizes = options.allowed_batch_sizes if options is not None else (1,)
        started = time.monotonic()
        servable.warm_up(sizes)
        logging.info(
            "Replica %s warmed up %s version %d at batch sizes %s in %.1f s",
            self._options.name,
            servable.name,
            servable.version,
            list(sizes),
            time.monotonic() - started,
        )
        batcher = None
        if options is not None:
            batcher = batching.DynamicBatcher(
                lambda inputs: self._run(servable, inputs),
                options,
                signature=servable.signature.inputs,
                on_batch=self._observe_batch,
            )
        return _Served(servable, batcher)

    def _run(
        self, servable: model_lib.ServableModel, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        started = time.monotonic()
        outputs = servable.predict(inputs)
        if self._options.slowdown > 1.0:
            time.sleep((self._options.slowdown - 1.0) * (time.monotonic() - started))
        return outputs

    def _define_metrics(self) -> None:
        m = self.metrics
        self._requests = m.counter(
            "tfscale_serve_requests_total", "Requests answered, by API and status.", ("api", "code")
        )
        self._latency = m.histogram(
            "tfscale_serve_request_latency_seconds", "Request latency in the replica.", ("api",)
        )
        self._queue_latency = m.histogram(
            "tfscale_serve_queue_latency_seconds", "Time a batch's oldest request waited."
        )
        self._compute_latency = m.histogram(
            "tfscale_serve_compute_latency_seconds", "Time the model took per batch."
        )
        self._batch_size = m.histogram(
            "tfscale_serve_batch_size",
            "Rows per batch before padding.",
            buckets=metrics_lib.BATCH_SIZE_BUCKETS,
        )
        self._padded_rows = m.counter("tfscale_serve_padded_rows_total", "Padding rows computed.")
        queue_depth = m.gauge("tfscale_serve_queue_depth", "Requests waiting for a batch.")
        queue_depth.set_function(self._queue_depth)
        self._version = m.gauge("tfscale_serve_model_version", "Version of the model served.")

    def _queue_depth(self) -> float:
        served = self._served
        if served is None or served.batcher is None:
            return 0.0
        return float(served.batcher.stats().queue_depth)

    def _observe_batch(self, rows: int, padded: int, queue_s: float, run_s: float) -> None:
        self._batch_size.observe(rows)
        self._padded_rows.inc(padded - rows)
        self._queue_latency.observe(queue_s)
        self._compute_latency.observe(run_s)

    def _record(self, api: str, code: grpc.StatusCode, seconds: float) -> None:
        self._requests.labels(api=api, code=code.name).inc()
        self._latency.labels(api=api).observe(seconds)

    def _set_health(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._health.set(service, status)
        if service == READINESS:
            self._health.set("", status)

    def _start_grpc(self) -> None:
        options = self._options
        server = transport.grpc_server(
            options.max_threads, options.max_request_bytes, options.auth_token
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(self), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers(
            (admin.handler({"Status": lambda _: self.status(), "Reload": lambda _: self.reload()}),)
        )
        self._port = transport.listen(
            server,
            options.host,
            options.port,
            tls_cert_file=options.tls_cert_file,
            tls_key_file=options.tls_key_file,
            what="replica",
        )
        server.start()
        self._server = server

    def _start_rest(self) -> None:
        replica = self

        class Handler(_RestHandler):
            server_replica = replica

        self._rest = transport.serve_http(
            self._options.host, self._options.rest_port, Handler, "replica-rest"
        )
        self._rest_port = self._rest.server_address[1]


def _cast(arrays: Mapping[str, np.ndarray], specs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays in their input's dtype where numpy casts within the kind."""
    out = {}
    for name, array in arrays.items():
        spec = specs.get(name)
        if spec is not None and array.dtype != spec[0]:
            if not np.can_cast(array.dtype, spec[0], casting="same_kind"):
                raise _Failure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Input {name!r} must be {spec[0].name}. Received: dtype={array.dtype.name}",
                )
            array = array.astype(spec[0])
        out[name] = array
    return out


def _metadata_response(
    name: str, model: model_lib.ServableModel
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """TF Serving's answer: the `serving_default` SignatureDef, packed in `metadata`."""
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for specs, infos in (
        (model.signature.inputs, signature.inputs),
        (model.signature.outputs, signature.outputs),
    ):
        for key, (dtype, shape) in specs.items():
            info = infos[key]
            info.name = key
            info.dtype = tf.as_dtype(dtype).as_datatype_enum
            info.tensor_shape.dim.add(size=-1)
            for d in shape:
                info.tensor_shape.dim.add(size=-1 if d is None else d)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    signatures.signature_def[model_lib.SIGNATURE_KEY].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = name
    response.model_spec.version.value = model.version
    response.metadata["signature_def"].Pack(signatures)
    return response


def _version_of(model_spec: Any) -> Optional[int]:
    return model_spec.version.value if model_spec.HasField("version") else None


def _check_signature_name(name: str) -> None:
    if name not in ("", model_lib.SIGNATURE_KEY):
        raise _Failure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Unknown signature {name!r}; the model has {model_lib.SIGNATURE_KEY!r}",
        )


def _timing_metadata(replica: str, timing: Optional[batching.RequestTiming]) -> tuple:
    if timing is None:
        return ((REPLICA_KEY, replica),)
    return (
        (REPLICA_KEY, replica),
        (QUEUE_MS_KEY, f"{timing.queue_s * 1e3:.3f}"),
        (COMPUTE_MS_KEY, f"{timing.compute_s * 1e3:.3f}"),
    )


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, replica: ReplicaServer):
        self._replica = replica

    def Predict(self, request, context):  # noqa: N802 (gRPC's name)
        replica, started = self._replica, time.monotonic()
        code = grpc.StatusCode.OK
        try:
            _check_signature_name(request.model_spec.signature_name)
            try:
                arrays = {n: tensors.from_tensor_proto(n, t) for n, t in request.inputs.items()}
            except tensors.TensorError as e:
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            outputs, timing = replica.predict(
                request.model_spec.name,
                _version_of(request.model_spec),
                arrays,
                transport.time_left(context),
            )
            wanted = list(request.output_filter) or list(outputs)
            unknown = sorted(set(wanted) - set(outputs))
            if unknown:
                raise _Failure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output_filter names unknown outputs {unknown}; the model has {sorted(outputs)}",
                )
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = replica.model.version
            response.model_spec.signature_name = model_lib.SIGNATURE_KEY
            for name in wanted:
                response.outputs[name].CopyFrom(tensors.to_tensor_proto(outputs[name]))
            context.set_trailing_metadata(_timing_metadata(replica._options.name, timing))
            return response
        except _Failure as e:
            code = e.code
            context.abort(e.code, str(e))
        finally:
            replica._record("grpc", code, time.monotonic() - started)

    def GetModelMetadata(self, request, context):  # noqa: N802
        try:
            served = self._replica._check_model(
                request.model_spec.name, _version_of(request.model_spec)
            )
            fields = set(request.metadata_field) or {"signature_def"}
            if fields != {"signature_def"}:
                raise _Failure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"metadata_field must be ['signature_def']. Received: {sorted(fields)}",
                )
        except _Failure as e:
            context.abort(e.code, str(e))
        return _metadata_response(request.model_spec.name, served.model)


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, replica: ReplicaServer):
        self._replica = replica

    def GetModelStatus(self, request, context):  # noqa: N802
        try:
            served = self._replica._check_model(
                request.model_spec.name, _version_of(request.model_spec)
            )
        except _Failure as e:
            context.abort(e.code, str(e))
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = served.model.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


class _RestHandler(transport.JsonHandler):
    """TF Serving's REST API, `/metrics`, `/healthz` and `/readyz`."""

    server_replica: ReplicaServer

    def do_GET(self):  # noqa: N802
        replica = self.server_replica
        if self.path == "/metrics":
            return self.send(200, replica.metrics.render().encode(), metrics_lib.CONTENT_TYPE)
        if self.path in ("/healthz", "/readyz"):
            ready = self.path == "/healthz" or replica._state == "serving"
            return self.send(200 if ready else 503, b"ok\n" if ready else b"not ready\n")
        match = _REST_MODEL.match(self.path)
        if not match:
            return self.send_error_json(404, f"No such path: {self.path}")
        name, version, metadata = match.groups()
        try:
            served = replica._check_model(name, None if version is None else int(version))
        except _Failure as e:
            return self.send_error_json(transport.HTTP_STATUS[e.code], str(e))
        if metadata:
            body = {"model_spec": {"name": name, "version": str(served.model.version)}}
            body["metadata"] = {"signature_def": served.model.metadata()["signature_def"]}
        else:
            body = {
                "model_version_status": [
                    {
                        "version": str(served.model.version),
                        "state": "AVAILABLE",
                        "status": {"error_code": "OK", "error_message": ""},
                    }
                ]
            }
        self.send(200, json.dumps(body).encode())

    def do_POST(self):  # noqa: N802
        replica, started = self.server_replica, time.monotonic()
        code = grpc.StatusCode.OK
        try:
            match = _REST_PREDICT.match(self.path)
            if not match:
                raise _Failure(grpc.StatusCode.NOT_FOUND, f"No such path: {self.path}")
            token = replica._options.auth_token
            if token and not auth.presents(token, self.headers.get(auth.AUTH_METADATA_KEY)):
                raise _Failure(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")
            length = int(self.headers.get("Content-Length") or 0)
            if length > replica._options.max_request_bytes:
                raise _Failure(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"The body may have at most {replica._options.max_request_bytes} bytes. "
                    f"Received: {length}",
                )
            body = self.rfile.read(length)
            name, version = match.group(1), match.group(2)
            served = replica._check_model(name, None if version is None else int(version))
            try:
                arrays, form = tensors.parse_rest_predict(body, served.model.signature.inputs)
            except tensors.TensorError as e:
                raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            timeout = self.headers.get(transport.TIMEOUT_HEADER)
            outputs, timing = replica.predict(
                name, None if version is None else int(version), arrays, _float(timeout)
            )
            headers = dict(_timing_metadata(replica._options.name, timing))
            self.send(200, tensors.rest_predict_response(outputs, form), headers=headers)
        except _Failure as e:
            code = e.code
            self.send_error_json(transport.HTTP_STATUS.get(e.code, 500), str(e))
        finally:
            replica._record("rest", code, time.monotonic() - started)


def _float(value: Optional[str]) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None
