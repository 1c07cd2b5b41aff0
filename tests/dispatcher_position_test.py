"""A consumer's input position, checkpointed and rewound to after a crash."""

import collections
import dataclasses
import itertools
import random
import threading

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data import ledger
from tfscale.data import readers
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import consumer as consumer_lib
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import types

SIZES = [7, 12, 5, 9, 11, 6]  # 50 elements an epoch
NUM_EPOCHS = 2


def _spec():
    specs, start = [], 0
    for size in SIZES:
        specs.append(types.ShardSpec(f"range:{start}:{start + size}", size))
        start += size
    return types.JobSpec("pos", tuple(specs), "round_robin", NUM_EPOCHS, seed=1)


class PositionTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.server = server_lib.DispatcherServer().start()
        self.addCleanup(self.server.stop)
        self.client = client_lib.DispatcherClient(self.server.target)
        self.client.create_job(_spec())

    def _consumer(self):
        return consumer_lib.ShardConsumer(
            self.client, "pos", "w0", readers.elements, max_shards=2, shuffle_seed=5
        )

    @parameterized.named_parameters(
        dict(testcase_name="mid_shard", checkpoint=10, lost=13),
        dict(testcase_name="shard_boundary", checkpoint=19, lost=4),
        dict(testcase_name="epoch_boundary", checkpoint=50, lost=20),
        dict(testcase_name="second_epoch", checkpoint=73, lost=9),
        dict(testcase_name="nothing_lost", checkpoint=30, lost=0),
    )
    def test_resumed_run_sees_each_element_once_per_epoch(self, checkpoint, lost):
        first = self._consumer()
        stream = iter(first)
        trained = [next(stream) for _ in range(checkpoint)]
        position = first.position(checkpoint)
        for _ in range(lost):  # consumed by steps that die with the crash
            next(stream)

        self.client.rewind("pos", "w0", position)  # the resumed run starts here
        stream.close()
        second = self._consumer()
        resumed = list(second)
        counts = collections.Counter(trained + resumed)
        self.assertEqual(set(counts), set(range(sum(SIZES))))
        self.assertEqual(set(counts.values()), {NUM_EPOCHS})
        (job,) = self.client.list_jobs()
        self.assertTrue(job.finished)

    def test_position_after_a_rewind_builds_on_the_base(self):
        first = self._consumer()
        stream = iter(first)
        for _ in range(17):
            next(stream)
        base = first.position(17)
        self.client.rewind("pos", "w0", base)
        stream.close()
        second = self._consumer()
        stream = iter(second)
        for _ in range(20):
            next(stream)
        position = second.position(20, base)
        self.assertEqual(position.epoch, 0)
        consumed = sum(SIZES[s] for s in position.done) + sum(o for _, o in position.partials)
        self.assertEqual(consumed, 37)
        stream.close()

    def test_position_beyond_what_was_yielded(self):
        consumer = self._consumer()
        stream = iter(consumer)
        next(stream)
        with self.assertRaisesRegex(ValueError, "consumed=1000 is more than the elements yielded"):
            consumer.position(1000)
        stream.close()

    def test_rewind_needs_a_single_consumer(self):
        self.client.register_worker("pos", "w0")
        self.client.register_worker("pos", "w1")
        with self.assertRaisesRegex(
            types.FailedPrecondition, r"single-consumer job, or group=True; 'pos' also has \['w1'\]"
        ):
            self.client.rewind("pos", "w0", types.InputPosition())

    @parameterized.parameters(
        types.InputPosition(epoch=2),
        types.InputPosition(done=(6,)),
        types.InputPosition(done=(1,), partials=((1, 3),)),
        types.InputPosition(partials=((1, 3), (1, 4))),  # one shard twice
        types.InputPosition(
            partials=((0, 8),)
        ),  # shard 0 has 7 elements: 7 is "all, not yet finished"
    )
    def test_rewind_outside_the_job_is_invalid(self, position):
        self.client.register_worker("pos", "w0")
        before = self.client.list_jobs()
        with self.assertRaisesRegex(types.InvalidArgument, "outside job 'pos'"):
            self.client.rewind("pos", "w0", position)
        self.assertEqual(self.client.list_jobs(), before)


class UnionTest(absltest.TestCase):
    def test_a_shard_done_anywhere_is_done_and_partials_take_the_furthest_offset(self):
        a = types.InputPosition(1, (0, 4), ((2, 3), (5, 1)))
        b = types.InputPosition(1, (2,), ((5, 4), (6, 2)))
        self.assertEqual(
            types.InputPosition.union([a, b]),
            types.InputPosition(1, (0, 2, 4), ((5, 4), (6, 2))),
        )

    def test_positions_in_different_epochs_are_refused(self):
        with self.assertRaisesRegex(
            ValueError, r"in one epoch to be joined. Received: epochs \[0, 1\]"
        ):
            types.InputPosition.union([types.InputPosition(0), types.InputPosition(1)])
        with self.assertRaisesRegex(ValueError, "at least one position"):
            types.InputPosition.union([])

    def test_a_checkpoint_written_with_one_partial_still_reads(self):
        position = types.InputPosition.from_dict({"epoch": 2, "done": [1], "partial": [3, 4]})
        self.assertEqual(position, types.InputPosition(2, (1,), ((3, 4),)))


