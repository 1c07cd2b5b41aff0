"""Dispatcher clients: the RPC wrapper and the worker-side shard loop.

`DispatcherClient` turns the protocol into Python calls and gRPC errors into
the core's exceptions, retrying while the dispatcher is unreachable (it may
be restarting) for up to `unavailable_timeout_s`, then raising
`DispatcherUnavailable`. Its channel reconnects within a second of the
dispatcher's return (gRPC's default backoff grows to minutes), so that a
restarted dispatcher hears from its workers well within the grace it gives
their leases. `ShardConsumer` is a worker's loop: register, heartbeat from
a background thread, acquire leases, read each shard, commit it (the
dispatcher picks one winner among duplicate readers), hand its elements on,
and complete it once the last one was taken. A shard read twice (a
speculative backup, or a lease that expired and was re-leased) thus reaches
training once; a consumer closed or killed mid-shard gives the shard back.

Example:

```python
client = DispatcherClient("127.0.0.1:40123")
consumer = ShardConsumer(client, "train", "worker-0", read_fn=lambda name: [name])
for element in consumer:
    ...
```
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

import grpc
from absl import logging

from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import wire

__all__ = [
    "DEFAULT_UNAVAILABLE_TIMEOUT_S",
    "DispatcherClient",
    "DispatcherUnavailable",
    "ShardConsumer",
    "read_token_file",
]

T = TypeVar("T")
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

    def heartbeat(self, job: str, worker: str) -> list[int]:
        return list(self._call("Heartbeat", pb.HeartbeatRequest(job=job, worker=worker)).revoked_tokens)

    def acquire(self, job: str, worker: str, max_shards: int = 1) -> core.AcquireResult:
        response = self._call(
            "Acquire", pb.AcquireRequest(job=job, worker=worker, max_shards=max_shards)
        )
        return core.AcquireResult(
            leases=tuple(wire.lease_from_proto(lease, worker) for lease in response.leases),
            end_of_job=response.end_of_job,
            retry_after_s=response.retry_after_s,
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


class ShardConsumer:
    """A worker's stream of elements from leased shards, each shard once.

    Iterating registers the worker, heartbeats in the background, and loops:
    acquire up to `max_shards` leases; for each, read the whole shard with
    `read_fn`, commit the lease (a lost race drops the shard unseen), yield
    its elements, and complete the lease when the consumer asks for the
    element after the shard's last. Closing the iterator early (or the
    process dying) gives the unfinished leases back. Iteration ends with
    the job, or raises `DispatcherUnavailable` when the dispatcher stays
    unreachable longer than the client's `unavailable_timeout_s`.

    The leases of a batch are read and committed as soon as they are granted,
    before the first shard's elements are handed on: heartbeats renew only
    committed leases, so a prefetched lease left uncommitted while training
    consumes the shards before it would expire after `lease_timeout_s` and
    its shard would be read again. The batch's shards are thus held in
    memory together (`max_shards` of them). A read that outlasts its lease
    is not lost work for long: the shard is granted again with a lease twice
    as long each time (up to 64 lease timeouts).

    When the job equalizes its consumers (`num_consumers`, `equalize`),
    every consumer yields the same number of elements per epoch: with
    `"pad"`, the epoch's largest count (a consumer short of it repeats its
    latest shard's elements); with `"drop"`, the smallest (a consumer yields
    only up to the smallest count so far and drops its excess when the epoch
    ends). Equalized consumers wait for each other at the end of each epoch,
    so their shards are completed on commit, before their elements are
    taken: a crash loses the elements of the shard being handed on.

    With `shuffle_seed`, each shard's elements are shuffled, the same way
    every time the shard is read in the same epoch, so that a shard resumed
    partway (after a `rewind`) skips exactly the elements consumed before.
    `position(consumed)` tells where training stands once it has consumed
    that many of the elements yielded, for saving with a checkpoint.

    Attributes:
      delivered: (epoch, shard name) of each shard completed, in order.
      dropped: the same for shards read but not handed on (lost races).
      lost: the same for shards handed on whose lease was lost before they
        were completed (heartbeats failed for a whole lease timeout): they
        may reach training again through another lease.
      per_epoch: elements yielded in each epoch, padding included.
    """

    def __init__(
        self,
        client: DispatcherClient,
        job: str,
        worker: str,
        read_fn: Callable[[str], Iterable[T]],
        max_shards: int = 2,
        poll_s: float = 0.02,
        shuffle_seed: Optional[int] = None,
    ):
        self._client = client
        self._job = job
        self._worker = worker
        self._read_fn = read_fn
        self._max_shards = max_shards
        self._poll_s = poll_s
        self._shuffle_seed = shuffle_seed
        # (epoch, shard index or None for padding, first offset, count) per
        # run of yielded elements, in order: what `position` walks.
        self._log: list[tuple[int, Optional[int], int, int]] = []
        self._equalize = "none"
        self.delivered: list[tuple[int, str]] = []
        self.dropped: list[tuple[int, str]] = []
        self.lost: list[tuple[int, str]] = []
        self.per_epoch: dict[int, int] = {}
        self._epoch = 0
        self._held: list[T] = []  # drop: committed, not yet allowed out
        self._latest: list[T] = []  # pad: the latest shard's elements

    def __iter__(self) -> Iterator[T]:
        registration = self._client.register_worker(self._job, self._worker)
        self._equalize = registration.equalize if registration.num_consumers else "none"
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(stop, registration.heartbeat_interval_s), daemon=True
        )
        beat.start()
        unfinished: list[core.Lease] = []
        try:
            while True:
                result = self._client.acquire(self._job, self._worker, self._max_shards)
                if result.end_of_job:
                    yield from self._close_epochs(registration.num_epochs)
                    return
                if not result.leases:
                    yield from self._release_held()
                    time.sleep(result.retry_after_s)
                    continue
                unfinished = list(result.leases)
                yield from self._close_epochs(unfinished[0].epoch)  # one epoch per batch
                if self._equalize == "none":
                    claimed = [self._claim(lease) for lease in unfinished]
                    while unfinished:
                        yield from self._deliver(unfinished[0], claimed.pop(0))
                        unfinished.pop(0)
                    continue
                # Equalized consumers wait for each other at epoch ends, so
                # none may hold a shard it has not completed while it waits
                # for its elements to be taken: settle the batch first.
                settled = [(lease, self._settle(lease)) for lease in unfinished]
                unfinished = []
                for lease, elements in settled:
                    if elements is not None:
                        yield from self._hand_on(lease, elements)
        except DispatcherUnavailable:
            unfinished = []  # Nobody to give them to: they expire there.
            raise
        finally:
            stop.set()
            self._give_back(unfinished)

    def position(
        self, consumed: int, base: core.InputPosition = core.InputPosition()
    ) -> core.InputPosition:
        """The input position after the first `consumed` yielded elements.

        Args:
          consumed: elements of this iterator that training consumed.
          base: the position this iterator started from (after a rewind).

        Raises:
          ValueError: with `equalize="drop"` (held-back elements make the
            stream's order differ from the shards'), or for more elements
            than were yielded.
        """
        if self._equalize == "drop":
            raise ValueError("Input positions are not tracked with equalize='drop'")
        epoch, done, partial = base.epoch, set(base.done), base.partial
        remaining = consumed
        for entry_epoch, shard, start, count in list(self._log):
            if remaining <= 0:
                break
            take = min(count, remaining)
            remaining -= take
            if shard is None:  # padding
                continue
            if entry_epoch != epoch:
                epoch, done, partial = entry_epoch, set(), None
            if take == count:
                done.add(shard)
                partial = None if partial and partial[0] == shard else partial
            else:
                partial = (shard, start + take)
        if remaining > 0:
            raise ValueError(f"consumed={consumed} is more than the elements yielded")
        return core.InputPosition(epoch, tuple(sorted(done)), partial)

    def _read(self, lease: core.Lease) -> list[T]:
        elements = list(self._read_fn(lease.shard_name))
        if self._shuffle_seed is not None:
            key = f"{self._shuffle_seed}:{lease.epoch}:{lease.shard_name}"
            random.Random(key).shuffle(elements)
        return elements[lease.offset:]

    def _claim(self, lease: core.Lease) -> Optional[list[T]]:
        """Read and commit; the elements, or None for a lost race."""
        elements = self._read(lease)
        return elements if self._commit(lease) else None

    def _deliver(self, lease: core.Lease, elements: Optional[list[T]]) -> Iterator[T]:
        """Hand a claimed shard on, then complete it (after the last element is taken)."""
        if elements is None:
            return
        self._log.append((lease.epoch, lease.shard_index, lease.offset, len(elements)))
        yield from self._emit(elements)
        self._complete(lease)

    def _settle(self, lease: core.Lease) -> Optional[list[T]]:
        """Read, commit and complete; the elements, or None for a lost race."""
        elements = self._claim(lease)
        if elements is not None:
            self._complete(lease)
        return elements

    def _hand_on(self, lease: core.Lease, elements: list[T]) -> Iterator[T]:
        """Equalized consumers: pad keeps the latest shard, drop holds back."""
        if self._equalize == "drop":
            self._held.extend(elements)
            yield from self._release_held()
            return
        self._log.append((lease.epoch, lease.shard_index, lease.offset, len(elements)))
        yield from self._emit(elements)
        self._latest = elements or self._latest

    def _commit(self, lease: core.Lease) -> bool:
        try:
            self._client.commit(self._job, self._worker, lease.token)
        except core.FailedPrecondition:
            self.dropped.append((lease.epoch, lease.shard_name))
            return False
        return True

    def _emit(self, elements: list[T]) -> Iterator[T]:
        self.per_epoch[self._epoch] = self.per_epoch.get(self._epoch, 0) + len(elements)
        yield from elements

    def _release_held(self, final: Optional[core.EpochProgress] = None) -> Iterator[T]:
        """drop: yields held elements up to the smallest consumer count."""
        if not self._held:
            return
        progress = final or self._client.epoch_progress(self._job, self._epoch)
        allowed = progress.floor - self.per_epoch.get(self._epoch, 0)
        if allowed > 0:
            out, self._held = self._held[:allowed], self._held[allowed:]
            yield from self._emit(out)

    def _close_epochs(self, until: int) -> Iterator[T]:
        """Equalizes and closes every epoch before `until`."""
        while self._epoch < until:
            if self._equalize != "none":
                progress = self._wait_finished(self._epoch)
                if self._equalize == "drop":
                    yield from self._release_held(progress)
                else:
                    yield from self._pad(progress.ceiling - self.per_epoch.get(self._epoch, 0))
            self._held = []
            self._epoch += 1

    def _pad(self, count: int) -> Iterator[T]:
        if count > 0 and not self._latest:
            logging.warning("Cannot pad epoch %d: no element seen yet", self._epoch)
            return
        if count > 0:
            self._log.append((self._epoch, None, 0, count))
        for i in range(max(count, 0)):
            yield from self._emit([self._latest[i % len(self._latest)]])

    def _wait_finished(self, epoch: int) -> core.EpochProgress:
        while True:
            progress = self._client.epoch_progress(self._job, epoch)
            if progress.finished:
                return progress
            time.sleep(self._poll_s)

    def _complete(self, lease: core.Lease) -> None:
        try:
            self._client.complete(self._job, self._worker, lease.token)
        except core.FailedPrecondition as e:
            # Only when heartbeats failed for a whole lease timeout: the shard
            # went to another reader after these elements were handed on.
            logging.warning("Shard %s delivered, but its lease was lost: %s", lease.shard_name, e)
            self.lost.append((lease.epoch, lease.shard_name))
            return
        self.delivered.append((lease.epoch, lease.shard_name))

    def _give_back(self, leases: list[core.Lease]) -> None:
        for lease in leases:
            try:
                self._client.release(self._job, self._worker, lease.token)
            except (grpc.RpcError, core.DispatcherError):
                pass  # Expired or revoked already: the dispatcher has it back.

    def _heartbeat(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.wait(interval_s):
            try:
                self._client.heartbeat(self._job, self._worker)
            except (grpc.RpcError, core.DispatcherError):
                pass  # The next acquire reports a lasting failure.
