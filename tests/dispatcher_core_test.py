"""Tests for the dispatcher's state machine (no gRPC)."""

import collections
import dataclasses
import random

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import journal as journal_lib
from tfscale.data.dispatcher import types

TIMEOUT = 10.0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _spec(num_shards=6, policy="round_robin", num_epochs=1, name="job", sizes=None):
    shards = tuple(
        types.ShardSpec(f"shard-{i:03d}", sizes[i] if sizes else 1) for i in range(num_shards)
    )
    return types.JobSpec(name, shards, policy, num_epochs, seed=7, lease_timeout_s=TIMEOUT)


def _core(spec=None, workers=("w0", "w1"), journal=None):
    clock = FakeClock()
    dispatcher = core.DispatcherCore(clock=clock, journal=journal)
    if spec is not None:
        dispatcher.create_job(spec)
        for worker in workers:
            dispatcher.register_worker(spec.name, worker)
    return dispatcher, clock


def _drain(dispatcher, clock, job="job", workers=("w0", "w1", "w2"), seed=0, max_shards=2):
    """Random interleaving of acquires and completions until the job ends."""
    rng = random.Random(seed)
    held = {w: [] for w in workers}
    completed = []
    for _ in range(100_000):
        clock.now += 0.01
        worker = rng.choice(workers)
        dispatcher.heartbeat(job, worker)
        if held[worker] and rng.random() < 0.6:
            lease = held[worker].pop(0)
            try:
                dispatcher.complete(job, worker, lease.token)
            except types.FailedPrecondition:  # a speculative race lost: dropped
                continue
            completed.append((lease.epoch, lease.shard_name))
            continue
        result = dispatcher.acquire(job, worker, max_shards)
        held[worker].extend(result.leases)
        if result.end_of_job and not any(held.values()):
            return completed
    raise AssertionError("job did not end")


class JobTest(parameterized.TestCase):
    def test_create_is_idempotent_and_conflicts_are_rejected(self):
        dispatcher, _ = _core()
        self.assertTrue(dispatcher.create_job(_spec()))
        self.assertFalse(dispatcher.create_job(_spec()))
        with self.assertRaisesRegex(types.AlreadyExists, "Job 'job' exists with a different spec"):
            dispatcher.create_job(_spec(num_shards=7))
        self.assertEqual(dispatcher.jobs()[0].num_shards, 6)

    def test_a_finished_job_can_get_more_epochs(self):
        dispatcher, clock = _core(_spec(num_shards=4, num_epochs=1), workers=("w0",))
        first = _drain(dispatcher, clock, workers=("w0",))
        self.assertFalse(dispatcher.create_job(_spec(num_shards=4, num_epochs=3)))
        self.assertFalse(dispatcher.jobs()[0].finished)
        more = _drain(dispatcher, clock, workers=("w0",))
        self.assertEqual(sorted({e for e, _ in first}), [0])
        self.assertEqual(sorted({e for e, _ in more}), [1, 2])
        self.assertLen(more, 8)
        with self.assertRaisesRegex(types.AlreadyExists, "only num_epochs may grow: 3 -> 2"):
            dispatcher.create_job(_spec(num_shards=4, num_epochs=2))

    @parameterized.parameters(
        dict(change=dict(name=""), match="job name must not be empty"),
        dict(change=dict(shards=()), match="has no shards"),
        dict(change=dict(shards=(types.ShardSpec("a"), types.ShardSpec("a"))), match="unique"),
        dict(change=dict(num_epochs=0), match="num_epochs must be >= 1. Received: num_epochs=0"),
        dict(change=dict(lease_timeout_s=0.0), match="lease_timeout_s must be positive"),
        dict(
            change=dict(policy="random"), match="Unknown policy 'random'. Valid policies: adaptive"
        ),
    )
    def test_malformed_specs_are_invalid_and_change_nothing(self, change, match):
        dispatcher, _ = _core()
        spec = _spec()
        spec = types.JobSpec(**{**spec.__dict__, **change})
        with self.assertRaisesRegex(types.InvalidArgument, match):
            dispatcher.create_job(spec)
        self.assertEqual(dispatcher.jobs(), [])

    def test_epochs_use_seeded_permutations(self):
        orders = []
        for _ in range(2):
            dispatcher, clock = _core(_spec(num_shards=20, num_epochs=2), workers=("w0",))
            order = []
            while True:
                result = dispatcher.acquire("job", "w0", 1)
                if result.end_of_job:
                    break
                (lease,) = result.leases
                order.append((lease.epoch, lease.shard_index))
                dispatcher.complete("job", "w0", lease.token)
            orders.append(order)
        self.assertEqual(orders[0], orders[1])  # same seed, same order
        epoch0 = [s for e, s in orders[0] if e == 0]
        epoch1 = [s for e, s in orders[0] if e == 1]
        self.assertEqual(sorted(epoch0), list(range(20)))
        self.assertEqual(sorted(epoch1), list(range(20)))
        self.assertNotEqual(epoch0, epoch1)
        self.assertNotEqual(epoch0, list(range(20)))


