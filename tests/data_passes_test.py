"""`passes.stream`: seeded passes, and a stream from any element equal to the full one's tail."""

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.data import passes

testutil.setup_devices()

_COUNT = 10


def _take(dataset, n):
    return [int(x) for x in dataset.take(n).as_numpy_iterator()]


class StreamTest(parameterized.TestCase):
    @parameterized.parameters(0, 4)
    def test_a_stream_from_any_element_is_the_full_stream_after_it(self, buffer):
        source = tf.data.Dataset.range(_COUNT)
        full = _take(passes.stream(source, _COUNT, buffer, seed=3), 5 * _COUNT)
        for start in (1, 9, 10, 17, 30, 41):
            resumed = _take(
                passes.stream(source, _COUNT, buffer, seed=3, start=start), 5 * _COUNT - start
            )
            self.assertEqual(resumed, full[start:], f"start={start}")

    def test_every_pass_holds_each_element_once_in_an_order_of_its_own(self):
        source = tf.data.Dataset.range(_COUNT)
        full = _take(passes.stream(source, _COUNT, 8, seed=0), 4 * _COUNT)
        orders = [full[i * _COUNT : (i + 1) * _COUNT] for i in range(4)]
        for order in orders:
            self.assertEqual(sorted(order), list(range(_COUNT)))
        self.assertGreater(len({tuple(o) for o in orders}), 1)
        # The same seed, the same passes; another seed, other ones.
        self.assertEqual(_take(passes.stream(source, _COUNT, 8, seed=0), 4 * _COUNT), full)
        self.assertNotEqual(_take(passes.stream(source, _COUNT, 8, seed=1), 4 * _COUNT), full)

    def test_without_a_buffer_passes_keep_the_source_order(self):
        source = tf.data.Dataset.range(_COUNT)
        self.assertEqual(
            _take(passes.stream(source, _COUNT, 0, seed=5), 2 * _COUNT), list(range(_COUNT)) * 2
        )

    def test_resuming_reads_only_the_part_of_the_pass_before_the_start(self):
        reads = []

        def record(x):
            reads.append(int(x))
            return x

        source = tf.data.Dataset.range(_COUNT).map(lambda x: tf.py_function(record, [x], tf.int64))
        _take(passes.stream(source, _COUNT, 0, seed=0, start=7 * _COUNT + 3), 1)
        # Three elements skipped, one taken (prefetching may read a few more).
        self.assertLessEqual(len(reads), _COUNT)

    def test_bad_arguments(self):
        source = tf.data.Dataset.range(_COUNT)
        with self.assertRaisesRegex(ValueError, "count must be >= 1. Received: count=0"):
            passes.stream(source, 0, 0, seed=0)
        with self.assertRaisesRegex(ValueError, "Received: shuffle_buffer=-1, start=0"):
            passes.stream(source, _COUNT, -1, seed=0)
        with self.assertRaisesRegex(ValueError, "Received: shuffle_buffer=0, start=-2"):
            passes.stream(source, _COUNT, 0, seed=0, start=-2)


class SeededShuffleTest(absltest.TestCase):
    def test_a_seed_tensor_gives_one_order_every_time(self):
        source = tf.data.Dataset.range(100)
        first = list(
            passes.seeded_shuffle(source, 50, tf.constant(7, tf.int64)).as_numpy_iterator()
        )
        again = list(passes.seeded_shuffle(source, 50, 7).as_numpy_iterator())
        self.assertEqual(first, again)
        self.assertNotEqual(first, list(range(100)))
        np.testing.assert_array_equal(sorted(first), np.arange(100))


if __name__ == "__main__":
    absltest.main()
