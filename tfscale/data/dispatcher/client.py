"""The dispatcher's RPC client.

`DispatcherClient` turns the protocol into Python calls and gRPC errors into
the `types.DispatcherError`s the core raised, retrying while the dispatcher is unreachable (it may
be restarting) for up to `unavailable_timeout_s`, then raising
`DispatcherUnavailable`. Its channel reconnects within a second of the
dispatcher's return (gRPC's default backoff grows to minutes), so that a
restarted dispatcher hears from its workers well within the grace it gives
their leases. Every method takes and returns the types of
`tfscale.data.dispatcher.types`: no protocol message leaves this module.
A worker's loop over its leases is `feed.LeaseFeed`.

Example:

```python
client = DispatcherClient("127.0.0.1:40123")
client.register_worker("train", "worker-0")
result = client.acquire("train", "worker-0", max_shards=2, claim="commit")
client.acquire("train", "worker-0", 0, complete=[l.token for l in result.leases])
```
"""

from __future__ import annotations

import time
from typing import Any
from typing import Iterable
from typing import Optional

import grpc

from tfscale.data.dispatcher import auth
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import types
from tfscale.data.dispatcher import wire

__all__ = [
    "DEFAULT_UNAVAILABLE_TIMEOUT_S",
    "DispatcherClient",
    "DispatcherUnavailable",
]

_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: types.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: types.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: types.FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: types.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: types.ResourceExhausted,
}
DEFAULT_UNAVAILABLE_TIMEOUT_S = 600.0
# Reconnect attempts while the dispatcher is down: every 0.1 s at first, at
# most 1 s apart (gRPC's defaults: 1 s, growing to 120 s).
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_MAX_RETRY_SLEEP_S = 0.25
_RPC_TIMEOUT_S = 30.0


