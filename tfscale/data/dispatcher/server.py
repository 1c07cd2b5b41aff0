"""The dispatcher's gRPC face: servicer, authentication, server lifecycle.

The servicer only translates: requests become `DispatcherCore` calls, and
one context manager, `_status_codes`, maps the core's errors to gRPC status
codes. `DispatcherServer` owns the gRPC server, the core and its journal.

With a journal, each call runs in the journal's `deferred_sync()`: the core
writes its records without waiting for an fsync (and so without holding its
lock through one), and the answer leaves only once everything the call may
have seen is durable. Concurrent calls share fsyncs (group commit).

Example:

```python
config = ServerConfig(work_dir="/tmp/dispatcher")  # port 0: any free port
with server_context(config) as server:
    print(server.target)  # 127.0.0.1:40123
```
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterator, Optional

import grpc

from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import journal as journal_lib
from tfscale.data.dispatcher import wire

__all__ = [
    "AUTH_METADATA_KEY",
    "DispatcherServer",
    "ServerConfig",
    "server_context",
]

AUTH_METADATA_KEY = "authorization"

_CODES = {
    core.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    core.NotFound: grpc.StatusCode.NOT_FOUND,
    core.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    core.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How to run a dispatcher.

    Attributes:
      port: TCP port; 0 picks a free one.
      host: interface to bind; loopback unless told otherwise.
      work_dir: journal and snapshots; `None` keeps state in memory only.
      auth_token: when set, every RPC must carry `authorization: Bearer <token>`.
      tls_cert_file: PEM certificate chain; with `tls_key_file`, serve TLS.
      tls_key_file: PEM private key.
      max_threads: gRPC worker threads.
      expire_interval_s: how often overdue leases are expired in the background.
      fsync: make each journal write durable before answering.
      snapshot_every: journal records between snapshots.
    """

    port: int = 0
    host: str = "127.0.0.1"
    work_dir: Optional[str] = None
    auth_token: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    max_threads: int = 32
    expire_interval_s: float = 0.25
    fsync: bool = True
    snapshot_every: int = 10_000


@contextlib.contextmanager
def _status_codes(context: grpc.ServicerContext) -> Iterator[None]:
    """Maps the core's errors to gRPC status codes (the one place that does)."""
    try:
        yield
    except core.DispatcherError as e:
        context.abort(_CODES[type(e)], str(e))


