"""Equal element counts per epoch for synchronous consumers (pad / drop)."""

import collections
import threading
import time

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data import readers
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import consumer as consumer_lib
from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import journal
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import types

SIZES = [5, 17, 3, 11, 8, 2, 13, 7, 9, 4, 6, 15]
NUM_EPOCHS = 2


def _shards():
    specs, start = [], 0
    for size in SIZES:
        specs.append(types.ShardSpec(f"range:{start}:{start + size}", size))
        start += size
    return tuple(specs)


def _run(equalize, num_consumers=3, policy="least_loaded", shards=None):
    """Three consumer threads of different speeds; returns (consumers, elements)."""
    spec = types.JobSpec(
        "eq",
        shards or _shards(),
        policy,
        NUM_EPOCHS,
        lease_timeout_s=30,
        num_consumers=num_consumers if equalize != "none" else 0,
        equalize=equalize,
    )
    with server_lib.server_context() as server:
        client_lib.DispatcherClient(server.target).create_job(spec)
        consumers, elements, threads = [], [], []
        for i, delay in enumerate((0.0005, 0.002, 0.004)):

            def read(name, delay=delay):
                for element in readers.elements(name):
                    time.sleep(delay)
                    yield element

            client = client_lib.DispatcherClient(server.target)
            consumers.append(consumer_lib.ShardConsumer(client, "eq", f"w{i}", read, max_shards=1))
            elements.append([])
            threads.append(
                threading.Thread(target=lambda c=consumers[-1], out=elements[-1]: out.extend(c))
            )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        progress = [server.core.epoch_progress("eq", e) for e in range(NUM_EPOCHS)]
    return consumers, elements, progress


class EqualizeTest(parameterized.TestCase):
    def test_none_delivers_each_element_once_per_epoch(self):
        consumers, elements, _ = _run("none")
        counts = collections.Counter(e for out in elements for e in out)
        self.assertEqual(set(counts), set(range(sum(SIZES))))
        self.assertEqual(set(counts.values()), {NUM_EPOCHS})
        self.assertEqual(
            [sum(c.per_epoch[e] for c in consumers) for e in range(NUM_EPOCHS)],
            [sum(SIZES)] * NUM_EPOCHS,
        )

    def test_drop_gives_every_consumer_the_smallest_count(self):
        consumers, elements, progress = _run("drop")
        # 100 elements cannot split evenly in 3: the raw counts differ.
        self.assertTrue(all(p.ceiling > p.floor for p in progress))
        for epoch in range(NUM_EPOCHS):
            counts = {c.per_epoch[epoch] for c in consumers}
            self.assertEqual(counts, {progress[epoch].floor}, f"epoch {epoch}")
            self.assertGreater(progress[epoch].floor, 0)
        counts = collections.Counter(e for out in elements for e in out)
        self.assertLessEqual(max(counts.values()), NUM_EPOCHS)  # nothing repeated
        self.assertEqual(sum(counts.values()), 3 * sum(p.floor for p in progress))

    def test_pad_gives_every_consumer_the_largest_count(self):
        consumers, elements, progress = _run("pad")
        self.assertTrue(all(p.ceiling > p.floor for p in progress))
        for epoch in range(NUM_EPOCHS):
            counts = {c.per_epoch[epoch] for c in consumers}
            self.assertEqual(counts, {progress[epoch].ceiling}, f"epoch {epoch}")
        counts = collections.Counter(e for out in elements for e in out)
        self.assertEqual(set(counts), set(range(sum(SIZES))))
        self.assertGreaterEqual(min(counts.values()), NUM_EPOCHS)  # nothing missing
        padding = 3 * sum(p.ceiling for p in progress) - NUM_EPOCHS * sum(SIZES)
        self.assertEqual(sum(counts.values()) - NUM_EPOCHS * sum(SIZES), padding)

    def test_pad_by_a_consumer_that_got_no_shard_uses_the_jobs_first(self):
        # Three consumers, one shard: two of them read none, and pad.
        shards = (types.ShardSpec("range:0:5", 5),)
        consumers, elements, progress = _run("pad", shards=shards)
        self.assertEqual([p.ceiling for p in progress], [5] * NUM_EPOCHS)
        for consumer, out in zip(consumers, elements):
            self.assertEqual(consumer.per_epoch, {e: 5 for e in range(NUM_EPOCHS)})
            self.assertEqual(sorted(out), sorted(list(range(5)) * NUM_EPOCHS))
            # Only padding in an epoch still moves the position into it: the
            # group's positions can be joined.
            self.assertEqual(consumer.position(5 * NUM_EPOCHS - 1).epoch, NUM_EPOCHS - 1)

    @parameterized.parameters(
        dict(num_consumers=0, equalize="pad"),
        dict(num_consumers=2, equalize="none"),
        dict(num_consumers=2, equalize="trim"),
    )
    def test_inconsistent_options_are_invalid(self, num_consumers, equalize):
        spec = types.JobSpec("eq", _shards(), num_consumers=num_consumers, equalize=equalize)
        with self.assertRaisesRegex(types.InvalidArgument, "equalize"):
            core.DispatcherCore().create_job(spec)


