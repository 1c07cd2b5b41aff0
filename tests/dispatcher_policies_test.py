"""Tests for tfscale.data.dispatcher.policies."""

import collections
import dataclasses
import heapq
import random
from typing import Mapping
from typing import Optional
from typing import Sequence
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data.dispatcher import hash_ring
from tfscale.data.dispatcher import policies
from tfscale.data.dispatcher import types


def _names(num_shards: int) -> list[str]:
    return [f"shard-{i:05d}" for i in range(num_shards)]


def _permutation(num_shards: int, seed: int) -> list[int]:
    """Shard indices in a seeded epoch order."""
    shards = list(range(num_shards))
    random.Random(seed).shuffle(shards)
    return shards


def make_view(
    worker: str,
    live_workers: Sequence[str],
    pending: Sequence[int],
    *,
    num_shards: Optional[int] = None,
    permutation: Optional[Sequence[int]] = None,
    sizes: Optional[Mapping[int, int]] = None,
    outstanding: Optional[Mapping[str, int]] = None,
    throughput: Optional[Mapping[str, float]] = None,
    in_flight: Sequence[policies.InFlight] = (),
    epoch: int = 0,
    now: float = 0.0,
) -> policies.PolicyView:
    """A view over `num_shards` shards; `permutation` is the epoch order (identity by default).

    `pending` is put in permutation order, as the core does.
    """
    if num_shards is None:
        num_shards = len(permutation) if permutation is not None else max(pending, default=-1) + 1
    if permutation is None:
        permutation = list(range(num_shards))
    order = {shard: rank for rank, shard in enumerate(permutation)}
    return policies.PolicyView(
        worker=worker,
        live_workers=tuple(live_workers),
        pending=tuple(sorted(pending, key=order.__getitem__)),
        order=order,
        names=dict(enumerate(_names(num_shards))),
        sizes=dict(sizes) if sizes is not None else {shard: 1 for shard in range(num_shards)},
        outstanding=dict(outstanding or {}),
        throughput=dict(throughput or {}),
        in_flight=tuple(in_flight),
        epoch=epoch,
        now=now,
    )


class RoundRobinTest(parameterized.TestCase):
    WORKERS = ("w0", "w1", "w2")

    @parameterized.parameters(0, 1, 7)
    def test_workers_in_turn_get_their_residue_class_in_order(self, seed):
        num_shards = 12
        permutation = _permutation(num_shards, seed)
        pending = list(permutation)
        policy = policies.RoundRobin()
        granted = collections.defaultdict(list)
        for turn in range(num_shards):
            worker = self.WORKERS[turn % 3]
            view = make_view(worker, self.WORKERS, pending, permutation=permutation)
            selection = policy.select(view, max_shards=1)
            self.assertLen(selection.shards, 1)
            self.assertEqual(selection.backups, ())
            granted[worker].extend(selection.shards)
            pending.remove(selection.shards[0])
        for i, worker in enumerate(self.WORKERS):
            self.assertEqual(granted[worker], permutation[i::3])

    def test_steals_in_permutation_order_once_own_are_exhausted(self):
        permutation = _permutation(9, seed=3)
        # w0 owns ranks 0, 3, 6; all three are done.
        pending = [shard for rank, shard in enumerate(permutation) if rank % 3 != 0]
        view = make_view("w0", self.WORKERS, pending, permutation=permutation)
        selection = policies.RoundRobin().select(view, max_shards=2)
        self.assertEqual(selection.shards, (permutation[1], permutation[2]))

    def test_own_shards_come_before_stolen_ones(self):
        permutation = _permutation(9, seed=4)
        # w0 has only rank 6 left of its own; others' ranks 1, 2, 4 are still pending.
        pending = [permutation[rank] for rank in (1, 2, 4, 6)]
        view = make_view("w0", self.WORKERS, pending, permutation=permutation)
        selection = policies.RoundRobin().select(view, max_shards=3)
        self.assertEqual(selection.shards, (permutation[6], permutation[1], permutation[2]))

    def test_dead_worker_does_not_stall_the_epoch(self):
        permutation = _permutation(10, seed=5)
        pending = list(permutation)
        policy = policies.RoundRobin()
        granted = []
        turn = 0
        while pending:
            # w2 is registered but never asks.
            worker = ("w0", "w1")[turn % 2]
            view = make_view(worker, self.WORKERS, pending, permutation=permutation)
            shards = policy.select(view, max_shards=2).shards
            self.assertNotEmpty(shards)
            granted.extend(shards)
            pending = [shard for shard in pending if shard not in shards]
            turn += 1
        self.assertCountEqual(granted, permutation)

    def test_at_most_max_shards(self):
        view = make_view("w0", self.WORKERS, range(9))
        self.assertLen(policies.RoundRobin().select(view, max_shards=4).shards, 4)
        self.assertEqual(policies.RoundRobin().select(view, max_shards=0).shards, ())


