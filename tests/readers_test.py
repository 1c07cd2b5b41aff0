"""Tests for tfscale.data.readers: shard names read as tf.data datasets or Python values."""

import functools
import os

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from tfscale.data import readers  # noqa: E402
from tfscale.data import records  # noqa: E402
from tfscale.data.dispatcher import shards  # noqa: E402


def _write_records(path, shape, count=2):
    """`count` records of images of `shape` (all 255), labels 4, 9, ... and ids 7, 8, ..."""
    images = np.full((count,) + tuple(shape), 255, np.uint8)
    records.write_examples(path, images, np.arange(count) * 5 + 4, np.arange(count) + 7)


class DatasetReadersTest(parameterized.TestCase):
    def test_ranges(self):
        self.assertEqual(
            list(readers.ranges()(tf.constant("range:3:7")).as_numpy_iterator()), [3, 4, 5, 6]
        )

    @parameterized.parameters((28, 28, 1), (8, 6, 3))
    def test_records_parses_images_of_the_given_shape(self, *shape):
        path = os.path.join(self.create_tempdir().full_path, "x.tfrecord")
        _write_records(path, shape)
        elements = list(readers.records(shape)(tf.constant(path)))
        self.assertEqual([int(e["id"]) for e in elements], [7, 8])
        self.assertEqual([int(e["label"]) for e in elements], [4, 9])
        self.assertEqual(elements[0]["image"].shape, shape)

    def test_records_rejects_a_bad_shape(self):
        with self.assertRaisesRegex(ValueError, r"image_shape must be positive ints.*\(28, 0\)"):
            readers.records((28, 0))

    def test_tfrecord_without_parse_reads_raw_records(self):
        path = os.path.join(self.create_tempdir().full_path, "x.tfrecord")
        _write_records(path, (2, 2, 1), count=3)
        self.assertLen(list(readers.tfrecord()(tf.constant(path))), 3)

    def test_datasets_reader_rejects_mixed_specs(self):
        with self.assertRaisesRegex(ValueError, "share one element spec"):
            readers.datasets(
                {
                    "a": tf.data.Dataset.range(3),
                    "b": tf.data.Dataset.from_tensor_slices(np.zeros(3, np.float32)),
                }
            )


class ElementsTest(parameterized.TestCase):
    def test_range(self):
        self.assertEqual(list(readers.elements("range:3:7")), [3, 4, 5, 6])

    @parameterized.parameters((28, 28, 1), (32, 32, 3), (5, 7, 2))
    def test_record_file_of_the_given_image_shape(self, *shape):
        path = os.path.join(self.create_tempdir().full_path, "x.tfrecord")
        _write_records(path, shape)
        elements = list(readers.elements(path, image_shape=shape))
        self.assertEqual([int(e["label"]) for e in elements], [4, 9])
        self.assertEqual([int(e["id"]) for e in elements], [7, 8])
        self.assertEqual(elements[0]["image"].shape, shape)
        self.assertAlmostEqual(float(elements[0]["image"].max()), 1.0)

    def test_a_record_file_needs_an_image_shape(self):
        with self.assertRaisesRegex(ValueError, "needs the shape of its images.*image_shape=None"):
            readers.elements("/data/part-0.tfrecord")

    def test_a_partial_with_the_shape_is_a_consumer_read_fn(self):
        path = os.path.join(self.create_tempdir().full_path, "x.tfrecord")
        _write_records(path, (4, 4, 3), count=3)
        read = functools.partial(readers.elements, image_shape=(4, 4, 3))
        self.assertLen(list(read(path)), 3)

    def test_tfds_slice_elements(self):
        # mock_data serves num_examples for any split string: slicing itself
        # is TFDS's, so this checks the read path and the element structure.
        with tfds.testing.mock_data(num_examples=12):
            elements = list(readers.elements(shards.expand("tfds:mnist:train:4")[1].name))
        self.assertLen(elements, 12)
        image, label = elements[0]
        self.assertEqual(image.shape, (28, 28, 1))
        self.assertEqual(np.asarray(label).dtype.kind, "i")

    def test_range_shards_read_without_tensorflow(self):
        code = (
            "import sys; from tfscale.data import readers; "
            "assert list(readers.elements('range:0:3')) == [0, 1, 2]; "
            "print('tensorflow' in sys.modules)"
        )
        result = testutil.run_python("-c", code)
        self.assertEqual(result.stdout.strip(), "False", result.stderr[-2000:])


if __name__ == "__main__":
    absltest.main()