class RequestOrderTest(parameterized.TestCase):
    def test_unknown_job_is_not_found(self):
        dispatcher, _ = _core(_spec())
        with self.assertRaisesRegex(types.NotFound, "No job 'nope'. Jobs: \\['job'\\]"):
            dispatcher.acquire("nope", "w0")

    def test_acquire_before_register_fails_precondition(self):
        dispatcher, _ = _core(_spec(), workers=())
        with self.assertRaisesRegex(types.FailedPrecondition, "'w9' is not registered"):
            dispatcher.acquire("job", "w9")
        self.assertEqual(dispatcher.jobs()[0].grants, 0)

    @parameterized.parameters(-1, types.MAX_SHARDS_PER_CALL + 1)
    def test_bad_max_shards_is_invalid(self, max_shards):
        dispatcher, _ = _core(_spec())
        with self.assertRaisesRegex(types.InvalidArgument, f"Received: max_shards={max_shards}"):
            dispatcher.acquire("job", "w0", max_shards)
        self.assertEqual(dispatcher.jobs()[0].pending, 6)

    def test_completing_unknown_or_foreign_lease_fails_and_changes_nothing(self):
        dispatcher, _ = _core(_spec())
        (lease,) = dispatcher.acquire("job", "w0", 1).leases
        before = dispatcher.status()
        with self.assertRaisesRegex(
            types.FailedPrecondition, "Lease 999 of job 'job' is not active"
        ):
            dispatcher.complete("job", "w0", 999)
        with self.assertRaisesRegex(
            types.FailedPrecondition, f"Lease {lease.token} belongs to 'w0'"
        ):
            dispatcher.complete("job", "w1", lease.token)
        self.assertEqual(dispatcher.status(), before)
        dispatcher.complete("job", "w0", lease.token)
        with self.assertRaisesRegex(types.FailedPrecondition, "is not active"):
            dispatcher.complete("job", "w0", lease.token)
        self.assertEqual(dispatcher.jobs()[0].completed, 1)