class DispatcherUnavailable(grpc.RpcError):
    """The dispatcher stayed unreachable for longer than `unavailable_timeout_s`.

    An `RpcError` with code UNAVAILABLE, so callers that handle those keep working.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message


class DispatcherClient:
    """Calls a dispatcher; safe to share between threads.

    Args:
      address: `host:port`.
      auth_token: the server's token, if it requires one.
      tls_root_cert_file: PEM root certificate to talk TLS.
      unavailable_timeout_s: how long a call retries while the server is
        unreachable (a restart, an outage) before it raises
        `DispatcherUnavailable`: the longest dispatcher outage that training
        survives.

    Raises:
      ValueError: for an `unavailable_timeout_s` that is not positive.
    """

    def __init__(
        self,
        address: str,
        auth_token: Optional[str] = None,
        tls_root_cert_file: Optional[str] = None,
        unavailable_timeout_s: float = DEFAULT_UNAVAILABLE_TIMEOUT_S,
    ):
        if not unavailable_timeout_s > 0:
            raise ValueError(
                "unavailable_timeout_s must be positive. "
                f"Received: unavailable_timeout_s={unavailable_timeout_s}"
            )
        if tls_root_cert_file:
            with open(tls_root_cert_file, "rb") as f:
                credentials = grpc.ssl_channel_credentials(f.read())
            channel = grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._channel = channel
        self._stub = pb_grpc.ShardDispatcherStub(channel)
        self._metadata = auth.call_metadata(auth_token)
        self._unavailable_timeout_s = unavailable_timeout_s
        self.address = address

    def create_job(self, spec: types.JobSpec) -> bool:
        """Creates a job; False if it exists (an equal spec, or more epochs of it)."""
        request = pb.CreateJobRequest(job=wire.job_spec_to_proto(spec))
        return self._call("CreateJob", request).created

    def list_jobs(self) -> list[types.JobStatus]:
        """Progress of each job."""
        response = self._call("ListJobs", pb.ListJobsRequest())
        return [wire.job_status_from_proto(job) for job in response.jobs]

    def register_worker(self, job: str, worker: str) -> types.Registration:
        """Joins `worker` to `job`, ending the leases of its previous registration."""
        request = pb.RegisterWorkerRequest(job=job, worker=worker)
        return wire.registration_from_proto(self._call("RegisterWorker", request))

    def heartbeat(
        self, job: str, worker: str, progress: Optional[dict[int, int]] = None
    ) -> list[int]:
        """Renews the worker's leases, reporting `progress` (token -> offset).

        Returns:
          Tokens of this worker's leases that are no longer valid.
        """
        request = pb.HeartbeatRequest(
            job=job, worker=worker, progress=wire.progress_to_proto(progress)
        )
        return list(self._call("Heartbeat", request).revoked_tokens)

    def acquire(
        self,
        job: str,
        worker: str,
        max_shards: int = 1,
        *,
        claim: str = "none",
        complete: Iterable[int] = (),
        release: Iterable[int] = (),
        progress: Optional[dict[int, int]] = None,
        unavailable_timeout_s: Optional[float] = None,
    ) -> types.AcquireResult:
        """Settles `complete`, `release` and `progress`, then leases up to `max_shards` shards.

        `unavailable_timeout_s` overrides the client's for this call (e.g. a
        best-effort release that must not wait out a long outage).
        """
        request = pb.AcquireRequest(
            job=job,
            worker=worker,
            max_shards=max_shards,
            claim=wire.claim_to_proto(claim),
            complete=list(complete),
            release=list(release),
            progress=wire.progress_to_proto(progress),
        )
        response = self._call("Acquire", request, unavailable_timeout_s)
        return wire.acquire_result_from_proto(response, worker)

    def commit(self, job: str, worker: str, token: int) -> None:
        """Claims the lease's shard for delivery; the first commit of a shard wins."""
        self._call("Commit", pb.CommitRequest(job=job, worker=worker, token=token))

    def rewind(
        self,
        job: str,
        worker: str,
        position: types.InputPosition,
        group: bool = False,
        num_consumers: int = 0,
    ) -> None:
        """Moves the job back to `position` (see `DispatcherCore.rewind`)."""
        request = wire.position_to_proto(job, worker, position, group, num_consumers)
        self._call("Rewind", request)

    def epoch_progress(self, job: str, epoch: int) -> types.EpochProgress:
        """Committed element counts of the consumers in `epoch`."""
        response = self._call("EpochProgress", pb.EpochProgressRequest(job=job, epoch=epoch))
        return wire.epoch_progress_from_proto(response)

    def complete(self, job: str, worker: str, token: int) -> None:
        """Marks the lease's shard done for its epoch."""
        self._call("Complete", pb.CompleteRequest(job=job, worker=worker, token=token))

    def release(self, job: str, worker: str, token: int) -> None:
        """Gives the lease back unfinished: its shard is pending again."""
        self._call("Release", pb.ReleaseRequest(job=job, worker=worker, token=token))

    def status(self) -> types.DispatcherStatus:
        """Jobs, workers, throughput and imbalance (`tfscale-dispatcher status`)."""
        response, trailing = self._call_with_metadata("Status", pb.StatusRequest())
        return wire.status_from_proto(response, wire.omitted_workers(trailing))

    def close(self) -> None:
        self._channel.close()

    @property
    def unavailable_timeout_s(self) -> float:
        return self._unavailable_timeout_s

    def _call(
        self, method: str, request: Any, unavailable_timeout_s: Optional[float] = None
    ) -> Any:
        """The reply to `method(request)`, retried while the dispatcher is unreachable."""
        response, _ = self._call_with_metadata(method, request, unavailable_timeout_s)
        return response

    def _call_with_metadata(
        self, method: str, request: Any, unavailable_timeout_s: Optional[float] = None
    ) -> tuple[Any, Any]:
        """`_call`'s reply, and the trailing metadata that came with it."""
        limit = (
            self._unavailable_timeout_s if unavailable_timeout_s is None else unavailable_timeout_s
        )
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                response, call = getattr(self._stub, method).with_call(
                    request, metadata=self._metadata, timeout=_RPC_TIMEOUT_S
                )
                return response, call.trailing_metadata()
            except grpc.RpcError as e:
                code = e.code()
                if code in _ERRORS:
                    raise _ERRORS[code](e.details()) from None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise
                waited = time.monotonic() - start
                if waited > limit:
                    raise DispatcherUnavailable(
                        f"The dispatcher at {self.address} was unreachable for {waited:.1f} s "
                        f"(unavailable_timeout_s={limit:g}); last error: "
                        f"{e.details()}"
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_SLEEP_S)
