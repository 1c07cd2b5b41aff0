"""Conversions between the core's dataclasses and the protocol messages."""

from __future__ import annotations

from typing import Any

from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import dispatcher_pb2 as pb

__all__ = [
    "claim_from_proto",
    "claim_to_proto",
    "job_spec_from_proto",
    "job_spec_to_proto",
    "lease_from_proto",
    "lease_to_proto",
    "position_from_proto",
    "position_to_proto",
    "status_to_proto",
]

_INT64_MAX = 2**63 - 1
_CLAIMS = {pb.CLAIM_NONE: "none", pb.CLAIM_COMMIT: "commit", pb.CLAIM_COMPLETE: "complete"}


def claim_from_proto(value: int) -> str:
    """The core's claim name of a `Claim` value; InvalidArgument if unknown."""
    if value not in _CLAIMS:
        raise core.InvalidArgument(
            f"claim must be one of {sorted(_CLAIMS)}. Received: claim={value}"
        )
    return _CLAIMS[value]


def claim_to_proto(claim: str) -> int:
    """The `Claim` value of a core claim name."""
    return {name: value for value, name in _CLAIMS.items()}[claim]


def job_spec_to_proto(spec: core.JobSpec) -> pb.JobSpec:
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


def job_spec_from_proto(message: pb.JobSpec) -> core.JobSpec:
    return core.JobSpec(
        name=message.name,
        shards=tuple(core.ShardSpec(s.name, s.size) for s in message.shards),
        policy=message.policy,
        num_epochs=message.num_epochs,
        seed=message.seed,
        lease_timeout_s=message.lease_timeout_s,
        num_consumers=message.num_consumers,
        equalize=message.equalize or "none",
    )


def lease_to_proto(lease: core.Lease) -> pb.Lease:
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


def lease_from_proto(message: pb.Lease, worker: str) -> core.Lease:
    return core.Lease(
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


def position_from_proto(message: pb.RewindRequest) -> core.InputPosition:
    partial = None
    if message.partial_shard >= 0:
        partial = (message.partial_shard, message.partial_offset)
    return core.InputPosition(message.epoch, tuple(message.done), partial)


def position_to_proto(job: str, worker: str, position: core.InputPosition) -> pb.RewindRequest:
    shard, offset = position.partial or (-1, 0)
    return pb.RewindRequest(
        job=job, worker=worker, epoch=position.epoch, done=list(position.done),
        partial_shard=shard, partial_offset=offset,
    )


def status_to_proto(status: dict[str, Any]) -> pb.StatusResponse:
    return pb.StatusResponse(
        jobs=[pb.JobStatus(**_saturated(job)) for job in status["jobs"]],
        workers=[pb.WorkerStatus(**_saturated(worker)) for worker in status["workers"]],
        imbalance=status["imbalance"],
        uptime_s=status["uptime_s"],
    )


def _saturated(fields: dict[str, Any]) -> dict[str, Any]:
    """Caps ints at int64's maximum: totals that grow with every rewind could pass it."""
    return {
        k: min(v, _INT64_MAX) if type(v) is int else v for k, v in fields.items()
    }