class LeaseTest(absltest.TestCase):
    def test_expired_lease_is_re_leased_and_fenced(self):
        dispatcher, clock = _core(_spec(num_shards=1))
        (first,) = dispatcher.acquire("job", "w0", 1).leases
        clock.now += TIMEOUT / 2
        self.assertEqual(dispatcher.acquire("job", "w1", 1).leases, ())  # still leased
        clock.now += TIMEOUT  # w0 never heartbeat
        dispatcher.heartbeat("job", "w1")
        (second,) = dispatcher.acquire("job", "w1", 1).leases
        self.assertEqual(second.shard_index, first.shard_index)
        self.assertGreater(second.token, first.token)
        with self.assertRaisesRegex(types.FailedPrecondition, f"Lease {first.token} .* not active"):
            dispatcher.complete("job", "w0", first.token)
        self.assertEqual(dispatcher.heartbeat("job", "w0"), [first.token])
        dispatcher.complete("job", "w1", second.token)
        self.assertTrue(dispatcher.jobs()[0].finished)

    def test_heartbeats_keep_committed_leases(self):
        dispatcher, clock = _core(_spec(num_shards=1))
        (lease,) = dispatcher.acquire("job", "w0", 1).leases
        dispatcher.commit("job", "w0", lease.token)
        for _ in range(5):
            clock.now += TIMEOUT * 0.8
            self.assertEqual(dispatcher.heartbeat("job", "w0"), [])
        dispatcher.complete("job", "w0", lease.token)
        self.assertTrue(dispatcher.jobs()[0].finished)

    def test_an_uncommitted_grant_expires_despite_heartbeats(self):
        # The dispatcher journaled the grant but its reply was lost: the
        # worker does not know the lease, and its heartbeats must not keep it.
        dispatcher, clock = _core(_spec(num_shards=2), workers=("w0", "w1"))
        (orphan,) = dispatcher.acquire("job", "w0", 1).leases
        for _ in range(2):
            clock.now += TIMEOUT * 0.8
            dispatcher.heartbeat("job", "w0")
        shards = {lease.shard_index for lease in dispatcher.acquire("job", "w1", 2).leases}
        self.assertIn(orphan.shard_index, shards)
        with self.assertRaisesRegex(types.FailedPrecondition, "not active"):
            dispatcher.commit("job", "w0", orphan.token)

    def test_registering_again_ends_the_previous_registrations_leases(self):
        dispatcher, _ = _core(_spec(num_shards=2), workers=("w0",))
        old = dispatcher.acquire("job", "w0", 1).leases[0]
        dispatcher.commit("job", "w0", old.token)
        dispatcher.register_worker("job", "w0")  # the process restarted
        with self.assertRaisesRegex(types.FailedPrecondition, "not active"):
            dispatcher.complete("job", "w0", old.token)
        (new,) = dispatcher.acquire("job", "w0", 1).leases
        self.assertEqual(new.shard_index, old.shard_index)

    def test_release_puts_shard_back_first(self):
        dispatcher, _ = _core(_spec(num_shards=3), workers=("w0",))
        leases = dispatcher.acquire("job", "w0", 2).leases
        dispatcher.release("job", "w0", leases[1].token)
        (again,) = dispatcher.acquire("job", "w0", 1).leases
        self.assertEqual(again.shard_index, leases[1].shard_index)

    def test_dead_worker_leaves_the_live_set(self):
        dispatcher, clock = _core(_spec(), workers=("w0", "w1"))
        clock.now += TIMEOUT + 1
        dispatcher.heartbeat("job", "w1")
        live = {w.worker: w.live for w in dispatcher.status().workers}
        self.assertEqual(live, {"w0": False, "w1": True})


def _read_slowly(dispatcher, clock, job, workers, duration):
    """Advances the clock by `duration` while `workers` heartbeat (a long read)."""
    steps = int(duration / (TIMEOUT * 0.4)) + 1
    for _ in range(steps):
        clock.now += duration / steps
        for worker in workers:
            dispatcher.heartbeat(job, worker)