def _sizes(distribution: str, num_shards: int, seed: int) -> dict[int, int]:
    rng = random.Random(seed)
    if distribution == "zipf":
        values = [rng.paretovariate(1.1) * 10 for _ in range(num_shards)]
    else:
        values = [rng.lognormvariate(3.0, 1.0) for _ in range(num_shards)]
    return {shard: max(1, round(value)) for shard, value in enumerate(values)}


class LeastLoadedTest(parameterized.TestCase):
    WORKERS = ("w0", "w1", "w2", "w3")

    def _simulate(self, sizes, max_shards):
        """Equal-speed workers (1 size unit per second) consume all shards; FIFO per worker.

        A worker asks whenever it holds fewer than `max_shards` shards, and
        otherwise when one of its shards completes.

        Returns:
          (worker -> granted shards, worker -> total size processed).
        """
        num_shards = len(sizes)
        permutation = _permutation(num_shards, seed=11)
        pending = list(permutation)
        policy = policies.LeastLoaded()
        queues = {worker: collections.deque() for worker in self.WORKERS}
        busy_until = {worker: 0.0 for worker in self.WORKERS}
        granted = collections.defaultdict(list)
        events = []  # (finish time, worker, shard)

        def ask(worker, now):
            outstanding = {w: sum(sizes[s] for s in queues[w]) for w in self.WORKERS}
            view = make_view(
                worker,
                self.WORKERS,
                pending,
                permutation=permutation,
                sizes=sizes,
                outstanding=outstanding,
                now=now,
            )
            want = max_shards - len(queues[worker])
            shards = policy.select(view, max_shards=want).shards
            if shards and outstanding[worker] > 0:
                # Nobody gets more than one (the largest pending) shard ahead.
                least_other = min(outstanding[w] for w in self.WORKERS if w != worker)
                limit = least_other + max(sizes[s] for s in view.pending)
                self.assertLessEqual(outstanding[worker] + sum(sizes[s] for s in shards), limit)
            for shard in shards:
                pending.remove(shard)
                granted[worker].append(shard)
                queues[worker].append(shard)
                busy_until[worker] = max(busy_until[worker], now) + sizes[shard]
                heapq.heappush(events, (busy_until[worker], worker, shard))

        for worker in self.WORKERS:
            ask(worker, 0.0)
        while events:
            now, worker, shard = heapq.heappop(events)
            self.assertEqual(queues[worker].popleft(), shard)
            # Everyone idle or below its limit asks again when anything completes.
            for other in (worker,) + tuple(w for w in self.WORKERS if w != worker):
                ask(other, now)
        self.assertEmpty(pending)
        processed = {w: sum(sizes[s] for s in granted[w]) for w in self.WORKERS}
        return granted, processed

    @parameterized.product(distribution=["zipf", "lognormal"], seed=[0, 1, 2])
    def test_balanced_under_uneven_shard_sizes(self, distribution, seed):
        sizes = _sizes(distribution, num_shards=40, seed=seed)
        granted, processed = self._simulate(sizes, max_shards=1)
        all_granted = [shard for shards in granted.values() for shard in shards]
        self.assertCountEqual(all_granted, range(40))  # every shard exactly once
        self.assertLessEqual(max(processed.values()) - min(processed.values()), max(sizes.values()))

    @parameterized.product(distribution=["zipf", "lognormal"], seed=[0, 1, 2], max_shards=[2, 3])
    def test_prefetching_workers_stay_within_one_shard(self, distribution, seed, max_shards):
        sizes = _sizes(distribution, num_shards=40, seed=seed)
        granted, processed = self._simulate(sizes, max_shards=max_shards)
        self.assertCountEqual([s for shards in granted.values() for s in shards], range(40))
        self.assertLessEqual(max(processed.values()) - min(processed.values()), max(sizes.values()))

    def test_requester_far_ahead_gets_nothing(self):
        sizes = {0: 50, 1: 30, 2: 10}
        view = make_view(
            "w0",
            self.WORKERS,
            [0, 1, 2],
            sizes=sizes,
            outstanding={"w0": 200, "w1": 100, "w2": 140, "w3": 120},
        )
        # 200 > 100 + 50: w0 is more than the largest shard ahead of w1.
        self.assertEqual(policies.LeastLoaded().select(view, max_shards=3), policies.Selection())

    def test_idle_requester_always_gets_the_largest_shard(self):
        sizes = {0: 5, 1: 80, 2: 80, 3: 20}
        view = make_view("w0", self.WORKERS, [0, 1, 2, 3], permutation=[2, 0, 3, 1], sizes=sizes)
        # Ties by permutation order: shard 2 comes before shard 1. A second shard
        # would put w0 at 80 + 80 > 0 + 80.
        self.assertEqual(policies.LeastLoaded().select(view, max_shards=3).shards, (2,))

    def test_grants_largest_first_within_the_limit(self):
        sizes = {0: 10, 1: 50, 2: 20, 3: 30}
        view = make_view(
            "w0",
            self.WORKERS,
            [0, 1, 2, 3],
            sizes=sizes,
            outstanding={"w0": 0, "w1": 30, "w2": 60, "w3": 90},
        )
        # Limit 30 + 50 = 80: 50, then 50 + 30 = 80; adding 20 would exceed it.
        self.assertEqual(policies.LeastLoaded().select(view, max_shards=4).shards, (1, 3))

    def test_only_live_worker_takes_up_to_max_shards(self):
        view = make_view("w0", ["w0"], range(5), outstanding={"w0": 3})
        self.assertLen(policies.LeastLoaded().select(view, max_shards=4).shards, 4)


