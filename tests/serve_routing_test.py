"""Tests for tfscale.serve.routing."""

import collections
import heapq
import math
import random
import subprocess
import sys
import threading

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.serve import replicas
from tfscale.serve import routing

NAMES = ("r0", "r1", "r2", "r3")


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingRandom(random.Random):
    """A seeded random source that keeps every sample it draws."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.samples = []

    def sample(self, population, k, **kwargs):
        drawn = super().sample(population, k, **kwargs)
        self.samples.append(list(drawn))
        return drawn


def _stats(outstanding):
    return [replicas.ReplicaStats(name, outstanding=n) for name, n in outstanding.items()]


def _quiet_options(**overrides):
    """Options under which no replica is ejected unless a test asks for it."""
    values = dict(consecutive_errors=10**6, latency_factor=math.inf)
    values.update(overrides)
    return replicas.OutlierOptions(**values)


def _router(policy="round_robin", clock=None, names=NAMES, **options):
    return routing.Router(
        names, policy=policy, options=replicas.OutlierOptions(**options), clock=clock or FakeClock()
    )


def _route_and_finish(router, latency_s=0.01, ok=True, key=None):
    ticket = router.route(key)
    router.finish(ticket, latency_s=latency_s, ok=ok)
    return ticket.replica


class RoundRobinTest(parameterized.TestCase):

    def test_cycles_over_the_candidates_in_name_order(self):
        policy = routing.RoundRobin()
        candidates = _stats({"b": 0, "c": 5, "a": 9})
        self.assertEqual([policy.choose(candidates) for _ in range(7)], list("abcabca"))

    def test_cycles_over_up_replicas_only(self):
        router = _router("round_robin")
        router.mark_down("r1")
        self.assertEqual([router.route().replica for _ in range(6)], ["r0", "r2", "r3"] * 2)

    def test_keeps_its_turn_when_a_replica_joins(self):
        policy = routing.RoundRobin()
        self.assertEqual(policy.choose(_stats({"a": 0, "c": 0})), "a")
        self.assertEqual(policy.choose(_stats({"a": 0, "b": 0, "c": 0})), "b")

    def test_no_candidates(self):
        with self.assertRaisesRegex(ValueError, "at least one candidate"):
            routing.RoundRobin().choose([])


class LeastLoadedTest(parameterized.TestCase):

    @parameterized.parameters(
        ({"a": 3, "b": 1, "c": 2}, "b"),
        ({"a": 0, "b": 4, "c": 4}, "a"),
        ({"a": 7, "b": 7, "c": 6}, "c"),
    )
    def test_picks_the_fewest_outstanding(self, outstanding, expected):
        self.assertEqual(routing.LeastLoaded().choose(_stats(outstanding)), expected)

    def test_ties_in_turn(self):
        policy = routing.LeastLoaded()
        candidates = _stats({"a": 1, "b": 0, "c": 0, "d": 0})
        self.assertEqual([policy.choose(candidates) for _ in range(4)], list("bcdb"))

    def test_router_spreads_held_requests_evenly(self):
        router = _router("least_loaded")
        tickets = [router.route() for _ in range(8)]
        self.assertEqual(collections.Counter(t.replica for t in tickets), {n: 2 for n in NAMES})
        for ticket in tickets[:2]:  # frees r0 and r1
            router.finish(ticket, latency_s=0.01)
        self.assertIn(router.route().replica, ("r0", "r1"))


def _keys(count):
    return [f"key-{i}" for i in range(count)]


class ConsistentHashTest(parameterized.TestCase):

    def _owners(self, policy, names, keys):
        candidates = [replicas.ReplicaStats(name) for name in names]
        return {key: policy.choose(candidates, key) for key in keys}

    def test_a_key_keeps_to_its_replica(self):
        policy = routing.ConsistentHash()
        policy.update(NAMES)
        candidates = _stats({"r0": 5, "r1": 0, "r2": 1, "r3": 9})
        for key in _keys(20):
            first = policy.choose(candidates, key)
            self.assertEqual({policy.choose(candidates, key) for _ in range(5)}, {first})

    def test_same_owners_in_every_instance(self):
        keys = _keys(200)
        first = self._owners(routing.ConsistentHash(), NAMES, keys)
        self.assertEqual(self._owners(routing.ConsistentHash(), reversed(NAMES), keys), first)
        self.assertLen(set(first.values()), len(NAMES))

    @parameterized.parameters(3, 10)
    def test_adding_a_replica_moves_about_one_nth_of_the_keys(self, num_replicas):
        names = [f"replica-{i}" for i in range(num_replicas)]
        keys = _keys(10_000)
        policy = routing.ConsistentHash()
        policy.update(names)
        before = self._owners(policy, names, keys)
        policy.update(names + ["new"])
        after = self._owners(policy, names + ["new"], keys)
        moved = [key for key in keys if before[key] != after[key]]
        n = num_replicas + 1
        self.assertBetween(len(moved) / len(keys), 0.5 / n, 2.0 / n)
        self.assertEqual({after[key] for key in moved}, {"new"})

    def test_removing_a_replica_moves_only_its_keys(self):
        names = [f"replica-{i}" for i in range(6)]
        keys = _keys(2000)
        policy = routing.ConsistentHash()
        before = self._owners(policy, names, keys)
        policy.update(names[1:])
        after = self._owners(policy, names[1:], keys)
        moved = {key for key in keys if before[key] != after[key]}
        self.assertEqual(moved, {key for key in keys if before[key] == names[0]})

    def test_keys_of_a_down_replica_go_elsewhere_and_come_back(self):
        router = _router("consistent_hash")
        keys = _keys(400)
        before = {key: _route_and_finish(router, key=key) for key in keys}
        router.mark_down("r2")
        during = {key: _route_and_finish(router, key=key) for key in keys}
        router.mark_up("r2")
        after = {key: _route_and_finish(router, key=key) for key in keys}
        self.assertNotIn("r2", during.values())
        for key in keys:
            if before[key] != "r2":
                self.assertEqual(during[key], before[key])
        self.assertEqual(after, before)

    def test_keyless_requests_go_to_the_least_loaded(self):
        policy = routing.ConsistentHash()
        self.assertIsInstance(policy.fallback, routing.LeastLoaded)
        self.assertEqual(policy.choose(_stats({"a": 2, "b": 0, "c": 1})), "b")

    def test_bad_virtual_nodes(self):
        with self.assertRaisesWithLiteralMatch(
            ValueError, "virtual_nodes must be an int >= 1. Received: virtual_nodes=0"
        ):
            routing.ConsistentHash(virtual_nodes=0)


class PowerOfTwoTest(parameterized.TestCase):

    @parameterized.parameters(0, 1, 2)
    def test_never_picks_the_more_loaded_of_its_two_samples(self, seed):
        rng = RecordingRandom(seed)
        policy = routing.PowerOfTwo(rng=rng)
        load = random.Random(seed + 100)
        for _ in range(300):
            candidates = _stats({name: load.randrange(5) for name in NAMES + ("r4", "r5")})
            chosen = policy.choose(candidates)
            first, second = (candidates[i] for i in rng.samples[-1])
            self.assertNotEqual(first.name, second.name)
            self.assertIn(chosen, (first.name, second.name))
            self.assertEqual(
                next(c for c in candidates if c.name == chosen).outstanding,
                min(first.outstanding, second.outstanding),
            )

    def test_one_candidate(self):
        self.assertEqual(routing.PowerOfTwo().choose(_stats({"only": 3})), "only")

    def test_same_seed_same_choices(self):
        candidates = _stats({name: i % 2 for i, name in enumerate(NAMES)})
        runs = [
            [routing.PowerOfTwo(random.Random(7)).choose(candidates) for _ in range(50)]
            for _ in range(2)
        ]
        self.assertEqual(runs[0], runs[1])

    def _simulate(self, policy, ticks=500, per_tick=2):
        """r0 holds each request 20 ticks, the others 1; returns requests per replica."""
        clock = FakeClock(0.0)
        router = routing.Router(NAMES, policy=policy, options=_quiet_options(), clock=clock)
        finishing = []  # (finish time, ticket id, ticket)
        counts = collections.Counter()
        for tick in range(ticks):
            clock.now = float(tick)
            while finishing and finishing[0][0] <= tick:
                router.finish(heapq.heappop(finishing)[2])
            for _ in range(per_tick):
                ticket = router.route()
                counts[ticket.replica] += 1
                service = 20 if ticket.replica == "r0" else 1
                heapq.heappush(finishing, (tick + service, ticket.id, ticket))
        return counts

    def test_a_slow_replica_gets_far_fewer_requests_than_under_round_robin(self):
        round_robin = self._simulate(routing.RoundRobin())
        power_of_two = self._simulate(routing.PowerOfTwo(random.Random(3)))
        self.assertEqual(round_robin["r0"], 250)
        self.assertLess(power_of_two["r0"], round_robin["r0"] / 4)


class OutlierOptionsTest(parameterized.TestCase):

    @parameterized.parameters(
        ("consecutive_errors", 0, "consecutive_errors must be an int >= 1. Received: "),
        ("consecutive_errors", 2.5, "consecutive_errors must be an int >= 1. Received: "),
        ("min_requests", True, "min_requests must be an int >= 1. Received: "),
        ("latency_factor", 1.0, "latency_factor must be > 1.0. Received: "),
        ("latency_factor", math.nan, "latency_factor must be > 1.0. Received: "),
        ("base_ejection_s", 0.0, "base_ejection_s must be finite and > 0. Received: "),
        ("max_ejection_s", 5.0, "max_ejection_s must be >= base_ejection_s and finite. Received: "),
        ("max_ejected_fraction", 1.5, "max_ejected_fraction must be in [0, 1]. Received: "),
        ("max_ejected_fraction", "half", "max_ejected_fraction must be in [0, 1]. Received: "),
    )
    def test_bad_option(self, field, value, message):
        with self.assertRaisesWithLiteralMatch(ValueError, f"{message}{field}={value!r}"):
            replicas.OutlierOptions(**{field: value})

    def test_defaults(self):
        options = replicas.OutlierOptions()
        self.assertEqual(options.consecutive_errors, 5)
        self.assertEqual(options.latency_factor, 3.0)
        self.assertEqual(options.base_ejection_s, 10.0)
        self.assertEqual(options.max_ejected_fraction, 0.5)

    def test_ejection_time_doubles_up_to_the_cap(self):
        detector = replicas.OutlierDetector(replicas.OutlierOptions(max_ejection_s=60.0))
        self.assertEqual([detector.ejection_s(n) for n in range(1, 6)], [10, 20, 40, 60, 60])
        self.assertEqual(detector.ejection_s(10_000), 60.0)


class EjectionTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.clock = FakeClock()

    def _fail(self, router, name, times):
        for _ in range(times):
            ticket = router.replicas.start(name)
            router.finish(ticket, latency_s=0.01, ok=False)

    def test_consecutive_errors_eject(self):
        router = _router(clock=self.clock, consecutive_errors=3)
        self._fail(router, "r1", 2)
        _route_and_finish(router)  # a success elsewhere does not reset r1's count
        self._fail(router, "r1", 1)
        stats = router.replicas.stats("r1")
        self.assertEqual(stats.health, replicas.Health.EJECTED)
        self.assertEqual(stats.ejected_until, self.clock.now + 10.0)
        self.assertEqual(stats.ejection_reason, "errors")
        self.assertNotIn("r1", {_route_and_finish(router) for _ in range(12)})

    def test_a_success_resets_the_error_count(self):
        router = _router(clock=self.clock, consecutive_errors=3)
        self._fail(router, "r1", 2)
        router.finish(router.replicas.start("r1"), latency_s=0.01, ok=True)
        self._fail(router, "r1", 2)
        self.assertEqual(router.replicas.stats("r1").health, replicas.Health.UP)

    def test_latency_outlier_is_ejected(self):
        router = _router(clock=self.clock, min_requests=5, latency_factor=3.0)
        for _ in range(6):
            for name, latency in (("r0", 0.010), ("r1", 0.012), ("r2", 0.011), ("r3", 0.040)):
                if router.replicas.stats(name).health is replicas.Health.UP:
                    router.finish(router.replicas.start(name), latency_s=latency)
        health = {s.name: s.health for s in router.status()}
        self.assertEqual(health["r3"], replicas.Health.EJECTED)
        self.assertEqual(router.replicas.stats("r3").ejection_reason, "latency")
        self.assertEqual([health[n] for n in ("r0", "r1", "r2")], [replicas.Health.UP] * 3)

    def test_not_judged_on_latency_against_fewer_than_min_latency_peers(self):
        for min_peers, ejected in ((2, False), (1, True)):
            with self.subTest(min_latency_peers=min_peers):
                router = _router(
                    clock=self.clock,
                    names=("r0", "r1"),
                    min_requests=5,
                    min_latency_peers=min_peers,
                )
                for _ in range(6):
                    for name, latency in (("r0", 0.010), ("r1", 0.100)):
                        if router.replicas.stats(name).health is replicas.Health.UP:
                            router.finish(router.replicas.start(name), latency_s=latency)
                health = router.replicas.stats("r1").health
                self.assertEqual(health is replicas.Health.EJECTED, ejected)

    def test_not_judged_on_latency_before_min_requests(self):
        router = _router(clock=self.clock, min_requests=5)
        for _ in range(4):
            for name, latency in (("r0", 0.01), ("r1", 1.0)):
                router.finish(router.replicas.start(name), latency_s=latency)
        self.assertEqual(router.replicas.stats("r1").health, replicas.Health.UP)

    def test_probe_after_the_ejection_time_returns_a_good_replica(self):
        router = _router("least_loaded", clock=self.clock, consecutive_errors=1)
        self._fail(router, "r2", 1)
        self.clock.advance(9.9)
        self.assertNotIn("r2", {_route_and_finish(router) for _ in range(8)})
        self.clock.advance(0.1)
        probe = router.route(key="any")
        self.assertEqual((probe.replica, probe.probe), ("r2", True))
        # One probe at a time: while it is out, r2 gets nothing more.
        self.assertNotIn("r2", {router.route().replica for _ in range(6)})
        router.finish(probe, latency_s=0.01, ok=True)
        stats = router.replicas.stats("r2")
        self.assertEqual((stats.health, stats.ejected_until), (replicas.Health.UP, None))
        self.assertEqual(router.route().replica, "r2")  # least loaded again

    def test_failed_probes_eject_for_longer_each_time(self):
        router = _router(clock=self.clock, consecutive_errors=1, max_ejection_s=35.0)
        self._fail(router, "r0", 1)
        lengths = []
        for _ in range(4):
            stats = router.replicas.stats("r0")
            lengths.append(stats.ejected_until - self.clock.now)
            self.clock.now = stats.ejected_until
            probe = router.route()
            self.assertTrue(probe.probe)
            router.finish(probe, latency_s=0.01, ok=False)
        self.assertEqual(lengths, [10.0, 20.0, 35.0, 35.0])
        self.assertEqual(router.replicas.stats("r0").ejection_reason, "probe")

    def test_ejected_again_soon_after_return_ejects_for_longer(self):
        router = _router(clock=self.clock, consecutive_errors=1, max_ejection_s=100.0)
        self._fail(router, "r0", 1)
        self.clock.advance(10.0)
        router.finish(router.route(), latency_s=0.01, ok=True)  # the probe returns r0
        self.clock.advance(50.0)
        self._fail(router, "r0", 1)
        self.assertEqual(router.replicas.stats("r0").ejected_until, self.clock.now + 20.0)
        self.clock.advance(20.0)
        router.finish(router.route(), latency_s=0.01, ok=True)
        self.clock.advance(100.0)  # back for max_ejection_s: a new streak
        self._fail(router, "r0", 1)
        self.assertEqual(router.replicas.stats("r0").ejected_until, self.clock.now + 10.0)

    def test_a_slow_probe_ejects_again(self):
        router = _router(clock=self.clock, min_requests=2, latency_factor=3.0)
        for _ in range(3):
            for name in NAMES:
                latency = 1.0 if name == "r1" else 0.01
                if router.replicas.stats(name).health is replicas.Health.UP:
                    router.finish(router.replicas.start(name), latency_s=latency)
        self.assertEqual(router.replicas.stats("r1").health, replicas.Health.EJECTED)
        self.clock.advance(10.0)
        probe = router.route()
        router.finish(probe, latency_s=0.5, ok=True)
        stats = router.replicas.stats("r1")
        self.assertEqual((stats.health, stats.ejections), (replicas.Health.EJECTED, 2))

    @parameterized.parameters((0.5, 4, 2), (0.25, 4, 1), (0.5, 3, 1), (0.0, 4, 0), (1.0, 4, 4))
    def test_max_ejected_fraction(self, fraction, num_replicas, most):
        names = NAMES[:num_replicas]
        router = _router(
            clock=self.clock, names=names, consecutive_errors=1, max_ejected_fraction=fraction
        )
        for name in names:
            self._fail(router, name, 1)
        ejected = [s.name for s in router.status() if s.health is replicas.Health.EJECTED]
        self.assertLen(ejected, most)

    def test_down_replicas_do_not_count_toward_the_fraction(self):
        router = _router(clock=self.clock, consecutive_errors=1)
        router.mark_down("r0")
        router.mark_down("r1")
        self._fail(router, "r2", 1)
        self._fail(router, "r3", 1)
        health = [s.health for s in router.status()]
        self.assertEqual(health.count(replicas.Health.EJECTED), 1)
        self.assertEqual(router.replicas.stats("r3").health, replicas.Health.UP)


class RouterTest(parameterized.TestCase):

    @parameterized.parameters(*routing.POLICIES)
    def test_down_replica_is_never_chosen_from_then_on(self, policy):
        router = _router(policy)
        router.mark_down("r3")
        for i in range(200):
            self.assertNotEqual(_route_and_finish(router, key=f"k{i}"), "r3")

    def test_late_finish_of_a_dead_replica_is_not_counted(self):
        router = _router("least_loaded")
        tickets = [router.route() for _ in range(8)]
        router.mark_down("r0")
        router.mark_up("r0")  # restarted: a fresh state
        self.assertEqual(router.replicas.stats("r0").outstanding, 0)
        for ticket in tickets:
            router.finish(ticket, latency_s=0.01, ok=False)
        stats = router.replicas.stats("r0")
        self.assertEqual((stats.outstanding, stats.requests, stats.errors), (0, 0, 0))
        self.assertEqual(sum(s.outstanding for s in router.status()), 0)

    def test_no_replica_available_message(self):
        clock = FakeClock()
        router = _router(clock=clock, consecutive_errors=1, max_ejected_fraction=1.0)
        router.mark_down("r0")
        router.mark_down("r1")
        for name in ("r2", "r3"):
            router.finish(router.replicas.start(name), latency_s=0.01, ok=False)
        clock.advance(2.5)
        with self.assertRaisesWithLiteralMatch(
            replicas.NoReplicaAvailable,
            "No replica can take the request: 4 replicas, 2 down, 2 ejected "
            "(the next probe in 7.5 s).",
        ) as caught:
            router.route()
        self.assertEqual((caught.exception.down, caught.exception.ejected), (2, 2))

    def test_no_replica_available_when_all_down_or_none(self):
        router = _router(names=("a",))
        router.mark_down("a")
        with self.assertRaisesWithLiteralMatch(
            replicas.NoReplicaAvailable,
            "No replica can take the request: 1 replicas, 1 down, 0 ejected.",
        ):
            router.route()
        router.remove("a")
        with self.assertRaisesWithLiteralMatch(
            replicas.NoReplicaAvailable,
            "No replica can take the request: the router has no replicas.",
        ):
            router.route()

    def test_request_context_counts_an_exception_as_an_error(self):
        clock = FakeClock()
        router = _router(clock=clock, names=("a",))
        with router.request() as replica:
            clock.advance(0.25)
        self.assertEqual(replica, "a")
        with self.assertRaisesRegex(RuntimeError, "boom"):
            with router.request():
                raise RuntimeError("boom")
        stats = router.replicas.stats("a")
        self.assertEqual((stats.requests, stats.errors, stats.outstanding), (2, 1, 0))
        self.assertAlmostEqual(stats.latency_s, 0.25 * (1 - 0.2))

    def test_finish_twice(self):
        router = _router()
        ticket = router.route()
        router.finish(ticket, latency_s=0.01)
        with self.assertRaisesRegex(ValueError, "is not active: finished already"):
            router.finish(ticket, latency_s=0.01)

    @parameterized.parameters(-1.0, math.nan)
    def test_bad_latency(self, latency_s):
        router = _router()
        with self.assertRaisesRegex(ValueError, "latency_s must be >= 0. Received: "):
            router.finish(router.route(), latency_s=latency_s)

    def test_membership_errors(self):
        router = _router()
        with self.assertRaisesWithLiteralMatch(ValueError, "Replica 'r0' is in the set already."):
            router.add("r0")
        with self.assertRaisesWithLiteralMatch(
            ValueError, "Unknown replica 'x'. Known replicas: ['r0', 'r1', 'r2', 'r3']"
        ):
            router.mark_down("x")
        with self.assertRaisesRegex(ValueError, "must be a non-empty string. Received: ''"):
            router.add("")

    def test_start_refuses_a_down_replica(self):
        router = _router()
        router.mark_down("r1")
        with self.assertRaisesWithLiteralMatch(
            ValueError, "Replica 'r1' is down: it takes no request."
        ):
            router.replicas.start("r1")

    def test_added_replica_takes_its_keys(self):
        router = _router("consistent_hash", names=("a", "b"))
        router.add("c")
        owners = {_route_and_finish(router, key=key) for key in _keys(100)}
        self.assertEqual(owners, {"a", "b", "c"})

    def test_unknown_policy_lists_valid_names(self):
        with self.assertRaisesWithLiteralMatch(
            ValueError,
            "Unknown routing policy 'random'. "
            "Valid policies: round_robin, least_loaded, consistent_hash, power_of_two",
        ):
            routing.Router(NAMES, policy="random")

    @parameterized.parameters(*routing.POLICIES)
    def test_make_policy(self, name):
        self.assertEqual(routing.make_policy(name).name, name)

    def test_repr(self):
        router = routing.Router(["a"], policy="consistent_hash")
        self.assertEqual(
            repr(router),
            "Router(['a'], policy=ConsistentHash(virtual_nodes=256, fallback=LeastLoaded()))",
        )

    def test_imports_neither_tensorflow_nor_grpc(self):
        code = (
            "import sys, tfscale.serve.routing; "
            "heavy = {'tensorflow', 'grpc', 'keras'}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        self.assertEqual(result.stdout.strip(), "[]")

    @parameterized.parameters(*routing.POLICIES)
    def test_threads_route_and_finish(self, policy):
        router = routing.Router(NAMES, policy=policy, options=replicas.OutlierOptions())
        errors = []

        def work(seed):
            rng = random.Random(seed)
            try:
                for i in range(300):
                    try:
                        ticket = router.route(key=f"k{rng.randrange(50)}")
                    except replicas.NoReplicaAvailable:  # all down or ejected for a moment
                        continue
                    if i % 50 == 0:
                        router.mark_down(NAMES[seed % 4])
                        router.mark_up(NAMES[seed % 4])
                    router.finish(ticket, latency_s=rng.random() / 100, ok=rng.random() > 0.1)
            except Exception as error:  # reported below, with the thread's seed
                errors.append((seed, error))

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual([s.outstanding for s in router.status()], [0] * len(NAMES))


if __name__ == "__main__":
    absltest.main()
