"""Tests for record counts without reading: the counts.json sidecar and the count cache."""

import json
import os
from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data import records
from tfscale.data import synthetic
from tfscale.data.dispatcher import shards


def _write(path, n):
    records.write_examples(path, np.zeros((n, 28, 28), np.uint8), np.zeros(n), np.arange(n))


def _no_reads():
    return mock.patch.object(records, "count", side_effect=AssertionError("read a file through"))


class SidecarTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.root = self.create_tempdir().full_path
        self.files = [os.path.join(self.root, f"part-{i}.tfrecord") for i in range(2)]
        _write(self.files[0], 3)
        _write(self.files[1], 5)

    def test_sidecar_is_used_without_reading(self):
        # Deliberately wrong counts: returning them proves the files were not read.
        records.write_counts(self.root, {"part-0.tfrecord": 42, "part-1.tfrecord": 7})
        with _no_reads():
            self.assertEqual(records.shard_counts(self.files), [42, 7])
            cache_dir = self.create_tempdir().full_path
            self.assertEqual(records.shard_counts(self.files, cache_dir=cache_dir), [42, 7])

    def test_file_missing_from_sidecar_is_counted(self):
        records.write_counts(self.root, {"part-0.tfrecord": 42})
        with mock.patch.object(records, "count", wraps=records.count) as count:
            self.assertEqual(records.shard_counts(self.files), [42, 5])
        count.assert_called_once_with(self.files[1])

    def test_sidecar_format(self):
        records.write_counts(self.root, {"b": 2, "a": 1})
        with open(os.path.join(self.root, "counts.json")) as f:
            self.assertEqual(json.load(f), {"a": 1, "b": 2})
        self.assertEqual(
            sorted(os.listdir(self.root)), ["counts.json", "part-0.tfrecord", "part-1.tfrecord"]
        )

    def test_dispatcher_expand_uses_the_sidecar(self):
        records.write_counts(self.root, {"part-0.tfrecord": 42, "part-1.tfrecord": 7})
        with _no_reads():
            specs = shards.expand(os.path.join(self.root, "*.tfrecord"), count_elements=True)
        self.assertEqual([(s.name, s.size) for s in specs], list(zip(self.files, [42, 7])))

    @parameterized.parameters(
        dict(text="{not json", match="counts.json is not valid JSON"),
        dict(text='["a"]', match="counts.json must map file basenames to non-negative"),
        dict(text='{"part-0.tfrecord": -1}', match="must map file basenames to non-negative"),
        dict(text='{"part-0.tfrecord": "3"}', match="must map file basenames to non-negative"),
    )
    def test_malformed_sidecar_names_the_file(self, text, match):
        with open(os.path.join(self.root, "counts.json"), "w") as f:
            f.write(text)
        with self.assertRaisesRegex(ValueError, match):
            records.shard_counts(self.files)

    @parameterized.parameters(
        dict(counts={"dir/x": 1}, match="keyed by file basenames. Received: 'dir/x'"),
        dict(counts={"": 1}, match="keyed by file basenames. Received: ''"),
        dict(counts={"x": -1}, match="non-negative ints. Received: 'x': -1"),
        dict(counts={"x": 1.0}, match="non-negative ints. Received: 'x': 1.0"),
        dict(counts={"x": True}, match="non-negative ints. Received: 'x': True"),
    )
    def test_write_counts_validates(self, counts, match):
        with self.assertRaisesRegex(ValueError, match):
            records.write_counts(self.root, counts)
        self.assertFalse(os.path.exists(os.path.join(self.root, "counts.json")))


class CacheTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.root = self.create_tempdir().full_path
        self.cache_dir = os.path.join(self.create_tempdir().full_path, "made-on-demand")
        self.cache_file = os.path.join(self.cache_dir, "record_counts.json")
        self.files = [os.path.join(self.root, f"part-{i}.tfrecord") for i in range(2)]
        _write(self.files[0], 3)
        _write(self.files[1], 5)

    def test_no_cache_dir_reads_every_time(self):
        for _ in range(2):
            with mock.patch.object(records, "count", wraps=records.count) as count:
                self.assertEqual(records.shard_counts(self.files), [3, 5])
            self.assertEqual(count.call_count, 2)
        self.assertFalse(os.path.exists(self.cache_dir))

    def test_second_call_hits_the_cache(self):
        with mock.patch.object(records, "count", wraps=records.count) as count:
            self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 5])
        self.assertEqual(count.call_count, 2)
        with open(self.cache_file) as f:
            cache = json.load(f)
        stat = os.stat(self.files[0])
        self.assertEqual(
            cache[os.path.abspath(self.files[0])],
            {"count": 3, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
        )
        # Written atomically: no temporary file is left.
        self.assertEqual(sorted(os.listdir(self.cache_dir)), ["record_counts.json"])
        with _no_reads():
            self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 5])

    def test_keyed_by_absolute_path(self):
        records.shard_counts(self.files, cache_dir=self.cache_dir)
        relative = os.path.relpath(self.files[1])
        with _no_reads():
            self.assertEqual(records.shard_counts([relative], cache_dir=self.cache_dir), [5])

    def test_changed_file_is_counted_again(self):
        records.shard_counts(self.files, cache_dir=self.cache_dir)
        _write(self.files[1], 8)  # more records: size and mtime change
        with mock.patch.object(records, "count", wraps=records.count) as count:
            self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 8])
        count.assert_called_once_with(self.files[1])
        with _no_reads():
            self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 8])

    def test_same_size_other_mtime_is_counted_again(self):
        records.shard_counts(self.files, cache_dir=self.cache_dir)
        stat = os.stat(self.files[0])
        os.utime(self.files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        with mock.patch.object(records, "count", wraps=records.count) as count:
            self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 5])
        count.assert_called_once_with(self.files[0])

    def test_corrupt_cache_is_ignored_and_rewritten(self):
        bad_entry = json.dumps({os.path.abspath(self.files[0]): {"count": "x"}})
        for corrupt in ("{not json", "[1, 2]", bad_entry):
            os.makedirs(self.cache_dir, exist_ok=True)
            with open(self.cache_file, "w") as f:
                f.write(corrupt)
            with mock.patch.object(records, "count", wraps=records.count) as count:
                self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 5])
            self.assertEqual(count.call_count, 2, corrupt)
            with _no_reads():
                self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 5])

    def test_corrupt_cache_logs_a_warning(self):
        os.makedirs(self.cache_dir)
        with open(self.cache_file, "w") as f:
            f.write("{not json")
        with self.assertLogs(level="WARNING") as logs:
            records.shard_counts(self.files, cache_dir=self.cache_dir)
        self.assertIn("Ignoring the record count cache", "\n".join(logs.output))

    def test_unwritable_cache_still_counts(self):
        not_a_dir = os.path.join(self.root, "plain-file")
        with open(not_a_dir, "w") as f:
            f.write("x")
        with self.assertLogs(level="WARNING") as logs:
            self.assertEqual(records.shard_counts(self.files, cache_dir=not_a_dir), [3, 5])
        self.assertIn("Cannot write the record count cache", "\n".join(logs.output))

    def test_keeps_entries_of_other_callers(self):
        records.shard_counts(self.files[:1], cache_dir=self.cache_dir)
        records.shard_counts(self.files[1:], cache_dir=self.cache_dir)
        with _no_reads():
            self.assertEqual(records.shard_counts(self.files, cache_dir=self.cache_dir), [3, 5])


class SyntheticCountsTest(absltest.TestCase):
    def test_split_writes_its_counts(self):
        cache_dir = self.create_tempdir().full_path
        files = synthetic.ensure_shards(cache_dir=cache_dir, split="test")
        directory = os.path.dirname(files[0])
        with open(os.path.join(directory, "counts.json")) as f:
            counts = json.load(f)
        self.assertEqual(sorted(counts), sorted(os.path.basename(p) for p in files))
        self.assertEqual(sum(counts.values()), synthetic.SPLITS["test"][0])
        in_order = [counts[os.path.basename(p)] for p in files]
        self.assertEqual(in_order, [records.count(p) for p in files])
        with _no_reads():
            self.assertEqual(records.shard_counts(files), in_order)
        # Only the shards and their metadata: the staging directory left nothing behind.
        self.assertEqual(
            sorted(os.listdir(directory)), sorted([*counts, "counts.json", "info.json"])
        )
        self.assertEqual(os.listdir(os.path.dirname(directory)), ["test"])


if __name__ == "__main__":
    absltest.main()