class ConsistentHashTest(parameterized.TestCase):
    NAMES = _names(200)
    WORKERS_4 = [f"worker-{i}" for i in range(4)]
    WORKERS_5 = [f"worker-{i}" for i in range(5)]

    def test_assignment_is_stable_across_calls_and_instances(self):
        first = policies.ConsistentHash().assignment(self.NAMES, self.WORKERS_4)
        policy = policies.ConsistentHash()
        self.assertEqual(policy.assignment(self.NAMES, self.WORKERS_4), first)
        self.assertEqual(policy.assignment(list(reversed(self.NAMES)), self.WORKERS_4), first)
        self.assertEqual(policy.assignment(self.NAMES, list(reversed(self.WORKERS_4))), first)
        self.assertEqual(set(first), set(self.NAMES))

    def test_owners_are_the_same_across_epochs(self):
        policy = policies.ConsistentHash()
        owned = []
        for epoch, seed in enumerate((1, 2)):
            permutation = _permutation(200, seed)
            owned_this_epoch = {}
            for worker in self.WORKERS_4:
                view = make_view(
                    worker, self.WORKERS_4, permutation, permutation=permutation, epoch=epoch
                )
                shards = policy.select(view, max_shards=200).shards
                ranks = [view.order[shard] for shard in shards]
                self.assertEqual(ranks, sorted(ranks))  # own shards in permutation order
                owned_this_epoch[worker] = set(shards)
            owned.append(owned_this_epoch)
        self.assertEqual(owned[0], owned[1])
        self.assertCountEqual([s for shards in owned[0].values() for s in shards], range(200))

    @parameterized.parameters((8, 0.25), (64, 0.35))
    def test_shares_are_close_to_the_mean(self, num_workers, spread):
        names = _names(20_000)
        workers = [f"worker-{i}" for i in range(num_workers)]
        counts = collections.Counter(policies.ConsistentHash().assignment(names, workers).values())
        mean = len(names) / num_workers
        self.assertLen(counts, num_workers)
        self.assertLessEqual(max(counts.values()), (1 + spread) * mean)
        self.assertGreaterEqual(min(counts.values()), (1 - spread) * mean)

    def test_a_join_moves_shards_only_to_the_new_worker(self):
        policy = policies.ConsistentHash()
        before = policy.assignment(self.NAMES, self.WORKERS_4)
        after = policy.assignment(self.NAMES, self.WORKERS_5)
        moved = [name for name in self.NAMES if before[name] != after[name]]
        self.assertNotEmpty(moved)
        self.assertEqual({after[name] for name in moved}, {"worker-4"})
        self.assertLessEqual(len(moved), 1.5 * len(self.NAMES) / 5)

    @parameterized.parameters(0, 2, 4)
    def test_a_leave_moves_only_the_leaving_workers_shards(self, leaving):
        policy = policies.ConsistentHash()
        gone = self.WORKERS_5[leaving]
        remaining = [worker for worker in self.WORKERS_5 if worker != gone]
        before = policy.assignment(self.NAMES, self.WORKERS_5)
        after = policy.assignment(self.NAMES, remaining)
        self.assertNotIn(gone, after.values())
        moved = {name for name in self.NAMES if before[name] != after[name]}
        self.assertEqual(moved, {name for name in self.NAMES if before[name] == gone})

    @parameterized.parameters(0, 1, 2)
    def test_incremental_owners_equal_a_full_computation(self, seed):
        rng = random.Random(seed)
        names = _names(500)
        pool = [f"w{i}" for i in range(12)]
        policy = policies.ConsistentHash(virtual_nodes=16)
        live = set(rng.sample(pool, 3))
        for _ in range(30):
            if len(live) > 1 and rng.random() < 0.5:
                live.discard(rng.choice(sorted(live)))
            else:
                live.add(rng.choice(pool))
            workers = sorted(live)
            rng.shuffle(workers)
            view = make_view(workers[0], workers, range(500), num_shards=500)
            owners = policy._shard_owners(dataclasses.replace(view, names=names))
            full = policy.assignment(names, workers)
            self.assertEqual(dict(zip(names, owners)), full)

    def test_a_membership_change_recomputes_only_the_moved_share(self):
        names = _names(2000)
        workers = [f"worker-{i}" for i in range(16)]
        policy = policies.ConsistentHash()

        def select(live):
            view = make_view(live[0], live, range(2000), num_shards=2000)
            policy.select(dataclasses.replace(view, names=names), max_shards=1)

        select(workers)
        self.assertEqual(policy.recomputed, 2000)  # the first computation: every shard
        for live, changed in ((workers[1:], workers[0]), (workers, workers[0])):
            before = policy.assignment(names, workers)
            done = policy.recomputed
            select(live)
            share = sum(owner == changed for owner in before.values())
            self.assertEqual(policy.recomputed - done, share)
            self.assertLess(share, 2000 / 8)

    def test_hash_does_not_depend_on_the_process(self):
        # Computed once with blake2b; a salted or changed hash function fails here.
        names = ["train-00000-of-00016", "train-00007-of-00016", "train-00015-of-00016"]
        owners = policies.ConsistentHash().assignment(names, ["worker-0", "worker-1", "worker-2"])
        self.assertEqual(
            owners,
            {
                "train-00000-of-00016": "worker-1",
                "train-00007-of-00016": "worker-2",
                "train-00015-of-00016": "worker-2",
            },
        )

    def test_never_steals(self):
        policy = policies.ConsistentHash()
        owners = policy.assignment(_names(20), ["w0", "w1"])
        others = [i for i, name in enumerate(_names(20)) if owners[name] == "w1"]
        view = make_view("w0", ["w0", "w1"], others, num_shards=20)
        self.assertEqual(policy.select(view, max_shards=5), policies.Selection())

    def test_select_grants_own_shards_up_to_max_shards(self):
        policy = policies.ConsistentHash()
        owners = policy.assignment(_names(20), ["w0", "w1"])
        permutation = _permutation(20, seed=9)
        view = make_view("w0", ["w0", "w1"], permutation, permutation=permutation)
        own = [s for s in permutation if owners[_names(20)[s]] == "w0"]
        self.assertEqual(policy.select(view, max_shards=3).shards, tuple(own[:3]))

    def test_repeated_calls_use_the_cached_owners(self):
        policy = policies.ConsistentHash()
        view = make_view("w0", ["w0", "w1"], range(20))
        with mock.patch.object(hash_ring, "stable_hash", wraps=hash_ring.stable_hash) as hashed:
            policy.select(view, max_shards=1)
            calls = hashed.call_count
            policy.select(view, max_shards=1)
        self.assertGreater(calls, 0)
        self.assertEqual(hashed.call_count, calls)

    def test_assignment_returns_a_copy(self):
        policy = policies.ConsistentHash()
        owners = policy.assignment(_names(4), ["w0"])
        owners.clear()
        self.assertLen(policy.assignment(_names(4), ["w0"]), 4)

    @parameterized.parameters(0, -1, 1.5)
    def test_bad_virtual_nodes_raise(self, virtual_nodes):
        with self.assertRaisesRegex(ValueError, f"Received: virtual_nodes={virtual_nodes}"):
            policies.ConsistentHash(virtual_nodes=virtual_nodes)

    def test_no_workers_raises(self):
        with self.assertRaisesRegex(ValueError, r"Received: workers=\(\)"):
            policies.ConsistentHash().assignment(_names(3), [])