class BalanceTest(parameterized.TestCase):
    """An equalized job leases each consumer at most a shard beyond the others."""

    def _core(self, num_consumers=2, **kwargs):
        dispatcher = core.DispatcherCore(**kwargs)
        spec = types.JobSpec(
            "eq", _shards(), "round_robin", NUM_EPOCHS, num_consumers=num_consumers, equalize="pad"
        )
        dispatcher.create_job(spec)
        return dispatcher

    @staticmethod
    def _lease(dispatcher, worker):
        """The size of the shard `worker` gets (completed at grant), or None."""
        result = dispatcher.acquire("eq", worker, max_shards=1, claim="complete")
        if not result.leases:
            return None
        (lease,) = result.leases
        return lease.size - lease.offset

    def test_a_consumer_that_starts_first_waits_for_the_others_after_one_shard(self):
        dispatcher = self._core(num_consumers=3)
        for worker in ("w0", "w1", "w2"):
            dispatcher.register_worker("eq", worker)
        self.assertIsNotNone(self._lease(dispatcher, "w0"))
        refused = dispatcher.acquire("eq", "w0", max_shards=1, claim="complete")
        self.assertEqual(refused.leases, ())
        self.assertGreater(refused.retry_after_s, 0)
        self.assertIsNotNone(self._lease(dispatcher, "w1"))
        self.assertIsNone(self._lease(dispatcher, "w0"))  # w2 has none yet
        self.assertIsNotNone(self._lease(dispatcher, "w2"))

    def test_counts_stay_within_one_shard_whoever_asks(self):
        dispatcher = self._core()
        for worker in ("w0", "w1"):
            dispatcher.register_worker("eq", worker)
        counts = {"w0": 0, "w1": 0}
        # w0 asks three times as often as w1, for the whole epoch.
        while dispatcher.jobs()[0].epoch == 0:
            for worker in ("w0", "w0", "w0", "w1"):
                size = self._lease(dispatcher, worker) if dispatcher.jobs()[0].epoch == 0 else None
                if size is not None:
                    counts[worker] += size
                    self.assertLessEqual(abs(counts["w0"] - counts["w1"]), max(SIZES), counts)
        self.assertEqual(sum(counts.values()), sum(SIZES))
        self.assertEqual(dispatcher.epoch_progress("eq", 0).ceiling, max(counts.values()))

    def test_a_group_rewind_sets_the_group_size_and_a_restart_keeps_it(self):
        work_dir = self.create_tempdir().full_path
        with journal.Journal(work_dir, fsync=False) as log:
            dispatcher = self._core(num_consumers=3, journal=log)
            dispatcher.register_worker("eq", "w0")
            dispatcher.rewind("eq", "w0", types.InputPosition(), group=True, num_consumers=2)
            self.assertEqual(dispatcher.register_worker("eq", "w1").num_consumers, 2)
        with journal.Journal(work_dir, fsync=False) as log:
            dispatcher = core.DispatcherCore(journal=log)
            # Two consumers, not three: w0 leases again once w1 caught up.
            ahead = self._lease(dispatcher, "w0")
            self.assertIsNone(self._lease(dispatcher, "w0"))
            behind = 0
            while behind < ahead:
                behind += self._lease(dispatcher, "w1")
            self.assertIsNotNone(self._lease(dispatcher, "w0"))

    def test_a_group_of_one_leases_freely(self):
        dispatcher = self._core(num_consumers=3)
        dispatcher.register_worker("eq", "w0")
        dispatcher.register_worker("eq", "w1")  # a member of the group before
        dispatcher.rewind("eq", "w0", types.InputPosition(), group=True, num_consumers=1)
        sizes = [self._lease(dispatcher, "w0") for _ in SIZES]
        self.assertEqual(sorted(sizes), sorted(SIZES))

    @parameterized.parameters(
        dict(group=False, num_consumers=2),
        dict(group=True, num_consumers=-1),
        dict(group=True, num_consumers=types.MAX_WORKERS_PER_JOB + 1),
    )
    def test_a_bad_group_size_is_invalid_and_changes_nothing(self, group, num_consumers):
        dispatcher = self._core()
        dispatcher.register_worker("eq", "w0")
        before = dispatcher.jobs()
        with self.assertRaisesRegex(types.InvalidArgument, "num_consumers must be in"):
            dispatcher.rewind(
                "eq", "w0", types.InputPosition(1), group=group, num_consumers=num_consumers
            )
        self.assertEqual(dispatcher.jobs(), before)
        self.assertEqual(dispatcher.register_worker("eq", "w0").num_consumers, 2)


if __name__ == "__main__":
    absltest.main()
