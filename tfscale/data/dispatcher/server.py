"""The dispatcher's gRPC face: servicer, authentication, server lifecycle.

The servicer only translates: requests become `DispatcherCore` calls, and
one context manager, `_status_codes`, maps every exception to a gRPC status
code (the core's errors to theirs, anything else to INTERNAL: never UNKNOWN).
A request whose bytes do not decode gets INVALID_ARGUMENT, one over
`max_request_bytes` RESOURCE_EXHAUSTED. `DispatcherServer` owns the gRPC
server, the core and its journal, whose work directory it locks: a second
server on the same `work_dir` fails, naming the first.

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
import ipaddress
import threading
from typing import Any
from typing import Callable
from typing import Iterator
from typing import NamedTuple
from typing import Optional

import grpc
from absl import logging

from tfscale.data.dispatcher import auth
from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import journal as journal_lib
from tfscale.data.dispatcher import types
from tfscale.data.dispatcher import wire

__all__ = [
    "DispatcherServer",
    "ServerConfig",
    "server_context",
]

_CODES = {
    types.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    types.NotFound: grpc.StatusCode.NOT_FOUND,
    types.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    types.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    types.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Status details travel in a header, which gRPC clients cap at 8 KiB by default.
_MAX_DETAILS_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How to run a dispatcher.

    Attributes:
      port: TCP port; 0 picks a free one.
      host: interface to bind; loopback unless told otherwise.
      work_dir: journal and snapshots; `None` keeps state in memory only.
      auth_token: when set, every RPC must carry `authorization: Bearer <token>`.
      auth_token_file: a file holding `auth_token` instead (read at start; a
        warning if its group or others can read it).
      tls_cert_file: PEM certificate chain; with `tls_key_file`, serve TLS.
      tls_key_file: PEM private key.
      max_threads: gRPC worker threads.
      expire_interval_s: how often overdue leases are expired in the background.
      fsync: make each journal write durable before answering.
      snapshot_every: journal records between snapshots.
      max_request_bytes: larger requests get RESOURCE_EXHAUSTED.
      restore_grace_s: after a restart, a lease restored from the journal
        lives at least this long (and at least its `lease_timeout_s`), so
        that live workers reconnect before their leases expire; a dead
        worker's shards go to others this long after the restart.
    """

    port: int = 0
    host: str = "127.0.0.1"
    work_dir: Optional[str] = None
    auth_token: Optional[str] = None
    auth_token_file: Optional[str] = None
    tls_cert_file: Optional[str] = None
    tls_key_file: Optional[str] = None
    max_threads: int = 32
    expire_interval_s: float = 0.25
    fsync: bool = True
    snapshot_every: int = 10_000
    max_request_bytes: int = 64 * 2**20
    restore_grace_s: float = core.DEFAULT_RESTORE_GRACE_S


def _details(error: BaseException) -> str:
    """The error's message, cut to what a status header carries."""
    text = str(error) or type(error).__name__
    data = text.encode()
    if len(data) <= _MAX_DETAILS_BYTES:
        return text
    return data[:_MAX_DETAILS_BYTES].decode(errors="ignore") + f"... ({len(data)} bytes)"