def _lease(shard, worker, since, has_backup=False):
    return policies.InFlight(shard=shard, worker=worker, since=since, has_backup=has_backup)


class AdaptiveTest(parameterized.TestCase):
    WORKERS = ("fast", "mid", "slow")
    THROUGHPUT = {"fast": 100.0, "mid": 50.0, "slow": 25.0}
    SIZES = {0: 40, 1: 10, 2: 70, 3: 20, 4: 80, 5: 30, 6: 60, 7: 50}

    def _pending_view(self, worker, throughput):
        return make_view(worker, self.WORKERS, range(8), sizes=self.SIZES, throughput=throughput)

    def test_faster_worker_gets_larger_and_more_shards(self):
        policy = policies.Adaptive()
        fast = policy.select(self._pending_view("fast", self.THROUGHPUT), max_shards=4).shards
        mid = policy.select(self._pending_view("mid", self.THROUGHPUT), max_shards=4).shards
        slow = policy.select(self._pending_view("slow", self.THROUGHPUT), max_shards=4).shards
        self.assertEqual(fast, (4, 2, 6, 7))  # round(4 * 100 / 100) = 4, largest first
        self.assertEqual(mid, (4, 2))  # round(4 * 50 / 100) = 2; at the median: largest first
        self.assertEqual(slow, (1,))  # max(1, round(4 * 25 / 100)) = 1, smallest first
        self.assertGreater(min(self.SIZES[s] for s in fast), max(self.SIZES[s] for s in slow))

    def test_unknown_throughput_gets_one_small_probe(self):
        view = self._pending_view("slow", {})
        self.assertEqual(policies.Adaptive().select(view, max_shards=3).shards, (1,))
        self.assertEqual(policies.Adaptive().select(view, max_shards=0).shards, ())

    def test_horizon_does_not_starve_alike_or_all_idle_workers(self):
        # Synchronous consumers run at nearly the same speed: no horizon.
        alike = {"fast": 100.0, "mid": 98.0, "slow": 97.0}
        view = make_view(
            "slow", self.WORKERS, [4], sizes=self.SIZES, throughput=alike, outstanding={"fast": 10}
        )
        self.assertEqual(policies.Adaptive().select(view, max_shards=1).shards, (4,))
        # Nobody holds a lease: the slow requester gets the shard, or the epoch would wait forever.
        view = make_view("slow", self.WORKERS, [4], sizes=self.SIZES, throughput=self.THROUGHPUT)
        self.assertEqual(policies.Adaptive().select(view, max_shards=1).shards, (4,))

    def test_slower_worker_only_gets_shards_within_the_horizon(self):
        # Pending 280 units + outstanding 10 over 175 units/s: a horizon of 1.66 s.
        # The slow worker (25/s) finishes a 40-unit shard in 1.6 s, not a 50-unit one.
        view = make_view(
            "slow",
            self.WORKERS,
            range(8),
            sizes=self.SIZES,
            throughput=self.THROUGHPUT,
            outstanding={"fast": 10},
        )
        shards = policies.Adaptive().select(view, max_shards=8).shards
        self.assertTrue(shards)
        self.assertTrue(all(self.SIZES[s] <= 40 for s in shards), shards)

    def _drain_view(self, in_flight, worker="fast", throughput=None, outstanding=None):
        sizes = {shard: 100 for shard in range(6)}
        return make_view(
            worker,
            ("fast", "mid", "slow", "slower", "new"),
            [],
            num_shards=6,
            sizes=sizes,
            throughput=throughput or {"fast": 100.0, "mid": 80.0, "slow": 20.0, "slower": 10.0},
            outstanding=outstanding or {"fast": 0},
            in_flight=in_flight,
            now=5.0,
        )

    def test_backup_of_the_latest_finishing_shard(self):
        in_flight = [
            _lease(0, "slow", since=0.0),  # 0 + 100 / 20 = 5
            _lease(1, "slower", since=1.0),  # 1 + 100 / 10 = 11
            _lease(2, "slower", since=4.0),  # 4 + 100 / 10 = 14: the latest
            _lease(3, "mid", since=5.0),  # 6.25, but mid is not 1.5x slower
        ]
        selection = policies.Adaptive().select(self._drain_view(in_flight), max_shards=4)
        self.assertEqual(selection, policies.Selection(shards=(), backups=(2,)))

    def test_no_backup_for_a_shard_that_has_one(self):
        in_flight = [_lease(1, "slower", since=1.0), _lease(2, "slower", 4.0, has_backup=True)]
        selection = policies.Adaptive().select(self._drain_view(in_flight), max_shards=4)
        self.assertEqual(selection.backups, (1,))
        all_backed = [_lease(2, "slower", 4.0, has_backup=True)]
        selection = policies.Adaptive().select(self._drain_view(all_backed), max_shards=4)
        self.assertEqual(selection, policies.Selection())

    def test_no_backup_of_own_shard(self):
        # A ratio of 1.0 would let "fast" back up its own shard if it were not excluded.
        in_flight = [_lease(0, "fast", since=4.0), _lease(1, "slow", since=0.0)]
        policy = policies.Adaptive(min_throughput_ratio=1.0)
        self.assertEqual(policy.select(self._drain_view(in_flight), max_shards=1).backups, (1,))

    def test_no_backup_without_speculation(self):
        view = self._drain_view([_lease(2, "slower", since=4.0)])
        self.assertEqual(policies.Adaptive(speculation=False).select(view, 4), policies.Selection())

    def test_no_backup_for_a_busy_requester(self):
        view = self._drain_view([_lease(2, "slower", since=4.0)], outstanding={"fast": 100})
        self.assertEqual(policies.Adaptive().select(view, 4), policies.Selection())

    def test_no_backup_when_holder_is_not_slow_enough(self):
        view = self._drain_view([_lease(3, "mid", since=5.0)])
        self.assertEqual(policies.Adaptive().select(view, 4), policies.Selection())

    def test_unknown_holder_counts_as_slowest(self):
        in_flight = [_lease(1, "slower", since=1.0), _lease(4, "new", since=0.5)]
        # "new" at the slowest known speed (10): 0.5 + 10 = 10.5 < 1 + 10 = 11.
        view = self._drain_view(in_flight)
        self.assertEqual(policies.Adaptive().select(view, 4).backups, (1,))
        # Later lease: 2.0 + 10 = 12 > 11.
        view = self._drain_view([_lease(1, "slower", 1.0), _lease(4, "new", 2.0)])
        self.assertEqual(policies.Adaptive().select(view, 4).backups, (4,))

    def test_requester_of_unknown_speed_gets_no_backup(self):
        view = self._drain_view([_lease(2, "slower", since=4.0)], worker="new")
        self.assertEqual(policies.Adaptive().select(view, 4), policies.Selection())

    def test_min_throughput_ratio_below_one_raises(self):
        with self.assertRaisesRegex(ValueError, "Received: min_throughput_ratio=0.5"):
            policies.Adaptive(min_throughput_ratio=0.5)