class SlowShardTest(parameterized.TestCase):
    @parameterized.parameters("round_robin", "least_loaded", "consistent_hash", "adaptive")
    def test_a_read_longer_than_the_lease_timeout_finishes(self, policy):
        dispatcher, clock = _core(_spec(1, policy), workers=("w0",))
        (first,) = dispatcher.acquire("job", "w0", 1).leases
        _read_slowly(dispatcher, clock, "job", ["w0"], 1.5 * TIMEOUT)
        with self.assertRaisesRegex(types.FailedPrecondition, "not active"):
            dispatcher.commit("job", "w0", first.token)
        (second,) = dispatcher.acquire("job", "w0", 1).leases
        self.assertEqual(second.shard_index, first.shard_index)
        _read_slowly(dispatcher, clock, "job", ["w0"], 1.5 * TIMEOUT)
        dispatcher.commit("job", "w0", second.token)
        dispatcher.complete("job", "w0", second.token)
        self.assertTrue(dispatcher.jobs()[0].finished)

    def test_lease_lifetimes_double_up_to_the_cap(self):
        dispatcher, clock = _core(_spec(1), workers=("w0",))
        lifetimes = []
        for _ in range(core.MAX_LEASE_DOUBLINGS + 2):
            granted = clock.now
            (lease,) = dispatcher.acquire("job", "w0", 1).leases
            while dispatcher.heartbeat("job", "w0") != [lease.token]:
                clock.now += 1.0
            lifetimes.append(clock.now - granted - 1.0)
        expected = [TIMEOUT * 2 ** min(n, core.MAX_LEASE_DOUBLINGS) for n in range(len(lifetimes))]
        self.assertEqual(lifetimes, expected)

    def test_a_consistent_hash_owner_gets_its_expired_shard_back(self):
        dispatcher, clock = _core(_spec(8, "consistent_hash"), workers=("w0", "w1"))
        (slow,) = dispatcher.acquire("job", "w0", 1).leases
        _read_slowly(dispatcher, clock, "job", ["w0", "w1"], 1.5 * TIMEOUT)
        with self.assertRaisesRegex(types.FailedPrecondition, "not active"):
            dispatcher.commit("job", "w0", slow.token)
        others = dispatcher.acquire("job", "w1", 8).leases  # w1 does not steal it
        self.assertNotIn(slow.shard_index, [lease.shard_index for lease in others])
        (again,) = dispatcher.acquire("job", "w0", 1).leases
        self.assertEqual(again.shard_index, slow.shard_index)
        _read_slowly(dispatcher, clock, "job", ["w0", "w1"], 1.5 * TIMEOUT)
        dispatcher.complete("job", "w0", again.token)
        for worker in ("w0", "w1"):
            while leases := dispatcher.acquire("job", worker, 8).leases:
                for lease in leases:
                    dispatcher.complete("job", worker, lease.token)
        self.assertTrue(dispatcher.jobs()[0].finished)

    def test_a_dead_consistent_hash_owners_shards_move_to_a_live_worker(self):
        dispatcher, clock = _core(_spec(8, "consistent_hash"), workers=("w0", "w1"))
        held = dispatcher.acquire("job", "w0", 8).leases
        self.assertNotEmpty(held)
        mine = dispatcher.acquire("job", "w1", 8).leases
        self.assertLen(held + mine, 8)
        for lease in mine:
            dispatcher.complete("job", "w1", lease.token)
        clock.now += TIMEOUT + 1  # w0 died holding its leases
        taken = dispatcher.acquire("job", "w1", 8).leases
        self.assertCountEqual([l.shard_index for l in taken], [l.shard_index for l in held])
        for lease in taken:
            dispatcher.complete("job", "w1", lease.token)
        self.assertTrue(dispatcher.jobs()[0].finished)

    @parameterized.parameters(1, 1000)
    def test_slow_shards_survive_a_restart(self, snapshot_every):
        work_dir = self.create_tempdir().full_path
        journal = journal_lib.Journal(work_dir, fsync=False, snapshot_every=snapshot_every)
        dispatcher, clock = _core(_spec(1), workers=("w0",), journal=journal)
        dispatcher.acquire("job", "w0", 1)
        clock.now += TIMEOUT + 1
        dispatcher.expire_all()
        journal.close()

        restarted, clock = _core(
            journal=journal_lib.Journal(work_dir, fsync=False, snapshot_every=snapshot_every)
        )
        restarted.register_worker("job", "w0")
        (lease,) = restarted.acquire("job", "w0", 1).leases
        _read_slowly(restarted, clock, "job", ["w0"], 1.5 * TIMEOUT)
        restarted.complete("job", "w0", lease.token)


