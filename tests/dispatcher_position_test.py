"""A consumer's input position, checkpointed and rewound to after a crash."""

import collections

from absl.testing import absltest
from absl.testing import parameterized

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
        consumed = sum(SIZES[s] for s in position.done) + (position.partial or (0, 0))[1]
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
            types.FailedPrecondition, r"single-consumer job; 'pos' also has \['w1'\]"
        ):
            self.client.rewind("pos", "w0", types.InputPosition())

    @parameterized.parameters(
        types.InputPosition(epoch=2),
        types.InputPosition(done=(6,)),
        types.InputPosition(done=(1,), partial=(1, 3)),
        types.InputPosition(partial=(0, 8)),  # shard 0 has 7 elements: 7 is "all, not yet finished"
    )
    def test_rewind_outside_the_job_is_invalid(self, position):
        self.client.register_worker("pos", "w0")
        before = self.client.list_jobs()
        with self.assertRaisesRegex(types.InvalidArgument, "outside job 'pos'"):
            self.client.rewind("pos", "w0", position)
        self.assertEqual(self.client.list_jobs(), before)


if __name__ == "__main__":
    absltest.main()