@contextlib.contextmanager
def _status_codes(context: grpc.ServicerContext) -> Iterator[None]:
    """Maps every exception to a gRPC status code (the one place that does)."""
    try:
        yield
    except types.DispatcherError as e:
        code = next(c for kind, c in _CODES.items() if isinstance(e, kind))
        context.abort(code, _details(e))
    except Exception as e:  # A bug or a failing disk: say so rather than UNKNOWN.
        logging.exception("Dispatcher request failed")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {_details(e)}")


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
        with _status_codes(context), durable:
            yield

    def CreateJob(self, request: pb.CreateJobRequest, context: Any) -> pb.CreateJobResponse:
        with self._serving(context):
            created = self._core.create_job(wire.job_spec_from_proto(request.job))
            return pb.CreateJobResponse(created=created)

    def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        with self._serving(context):
            jobs = [wire.job_status_to_proto(job) for job in self._core.jobs()]
            return pb.ListJobsResponse(jobs=jobs)

    def RegisterWorker(
        self, request: pb.RegisterWorkerRequest, context: Any
    ) -> pb.RegisterWorkerResponse:
        with self._serving(context):
            joined = self._core.register_worker(request.job, request.worker)
            return wire.registration_to_proto(joined)

    def Rewind(self, request: pb.RewindRequest, context: Any) -> pb.RewindResponse:
        with self._serving(context):
            position = wire.position_from_proto(request)
            self._core.rewind(
                request.job,
                request.worker,
                position,
                group=request.group,
                num_consumers=request.num_consumers,
            )
            return pb.RewindResponse()

    def EpochProgress(
        self, request: pb.EpochProgressRequest, context: Any
    ) -> pb.EpochProgressResponse:
        with self._serving(context):
            progress = self._core.epoch_progress(request.job, request.epoch)
            return wire.epoch_progress_to_proto(progress)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        with self._serving(context):
            revoked = self._core.heartbeat(
                request.job, request.worker, wire.progress_from_proto(request.progress)
            )
            return pb.HeartbeatResponse(revoked_tokens=revoked)

    def Acquire(self, request: pb.AcquireRequest, context: Any) -> pb.AcquireResponse:
        with self._serving(context):
            result = self._core.acquire(
                request.job,
                request.worker,
                request.max_shards,
                claim=wire.claim_from_proto(request.claim),
                complete=tuple(request.complete),
                release=tuple(request.release),
                progress=wire.progress_from_proto(request.progress),
            )
            return wire.acquire_result_to_proto(result)

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
            status = self._core.status()
            if status.omitted_workers:
                context.set_trailing_metadata(
                    ((wire.OMITTED_WORKERS_METADATA_KEY, str(status.omitted_workers)),)
                )
            return wire.status_to_proto(status)


class _Undecodable(NamedTuple):
    """What a request whose bytes do not parse deserializes to."""

    error: str


class _DecodeErrors(grpc.ServerInterceptor):
    """Answers INVALID_ARGUMENT to undecodable requests (gRPC itself answers INTERNAL)."""

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        parse, behavior = handler.request_deserializer, handler.unary_unary

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # protobuf's DecodeError, or anything a parser raises
                return _Undecodable(f"{type(e).__name__}: {e}")

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"The request to {details.method} is not a valid protocol message "
                    f"({request.error})",
                )
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=lenient, response_serializer=handler.response_serializer
        )


