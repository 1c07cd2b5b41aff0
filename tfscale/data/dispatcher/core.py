"""The dispatcher's state machine: jobs, epochs, shards, leases, workers.

Pure Python and transport-free: the gRPC servicer only translates requests
into these calls. Every state change is applied through `_apply`, which is
also what recovery replays from the journal, so the state after a restart is
the state before the crash. The clock does not carry over a restart, so:

- lease deadlines restart at recovery time, with a grace period: a restored
  lease lives `max(its lifetime, restore_grace_s)` from recovery, so a
  live worker that is still reconnecting (gRPC backoff, its retry loop)
  keeps the leases it renews; a dead worker's come back after the grace;
- throughput: each completion's record carries the time its worker spent on
  the shard (`busy_s`), so replay restores every worker's estimate rather
  than stamping all the completions with one recovery time.

A lease is read, then committed (claimed for delivery: the first commit of
a shard wins and revokes its other leases), then completed once the shard's
elements were consumed. A streaming reader, which hands elements on as it
reads, has its leases committed at grant (`claim="commit"`); equalized
consumers have them completed at grant (`claim="complete"`). An acquire also
carries the completions, releases and progress that are due, so that one
round trip serves a grant.

Workers report how far training has consumed into each leased shard (with
heartbeats and acquires). When a lease ends unfinished (its worker died,
restarted or gave it back), its shard goes back pending at that offset, and
the next lease of it skips the elements trained already.

Guarantees:
- each shard is completed exactly once per epoch; a commit or completion of
  a lease that lost the race (a speculative backup, or an expired lease that
  was re-leased) gets `FailedPrecondition`, so its reader drops the shard;
- a lease whose worker stops heartbeating expires after `lease_timeout_s`
  (after a restart: the grace above, if longer); its shard, even if
  committed, becomes pending again (at the front) and its token is fenced:
  a worker dying mid-shard loses nothing;
- a shard whose read outlasts its lease is not read forever: each time a
  lease of it expires uncommitted, its next leases live twice as long (up
  to `2**MAX_LEASE_DOUBLINGS` lease timeouts), under every policy;
- a rejected request changes no state.

Example:

```python
core = DispatcherCore()
core.create_job(JobSpec("train", (ShardSpec("a", 10), ShardSpec("b", 10))))
core.register_worker("train", "worker-0")
(lease,) = core.acquire("train", "worker-0", max_shards=1).leases
core.commit("train", "worker-0", lease.token)     # before handing elements on
core.complete("train", "worker-0", lease.token)   # after the last was consumed
```
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from typing import Any
from typing import Callable
from typing import Optional

from tfscale.data.dispatcher import policies as policies_lib
from tfscale.data.dispatcher.types import MAX_JOBS
from tfscale.data.dispatcher.types import MAX_SHARDS_PER_CALL
from tfscale.data.dispatcher.types import MAX_WORKERS_PER_JOB
from tfscale.data.dispatcher.types import AcquireResult
from tfscale.data.dispatcher.types import AlreadyExists
from tfscale.data.dispatcher.types import DispatcherStatus
from tfscale.data.dispatcher.types import EpochProgress
from tfscale.data.dispatcher.types import FailedPrecondition
from tfscale.data.dispatcher.types import InputPosition
from tfscale.data.dispatcher.types import InvalidArgument
from tfscale.data.dispatcher.types import JobSpec
from tfscale.data.dispatcher.types import JobStatus
from tfscale.data.dispatcher.types import Lease
from tfscale.data.dispatcher.types import NotFound
from tfscale.data.dispatcher.types import Registration
from tfscale.data.dispatcher.types import ResourceExhausted
from tfscale.data.dispatcher.types import WorkerStatus
from tfscale.data.dispatcher.types import describe
from tfscale.data.dispatcher.types import validate_name
from tfscale.data.dispatcher.types import validate_position
from tfscale.data.dispatcher.types import validate_spec

__all__ = [
    "CLAIMS",
    "DEFAULT_RESTORE_GRACE_S",
    "HEARTBEATS_PER_LEASE",
    "MAX_LEASE_DOUBLINGS",
    "MAX_REVOKED_PER_REPLY",
    "MAX_STATUS_WORKERS",
    "MAX_TOKENS_PER_CALL",
    "DispatcherCore",
]

Clock = Callable[[], float]
CLAIMS = ("none", "commit", "complete")
MAX_TOKENS_PER_CALL = 10_000
# Status lists at most this many workers (live ones first) and counts the rest,
# so that its reply stays under gRPC's 4 MiB with names of MAX_NAME_BYTES.
MAX_STATUS_WORKERS = 1024
# A heartbeat returns at most this many revoked tokens; the next one returns the rest.
MAX_REVOKED_PER_REPLY = 100_000
_RETRY_AFTER_S = 0.05
# A shard's leases live at most this many doublings of `lease_timeout_s`. The
# cap bounds how long an orphaned grant (its reply lost) of a slow shard waits.
MAX_LEASE_DOUBLINGS = 6
# Heartbeats a worker sends per lease timeout: its leases survive a few lost ones.
HEARTBEATS_PER_LEASE = 4
# How long a restored lease lives after recovery, at least: enough for the
# workers' clients to notice the restart and heartbeat again.
DEFAULT_RESTORE_GRACE_S = 10.0


@dataclasses.dataclass
class _Worker:
    name: str
    last_seen: float
    completed_shards: int = 0
    completed_size: int = 0
    # Size and time of the completions whose time is known (journal records
    # written before completions carried their `busy_s` have none).
    timed_size: int = 0
    busy_s: float = 0.0
    revoked: set = dataclasses.field(default_factory=set)
    # When this worker last completed a shard (this process's clock; not restored).
    last_completed_at: float = 0.0

    @property
    def throughput(self) -> float:
        return self.timed_size / self.busy_s if self.busy_s > 0 else 0.0


@dataclasses.dataclass
class _ActiveLease:
    lease: Lease
    granted_at: float
    deadline: float
    committed: bool = False
    # How far training consumed into the shard (absolute offset), as reported.
    progress: int = 0


class _Job:
    """State of one job; mutated only by DispatcherCore._apply."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.policy = policies_lib.make_policy(spec.policy)
        self.names = tuple(s.name for s in spec.shards)
        self.sizes = tuple(s.size for s in spec.shards)
        self.workers: dict[str, _Worker] = {}
        self.leases: dict[int, _ActiveLease] = {}
        self.grants = 0
        # shard -> how many of its leases expired uncommitted (a slow read), for
        # the job's lifetime: a shard slow to read is slow in every epoch.
        self.slow: dict[int, int] = {}
        # epoch -> worker -> elements of the shards it committed in that epoch (from
        # each lease's offset)
        self.epoch_counts: dict[int, dict[str, int]] = {}
        # Leases completed at grant, until the acquire that granted them replies.
        self.completed_at_grant: dict[int, Lease] = {}
        # The synchronous consumers an equalized job balances its epochs over:
        # the spec's, until a group rewind gives its group's size.
        self.group_size = spec.num_consumers
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = list(range(len(self.spec.shards)))
        random.Random(self.spec.seed * 1_000_003 + epoch).shuffle(order)
        self.order = {shard: rank for rank, shard in enumerate(order)}
        self.pending = order if epoch < self.spec.num_epochs else []
        self.done: set[int] = set()
        self.offsets: dict[int, int] = {}  # shard -> elements to skip (after a rewind)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.spec.num_epochs

    def holders(self, shard: int) -> list[int]:
        return [t for t, a in self.leases.items() if a.lease.shard_index == shard]

    def lifetime(self, shard: int) -> float:
        """How long a new lease of `shard` lives unless committed."""
        doublings = min(self.slow.get(shard, 0), MAX_LEASE_DOUBLINGS)
        return self.spec.lease_timeout_s * 2**doublings