class ExactlyOnceTest(parameterized.TestCase):
    @parameterized.parameters("round_robin", "least_loaded", "consistent_hash", "adaptive")
    def test_every_shard_completed_once_per_epoch(self, policy):
        sizes = [1 + (i * 7) % 11 for i in range(30)]
        dispatcher, clock = _core(
            _spec(30, policy, num_epochs=3, sizes=sizes), workers=("w0", "w1", "w2")
        )
        completed = _drain(dispatcher, clock)
        counts = collections.Counter(completed)
        self.assertLen(counts, 90)
        self.assertEqual(set(counts.values()), {1})
        self.assertTrue(dispatcher.jobs()[0].finished)

    def test_speculative_backup_first_completion_wins(self):
        sizes = [10] * 16
        dispatcher, clock = _core(_spec(16, "adaptive", sizes=sizes), workers=("fast", "slow"))
        # Give both workers a throughput history: fast takes 1s, slow 10s per shard.
        (a,) = dispatcher.acquire("job", "fast", 1).leases
        (b,) = dispatcher.acquire("job", "slow", 1).leases
        clock.now += 1
        dispatcher.complete("job", "fast", a.token)
        (c,) = dispatcher.acquire("job", "fast", 1).leases
        clock.now += 1
        dispatcher.complete("job", "fast", c.token)
        clock.now += 8
        dispatcher.complete("job", "slow", b.token)
        # 13 shards (130 units) left for 11 units/s together: the slow worker
        # (10 s per shard) still finishes one within that horizon.
        (d,) = dispatcher.acquire("job", "slow", 1).leases
        while True:  # the fast worker drains the rest (within d's lease), then backs d up
            clock.now += 0.2
            (lease,) = dispatcher.acquire("job", "fast", 1).leases
            if lease.speculative:
                break
            dispatcher.complete("job", "fast", lease.token)
        self.assertEqual(lease.shard_index, d.shard_index)
        dispatcher.complete("job", "fast", lease.token)
        with self.assertRaisesRegex(types.FailedPrecondition, "not active"):
            dispatcher.complete("job", "slow", d.token)
        self.assertEqual(dispatcher.heartbeat("job", "slow"), [d.token])
        self.assertTrue(dispatcher.jobs()[0].finished)

    def test_slow_worker_gets_nothing_it_would_finish_last(self):
        dispatcher, clock = _core(_spec(4, "adaptive", sizes=[10] * 4), workers=("fast", "slow"))
        (a,) = dispatcher.acquire("job", "fast", 1).leases
        (b,) = dispatcher.acquire("job", "slow", 1).leases
        clock.now += 1
        dispatcher.complete("job", "fast", a.token)
        clock.now += 9
        dispatcher.complete("job", "slow", b.token)
        (c,) = dispatcher.acquire("job", "fast", 1).leases
        # 10 pending + 10 held = 20 units / 11 units/s: under the slow worker's 10 s per shard.
        self.assertEqual(dispatcher.acquire("job", "slow", 1).leases, ())
        dispatcher.complete("job", "fast", c.token)
        self.assertLen(dispatcher.acquire("job", "fast", 1).leases, 1)


class LimitTest(parameterized.TestCase):
    def test_jobs_are_bounded(self):
        dispatcher, _ = _core()
        for i in range(types.MAX_JOBS):
            dispatcher.create_job(_spec(1, name=f"job-{i}"))
        with self.assertRaisesRegex(types.ResourceExhausted, "at most 1024 jobs"):
            dispatcher.create_job(_spec(1, name="one-more"))
        self.assertFalse(dispatcher.create_job(_spec(1, name="job-0")))

    def test_status_lists_live_workers_first_and_counts_the_rest(self):
        dispatcher, clock = _core(_spec(1), workers=())
        dispatcher.register_worker("job", "gone")
        clock.now += 2 * TIMEOUT
        for i in range(core.MAX_STATUS_WORKERS):
            dispatcher.register_worker("job", f"w{i}")
        status = dispatcher.status()
        self.assertLen(status.workers, core.MAX_STATUS_WORKERS)
        self.assertTrue(all(w.live for w in status.workers))
        self.assertEqual(status.omitted_workers, 1)

    def test_not_found_lists_few_jobs(self):
        dispatcher, _ = _core()
        for i in range(20):
            dispatcher.create_job(_spec(1, name=f"{i:02d}".ljust(1000, "j")))
        with self.assertRaises(types.NotFound) as raised:
            dispatcher.heartbeat("nope", "w0")
        self.assertLess(len(str(raised.exception)), 2000)


