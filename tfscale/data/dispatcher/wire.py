"""Conversions between the dispatcher's types and its protocol messages.

The servicer and the client only call these: neither builds nor reads a
message field by field, so a field added to a type and its message changes
this module alone.

Example:

```python
message = job_spec_to_proto(JobSpec("train", (ShardSpec("a", 10),)))
job_spec_from_proto(message).shards  # (ShardSpec(name='a', size=10),)
```
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import Mapping
from typing import Optional
from typing import Sequence

from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher.types import AcquireResult
from tfscale.data.dispatcher.types import DispatcherStatus
from tfscale.data.dispatcher.types import EpochProgress
from tfscale.data.dispatcher.types import InputPosition
from tfscale.data.dispatcher.types import InvalidArgument
from tfscale.data.dispatcher.types import JobSpec
from tfscale.data.dispatcher.types import JobStatus
from tfscale.data.dispatcher.types import Lease
from tfscale.data.dispatcher.types import Registration
from tfscale.data.dispatcher.types import ShardSpec
from tfscale.data.dispatcher.types import WorkerStatus

__all__ = [
    "OMITTED_WORKERS_METADATA_KEY",
    "acquire_result_from_proto",
    "acquire_result_to_proto",
    "claim_from_proto",
    "claim_to_proto",
    "epoch_progress_from_proto",
    "epoch_progress_to_proto",
    "job_spec_from_proto",
    "job_spec_to_proto",
    "job_status_from_proto",
    "job_status_to_proto",
    "lease_from_proto",
    "lease_to_proto",
    "omitted_workers",
    "position_from_proto",
    "position_to_proto",
    "progress_from_proto",
    "progress_to_proto",
    "registration_from_proto",
    "registration_to_proto",
    "status_from_proto",
    "status_to_proto",
]

# Trailing metadata of a Status reply that left workers out: how many.
OMITTED_WORKERS_METADATA_KEY = "tfscale-omitted-workers"

_INT64_MAX = 2**63 - 1
_CLAIMS = {pb.CLAIM_NONE: "none", pb.CLAIM_COMMIT: "commit", pb.CLAIM_COMPLETE: "complete"}


def claim_from_proto(value: int) -> str:
    """The core's claim name of a `Claim` value; InvalidArgument if unknown."""
    if value not in _CLAIMS:
        raise InvalidArgument(f"claim must be one of {sorted(_CLAIMS)}. Received: claim={value}")
    return _CLAIMS[value]


def claim_to_proto(claim: str) -> int:
    """The `Claim` value of a core claim name."""
    return {name: value for value, name in _CLAIMS.items()}[claim]


def job_spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    return pb.JobSpec(
        name=spec.name,
        shards=[pb.Shard(name=s.name, size=s.size) for s in spec.shards],
        policy=spec.policy,
        num_epochs=spec.num_epochs,
        seed=spec.seed,
        lease_timeout_s=spec.lease_timeout_s,
        num_consumers=spec.num_consumers,
        equalize=spec.equalize,
    )


def job_spec_from_proto(message: pb.JobSpec) -> JobSpec:
    return JobSpec(
        name=message.name,
        shards=tuple(ShardSpec(s.name, s.size) for s in message.shards),
        policy=message.policy,
        num_epochs=message.num_epochs,
        seed=message.seed,
        lease_timeout_s=message.lease_timeout_s,
        num_consumers=message.num_consumers,
        equalize=message.equalize or "none",
    )


def lease_to_proto(lease: Lease) -> pb.Lease:
    return pb.Lease(
        job=lease.job,
        epoch=lease.epoch,
        shard_index=lease.shard_index,
        shard_name=lease.shard_name,
        size=lease.size,
        token=lease.token,
        speculative=lease.speculative,
        offset=lease.offset,
    )


def lease_from_proto(message: pb.Lease, worker: str) -> Lease:
    """The lease of a message; `worker` is the one that asked (messages omit it)."""
    return Lease(
        job=message.job,
        epoch=message.epoch,
        shard_index=message.shard_index,
        shard_name=message.shard_name,
        size=message.size,
        token=message.token,
        worker=worker,
        speculative=message.speculative,
        offset=message.offset,
    )


def progress_to_proto(progress: Optional[Mapping[int, int]]) -> list[pb.ShardProgress]:
    """Token -> offset, as the `progress` field of heartbeats and acquires."""
    return [pb.ShardProgress(token=t, offset=o) for t, o in (progress or {}).items()]