class SelectionContractTest(parameterized.TestCase):
    @parameterized.parameters(*sorted(policies.POLICIES))
    def test_selection_is_always_valid(self, name):
        rng = random.Random(name)
        policy = policies.make_policy(name)
        workers = ("w0", "w1", "w2")
        for _ in range(200):
            num_shards = rng.randint(1, 12)
            permutation = _permutation(num_shards, rng.randint(0, 99))
            pending = [s for s in permutation if rng.random() < 0.5]
            leased = [s for s in permutation if s not in pending and rng.random() < 0.5]
            in_flight = [
                _lease(s, rng.choice(workers), rng.random(), rng.random() < 0.3) for s in leased
            ]
            view = make_view(
                rng.choice(workers),
                workers,
                pending,
                permutation=permutation,
                sizes={s: rng.randint(1, 100) for s in range(num_shards)},
                outstanding={w: rng.choice((0, 0, 50, 200)) for w in workers},
                throughput={w: rng.choice((0.0, 10.0, 40.0)) for w in workers},
                in_flight=in_flight,
                now=1.0,
            )
            max_shards = rng.randint(0, 4)
            selection = policy.select(view, max_shards)
            self.assertLessEqual(len(selection.shards), max_shards)
            self.assertLen(set(selection.shards), len(selection.shards))
            self.assertContainsSubset(selection.shards, pending)
            self.assertContainsSubset(selection.backups, leased)

    def test_negative_max_shards_raises(self):
        view = make_view("w0", ["w0"], [0])
        with self.assertRaisesRegex(ValueError, "Received: max_shards=-1"):
            policies.RoundRobin().select(view, max_shards=-1)