class OneRoundTripTest(parameterized.TestCase):
    """Acquires that claim at grant and settle what is due; progress offsets."""

    def test_claim_commit_then_complete_on_the_next_acquire(self):
        dispatcher, _ = _core(_spec(num_shards=4), workers=("w0",))
        first = dispatcher.acquire("job", "w0", 2, claim="commit")
        self.assertLen(first.leases, 2)
        second = dispatcher.acquire(
            "job", "w0", 2, claim="commit", complete=tuple(l.token for l in first.leases)
        )
        self.assertLen(second.leases, 2)
        (status,) = dispatcher.jobs()
        self.assertEqual((status.completed, status.leased), (2, 2))
        last = dispatcher.acquire("job", "w0", 2, complete=tuple(l.token for l in second.leases))
        self.assertTrue(last.end_of_job)

    def test_committed_at_grant_is_renewed_by_heartbeats(self):
        dispatcher, clock = _core(_spec(num_shards=2), workers=("w0",))
        (lease,) = dispatcher.acquire("job", "w0", 1, claim="commit").leases
        for _ in range(5):
            clock.now += TIMEOUT * 0.6
            self.assertEqual(dispatcher.heartbeat("job", "w0"), [])
        dispatcher.acquire("job", "w0", 0, complete=(lease.token,))
        self.assertEqual(dispatcher.jobs()[0].completed, 1)

    def test_claim_complete_completes_at_grant(self):
        dispatcher, _ = _core(_spec(num_shards=3), workers=("w0",))
        result = dispatcher.acquire("job", "w0", 3, claim="complete")
        self.assertLen(result.leases, 3)
        self.assertTrue(dispatcher.acquire("job", "w0", 1).end_of_job)

    def test_stale_tokens_are_rejected_not_failed(self):
        dispatcher, clock = _core(_spec(num_shards=4), workers=("w0",))
        (lease,) = dispatcher.acquire("job", "w0", 1, claim="commit").leases
        clock.now += TIMEOUT + 1  # no heartbeat: the lease expires
        result = dispatcher.acquire("job", "w0", 1, claim="commit", complete=(lease.token, 999))
        self.assertEqual(sorted(result.rejected), [lease.token, 999])
        self.assertLen(result.leases, 1)  # the grant still happens

    def test_bad_settlement_changes_nothing(self):
        dispatcher, _ = _core(_spec(num_shards=4), workers=("w0",))
        (lease,) = dispatcher.acquire("job", "w0", 1, claim="commit").leases
        before = dispatcher.status()
        for kwargs in (
            dict(claim="maybe", complete=(lease.token,)),
            dict(progress={lease.token: -1}, complete=(lease.token,)),
            dict(complete=tuple(range(core.MAX_TOKENS_PER_CALL + 1))),
        ):
            with self.assertRaises(types.InvalidArgument):
                dispatcher.acquire("job", "w0", 1, **kwargs)
        self.assertEqual(dispatcher.status().jobs, before.jobs)

    @parameterized.named_parameters(
        dict(testcase_name="expired", end="expire"),
        dict(testcase_name="released", end="release"),
        dict(testcase_name="reregistered", end="register"),
    )
    def test_a_lease_ended_unfinished_resumes_at_its_progress(self, end):
        dispatcher, clock = _core(_spec(num_shards=1, sizes=[50]), workers=("w0", "w1"))
        (lease,) = dispatcher.acquire("job", "w0", 1, claim="commit").leases
        dispatcher.heartbeat("job", "w0", {lease.token: 20})
        dispatcher.heartbeat("job", "w0", {lease.token: 17})  # never backwards
        if end == "expire":
            clock.now += TIMEOUT + 1
            dispatcher.heartbeat("job", "w1")
        elif end == "release":
            dispatcher.acquire("job", "w0", 0, release=(lease.token,))
        else:
            dispatcher.register_worker("job", "w0")
        (again,) = dispatcher.acquire("job", "w1", 1, claim="commit").leases
        self.assertEqual((again.shard_index, again.offset), (lease.shard_index, 20))

    def test_progress_survives_a_restart_once_the_lease_ended(self):
        work_dir = self.create_tempdir().full_path
        journal = journal_lib.Journal(work_dir, fsync=False)
        dispatcher, _ = _core(_spec(num_shards=1, sizes=[50]), journal=journal)
        (lease,) = dispatcher.acquire("job", "w0", 1, claim="commit").leases
        dispatcher.acquire("job", "w0", 0, release=(lease.token,), progress={lease.token: 31})
        journal.close()
        restarted, _ = _core(journal=journal_lib.Journal(work_dir, fsync=False))
        (again,) = restarted.acquire("job", "w1", 1, claim="commit").leases
        self.assertEqual(again.offset, 31)