def progress_from_proto(messages: Sequence[pb.ShardProgress]) -> dict[int, int]:
    return {p.token: p.offset for p in messages}


def acquire_result_to_proto(result: AcquireResult) -> pb.AcquireResponse:
    return pb.AcquireResponse(
        leases=[lease_to_proto(lease) for lease in result.leases],
        end_of_job=result.end_of_job,
        retry_after_s=result.retry_after_s,
        rejected=result.rejected,
    )


def acquire_result_from_proto(message: pb.AcquireResponse, worker: str) -> AcquireResult:
    return AcquireResult(
        leases=tuple(lease_from_proto(lease, worker) for lease in message.leases),
        end_of_job=message.end_of_job,
        retry_after_s=message.retry_after_s,
        rejected=tuple(message.rejected),
    )


def registration_to_proto(registration: Registration) -> pb.RegisterWorkerResponse:
    return pb.RegisterWorkerResponse(**dataclasses.asdict(registration))


def registration_from_proto(message: pb.RegisterWorkerResponse) -> Registration:
    return Registration(
        lease_timeout_s=message.lease_timeout_s,
        num_epochs=message.num_epochs,
        num_consumers=message.num_consumers,
        equalize=message.equalize or "none",
        heartbeat_interval_s=message.heartbeat_interval_s,
    )


def epoch_progress_to_proto(progress: EpochProgress) -> pb.EpochProgressResponse:
    return pb.EpochProgressResponse(**dataclasses.asdict(progress))


def epoch_progress_from_proto(message: pb.EpochProgressResponse) -> EpochProgress:
    return EpochProgress(
        finished=message.finished,
        floor=message.floor,
        ceiling=message.ceiling,
        pad_shard=message.pad_shard,
    )


def position_from_proto(message: pb.RewindRequest) -> InputPosition:
    if len(message.partial_shards) != len(message.partial_offsets):
        raise InvalidArgument(
            "A position needs one offset per partial shard. Received: "
            f"{len(message.partial_shards)} shards, {len(message.partial_offsets)} offsets"
        )
    partials = tuple(sorted(zip(message.partial_shards, message.partial_offsets)))
    return InputPosition(message.epoch, tuple(message.done), partials)


def position_to_proto(
    job: str, worker: str, position: InputPosition, group: bool = False, num_consumers: int = 0
) -> pb.RewindRequest:
    return pb.RewindRequest(
        job=job,
        worker=worker,
        epoch=position.epoch,
        done=list(position.done),
        partial_shards=[shard for shard, _ in position.partials],
        partial_offsets=[offset for _, offset in position.partials],
        group=group,
        num_consumers=num_consumers,
    )


def job_status_to_proto(status: JobStatus) -> pb.JobStatus:
    return pb.JobStatus(**_saturated(dataclasses.asdict(status)))


def job_status_from_proto(message: pb.JobStatus) -> JobStatus:
    return JobStatus(**_fields(message, JobStatus))


def status_to_proto(status: DispatcherStatus) -> pb.StatusResponse:
    """The reply to Status; `omitted_workers` travels in trailing metadata."""
    return pb.StatusResponse(
        jobs=[job_status_to_proto(job) for job in status.jobs],
        workers=[pb.WorkerStatus(**_saturated(dataclasses.asdict(w))) for w in status.workers],
        imbalance=status.imbalance,
        uptime_s=status.uptime_s,
    )


def status_from_proto(message: pb.StatusResponse, omitted: int = 0) -> DispatcherStatus:
    return DispatcherStatus(
        jobs=tuple(job_status_from_proto(job) for job in message.jobs),
        workers=tuple(WorkerStatus(**_fields(w, WorkerStatus)) for w in message.workers),
        omitted_workers=omitted,
        imbalance=message.imbalance,
        uptime_s=message.uptime_s,
    )


def omitted_workers(trailing_metadata: Sequence[tuple[str, Any]]) -> int:
    """The omitted workers' count of a Status reply's trailing metadata (0 if absent)."""
    value = dict(trailing_metadata or ()).get(OMITTED_WORKERS_METADATA_KEY, "0")
    return int(value.decode() if isinstance(value, bytes) else value)


def _fields(message: Any, cls: type) -> dict[str, Any]:
    """The message's fields named like the dataclass `cls`'s."""
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(cls)}


def _saturated(fields: dict[str, Any]) -> dict[str, Any]:
    """Caps ints at int64's maximum: totals that grow with every rewind could pass it."""
    return {k: min(v, _INT64_MAX) if type(v) is int else v for k, v in fields.items()}