class _Servicer(pb_grpc.ShardDispatcherServicer):
    def __init__(self, dispatcher: core.DispatcherCore, journal: Optional[journal_lib.Journal]):
        self._core = dispatcher
        self._journal = journal

    @contextlib.contextmanager
    def _serving(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Maps errors to status codes; the answer waits until what the call saw is durable."""
        if self._journal is None:
            durable = contextlib.nullcontext()
        else:
            durable = self._journal.deferred_sync()
        with durable, _status_codes(context):
            yield

    def CreateJob(self, request: pb.CreateJobRequest, context: Any) -> pb.CreateJobResponse:
        with self._serving(context):
            created = self._core.create_job(wire.job_spec_from_proto(request.job))
            return pb.CreateJobResponse(created=created)

    def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        with self._serving(context):
            return pb.ListJobsResponse(jobs=[pb.JobStatus(**j) for j in self._core.jobs()])

    def RegisterWorker(self, request: pb.RegisterWorkerRequest, context: Any) -> pb.RegisterWorkerResponse:
        with self._serving(context):
            joined = self._core.register_worker(request.job, request.worker)
            return pb.RegisterWorkerResponse(
                heartbeat_interval_s=joined.lease_timeout_s / 4,
                lease_timeout_s=joined.lease_timeout_s,
                num_epochs=joined.num_epochs,
                num_consumers=joined.num_consumers,
                equalize=joined.equalize,
            )

    def Rewind(self, request: pb.RewindRequest, context: Any) -> pb.RewindResponse:
        with self._serving(context):
            position = wire.position_from_proto(request)
            self._core.rewind(request.job, request.worker, position)
            return pb.RewindResponse()

    def EpochProgress(
        self, request: pb.EpochProgressRequest, context: Any
    ) -> pb.EpochProgressResponse:
        with self._serving(context):
            progress = self._core.epoch_progress(request.job, request.epoch)
            return pb.EpochProgressResponse(
                finished=progress.finished, floor=progress.floor, ceiling=progress.ceiling
            )

    def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        with self._serving(context):
            revoked = self._core.heartbeat(request.job, request.worker)
            return pb.HeartbeatResponse(revoked_tokens=revoked)

    def Acquire(self, request: pb.AcquireRequest, context: Any) -> pb.AcquireResponse:
        with self._serving(context):
            result = self._core.acquire(request.job, request.worker, request.max_shards)
            return pb.AcquireResponse(
                leases=[wire.lease_to_proto(lease) for lease in result.leases],
                end_of_job=result.end_of_job,
                retry_after_s=result.retry_after_s,
            )

    def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        with self._serving(context):
            self._core.commit(request.job, request.worker, request.token)
            return pb.CommitResponse()

    def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        with self._serving(context):
            self._core.complete(request.job, request.worker, request.token)
            return pb.CompleteResponse()

    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        with self._serving(context):
            self._core.release(request.job, request.worker, request.token)
            return pb.ReleaseResponse()

    def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        with self._serving(context):
            return wire.status_to_proto(self._core.status())


class _TokenAuth(grpc.ServerInterceptor):
    """Rejects every RPC without `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        metadata = dict(details.invocation_metadata or ())
        if metadata.get(AUTH_METADATA_KEY) != self._expected:
            return self._deny
        return continuation(details)


class DispatcherServer:
    """A dispatcher serving over gRPC; `start`, `join` and `stop` are safe to repeat.

    Args:
      config: a `ServerConfig`.
      clock: the core's clock (tests inject one).
    """

    def __init__(self, config: ServerConfig = ServerConfig(), clock: Callable[[], float] = None):
        self._config = config
        self._journal = None
        if config.work_dir:
            self._journal = journal_lib.Journal(
                config.work_dir, fsync=config.fsync, snapshot_every=config.snapshot_every
            )
        kwargs = {"clock": clock} if clock else {}
        self.core = core.DispatcherCore(journal=self._journal, **kwargs)
        self._server: Optional[grpc.Server] = None
        self._port: Optional[int] = None
        self._stopped = threading.Event()
        self._expirer: Optional[threading.Thread] = None

    @property
    def target(self) -> str:
        """`host:port` the server listens on (after `start`)."""
        if self._port is None:
            raise RuntimeError("DispatcherServer.target is known only after start()")
        return f"{self._config.host}:{self._port}"

    def start(self) -> "DispatcherServer":
        if self._server is not None:
            return self
        interceptors = [_TokenAuth(self._config.auth_token)] if self._config.auth_token else []
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=self._config.max_threads),
            interceptors=interceptors,
        )
        pb_grpc.add_ShardDispatcherServicer_to_server(_Servicer(self.core, self._journal), server)
        address = f"{self._config.host}:{self._config.port}"
        credentials = self._credentials()
        if credentials is None:
            self._port = server.add_insecure_port(address)
        else:
            self._port = server.add_secure_port(address, credentials)
        if not self._port:
            raise OSError(f"Could not bind the dispatcher to {address}")
        server.start()
        self._server = server
        self._expirer = threading.Thread(target=self._expire_loop, name="lease-expiry", daemon=True)
        self._expirer.start()
        return self

    def join(self) -> None:
        """Blocks until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def stop(self, grace_s: float = 0.5) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._journal is not None:
            self._journal.close()

    def _credentials(self) -> Optional[grpc.ServerCredentials]:
        cert, key = self._config.tls_cert_file, self._config.tls_key_file
        if bool(cert) != bool(key):
            raise ValueError(
                f"TLS needs both a certificate and a key. Received: tls_cert_file={cert!r}, "
                f"tls_key_file={key!r}"
            )
        if not cert:
            return None
        with open(cert, "rb") as c, open(key, "rb") as k:
            return grpc.ssl_server_credentials([(k.read(), c.read())])

    def _expire_loop(self) -> None:
        while not self._stopped.wait(self._config.expire_interval_s):
            self.core.expire_all()


@contextlib.contextmanager
def server_context(config: ServerConfig = ServerConfig()) -> Iterator[DispatcherServer]:
    """Yields a started server and stops it on exit."""
    server = DispatcherServer(config)
    try:
        yield server.start()
    finally:
        server.stop()
