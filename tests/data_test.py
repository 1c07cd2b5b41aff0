"""Tests for tfscale.data: the synthetic set, TFRecord shards, sources."""

import os

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from tfscale.data import records  # noqa: E402
from tfscale.data import sources  # noqa: E402
from tfscale.data import synthetic  # noqa: E402


class GenerateTest(absltest.TestCase):
    def test_deterministic_for_a_seed(self):
        a_images, a_labels = synthetic.generate(50, seed=5)
        b_images, b_labels = synthetic.generate(50, seed=5)
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_labels, b_labels)
        c_images, _ = synthetic.generate(50, seed=6)
        self.assertFalse(np.array_equal(a_images, c_images))

    def test_shapes_types_and_class_balance(self):
        images, labels = synthetic.generate(2000, seed=0)
        self.assertEqual(images.shape, (2000, 28, 28))
        self.assertEqual(images.dtype, np.uint8)
        counts = np.bincount(labels, minlength=10)
        self.assertTrue(all(150 < c < 250 for c in counts), counts)

    def test_classes_differ_on_average(self):
        # A learnable set: class mean images are far apart relative to noise.
        images, labels = synthetic.generate(2000, seed=0)
        means = np.stack([images[labels == k].mean(axis=0) for k in range(10)])
        gaps = [np.abs(means[i] - means[j]).mean() for i in range(10) for j in range(i)]
        self.assertGreater(min(gaps), 5.0)


class EnsureShardsTest(absltest.TestCase):
    def test_writes_shards_once_with_every_example(self):
        cache = self.create_tempdir().full_path
        files = synthetic.ensure_shards(cache, "test")
        num_examples, num_shards, _ = synthetic.SPLITS["test"]
        self.assertLen(files, num_shards)
        mtimes = [os.path.getmtime(f) for f in files]
        self.assertEqual(synthetic.ensure_shards(cache, "test"), files)
        self.assertEqual([os.path.getmtime(f) for f in files], mtimes)
        parse = records.parse_fn((28, 28, 1))
        ids = [int(parse(r)["id"]) for r in tf.data.TFRecordDataset(files)]
        self.assertEqual(sorted(ids), list(range(num_examples)))
        self.assertFalse([n for n in os.listdir(os.path.dirname(os.path.dirname(files[0]))) if n.startswith(".")])

    def test_shards_hold_the_generated_images(self):
        cache = self.create_tempdir().full_path
        files = synthetic.ensure_shards(cache, "test")
        images, labels = synthetic.generate(synthetic.SPLITS["test"][0], synthetic.SPLITS["test"][2])
        element = next(iter(tf.data.TFRecordDataset(files[1:]).map(records.parse_fn((28, 28, 1)))))
        i = int(element["id"])
        np.testing.assert_allclose(element["image"].numpy()[..., 0], images[i] / 255.0, atol=1e-6)
        self.assertEqual(int(element["label"]), labels[i])

    def test_unknown_split(self):
        with self.assertRaisesRegex(ValueError, r"Unknown split 'validation'.*Valid splits: train, test"):
            synthetic.ensure_shards(self.create_tempdir().full_path, "validation")


class RecordsTest(absltest.TestCase):
    def test_round_trip(self):
        path = os.path.join(self.create_tempdir().full_path, "x.tfrecord")
        images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
        records.write_examples(path, images, np.array([3, 7]), np.array([10, 11]))
        out = list(tf.data.TFRecordDataset([path]).map(records.parse_fn((4, 4, 1))))
        self.assertEqual([int(e["label"]) for e in out], [3, 7])
        self.assertEqual([int(e["id"]) for e in out], [10, 11])
        np.testing.assert_allclose(out[1]["image"].numpy()[..., 0], images[1] / 255.0)

    def test_mismatched_lengths(self):
        with self.assertRaisesRegex(ValueError, r"same length. Received: 2, 1, 2"):
            records.write_examples("/nonexistent", np.zeros((2, 4, 4), np.uint8), [1], [1, 2])


class LoadSplitTest(parameterized.TestCase):
    def test_synthetic(self):
        split = sources.load_split("synthetic", "test", cache_dir=testutil.cache_dir())
        self.assertEqual(split.num_examples, synthetic.SPLITS["test"][0])
        self.assertEqual(split.image_shape, (28, 28, 1))
        self.assertLen(split.files, synthetic.SPLITS["test"][1])
        image, label = next(iter(split.dataset))
        self.assertEqual(image.shape, (28, 28, 1))
        self.assertEqual(image.dtype, tf.float32)
        self.assertEqual(label.dtype, tf.int64)
        self.assertEqual(sum(1 for _ in split.dataset), split.num_examples)

    def test_tfrecord_pattern_with_split_placeholder(self):
        root = self.create_tempdir().full_path
        images, labels = synthetic.generate(30, seed=1)
        for shard in range(3):
            ids = np.arange(shard * 10, shard * 10 + 10)
            records.write_examples(
                os.path.join(root, f"val-{shard}.tfrecord"), images[ids], labels[ids], ids
            )
        split = sources.load_split(f"tfrecord:{root}/{{split}}-*.tfrecord", "val")
        self.assertEqual(split.num_examples, 30)
        self.assertLen(split.files, 3)
        got = sorted(int(label) for _, label in split.dataset)
        self.assertEqual(got, sorted(labels.tolist()))

    def test_tfrecord_pattern_matching_nothing(self):
        with self.assertRaisesRegex(ValueError, r"No file matches '/nonexistent/train-\*'"):
            sources.load_split("tfrecord:/nonexistent/{split}-*", "train")

    @parameterized.parameters("mnist", "tfds:", "csv:/x")
    def test_unknown_source(self, source):
        with self.assertRaisesRegex(ValueError, r"Unknown data source .*Valid sources: synthetic"):
            sources.load_split(source, "train")

    def test_tfds_source_with_mock_data(self):
        with tfds.testing.mock_data(num_examples=24):
            split = sources.load_split("tfds:mnist", "train")
            elements = list(split.dataset)
        self.assertEqual(split.num_examples, 24)
        self.assertLen(elements, 24)
        self.assertEqual(split.image_shape, (28, 28, 1))
        self.assertEqual(split.num_classes, 10)
        image, label = elements[0]
        self.assertEqual(image.dtype, tf.float32)
        self.assertLessEqual(float(tf.reduce_max(image)), 1.0)
        self.assertEqual(label.dtype, tf.int64)

    def test_tfds_source_without_features(self):
        with tfds.testing.mock_data(num_examples=4):
            with self.assertRaisesRegex(ValueError, r"tfds:imdb_reviews needs 'image' and 'label'"):
                sources.load_split("tfds:imdb_reviews", "train")


if __name__ == "__main__":
    absltest.main()
