"""The dispatcher's RPC client.

`DispatcherClient` turns the protocol into Python calls and gRPC errors into
the core's exceptions, retrying while the dispatcher is unreachable (it may
be restarting) for up to `unavailable_timeout_s`, then raising
`DispatcherUnavailable`. Its channel reconnects within a second of the
dispatcher's return (gRPC's default backoff grows to minutes), so that a
restarted dispatcher hears from its workers well within the grace it gives
their leases. A worker's loop over its leases is `feed.LeaseFeed`.

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
from typing import Any, Iterable, Optional

import grpc

from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import wire

__all__ = [
    "DEFAULT_UNAVAILABLE_TIMEOUT_S",
    "DispatcherClient",
    "DispatcherUnavailable",
    "read_token_file",
]

_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: core.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: core.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: core.FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: core.AlreadyExists,
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


def read_token_file(path: Optional[str]) -> Optional[str]:
    """The auth token stored in `path` (None for no path); warns if others can read it.

    Raises:
      ValueError: if the file is empty.
    """
    return server_lib.read_token_file(path) if path else None


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
        self._metadata = ((server_lib.AUTH_METADATA_KEY, f"Bearer {auth_token}"),) if auth_token else ()
        self._unavailable_timeout_s = unavailable_timeout_s
        self.address = address

    def create_job(self, spec: core.JobSpec) -> bool:
        return self._call("CreateJob", pb.CreateJobRequest(job=wire.job_spec_to_proto(spec))).created

    def list_jobs(self) -> list[pb.JobStatus]:
        return list(self._call("ListJobs", pb.ListJobsRequest()).jobs)

    def register_worker(self, job: str, worker: str) -> pb.RegisterWorkerResponse:
        return self._call("RegisterWorker", pb.RegisterWorkerRequest(job=job, worker=worker))

    def heartbeat(
        self, job: str, worker: str, progress: Optional[dict[int, int]] = None
    ) -> list[int]:
        """Renews the worker's leases, reporting `progress` (token -> offset); the revoked tokens."""
        request = pb.HeartbeatRequest(job=job, worker=worker, progress=_progress(progress))
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
    ) -> core.AcquireResult:
        """Settles `complete`, `release` and `progress`, then leases up to `max_shards` shards."""
        request = pb.AcquireRequest(
            job=job,
            worker=worker,
            max_shards=max_shards,
            claim=wire.claim_to_proto(claim),
            complete=list(complete),
            release=list(release),
            progress=_progress(progress),
        )
        response = self._call("Acquire", request)
        return core.AcquireResult(
            leases=tuple(wire.lease_from_proto(lease, worker) for lease in response.leases),
            end_of_job=response.end_of_job,
            retry_after_s=response.retry_after_s,
            rejected=tuple(response.rejected),
        )

    def commit(self, job: str, worker: str, token: int) -> None:
        self._call("Commit", pb.CommitRequest(job=job, worker=worker, token=token))

    def rewind(self, job: str, worker: str, position: core.InputPosition) -> None:
        self._call("Rewind", wire.position_to_proto(job, worker, position))

    def epoch_progress(self, job: str, epoch: int) -> core.EpochProgress:
        response = self._call("EpochProgress", pb.EpochProgressRequest(job=job, epoch=epoch))
        return core.EpochProgress(response.finished, response.floor, response.ceiling)

    def complete(self, job: str, worker: str, token: int) -> None:
        self._call("Complete", pb.CompleteRequest(job=job, worker=worker, token=token))

    def release(self, job: str, worker: str, token: int) -> None:
        self._call("Release", pb.ReleaseRequest(job=job, worker=worker, token=token))

    def status(self) -> pb.StatusResponse:
        return self._call("Status", pb.StatusRequest())

    def close(self) -> None:
        self._channel.close()

    @property
    def unavailable_timeout_s(self) -> float:
        return self._unavailable_timeout_s

    def _call(self, method: str, request: Any) -> Any:
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                return getattr(self._stub, method)(
                    request, metadata=self._metadata, timeout=_RPC_TIMEOUT_S
                )
            except grpc.RpcError as e:
                code = e.code()
                if code in _ERRORS:
                    raise _ERRORS[code](e.details()) from None
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise
                waited = time.monotonic() - start
                if waited > self._unavailable_timeout_s:
                    raise DispatcherUnavailable(
                        f"The dispatcher at {self.address} was unreachable for {waited:.1f} s "
                        f"(unavailable_timeout_s={self._unavailable_timeout_s:g}); last error: "
                        f"{e.details()}"
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_SLEEP_S)


def _progress(progress: Optional[dict[int, int]]) -> list[pb.ShardProgress]:
    return [pb.ShardProgress(token=t, offset=o) for t, o in (progress or {}).items()]