class DispatcherServer:
    """A dispatcher serving over gRPC; `start`, `join` and `stop` are safe to repeat.

    With a `work_dir`, the constructor recovers the journal and locks the
    directory until `stop()`; the lock file names this process and, once
    started, its address. `start()` after `stop()` serves again: with a
    `work_dir` it locks the directory again and recovers a new `core` from
    the journal, as a restarted process would; without one the core carries on.

    Args:
      config: a `ServerConfig`.
      clock: the core's clock (tests inject one).

    Raises:
      journal_lib.WorkDirLockedError: another dispatcher uses `work_dir`.
      journal_lib.JournalCorruptError: the journal cannot be recovered.
    """

    def __init__(
        self,
        config: ServerConfig = ServerConfig(),
        clock: Optional[Callable[[], float]] = None,
    ):
        self._config = config
        self._clock = clock
        self._journal: Optional[journal_lib.Journal] = None
        self._core = self._recover()
        self._server: Optional[grpc.Server] = None
        self._port: Optional[int] = None
        self._stopped = threading.Event()
        self._expirer: Optional[threading.Thread] = None

    @property
    def core(self) -> core.DispatcherCore:
        """The dispatcher's state machine (a new one after a restart with a `work_dir`)."""
        return self._core

    @property
    def target(self) -> str:
        """`host:port` the server listens on (after `start`)."""
        if self._port is None:
            raise RuntimeError("DispatcherServer.target is known only after start()")
        return f"{self._config.host}:{self._port}"

    def start(self) -> "DispatcherServer":
        """Binds and serves.

        Raises:
          OSError: the address cannot be bound (another server holds the port,
            even one of this process: SO_REUSEPORT is off), or a TLS or token
            file cannot be read.
          ValueError: a TLS certificate without a key (or the reverse), an auth
            token twice or an empty token file.
          journal_lib.WorkDirLockedError: after `stop()`, another dispatcher
            took the `work_dir` meanwhile.
          journal_lib.JournalCorruptError: after `stop()`, the journal cannot
            be recovered.
        """
        if self._server is not None:
            return self
        if self._config.work_dir and self._journal is None:  # stopped: the journal was closed
            self._core = self._recover()
        credentials = auth.server_credentials(self._config.tls_cert_file, self._config.tls_key_file)
        token = self._auth_token()
        interceptors = [auth.TokenAuth(token)] if token else []
        server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=self._config.max_threads),
            interceptors=interceptors + [_DecodeErrors()],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", self._config.max_request_bytes),
            ],
        )
        pb_grpc.add_ShardDispatcherServicer_to_server(_Servicer(self.core, self._journal), server)
        address = f"{self._config.host}:{self._config.port}"
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as e:  # gRPC's "Failed to bind to address"
            raise OSError(f"Could not bind the dispatcher to {address}: {e}") from None
        if not port:
            raise OSError(f"Could not bind the dispatcher to {address}")
        self._port = port
        if credentials is None and not _is_loopback(self._config.host):
            logging.warning(
                "The dispatcher listens on %s without TLS: requests%s travel in the clear. "
                "Pass a TLS certificate and key, or bind a loopback address.",
                self.target,
                " and the auth token" if token else "",
            )
        server.start()
        self._server = server
        if self._journal is not None:
            self._journal.mark_holder(f"serving {self.target}")
        self._stopped = threading.Event()
        self._expirer = threading.Thread(
            target=self._expire_loop, args=(self._stopped,), name="lease-expiry", daemon=True
        )
        self._expirer.start()
        return self

    def join(self) -> None:
        """Blocks until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def stop(self, grace_s: float = 0.5) -> None:
        """Stops serving and closes the journal, releasing the work directory."""
        self._stopped.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        if self._expirer is not None:
            self._expirer.join()  # it may be expiring leases: let it finish before the close
            self._expirer = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _recover(self) -> core.DispatcherCore:
        """A new core, recovered from the `work_dir`'s journal (locking it) if there is one."""
        kwargs: dict[str, Any] = {"restore_grace_s": self._config.restore_grace_s}
        if self._clock:
            kwargs["clock"] = self._clock
        if not self._config.work_dir:
            return core.DispatcherCore(**kwargs)
        journal = journal_lib.Journal(
            self._config.work_dir,
            fsync=self._config.fsync,
            snapshot_every=self._config.snapshot_every,
        )
        try:
            recovered = core.DispatcherCore(journal=journal, **kwargs)
        except BaseException:
            journal.close()
            raise
        self._journal = journal
        return recovered

    def _auth_token(self) -> Optional[str]:
        token, path = self._config.auth_token, self._config.auth_token_file
        if token and path:
            raise ValueError(
                "Pass the auth token or a file holding it, not both. Received: auth_token=<set>, "
                f"auth_token_file={path!r}"
            )
        return auth.read_token_file(path) if path else token

    def _expire_loop(self, stopped: threading.Event) -> None:
        while not stopped.wait(self._config.expire_interval_s):
            self._core.expire_all()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


@contextlib.contextmanager
def server_context(config: ServerConfig = ServerConfig()) -> Iterator[DispatcherServer]:
    """Yields a started server and stops it on exit."""
    server = DispatcherServer(config)
    try:
        yield server.start()
    finally:
        server.stop()
