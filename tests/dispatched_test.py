"""DispatchedInput: dispatched shards read in tf.data, each element once per epoch."""

import collections
import os
import threading

import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data import dispatched
from tfscale.data import readers
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import shards
from tfscale.data.dispatcher import types

SIZES = [37, 5, 64, 1, 90, 23, 130, 8, 64, 12]  # 434 elements an epoch; odd sizes on purpose


def _range_shards(sizes=SIZES):
    specs, start = [], 0
    for size in sizes:
        specs.append(types.ShardSpec(f"range:{start}:{start + size}", size))
        start += size
    return tuple(specs)


class _CountingClient(client_lib.DispatcherClient):
    """Counts the RPCs it makes, by method."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = collections.Counter()

    def _call(self, method, request, *args):
        self.calls[method] += 1
        return super()._call(method, request, *args)


class DispatchedInputTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.server = server_lib.DispatcherServer().start()
        self.addCleanup(self.server.stop)
        self.client = client_lib.DispatcherClient(self.server.target)

    def _job(self, name="j", num_epochs=2, **kwargs):
        spec = types.JobSpec(
            name,
            _range_shards(),
            kwargs.pop("policy", "least_loaded"),
            num_epochs,
            lease_timeout_s=30,
            **kwargs,
        )
        self.client.create_job(spec)
        return spec

    def _input(self, worker, job="j", **kwargs):
        return dispatched.DispatchedInput(
            self.server.target, job, readers.ranges(), worker=worker, **kwargs
        )

    @parameterized.parameters(1, 3)
    def test_each_element_once_per_epoch_with_parallel_reads(self, cycle_length):
        self._job(num_epochs=2)
        inputs = [self._input(f"w{i}", cycle_length=cycle_length, max_shards=2) for i in range(2)]
        outs = [[] for _ in inputs]
        threads = [
            threading.Thread(
                target=lambda s=s, o=o: o.extend(
                    int(x) for b in s.dataset.batch(16) for x in b.numpy()
                )
            )
            for s, o in zip(inputs, outs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        counts = collections.Counter(x for out in outs for x in out)
        self.assertEqual(set(counts), set(range(sum(SIZES))))
        self.assertEqual(set(counts.values()), {2})
        delivered = collections.Counter(d for s in inputs for d in s.feed.delivered)
        self.assertLen(delivered, 2 * len(SIZES))  # every (epoch, shard) completed ...
        self.assertEqual(set(delivered.values()), {1})  # ... once
        self.assertEqual([s.feed.lost for s in inputs], [[], []])
        (job,) = self.client.list_jobs()
        self.assertTrue(job.finished)

    def test_shards_stream_in_order_one_after_another(self):
        # A consumer's elements come shard by shard, each in its own order:
        # what lets a count of consumed elements name a position.
        self._job(num_epochs=1)
        source = self._input("w0", cycle_length=4)
        out = [int(x) for x in source.dataset]
        self.assertEqual(sorted(out), list(range(sum(SIZES))))
        where = {x: i for i, x in enumerate(out)}
        for spec in _range_shards():
            start, stop = map(int, spec.name.split(":")[1:])
            positions = [where[x] for x in range(start, stop)]
            self.assertEqual(positions, list(range(positions[0], positions[0] + spec.size)))

    def test_one_round_trip_per_grant(self):
        self._job(num_epochs=1)
        source = self._input("w0", max_shards=5)
        source._client = counting = _CountingClient(self.server.target)
        source.dataset = source._build()
        self.assertLen(list(source.dataset), sum(SIZES))
        # Grants and completions ride on acquires: no Commit or Complete RPC.
        self.assertEqual(counting.calls["Commit"], 0)
        self.assertEqual(counting.calls["Complete"], 0)
        self.assertEqual(counting.calls["Release"], 0)
        (job,) = self.client.list_jobs()
        self.assertTrue(job.finished)
        self.assertEqual(job.grants, len(SIZES))

    def test_early_close_gives_the_rest_back_at_the_reported_offset(self):
        self._job(num_epochs=1)
        first = self._input("w0", cycle_length=2, track_consumed=True)
        iterator = iter(first.dataset)
        taken = [int(next(iterator)) for _ in range(100)]
        first.report_consumed(100)
        del iterator
        first.close()
        second = self._input("w1")
        rest = [int(x) for x in second.dataset]
        counts = collections.Counter(taken + rest)
        self.assertEqual(set(counts), set(range(sum(SIZES))), "missing elements")
        self.assertEqual(max(counts.values()), 1, "elements read twice")

    def test_position_rewinds_a_resumed_run_to_the_element(self):
        self._job(num_epochs=2)
        first = self._input("w0", shuffle_buffer=50, seed=3)
        iterator = iter(first.dataset)
        trained = [int(next(iterator)) for _ in range(500)]  # into the second epoch
        position = first.position(500)
        self.assertEqual(position.epoch, 1)
        for _ in range(40):  # consumed by steps lost in a crash
            next(iterator)
        del iterator
        first.close()
        second = self._input("w0", shuffle_buffer=50, seed=3)
        second.rewind(position)
        resumed = [int(x) for x in second.dataset]
        counts = collections.Counter(trained + resumed)
        self.assertEqual(set(counts), set(range(sum(SIZES))))
        self.assertEqual(set(counts.values()), {2})

    def test_equalized_pad_consumers_get_equal_counts(self):
        # consistent_hash never steals: each consumer reads its own shards in
        # every epoch, however slowly its pipeline starts (a consumer with no
        # element at all in an epoch has nothing to pad with).
        self._job(num_epochs=2, num_consumers=2, equalize="pad", policy="consistent_hash")
        for i in range(2):
            self.client.register_worker("j", f"w{i}")
        inputs = [self._input(f"w{i}", max_shards=1) for i in range(2)]
        outs = [[] for _ in inputs]
        threads = [
            threading.Thread(target=lambda s=s, o=o: o.extend(int(x) for x in s.dataset))
            for s, o in zip(inputs, outs)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for epoch in range(2):
            self.assertEqual(inputs[0].feed.per_epoch[epoch], inputs[1].feed.per_epoch[epoch])
        self.assertEqual(len(outs[0]), len(outs[1]))
        self.assertEqual(set(x for out in outs for x in out), set(range(sum(SIZES))))

    def test_a_users_own_tfrecord_schema(self):
        root = self.create_tempdir().full_path
        files = []
        for f in range(3):
            path = os.path.join(root, f"part-{f}.tfrecord")
            with tf.io.TFRecordWriter(path) as writer:
                for i in range(f * 10, f * 10 + 7 + f):
                    example = tf.train.Example(
                        features=tf.train.Features(
                            feature={
                                "text": tf.train.Feature(
                                    bytes_list=tf.train.BytesList(value=[b"t%d" % i])
                                ),
                                "score": tf.train.Feature(
                                    float_list=tf.train.FloatList(value=[i / 2])
                                ),
                            }
                        )
                    )
                    writer.write(example.SerializeToString())
            files.append(path)
        self.client.create_job(types.JobSpec("own", tuple(shards.expand(os.path.join(root, "*")))))
        features = {
            "text": tf.io.FixedLenFeature([], tf.string),
            "score": tf.io.FixedLenFeature([], tf.float32),
        }
        reader = readers.tfrecord(lambda r: tf.io.parse_single_example(r, features))
        source = dispatched.DispatchedInput(self.server.target, "own", reader, worker="w0")
        got = {e["text"].numpy().decode(): float(e["score"]) for e in source.dataset}
        want = {f"t{i}": i / 2 for f in range(3) for i in range(f * 10, f * 10 + 7 + f)}
        self.assertEqual(got, want)

    def test_tfds_slices(self):
        specs = shards.expand("tfds:mnist:train:3")
        with tfds.testing.mock_data(num_examples=6):
            reader = readers.tfds_slices([s.name for s in specs])
        self.client.create_job(types.JobSpec("tfds", tuple(specs)))
        source = dispatched.DispatchedInput(self.server.target, "tfds", reader, worker="w0")
        elements = list(source.dataset)
        self.assertLen(elements, 18)  # mock_data serves 6 examples for any split string
        image, label = elements[0]
        self.assertEqual(image.shape, (28, 28, 1))
        self.assertEqual(label.dtype, tf.int64)

    def test_bad_arguments_are_one_line_errors(self):
        for kwargs, cause in (
            (
                dict(cycle_length=0),
                "cycle_length must be an integer >= 1. Received: cycle_length=0",
            ),
            (dict(buffer_elements=-1), "buffer_elements"),
            (dict(shuffle_buffer=-2), "shuffle_buffer"),
        ):
            with self.assertRaisesRegex(ValueError, cause):
                self._input("w0", **kwargs)

    def test_variable_shaped_elements(self):
        self._job(num_epochs=1)

        def reader(name):
            return readers.ranges()(name).map(lambda x: tf.range(x % 3))

        source = dispatched.DispatchedInput(self.server.target, "j", reader, worker="w0")
        lengths = collections.Counter(int(tf.size(e)) for e in source.dataset)
        self.assertEqual(sum(lengths.values()), sum(SIZES))
        self.assertEqual(set(lengths), {0, 1, 2})


if __name__ == "__main__":
    absltest.main()
