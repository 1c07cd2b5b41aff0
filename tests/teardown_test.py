"""Tearing down the training input: no stall after the last epoch.

Deleting a tf.data iterator joins its autotuning ("model") thread, which can
miss the wake-up from the iterator's cancellation and sleep out the rest of
its optimization period (doubling up to 60 s), so Keras dropping the training
iterator at the end of `fit` stalled. The stall is a race, so these tests
check its precondition: no iterator of a distributed dataset autotunes.
"""

from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import tensorflow as tf  # noqa: E402

import tfscale  # noqa: E402
from tfscale.data import sources  # noqa: E402
from tfscale.sharding import strategy as sharding_strategy  # noqa: E402


def _iterator_datasets(iterator) -> list[tf.data.Dataset]:
    """The datasets of the source and of each per-device iterator."""
    (worker,) = iterator._iterators
    return [worker._dataset] + [d._dataset for d in worker._iterator._device_iterators]


class TeardownTest(absltest.TestCase):
    def test_training_input_iterators_do_not_autotune(self):
        dist = tfscale.distribution("mirrored")
        split = sources.load_split("synthetic", "train", cache_dir=testutil.cache_dir())
        dataset = split.dataset.shuffle(256, seed=0).repeat()
        iterator = iter(dist.distribute_dataset(dataset, 8 * dist.num_replicas_in_sync))
        next(iterator)
        datasets = _iterator_datasets(iterator)
        self.assertLen(datasets, 1 + dist.num_replicas_in_sync)
        for dataset in datasets:
            self.assertIs(dataset.options().autotune.enabled, False, dataset)

    def test_dtensor_input_does_not_autotune(self):
        dist = tfscale.distribution("dtensor", mesh="batch=2,model=2")
        batches = dist.distribute_dataset(tf.data.Dataset.range(64), 8)
        self.assertIsInstance(batches, sharding_strategy.DTensorBatches)
        self.assertIs(batches._sliced.options().autotune.enabled, False)

    def test_elements_and_order_unchanged(self):
        dist = tfscale.distribution("mirrored", devices=2)
        iterator = iter(dist.distribute_dataset(tf.data.Dataset.range(8), 4))
        batches = [
            [t.numpy().tolist() for t in dist.strategy.experimental_local_results(b)]
            for b in iterator
        ]
        self.assertEqual(batches, [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])


if __name__ == "__main__":
    absltest.main()
