"""Tests for shard specs: ranges, TFDS slices and file globs, and shard names."""

import os

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

from tfscale.data import records  # noqa: E402
from tfscale.data.dispatcher import shards  # noqa: E402


class ExpandTest(parameterized.TestCase):
    def test_ranges(self):
        specs = shards.expand("range:25:10")
        self.assertEqual(
            [(s.name, s.size) for s in specs],
            [("range:0:10", 10), ("range:10:20", 10), ("range:20:25", 5)],
        )

    def test_tfds_slices(self):
        specs = shards.expand("tfds:mnist:train:3")
        self.assertEqual(
            [s.name for s in specs],
            ["tfds:mnist:train[0%:33%]", "tfds:mnist:train[33%:67%]", "tfds:mnist:train[67%:100%]"],
        )
        self.assertEqual(sum(s.size for s in specs), 100)

    def test_files_sized_by_bytes_or_records(self):
        root = self.create_tempdir().full_path
        for i, n in enumerate((3, 5)):
            records.write_examples(
                os.path.join(root, f"part-{i}.tfrecord"),
                np.zeros((n, 28, 28), np.uint8),
                np.zeros(n),
                np.arange(n),
            )
        by_bytes = shards.expand(os.path.join(root, "*.tfrecord"))
        self.assertEqual(
            [os.path.basename(s.name) for s in by_bytes], ["part-0.tfrecord", "part-1.tfrecord"]
        )
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


class RangeBoundsTest(parameterized.TestCase):
    def test_bounds(self):
        self.assertEqual(shards.range_bounds("range:3:7"), (3, 7))
        self.assertEqual(shards.range_bounds("range:3:3"), (3, 3))

    @parameterized.parameters("range:7:3", "range:a:3", "range:1", "tfds:mnist:train[0%:5%]")
    def test_bad_names(self, name):
        with self.assertRaisesRegex(ValueError, "range:A:B"):
            shards.range_bounds(name)


if __name__ == "__main__":
    absltest.main()
