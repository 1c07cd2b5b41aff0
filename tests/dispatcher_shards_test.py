"""Tests for shard specs and shard reading (ranges, TFRecord files, TFDS slices)."""

import os

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import tensorflow_datasets as tfds  # noqa: E402

from tfscale.data import records  # noqa: E402
from tfscale.data.dispatcher import shards  # noqa: E402


class ExpandTest(parameterized.TestCase):
    def test_ranges(self):
        specs = shards.expand("range:25:10")
        self.assertEqual([(s.name, s.size) for s in specs],
                         [("range:0:10", 10), ("range:10:20", 10), ("range:20:25", 5)])

    def test_tfds_slices(self):
        specs = shards.expand("tfds:mnist:train:3")
        self.assertEqual([s.name for s in specs],
                         ["tfds:mnist:train[0%:33%]", "tfds:mnist:train[33%:67%]", "tfds:mnist:train[67%:100%]"])
        self.assertEqual(sum(s.size for s in specs), 100)

    def test_files_sized_by_bytes_or_records(self):
        root = self.create_tempdir().full_path
        for i, n in enumerate((3, 5)):
            records.write_examples(
                os.path.join(root, f"part-{i}.tfrecord"),
                np.zeros((n, 28, 28), np.uint8), np.zeros(n), np.arange(n),
            )
        by_bytes = shards.expand(os.path.join(root, "*.tfrecord"))
        self.assertEqual([os.path.basename(s.name) for s in by_bytes], ["part-0.tfrecord", "part-1.tfrecord"])
        self.assertEqual(by_bytes[0].size, os.path.getsize(by_bytes[0].name))
        by_count = shards.expand(os.path.join(root, "*.tfrecord"), count_elements=True)
        self.assertEqual([s.size for s in by_count], [3, 5])

    @parameterized.parameters(
        dict(spec="range:10:0", match="Shard size must be positive"),
        dict(spec="range:ten:2", match="Expected 2 integers in 'range:ten:2'"),
        dict(spec="tfds:mnist:train", match="Expected tfds:NAME:SPLIT:N"),
        dict(spec="tfds:mnist:train:0", match="N in \\[1, 100\\]"),
        dict(spec="/nonexistent/*.tfrecord", match="No file matches the shard glob"),
    )
    def test_bad_specs(self, spec, match):
        with self.assertRaisesRegex(ValueError, match):
            shards.expand(spec)


class ReadTest(absltest.TestCase):
    def test_range(self):
        self.assertEqual(list(shards.read("range:3:7")), [3, 4, 5, 6])

    def test_tfrecord_file(self):
        path = os.path.join(self.create_tempdir().full_path, "x.tfrecord")
        records.write_examples(path, np.full((2, 28, 28), 255, np.uint8), np.array([4, 9]), np.array([7, 8]))
        elements = list(shards.read(path))
        self.assertEqual([int(e["label"]) for e in elements], [4, 9])
        self.assertEqual([int(e["id"]) for e in elements], [7, 8])
        self.assertEqual(elements[0]["image"].shape, (28, 28, 1))
        self.assertAlmostEqual(float(elements[0]["image"].max()), 1.0)

    def test_tfds_slice_elements(self):
        # mock_data serves num_examples for any split string: slicing itself
        # is TFDS's, so this checks the read path and the element structure.
        with tfds.testing.mock_data(num_examples=12):
            elements = list(shards.read(shards.expand("tfds:mnist:train:4")[1].name))
        self.assertLen(elements, 12)
        image, label = elements[0]
        self.assertEqual(image.shape, (28, 28, 1))
        self.assertEqual(np.asarray(label).dtype.kind, "i")


if __name__ == "__main__":
    absltest.main()