class MakePolicyTest(parameterized.TestCase):
    @parameterized.parameters(
        ("adaptive", policies.Adaptive),
        ("consistent_hash", policies.ConsistentHash),
        ("least_loaded", policies.LeastLoaded),
        ("round_robin", policies.RoundRobin),
    )
    def test_make_policy(self, name, cls):
        policy = policies.make_policy(name)
        self.assertIsInstance(policy, cls)
        self.assertEqual(policy.name, name)
        self.assertIs(policies.POLICIES[name], cls)

    def test_the_policies_are_the_job_specs_policy_names(self):
        self.assertEqual(tuple(sorted(policies.POLICIES)), types.POLICY_NAMES)

    def test_unknown_policy_lists_valid_names(self):
        with self.assertRaisesWithLiteralMatch(
            ValueError,
            "Unknown policy 'random'. "
            "Valid policies: adaptive, consistent_hash, least_loaded, round_robin",
        ):
            policies.make_policy("random")

    def test_repr(self):
        self.assertEqual(repr(policies.RoundRobin()), "RoundRobin()")
        self.assertEqual(repr(policies.ConsistentHash(2)), "ConsistentHash(virtual_nodes=2)")
        self.assertEqual(
            repr(policies.Adaptive(speculation=False)),
            "Adaptive(speculation=False, min_throughput_ratio=1.5)",
        )


if __name__ == "__main__":
    absltest.main()