class GroupRewindTest(absltest.TestCase):
    """Two synchronous consumers checkpoint, lose steps, and three resume from there."""

    def setUp(self):
        super().setUp()
        spec = dataclasses.replace(_spec(), num_consumers=2, equalize="pad", lease_timeout_s=30)
        self.server = server_lib.DispatcherServer().start()
        self.addCleanup(self.server.stop)
        self.client = client_lib.DispatcherClient(self.server.target)
        self.client.create_job(spec)

    def test_a_group_resized_at_a_checkpoint_trains_each_element_once_per_epoch(self):
        # Two consumers train 9 elements each (the checkpoint), then 4
        # more each that die with the crash.
        first = [self._consumer(f"w{i}") for i in range(2)]
        trained, positions, ranges = self._run(first, take=13, checkpoint=9)
        self.assertEqual({p.epoch for p in positions}, {0})
        position = types.InputPosition.union(positions)
        self.assertNotEqual(position.partials, ())  # shards stopped partway
        # Three resume: one rewinds the job for the group. Its size stays 2
        # (no num_consumers): a third consumer may get no shard of an
        # epoch and only pad it.
        self.client.rewind("pos", "w0", position, group=True)
        second = [self._consumer(f"w{i}") for i in range(3)]
        resumed, final, more = self._run(second, base=position)
        ranges += more
        audit = ledger.Ledger(SIZES)
        audit.add(ranges, types.InputPosition.union(final))
        for epoch in audit.audit(types.InputPosition.union(final)):
            self.assertEqual((epoch.duplicated_elements, epoch.missing_elements), (0, 0), epoch)
        self.assertEqual(sum(e.elements for e in audit.audit(final[0])), NUM_EPOCHS * sum(SIZES))
        # The ranges are what the consumers yielded (the rest is padding).
        yielded = collections.Counter(trained + resumed)
        from_ranges = collections.Counter(_values(ranges))
        self.assertLessEqual(from_ranges, yielded)
        self.assertEqual(set(from_ranges), set(range(sum(SIZES))))
        self.assertEqual(set(from_ranges.values()), {NUM_EPOCHS})
        self.assertTrue(self.client.list_jobs()[0].finished)

    def test_a_group_resumed_in_a_later_epoch_pads_only_to_its_largest_share(self):
        first = [self._consumer(f"w{i}") for i in range(2)]
        streams, outputs = self._take(first, 60)
        # Equalized: both consumers end epoch 0 after as many elements;
        # the checkpoint is 3 elements into epoch 1.
        (epoch_0,) = {c.per_epoch[0] for c in first}
        checkpoint = epoch_0 + 3
        self.assertLessEqual(checkpoint, min(map(len, outputs)))
        position = types.InputPosition.union([c.position(checkpoint) for c in first])
        self.assertEqual(position.epoch, 1)
        self.assertNotEqual(position.partials, ())
        for stream in streams:
            stream.close()
        self.client.rewind("pos", "w0", position, group=True, num_consumers=3)
        second = [self._consumer(f"w{i}") for i in range(3)]
        for consumer in second:
            consumer.start_at(position)
        _, resumed = self._take(second)
        # Nothing of epoch 0 again, not even padding; epoch 1 holds the
        # rest after the position, each shard resumed at its offset.
        shares = [self._shares(c, len(out)) for c, out in zip(second, resumed)]
        for consumer in second:
            self.assertEqual(set(consumer.per_epoch), {1})
        rest = sum(SIZES) - sum(SIZES[s] for s in position.done)
        rest -= sum(offset for _, offset in position.partials)
        self.assertEqual(sum(s[1] for s in shares), rest)
        # Padding brings each consumer to the largest share, no further.
        self.assertEqual({c.per_epoch[1] for c in second}, {max(s[1] for s in shares)})

    @staticmethod
    def _shares(consumer, count):
        """Elements of real shards a consumer yielded, per epoch."""
        shares = collections.Counter()
        for epoch, _, first, stop in consumer.consumed_ranges(0, count):
            shares[epoch] += stop - first
        return shares

    def _take(self, consumers, take=None):
        """Each consumer in a thread takes `take` elements (all if None): (iterators, elements)."""
        outputs = [[] for _ in consumers]
        streams = [iter(c) for c in consumers]

        def run(stream, out):
            out.extend(stream if take is None else itertools.islice(stream, take))

        threads = [threading.Thread(target=run, args=a, daemon=True) for a in zip(streams, outputs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
            self.assertFalse(thread.is_alive())
        return streams, outputs

    def _consumer(self, worker):
        client = client_lib.DispatcherClient(self.server.target)
        return consumer_lib.ShardConsumer(
            client, "pos", worker, readers.elements, max_shards=1, shuffle_seed=5
        )

    def _run(self, consumers, take=None, checkpoint=None, base=types.InputPosition()):
        """Each consumer in a thread: (elements trained, positions, ranges) at the checkpoint."""
        streams, outputs = self._take(consumers, take)
        counts = [len(out) if checkpoint is None else checkpoint for out in outputs]
        positions = [c.position(n, base) for c, n in zip(consumers, counts)]
        ranges = [r for c, n in zip(consumers, counts) for r in c.consumed_ranges(0, n)]
        for stream in streams:
            stream.close()
        trained = [e for out, n in zip(outputs, counts) for e in out[:n]]
        return trained, positions, ranges


def _values(ranges):
    """The elements of (epoch, shard, first, stop) ranges, as ShardConsumer shuffles them."""
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    for epoch, shard, first, stop in ranges:
        name = f"range:{starts[shard]}:{starts[shard] + SIZES[shard]}"
        elements = list(range(starts[shard], starts[shard] + SIZES[shard]))
        random.Random(f"5:{epoch}:{name}").shuffle(elements)
        yield from elements[first:stop]


if __name__ == "__main__":
    absltest.main()