class RecoveryTest(parameterized.TestCase):
    def test_state_survives_a_restart(self):
        work_dir = self.create_tempdir().full_path
        journal = journal_lib.Journal(work_dir, fsync=False, snapshot_every=7)
        dispatcher, clock = _core(_spec(10, num_epochs=2), journal=journal)
        held = list(dispatcher.acquire("job", "w0", 3).leases)
        for lease in held[:2]:
            dispatcher.complete("job", "w0", lease.token)
        more = dispatcher.acquire("job", "w1", 2).leases
        before = dispatcher.status()
        journal.close()

        restarted, _ = _core(journal=journal_lib.Journal(work_dir, fsync=False, snapshot_every=7))
        after = restarted.status()
        self.assertEqual(after.jobs, before.jobs)
        strip = lambda ws: [dataclasses.replace(w, throughput=0.0) for w in ws]
        self.assertEqual(strip(after.workers), strip(before.workers))
        # The leases live on: their holders can complete them, tokens keep growing.
        restarted.complete("job", "w0", held[2].token)
        restarted.complete("job", "w1", more[0].token)
        (new,) = restarted.acquire("job", "w0", 1).leases
        self.assertGreater(new.token, max(l.token for l in held + list(more)))

    def test_restored_leases_outlive_the_lease_timeout_by_the_grace(self):
        work_dir = self.create_tempdir().full_path
        journal = journal_lib.Journal(work_dir, fsync=False)
        dispatcher, _ = _core(_spec(2), workers=("live", "dead"), journal=journal)
        leases = {}
        for worker in ("live", "dead"):
            (leases[worker],) = dispatcher.acquire("job", worker, 1).leases
            dispatcher.commit("job", worker, leases[worker].token)
        journal.close()

        clock = FakeClock()
        restarted = core.DispatcherCore(
            clock=clock,
            journal=journal_lib.Journal(work_dir, fsync=False),
            restore_grace_s=3 * TIMEOUT,
        )
        clock.now += 2 * TIMEOUT  # past the lease timeout: "live" is still reconnecting
        restarted.expire_all()
        self.assertEqual(restarted.heartbeat("job", "live"), [])
        clock.now += TIMEOUT / 2
        self.assertEqual(restarted.heartbeat("job", "live"), [])
        clock.now += TIMEOUT / 2 + 0.1  # past the grace
        restarted.expire_all()
        restarted.complete("job", "live", leases["live"].token)
        with self.assertRaisesRegex(types.FailedPrecondition, "not active"):
            restarted.complete("job", "dead", leases["dead"].token)
        (again,) = restarted.acquire("job", "live", 1).leases
        self.assertEqual(again.shard_index, leases["dead"].shard_index)

    def test_restore_grace_must_be_finite_and_not_negative(self):
        for grace in (-1.0, float("inf"), float("nan")):
            with self.assertRaisesRegex(ValueError, "restore_grace_s must be finite"):
                core.DispatcherCore(restore_grace_s=grace)

    @parameterized.named_parameters(("replay", 1000), ("snapshot_and_replay", 3), ("snapshot", 1))
    def test_throughput_estimates_survive_a_restart(self, snapshot_every):
        work_dir = self.create_tempdir().full_path
        journal = journal_lib.Journal(work_dir, fsync=False, snapshot_every=snapshot_every)
        spec = _spec(4, "adaptive", sizes=[10] * 4)
        dispatcher, clock = _core(spec, workers=("fast", "slow"), journal=journal)
        (a,) = dispatcher.acquire("job", "fast", 1).leases
        (b,) = dispatcher.acquire("job", "slow", 1).leases
        clock.now += 1
        dispatcher.complete("job", "fast", a.token)
        clock.now += 9
        dispatcher.complete("job", "slow", b.token)
        journal.close()

        restarted, _ = _core(
            journal=journal_lib.Journal(work_dir, fsync=False, snapshot_every=snapshot_every)
        )
        speeds = {w.worker: w.throughput for w in restarted.status().workers}
        self.assertAlmostEqual(speeds["fast"], 10.0)
        self.assertAlmostEqual(speeds["slow"], 1.0)
        # The adaptive policy still knows the slow worker: nothing it would finish last.
        restarted.acquire("job", "fast", 1)
        self.assertEqual(restarted.acquire("job", "slow", 1).leases, ())

    def test_completions_journaled_without_their_time_leave_throughput_unknown(self):
        work_dir = self.create_tempdir().full_path
        with journal_lib.Journal(work_dir, fsync=False) as journal:
            journal.recover()
            journal.append_many(
                [
                    {"op": "create_job", "spec": _spec(2).to_dict()},
                    {"op": "register", "job": "job", "worker": "w0"},
                    {
                        "op": "grant",
                        "job": "job",
                        "worker": "w0",
                        "shard": 0,
                        "epoch": 0,
                        "token": 1,
                        "speculative": False,
                    },
                    {"op": "complete", "job": "job", "token": 1},
                ]
            )
        restarted, _ = _core(journal=journal_lib.Journal(work_dir, fsync=False))
        (worker,) = restarted.status().workers
        self.assertEqual((worker.completed_size, worker.throughput), (1, 0.0))


if __name__ == "__main__":
    absltest.main()