class DispatcherCore:
    """Jobs, epochs, shards and leases, safe to call from many threads.

    Args:
      clock: seconds, monotonic; injectable for tests.
      journal: a recovered `journal.Journal`, or None for memory only.
      restore_grace_s: a lease restored from the journal lives at least this
        long after recovery (and at least its shard's lease lifetime), so
        that its worker has time to reconnect and renew it.

    Raises:
      ValueError: for a negative or non-finite `restore_grace_s`.
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        journal: Any = None,
        restore_grace_s: float = DEFAULT_RESTORE_GRACE_S,
    ):
        if not 0 <= restore_grace_s < float("inf"):
            raise ValueError(
                "restore_grace_s must be finite and >= 0. "
                f"Received: restore_grace_s={restore_grace_s}"
            )
        self._restore_grace_s = float(restore_grace_s)
        self._clock = clock
        self._journal = journal
        self._lock = threading.RLock()
        self._jobs: dict[str, _Job] = {}
        self._next_token = 1
        self._started = clock()
        if journal is not None:
            self._recover()

    # --- requests -----------------------------------------------------------

    def create_job(self, spec: JobSpec) -> bool:
        """Creates a job; returns False if it exists.

        An existing job may be given more epochs (a training run resumed
        with a higher epoch count); any other difference is an error.

        Raises:
          InvalidArgument: for a malformed spec.
          AlreadyExists: for a different job of the same name.
          ResourceExhausted: when MAX_JOBS jobs exist.
        """
        validate_spec(spec)
        with self._lock:
            existing = self._jobs.get(spec.name)
            if existing is None and len(self._jobs) >= MAX_JOBS:
                raise ResourceExhausted(
                    f"A dispatcher holds at most {MAX_JOBS} jobs. Received: a new job "
                    f"{describe(spec.name)}"
                )
            if existing is not None:
                more_epochs = dataclasses.replace(existing.spec, num_epochs=spec.num_epochs)
                if more_epochs != spec or spec.num_epochs < existing.spec.num_epochs:
                    raise AlreadyExists(
                        f"Job {describe(spec.name)} exists with a different spec (only "
                        f"num_epochs may grow: {existing.spec.num_epochs} -> {spec.num_epochs})"
                    )
                if spec.num_epochs > existing.spec.num_epochs:
                    self._commit(
                        {"op": "extend_job", "job": spec.name, "num_epochs": spec.num_epochs}
                    )
                return False
            self._commit({"op": "create_job", "spec": spec.to_dict()})
            return True

    def register_worker(self, job: str, worker: str) -> Registration:
        """Joins `worker` to `job`, ending the leases of its previous registration.

        A worker registers again when its process restarts (or opens a new
        iterator): the shards the old one held go back to the pending ones,
        so they are not kept alive by the new one's heartbeats.
        """
        validate_name("worker", worker)
        with self._lock:
            state = self._job(job)
            if worker not in state.workers and len(state.workers) >= MAX_WORKERS_PER_JOB:
                raise ResourceExhausted(
                    f"A job has at most {MAX_WORKERS_PER_JOB} workers; {describe(job)} has "
                    f"{len(state.workers)}. Received: a new worker {describe(worker)}"
                )
            held = [t for t, a in state.leases.items() if a.lease.worker == worker]
            if worker not in state.workers or held:
                self._commit_many(
                    self._progress_records(state, held)
                    + [{"op": "register", "job": job, "worker": worker}]
                )
            state.workers[worker].last_seen = self._clock()
            spec = state.spec
            return Registration(
                lease_timeout_s=spec.lease_timeout_s,
                num_epochs=spec.num_epochs,
                num_consumers=state.group_size,
                equalize=spec.equalize,
                heartbeat_interval_s=spec.lease_timeout_s / HEARTBEATS_PER_LEASE,
            )

    def epoch_progress(self, job: str, epoch: int) -> EpochProgress:
        """Committed element counts of the consumers in `epoch`."""
        with self._lock:
            state = self._job(job)
            if not 0 <= epoch < state.spec.num_epochs:
                raise InvalidArgument(
                    f"epoch must be in [0, {state.spec.num_epochs}). Received: epoch={epoch}"
                )
            counts = state.epoch_counts.get(epoch, {})
            values = [counts.get(w, 0) for w in state.workers]
            enough = len(values) >= max(state.group_size, 1)
            return EpochProgress(
                finished=epoch < state.epoch,
                floor=min(values) if enough else 0,
                ceiling=max(values, default=0),
                pad_shard=state.names[0],
            )

    def heartbeat(
        self, job: str, worker: str, progress: Optional[dict[int, int]] = None
    ) -> list[int]:
        """Renews the worker's committed leases; returns tokens it has lost since.

        `progress` maps a lease token to how far training consumed into its
        shard (an absolute element offset); tokens no longer active are
        ignored (the reply's revoked tokens tell the worker).

        Uncommitted leases are not renewed: one lives `lease_timeout_s` (more
        for a shard whose leases expired before) from its grant unless the
        worker commits it. A grant whose reply was lost (the dispatcher died
        after journaling it) is known to no worker, so it must expire rather
        than be kept alive by its worker's heartbeats.
        A renewal never shortens a deadline (a restored lease's grace).
        """
        progress = _checked_progress(progress)
        with self._lock:
            state, record = self._registered(job, worker)
            now = self._clock()
            record.last_seen = now
            self._note_progress(state, worker, progress)
            for active in state.leases.values():
                if active.lease.worker == worker and active.committed:
                    active.deadline = max(active.deadline, now + state.spec.lease_timeout_s)
            self._expire(state, now)
            revoked = sorted(record.revoked)[:MAX_REVOKED_PER_REPLY]
            record.revoked.difference_update(revoked)
            return revoked

    def acquire(
        self,
        job: str,
        worker: str,
        max_shards: int = 1,
        claim: str = "none",
        complete: tuple[int, ...] = (),
        release: tuple[int, ...] = (),
        progress: Optional[dict[int, int]] = None,
    ) -> AcquireResult:
        """Settles what is due, then leases up to `max_shards` shards per the policy.

        Args:
          max_shards: 0 to MAX_SHARDS_PER_CALL; 0 only settles.
          claim: `"none"`, `"commit"` (the leases are committed at grant) or
            `"complete"` (completed at grant).
          complete: tokens whose shard's last element was consumed.
          release: tokens given back unfinished (at their progress).
          progress: token -> absolute offset training consumed into its shard.

        Tokens of `complete` and `release` that are no longer active come
        back in `rejected`; they do not fail the call.

        Raises:
          InvalidArgument: for a bad `max_shards`, `claim` or progress (and
            then nothing changes).
        """
        if not 0 <= max_shards <= MAX_SHARDS_PER_CALL:
            raise InvalidArgument(
                f"max_shards must be in [0, {MAX_SHARDS_PER_CALL}]. "
                f"Received: max_shards={max_shards}"
            )
        if max(len(complete), len(release), len(progress or {})) > MAX_TOKENS_PER_CALL:
            raise InvalidArgument(
                f"An acquire settles at most {MAX_TOKENS_PER_CALL} tokens of each kind. Received: "
                f"{len(complete)} to complete, {len(release)} to release, "
                f"{len(progress or {})} progress reports"
            )
        if claim not in CLAIMS:
            raise InvalidArgument(
                f"claim must be one of {', '.join(CLAIMS)}. Received: claim={claim!r}"
            )
        progress = _checked_progress(progress)
        with self._lock:
            state, record = self._registered(job, worker)
            now = self._clock()
            record.last_seen = now
            self._note_progress(state, worker, progress)
            rejected = self._settle(state, worker, complete, release, now)
            self._expire(state, now)
            if state.finished:
                return AcquireResult(end_of_job=True, rejected=rejected)
            if max_shards == 0:
                return AcquireResult(rejected=rejected)
            if not self._may_lease(state, worker):  # equalized: the others' turn
                return AcquireResult(retry_after_s=_RETRY_AFTER_S, rejected=rejected)
            selection = state.policy.select(self._view(state, worker, now), max_shards)
            grants = self._checked_grants(state, worker, selection, max_shards)
            if not grants:
                return AcquireResult(retry_after_s=_RETRY_AFTER_S, rejected=rejected)
            records = []
            for shard, speculative in grants:
                records.append(
                    {
                        "op": "grant",
                        "job": job,
                        "worker": worker,
                        "shard": shard,
                        "epoch": state.epoch,
                        "token": self._next_token + len(records),
                        "speculative": speculative,
                    }
                )
                if claim != "none" and not speculative:
                    records[-1]["claim"] = claim
            leases = [r["token"] for r in records]
            self._commit_many(records)
            return AcquireResult(
                leases=tuple(self._granted(state, t) for t in leases), rejected=rejected
            )

    def commit(self, job: str, worker: str, token: int) -> None:
        """Claims the lease's shard for delivery; the first commit of a shard wins.

        Raises:
          FailedPrecondition: the lease is stale or lost the race.
        """
        with self._lock:
            if not self._live_lease(job, worker, token).committed:
                self._commit({"op": "commit", "job": job, "token": token})

    def complete(self, job: str, worker: str, token: int) -> None:
        """Marks the lease's shard done for its epoch, committing it if needed.

        Raises:
          FailedPrecondition: the lease is stale or lost the race.
        """
        with self._lock:
            active = self._live_lease(job, worker, token)
            busy_s = self._busy_s(self._jobs[job], active, self._clock())
            self._commit({"op": "complete", "job": job, "token": token, "busy_s": busy_s})

    def release(self, job: str, worker: str, token: int) -> None:
        """Gives a lease back unread: its shard is pending again."""
        with self._lock:
            self._live_lease(job, worker, token)
            state = self._jobs[job]
            self._commit_many(
                self._progress_records(state, [token])
                + [{"op": "release", "job": job, "token": token}]
            )

    def rewind(
        self,
        job: str,
        worker: str,
        position: InputPosition,
        group: bool = False,
        num_consumers: int = 0,
    ) -> None:
        """Moves the job back to a training checkpoint's position.

        Shards consumed after the checkpoint (lost with the steps that
        consumed them) become pending again; a partly consumed shard is
        leased next with the consumed elements skipped; every lease ends.

        Args:
          group: the caller rewinds for every consumer of the job (a
            synchronous group restarting from its checkpoint, whose other
            members wait until it did); without it, the job must have no
            other worker.
          num_consumers: with `group`, the group's size from now on (a
            group resumed at another size); an equalized job balances its
            epochs' leases over that many consumers. 0 keeps the size.

        Raises:
          InvalidArgument: for a position outside the job, or a bad
            `num_consumers` (and then nothing changes).
          FailedPrecondition: without `group`, if another worker consumes
            this job too.
        """
        if not 0 <= num_consumers <= MAX_WORKERS_PER_JOB or (num_consumers and not group):
            raise InvalidArgument(
                f"num_consumers must be in [0, {MAX_WORKERS_PER_JOB}], and 0 without group. "
                f"Received: num_consumers={num_consumers}, group={group}"
            )
        with self._lock:
            state, _ = self._registered(job, worker)
            others = sorted(set(state.workers) - {worker})
            if others and not group:
                raise FailedPrecondition(
                    f"Rewind needs a single-consumer job, or group=True; {describe(job)} also "
                    f"has {describe(others, limit=200)}"
                )
            validate_position(state.spec, position)
            record = {"op": "rewind", "job": job, "position": position.to_dict()}
            if num_consumers:
                record["num_consumers"] = num_consumers
            self._commit(record)

    def expire_all(self) -> None:
        """Expires overdue leases of every job (the server calls it periodically)."""
        with self._lock:
            now = self._clock()
            for state in self._jobs.values():
                self._expire(state, now)

    # --- reports ------------------------------------------------------------

    def jobs(self) -> list[JobStatus]:
        """Progress of each job."""
        with self._lock:
            return [self._job_status(state) for state in self._jobs.values()]

    def status(self) -> DispatcherStatus:
        """Jobs, workers, throughput and imbalance, for `tfscale-dispatcher status`.

        Lists at most MAX_STATUS_WORKERS workers, live ones first; `omitted_workers`
        counts the others.
        """
        with self._lock:
            now = self._clock()
            workers = []
            for state in self._jobs.values():
                live = self._live_workers(state, now)
                for record in state.workers.values():
                    held = [a.lease for a in state.leases.values() if a.lease.worker == record.name]
                    workers.append(
                        WorkerStatus(
                            job=state.spec.name,
                            worker=record.name,
                            live=record.name in live,
                            leases=len(held),
                            outstanding=sum(lease.size for lease in held),
                            completed_shards=record.completed_shards,
                            completed_size=record.completed_size,
                            throughput=record.throughput,
                        )
                    )
            done = [w.completed_size for w in workers if w.live]
            mean = sum(done) / len(done) if done else 0.0
            workers.sort(key=lambda w: not w.live)
            return DispatcherStatus(
                jobs=tuple(self.jobs()),
                workers=tuple(workers[:MAX_STATUS_WORKERS]),
                omitted_workers=max(len(workers) - MAX_STATUS_WORKERS, 0),
                imbalance=max(done) / mean if mean > 0 else 1.0,
                uptime_s=now - self._started,
            )

    # --- internals ------------------------------------------------------------

    def _job(self, job: str) -> _Job:
        validate_name("job", job)
        state = self._jobs.get(job)
        if state is None:
            names = sorted(self._jobs)
            listed = ", ".join(describe(n) for n in names[:10])
            listed += ", ..." if len(names) > 10 else ""
            raise NotFound(f"No job {describe(job)}. Jobs: {f'[{listed}]' if names else 'none'}")
        return state

    def _registered(self, job: str, worker: str) -> tuple[_Job, _Worker]:
        state = self._job(job)
        record = state.workers.get(worker)
        if record is None:
            raise FailedPrecondition(
                f"Worker {describe(worker)} is not registered with job {describe(job)}"
            )
        return state, record

    def _live_lease(self, job: str, worker: str, token: int) -> _ActiveLease:
        state, _ = self._registered(job, worker)
        self._expire(state, self._clock())
        active = state.leases.get(token)
        if active is None:
            raise FailedPrecondition(
                f"Lease {token} of job {describe(job)} is not active (expired, released, or its "
                "shard was completed by another lease)"
            )
        if active.lease.worker != worker:
            raise FailedPrecondition(
                f"Lease {token} belongs to {describe(active.lease.worker)}, not {describe(worker)}"
            )
        return active

    @staticmethod
    def _busy_s(state: _Job, active: _ActiveLease, now: float) -> float:
        """The time the lease's worker spent on its shard, if completed at `now`.

        A worker holding several leases reads them one after another: a
        shard's time starts at its grant or at the previous completion,
        whichever is later, so overlapping leases are not counted twice.
        """
        previous = state.workers[active.lease.worker].last_completed_at
        return max(now - max(active.granted_at, previous), 1e-6)

    def _live_workers(self, state: _Job, now: float) -> tuple[str, ...]:
        timeout = state.spec.lease_timeout_s
        return tuple(w.name for w in state.workers.values() if now - w.last_seen <= timeout)

    def _view(self, state: _Job, worker: str, now: float) -> policies_lib.PolicyView:
        outstanding = {name: 0 for name in state.workers}
        in_flight = {}
        for active in state.leases.values():
            lease = active.lease
            outstanding[lease.worker] += lease.size
            if not lease.speculative and not active.committed:  # committed: being delivered
                in_flight[lease.shard_index] = (lease.worker, active.granted_at)
        backed_up = {a.lease.shard_index for a in state.leases.values() if a.lease.speculative}
        return policies_lib.PolicyView(
            worker=worker,
            live_workers=self._live_workers(state, now),
            pending=state.pending,
            order=state.order,
            names=state.names,
            sizes=state.sizes,
            outstanding=outstanding,
            throughput={w.name: w.throughput for w in state.workers.values()},
            in_flight=tuple(
                policies_lib.InFlight(shard, holder, since, shard in backed_up)
                for shard, (holder, since) in in_flight.items()
            ),
            epoch=state.epoch,
            now=now,
        )

    @staticmethod
    def _may_lease(state: _Job, worker: str) -> bool:
        """Equalized: whether `worker` may lease more of the current epoch yet.

        Synchronous consumers train on as many elements each per epoch, so
        whatever one leases beyond another's share, the other pads with
        repeats. A consumer gets a shard only while its count in the epoch
        is at most each other member's (one with no lease yet counts 0):
        counts stay within one shard of each other, however the consumers'
        pipelines start or prefetch. Under a policy that never steals (a
        shard has one owner) the one behind may get nothing more, so no one
        is held back.
        """
        if state.spec.equalize == "none" or state.group_size <= 1 or not state.policy.steals:
            return True
        counts = state.epoch_counts.get(state.epoch, {})
        own = counts.get(worker, 0)
        # The other members' counts: the largest ones, should a consumer of
        # the epoch have left the group.
        others = sorted((c for w, c in counts.items() if w != worker), reverse=True)
        others = others[: state.group_size - 1]
        floor = min(others) if len(others) == state.group_size - 1 else 0
        return own <= floor

    def _checked_grants(
        self, state: _Job, worker: str, selection: policies_lib.Selection, max_shards: int
    ) -> list[tuple[int, bool]]:
        shards = list(dict.fromkeys(selection.shards))
        taken = {a.lease.shard_index for a in state.leases.values()} | state.done
        if len(shards) > max_shards or any(s in taken or s not in state.order for s in shards):
            raise RuntimeError(
                f"Policy {state.spec.policy!r} returned an invalid selection {selection}"
            )
        backups = []
        for shard in dict.fromkeys(selection.backups):
            holders = [state.leases[t].lease.worker for t in state.holders(shard)]
            if holders and worker not in holders and shard not in state.done:
                backups.append(shard)
        return [(s, False) for s in shards] + [(s, True) for s in backups]

    def _expire(self, state: _Job, now: float) -> None:
        overdue = [t for t, a in state.leases.items() if a.deadline < now]
        if overdue:
            self._commit_many(
                self._progress_records(state, overdue)
                + [{"op": "expire", "job": state.spec.name, "token": t} for t in overdue]
            )

    def _progress_records(self, state: _Job, tokens: list[int]) -> list[dict[str, Any]]:
        """Journal records of the progress of leases about to end unfinished."""
        return [
            {
                "op": "progress",
                "job": state.spec.name,
                "token": t,
                "offset": state.leases[t].progress,
            }
            for t in tokens
            if state.leases[t].progress > state.leases[t].lease.offset
        ]

    def _note_progress(self, state: _Job, worker: str, progress: dict[int, int]) -> None:
        """Records reported progress (in memory: journaled when a lease ends)."""
        for token, offset in progress.items():
            active = state.leases.get(token)
            if active is not None and active.lease.worker == worker and active.committed:
                active.progress = max(active.progress, offset)

    def _settle(
        self,
        state: _Job,
        worker: str,
        complete: tuple[int, ...],
        release: tuple[int, ...],
        now: float,
    ) -> tuple[int, ...]:
        """Completes and releases the worker's leases; the tokens no longer active."""
        self._expire(state, now)
        rejected, records = [], []
        done = [
            t
            for t in dict.fromkeys(complete)
            if t in state.leases and state.leases[t].lease.worker == worker
        ]
        rejected += [t for t in dict.fromkeys(complete) if t not in done]
        for token in done:
            # Shards completed together were read together: they share the time.
            busy_s = self._busy_s(state, state.leases[token], now) / len(done)
            records.append(
                {"op": "complete", "job": state.spec.name, "token": token, "busy_s": busy_s}
            )
        ending = []
        for token in dict.fromkeys(release):
            active = state.leases.get(token)
            if active is None or active.lease.worker != worker or token in complete:
                rejected.append(token)
                continue
            ending.append(token)
        records += self._progress_records(state, ending)
        records += [{"op": "release", "job": state.spec.name, "token": t} for t in ending]
        if records:
            self._commit_many(records)
        return tuple(rejected)

    def _granted(self, state: _Job, token: int) -> Lease:
        """A lease just granted (completed at grant: no longer active)."""
        active = state.leases.get(token)
        return active.lease if active is not None else state.completed_at_grant.pop(token)

    def _job_status(self, state: _Job) -> JobStatus:
        leased = {a.lease.shard_index for a in state.leases.values()}
        return JobStatus(
            name=state.spec.name,
            policy=state.spec.policy,
            epoch=state.epoch,
            num_epochs=state.spec.num_epochs,
            num_shards=len(state.spec.shards),
            pending=len(state.pending),
            leased=len(leased),
            completed=len(state.done),
            finished=state.finished,
            grants=state.grants,
        )

    # --- state changes: applied live and on recovery ---------------------------

    def _commit(self, record: dict[str, Any]) -> None:
        self._commit_many([record])

    def _commit_many(self, records: list[dict[str, Any]]) -> None:
        if self._journal is not None:
            self._journal.append_many(records)
        for record in records:
            self._apply(record, self._clock())
        if self._journal is not None and self._journal.should_snapshot():
            self._journal.snapshot(self._snapshot())

    def _apply(self, record: dict[str, Any], now: float) -> None:
        op = record["op"]
        if op == "create_job":
            spec = JobSpec.from_dict(record["spec"])
            self._jobs[spec.name] = _Job(spec)
            return
        state = self._jobs[record["job"]]
        if op == "extend_job":
            finished = state.finished
            state.spec = dataclasses.replace(state.spec, num_epochs=record["num_epochs"])
            if finished:
                state.start_epoch(state.epoch)
        elif op == "register":
            self._apply_register(state, record["worker"], now)
        elif op == "rewind":
            self._apply_rewind(state, InputPosition.from_dict(record["position"]))
            state.group_size = record.get("num_consumers", state.group_size)
        elif op == "grant":
            self._apply_grant(state, record, now)
        elif op == "commit":
            self._apply_commit(state, record["token"])
        elif op == "complete":
            self._apply_commit(state, record["token"])
            self._apply_complete(state, record["token"], record.get("busy_s"), now)
        elif op == "release":
            self._end_lease(state, record["token"], revoke=False)
        elif op == "progress":
            active = state.leases[record["token"]]
            active.progress = max(active.progress, record["offset"])
        elif op == "expire":
            self._apply_expire(state, record["token"])
        else:
            raise ValueError(f"Unknown journal record op {op!r}")

    def _apply_register(self, state: _Job, worker: str, now: float) -> None:
        if worker not in state.workers:
            state.workers[worker] = _Worker(worker, now)
            return
        for token in [t for t, a in state.leases.items() if a.lease.worker == worker]:
            self._end_lease(state, token, revoke=True)

    def _apply_expire(self, state: _Job, token: int) -> None:
        # Heartbeats do not renew an uncommitted lease (see `heartbeat`), so a
        # read that outlasts the lease would fail again on every re-grant; its
        # shard's next leases live longer instead.
        if not state.leases[token].committed:
            shard = state.leases[token].lease.shard_index
            state.slow[shard] = state.slow.get(shard, 0) + 1
        self._end_lease(state, token, revoke=True)

    def _end_lease(self, state: _Job, token: int, revoke: bool) -> None:
        """Ends a lease unfinished: its shard is pending again unless held or done."""
        active = state.leases.pop(token)
        if active.committed:
            self._count(state, active.lease, -1)
        shard = active.lease.shard_index
        if active.progress > active.lease.offset and shard not in state.done:
            state.offsets[shard] = max(state.offsets.get(shard, 0), active.progress)
        if shard not in state.done and not state.holders(shard):
            state.pending.insert(0, shard)
        if revoke:
            state.workers[active.lease.worker].revoked.add(token)

    def _apply_rewind(self, state: _Job, position: InputPosition) -> None:
        for token, active in state.leases.items():
            state.workers[active.lease.worker].revoked.add(token)
        state.leases.clear()
        state.epoch_counts = {e: c for e, c in state.epoch_counts.items() if e < position.epoch}
        state.start_epoch(position.epoch)
        state.done = set(position.done)
        state.pending = [s for s in state.pending if s not in state.done]
        partial = dict(position.partials)
        # Shards read in part first, so that few are open at a time.
        state.pending.sort(key=lambda shard: shard not in partial)
        state.offsets.update(partial)
        if len(state.done) == len(state.spec.shards):
            state.start_epoch(position.epoch + 1)

    def _apply_grant(self, state: _Job, record: dict[str, Any], now: float) -> None:
        shard = record["shard"]
        spec = state.spec.shards[shard]
        lease = Lease(
            state.spec.name,
            record["epoch"],
            shard,
            spec.name,
            spec.size,
            record["token"],
            record["worker"],
            record["speculative"],
            state.offsets.get(shard, 0),
        )
        if not record["speculative"]:
            state.pending.remove(shard)
        state.leases[lease.token] = _ActiveLease(lease, now, now + state.lifetime(shard))
        state.grants += 1
        self._next_token = max(self._next_token, lease.token + 1)
        claim = record.get("claim", "none")
        if claim != "none":
            self._apply_commit(state, lease.token)
        if claim == "complete":
            state.completed_at_grant[lease.token] = lease
            self._apply_complete(state, lease.token, None, now)

    def _apply_commit(self, state: _Job, token: int) -> None:
        active = state.leases[token]
        if active.committed:
            return
        active.committed = True
        self._count(state, active.lease, +1)
        for loser in state.holders(active.lease.shard_index):  # the race is decided
            if loser != token:
                state.workers[state.leases.pop(loser).lease.worker].revoked.add(loser)

    @staticmethod
    def _count(state: _Job, lease: Lease, sign: int) -> None:
        # The elements the lease reads: a shard resumed partway counts its rest.
        counts = state.epoch_counts.setdefault(lease.epoch, {})
        counts[lease.worker] = counts.get(lease.worker, 0) + sign * (lease.size - lease.offset)

    def _apply_complete(self, state: _Job, token: int, busy_s: Optional[float], now: float) -> None:
        lease = state.leases.pop(token).lease
        record = state.workers[lease.worker]
        record.completed_shards += 1
        record.completed_size += lease.size
        if busy_s is not None:  # None: an old record, whose time is unknown
            record.timed_size += lease.size
            record.busy_s += busy_s
        record.last_completed_at = now
        state.done.add(lease.shard_index)
        state.offsets.pop(lease.shard_index, None)
        if len(state.done) == len(state.spec.shards) and not state.leases:
            state.start_epoch(state.epoch + 1)

    # --- durability -------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        jobs = []
        for state in self._jobs.values():
            jobs.append(
                {
                    "spec": state.spec.to_dict(),
                    "epoch": state.epoch,
                    "pending": list(state.pending),
                    "done": sorted(state.done),
                    "grants": state.grants,
                    "epoch_counts": {str(e): c for e, c in state.epoch_counts.items()},
                    "group_size": state.group_size,
                    "offsets": {str(k): v for k, v in state.offsets.items()},
                    "slow": {str(k): v for k, v in state.slow.items()},
                    "workers": [
                        dataclasses.asdict(w) | {"revoked": sorted(w.revoked)}
                        for w in state.workers.values()
                    ],
                    "leases": [
                        dataclasses.asdict(a.lease)
                        | {"committed": a.committed, "progress": a.progress}
                        for a in state.leases.values()
                    ],
                }
            )
        return {"next_token": self._next_token, "jobs": jobs}

    def _recover(self) -> None:
        snapshot, records = self._journal.recover()
        now = self._clock()
        if snapshot is not None:
            self._restore(snapshot, now)
        for record in records:
            self._apply(record, now)
        for state in self._jobs.values():
            state.completed_at_grant.clear()  # replayed grants have no reply to wait for
            for active in state.leases.values():
                lifetime = state.lifetime(active.lease.shard_index)
                active.deadline = now + max(lifetime, self._restore_grace_s)

    def _restore(self, snapshot: dict[str, Any], now: float) -> None:
        self._next_token = snapshot["next_token"]
        for saved in snapshot["jobs"]:
            state = _Job(JobSpec.from_dict(saved["spec"]))
            state.start_epoch(saved["epoch"])
            state.pending = list(saved["pending"])
            state.done = set(saved["done"])
            state.grants = saved["grants"]
            state.epoch_counts = {int(e): c for e, c in saved["epoch_counts"].items()}
            state.group_size = saved.get("group_size", state.spec.num_consumers)
            state.offsets = {int(k): v for k, v in saved["offsets"].items()}
            state.slow = {int(k): v for k, v in saved.get("slow", {}).items()}
            for w in saved["workers"]:
                if "timed_size" not in w:  # an old snapshot: forget the times
                    w = {**w, "timed_size": 0, "busy_s": 0.0}
                fresh = {"last_seen": now, "revoked": set(w["revoked"]), "last_completed_at": 0.0}
                state.workers[w["name"]] = _Worker(**{**w, **fresh})
            for saved_lease in saved["leases"]:
                committed = saved_lease.pop("committed")
                progress = saved_lease.pop("progress", 0)
                lease = Lease(**saved_lease)
                state.leases[lease.token] = _ActiveLease(
                    lease, now, now + state.spec.lease_timeout_s, committed, progress
                )
            self._jobs[state.spec.name] = state


def _checked_progress(progress: Optional[dict[int, int]]) -> dict[int, int]:
    """`progress` as a dict; InvalidArgument for a negative offset."""
    progress = dict(progress or {})
    bad = {t: o for t, o in progress.items() if o < 0}
    if bad:
        token, offset = next(iter(bad.items()))
        raise InvalidArgument(
            f"Progress offsets must be >= 0. Received: offset={offset} for lease {token}"
        )
    return progress
