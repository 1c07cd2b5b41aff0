"""Tests for tfscale.data: the synthetic set, TFRecord shards, sources."""

import os
import struct
from unittest import mock

import numpy as np
import requests
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.image_classification import mnist  # noqa: E402

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
        self.assertFalse(
            [n for n in os.listdir(os.path.dirname(os.path.dirname(files[0]))) if n.startswith(".")]
        )

    def test_shards_hold_the_generated_images(self):
        cache = self.create_tempdir().full_path
        files = synthetic.ensure_shards(cache, "test")
        images, labels = synthetic.generate(
            synthetic.SPLITS["test"][0], synthetic.SPLITS["test"][2]
        )
        element = next(iter(tf.data.TFRecordDataset(files[1:]).map(records.parse_fn((28, 28, 1)))))
        i = int(element["id"])
        np.testing.assert_allclose(element["image"].numpy()[..., 0], images[i] / 255.0, atol=1e-6)
        self.assertEqual(int(element["label"]), labels[i])

    def test_unknown_split(self):
        with self.assertRaisesRegex(
            ValueError, r"Unknown split 'validation'.*Valid splits: train, test"
        ):
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

    def test_tfds_source_not_prepared_names_the_flags_and_data_dir(self):
        data_dir = self.create_tempdir().full_path
        with self.assertRaises(ValueError) as caught:
            sources.load_split("tfds:mnist", "train", tfds_data_dir=data_dir)
        variant_dir = tfds.builder("mnist", data_dir=data_dir).data_dir
        self.assertEqual(
            str(caught.exception),
            f"tfds:mnist is not prepared in the TFDS data dir {data_dir} (no {variant_dir}): "
            "pass --config.data.download=True to download it, or "
            "--config.data.tfds_data_dir=DIR naming a directory with a prepared copy",
        )

    def test_unknown_tfds_dataset_is_one_line(self):
        expected = r"^Unknown TFDS dataset 'mnsit' \(source 'tfds:mnsit'\); did you mean tfds:mnist"
        with self.assertRaisesRegex(ValueError, expected) as caught:
            sources.load_split("tfds:mnsit", "train", tfds_data_dir=self.create_tempdir().full_path)
        self.assertNotIn("\n", str(caught.exception))


class TfdsDownloadTest(absltest.TestCase):
    """`download=True` end to end, with the HTTP fetch replaced by local MNIST-format files."""

    NUM_EXAMPLES = 12

    def test_download_path_dependencies_import(self):
        # TFDS imports importlib_resources lazily, first in `code_path` (read
        # by download_and_prepare for the registered checksums).
        import importlib_resources  # noqa: F401

        self.assertEqual(tfds.builder("mnist").code_path.name, "mnist.py")

    def test_download_prepares_then_reads_the_data_dir(self):
        data_dir = self.create_tempdir().full_path
        files = self._fake_mnist_files()
        manager = tfds.download.DownloadManager
        with mock.patch.object(manager, "download_and_extract", return_value=files) as fetch:
            with mock.patch.multiple(
                mnist, _TRAIN_EXAMPLES=self.NUM_EXAMPLES, _TEST_EXAMPLES=self.NUM_EXAMPLES
            ):
                split = sources.load_split(
                    "tfds:mnist", "test", tfds_data_dir=data_dir, download=True
                )
        fetch.assert_called_once()
        self.assertEqual(split.num_examples, self.NUM_EXAMPLES)
        self.assertEqual(sum(1 for _ in split.dataset), self.NUM_EXAMPLES)
        again = sources.load_split("tfds:mnist", "train", tfds_data_dir=data_dir)
        self.assertEqual(again.num_examples, self.NUM_EXAMPLES)

    def test_download_without_network_is_one_line(self):
        data_dir = self.create_tempdir().full_path
        offline = requests.exceptions.ConnectionError("Failed to resolve 'storage.googleapis.com'")
        with mock.patch.object(
            tfds.download.DownloadManager, "download_and_extract", side_effect=offline
        ):
            with self.assertRaises(OSError) as caught:
                sources.load_split("tfds:mnist", "train", tfds_data_dir=data_dir, download=True)
        self.assertEqual(
            str(caught.exception),
            f"tfds:mnist could not be downloaded into {data_dir} (Failed to resolve "
            "'storage.googleapis.com'); without network, prepare it on another machine and pass "
            "--config.data.tfds_data_dir=DIR",
        )

    def _fake_mnist_files(self) -> dict[str, str]:
        """Uncompressed IDX files, as the download manager returns after extraction."""
        root = self.create_tempdir().full_path
        rng = np.random.default_rng(0)
        files = {}
        for part in ("train", "test"):
            n = self.NUM_EXAMPLES
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, n, dtype=np.uint8)
            image_header = struct.pack(">IIII", 2051, n, 28, 28)
            files[f"{part}_data"] = self._write(root, f"{part}-images", image_header, images)
            label_header = struct.pack(">II", 2049, n)
            files[f"{part}_labels"] = self._write(root, f"{part}-labels", label_header, labels)
        return files

    @staticmethod
    def _write(root: str, name: str, header: bytes, array: np.ndarray) -> str:
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.write(header + array.tobytes())
        return path


if __name__ == "__main__":
    absltest.main()
