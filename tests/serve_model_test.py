"""Tests of tfscale.serve.model: loading a trained model and serving batches."""

import os
import re
import shutil
import tempfile

from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfscale.data import records  # noqa: E402
from tfscale.data import sources  # noqa: E402
from tfscale.data import synthetic  # noqa: E402
from tfscale.serve import model as model_lib  # noqa: E402
from tfscale.train import config as config_lib  # noqa: E402
from tfscale.train import lib  # noqa: E402
from tfscale.train import models  # noqa: E402

_FLOAT = np.dtype("float32")
_ROOT = tempfile.mkdtemp(prefix="serve-model-test-", dir=os.environ.get("TEST_TMPDIR"))
_TRAINED = {}


def tearDownModule():
    shutil.rmtree(_ROOT, ignore_errors=True)


def _config():
    """The default smoke config on a small TFRecord source (no 24k-image synthetic set)."""
    data = os.path.join(_ROOT, "data")
    if not os.path.isdir(data):
        os.makedirs(data)
        counts = {}
        for split, size, seed in (("train", 1024, 1), ("test", 256, 2)):
            images, labels = synthetic.generate(size, seed)
            records.write_examples(
                os.path.join(data, f"{split}.tfrecord"), images, labels, np.arange(size)
            )
            counts[f"{split}.tfrecord"] = size
        records.write_counts(data, counts)
    config = config_lib.smoke(config_lib.base_config())
    config.devices.virtual_cpus = testutil.NUM_CPUS
    config.distribution.kind = "one_device"
    config.data.source = f"tfrecord:{data}/{{split}}.tfrecord"
    config.data.cache_dir = testutil.cache_dir()
    config.training.epochs = 1
    config.training.verbose = 0
    return config


def _trained():
    """One epoch trained once per process: workdir, metrics, eval data, reference model."""
    if not _TRAINED:
        workdir = os.path.join(_ROOT, "run")
        metrics = lib.run(_config(), workdir)
        split = sources.load_split(_config().data.source, "test")
        images, labels = next(iter(split.dataset.batch(256)))
        reference = models.build("lenet", (28, 28, 1), 10)
        reference.load_weights(os.path.join(workdir, "checkpoints", "epoch-00001.weights.h5"))
        _TRAINED.update(
            workdir=workdir,
            metrics=metrics,
            images=images.numpy(),
            labels=labels.numpy(),
            reference=reference,
            expected=reference(images, training=False).numpy(),
        )
    return _TRAINED


def _copy_workdir(test, name="copy"):
    copy = os.path.join(test.create_tempdir().full_path, name)
    shutil.copytree(_trained()["workdir"], copy, ignore=shutil.ignore_patterns("tensorboard"))
    return copy


class WorkdirTest(absltest.TestCase):
    def test_predictions_equal_the_trained_models(self):
        trained = _trained()
        served = model_lib.load(trained["workdir"])
        outputs = served.predict({"input": trained["images"]})
        self.assertEqual(list(outputs), ["output_0"])
        np.testing.assert_allclose(outputs["output_0"], trained["expected"], rtol=0, atol=1e-6)
        # The same numbers lib.run's evaluation reported on the same 256 images.
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            trained["labels"], outputs["output_0"]
        )
        accuracy = np.mean(outputs["output_0"].argmax(axis=1) == trained["labels"])
        self.assertAlmostEqual(float(loss), trained["metrics"]["eval"]["loss"], delta=1e-5)
        self.assertEqual(accuracy, trained["metrics"]["eval"]["accuracy"])

    def test_signature_version_and_metadata(self):
        served = model_lib.load(_trained()["workdir"])
        self.assertEqual((served.name, served.version, served.kind), ("run", 1, "workdir"))
        self.assertEqual(served.signature.inputs, {"input": (_FLOAT, (28, 28, 1))})
        self.assertEqual(served.signature.outputs, {"output_0": (_FLOAT, (10,))})
        self.assertEqual(
            served.metadata(),
            {
                "name": "run",
                "version": 1,
                "kind": "workdir",
                "source": _trained()["workdir"],
                "signature_name": "serving_default",
                "signature_def": {
                    "method_name": "tensorflow/serving/predict",
                    "inputs": {"input": {"dtype": "float32", "shape": [-1, 28, 28, 1]}},
                    "outputs": {"output_0": {"dtype": "float32", "shape": [-1, 10]}},
                },
            },
        )
        self.assertIn("name='run', version=1", repr(served))

    def test_warm_up_traces_each_batch_size_once(self):
        images = _trained()["images"]
        served = model_lib.load(_trained()["workdir"])
        self.assertEqual(served.tracing_count, 0)
        served.warm_up([1, 4, 8])
        self.assertEqual(served.tracing_count, 3)
        outputs = {b: served.predict({"input": images[:b]})["output_0"] for b in (8, 1, 4, 8)}
        self.assertEqual(served.tracing_count, 3)
        # Rows do not depend on their batch, so padding a request changes nothing.
        np.testing.assert_allclose(outputs[1], outputs[8][:1], rtol=0, atol=1e-6)
        np.testing.assert_allclose(outputs[4], outputs[8][:4], rtol=0, atol=1e-6)
        served.predict({"input": images[:3].astype(np.float64)})  # cast, a new size
        self.assertEqual(served.tracing_count, 4)

    def test_config_path_when_the_workdir_has_no_config(self):
        workdir = _copy_workdir(self)
        os.remove(os.path.join(workdir, lib.CONFIG_FILE))
        with self.assertRaisesRegex(
            model_lib.LoadError, f"Workdir {re.escape(workdir)} has no config.json: .*config_path"
        ):
            model_lib.load(workdir)
        served = model_lib.load(
            workdir,
            config_path=os.path.join(testutil.REPO_ROOT, "configs", "default.py:smoke"),
            image_shape=(28, 28, 1),
            num_classes=10,
        )
        outputs = served.predict({"input": _trained()["images"]})["output_0"]
        np.testing.assert_allclose(outputs, _trained()["expected"], rtol=0, atol=1e-6)

    def test_config_that_does_not_match_the_checkpoint_is_an_error(self):
        workdir = _trained()["workdir"]
        weights = os.path.join(workdir, "checkpoints", "epoch-00001.weights.h5")
        with self.assertRaisesRegex(
            model_lib.LoadError,
            f"^Checkpoint {re.escape(weights)} \\(epoch 1\\) cannot be read into a 'convnet' model",
        ):
            model_lib.load(workdir, config_overrides={"model.name": "convnet"})
        with self.assertRaisesRegex(model_lib.LoadError, "config_overrides must name existing"):
            model_lib.load(workdir, config_overrides={"model.nmae": "lenet"})
        with self.assertRaisesRegex(model_lib.LoadError, "config_path must name a config file"):
            model_lib.load(workdir, config_path="configs/nothing.py")

    def test_latest_version_follows_a_resumed_run(self):
        workdir = _copy_workdir(self)
        self.assertEqual(model_lib.latest_version(workdir), 1)
        first = model_lib.load(workdir)
        config = _config()
        config.training.epochs = 2
        lib.run(config, workdir)
        self.assertEqual(model_lib.latest_version(workdir), 2)
        second = model_lib.load(workdir)
        self.assertEqual((first.version, second.version), (1, 2))
        images = {"input": _trained()["images"][:8]}
        self.assertGreater(
            np.abs(second.predict(images)["output_0"] - first.predict(images)["output_0"]).max(),
            1e-3,
        )

    def test_truncated_checkpoint_is_named(self):
        workdir = _copy_workdir(self)
        weights = os.path.join(workdir, "checkpoints", "epoch-00001.weights.h5")
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
        with self.assertRaisesRegex(
            model_lib.LoadError, f"^Checkpoint {re.escape(weights)} \\(epoch 1\\) cannot be read"
        ) as raised:
            model_lib.load(workdir)
        self.assertLen(str(raised.exception).splitlines(), 1)

    def test_workdir_without_a_checkpoint(self):
        # As a run leaves it during its first epoch, and with an empty checkpoints/.
        started = self.create_tempdir("started")
        started.create_file(lib.CONFIG_FILE, _config().to_json())
        empty = self.create_tempdir("empty")
        empty.mkdir(lib.CHECKPOINTS_DIR)
        for workdir in (started.full_path, empty.full_path):
            self.assertEqual(model_lib.latest_version(workdir), 0)
            with self.assertRaisesRegex(
                model_lib.LoadError, f"^Workdir {re.escape(workdir)} has no checkpoint yet"
            ):
                model_lib.load(workdir)


class KerasFileTest(absltest.TestCase):
    def test_keras_file_predicts_like_the_trained_model(self):
        path = os.path.join(self.create_tempdir().full_path, "lenet.keras")
        _trained()["reference"].save(path)
        served = model_lib.load(path)
        self.assertEqual((served.name, served.kind, served.source), ("lenet", "keras", path))
        self.assertEqual(served.version, int(os.path.getmtime(path)))
        self.assertEqual(model_lib.latest_version(path), served.version)
        self.assertEqual(served.signature.inputs, {"input": (_FLOAT, (28, 28, 1))})
        self.assertEqual(served.signature.outputs, {"output_0": (_FLOAT, (10,))})
        outputs = served.predict({"input": _trained()["images"]})["output_0"]
        np.testing.assert_allclose(outputs, _trained()["expected"], rtol=0, atol=1e-6)

    def test_named_inputs_and_dict_outputs_keep_their_names(self):
        features = keras.Input((4,), name="features")
        mask = keras.Input((2,), dtype="int32", name="mask")
        hidden = keras.layers.Dense(3, name="hidden")(features)
        count = keras.ops.sum(keras.ops.cast(mask, "float32"), axis=1, keepdims=True)
        model = keras.Model(
            {"features": features, "mask": mask}, {"score": hidden, "count": count * 2.0}
        )
        path = os.path.join(self.create_tempdir().full_path, "ranker.keras")
        model.save(path)
        served = model_lib.load(path)
        self.assertEqual(
            served.signature.inputs,
            {"features": (_FLOAT, (4,)), "mask": (np.dtype("int32"), (2,))},
        )
        self.assertEqual(
            served.signature.outputs, {"score": (_FLOAT, (3,)), "count": (_FLOAT, (1,))}
        )
        inputs = {"features": np.ones((2, 4), np.float32), "mask": np.array([[1, 0], [1, 1]])}
        outputs = served.predict(inputs)
        np.testing.assert_allclose(outputs["count"], [[2.0], [4.0]])
        np.testing.assert_allclose(outputs["score"], model(inputs)["score"], atol=1e-6)

    def test_list_outputs_are_numbered(self):
        features = keras.Input((4,), name="features")
        model = keras.Model(features, [keras.layers.Dense(2)(features), features * 2.0])
        served = model_lib.ServableModel.from_keras(model, name="pair", version=3)
        self.assertEqual(list(served.signature.inputs), ["features"])
        self.assertEqual(
            served.signature.outputs, {"output_0": (_FLOAT, (2,)), "output_1": (_FLOAT, (4,))}
        )
        outputs = served.predict({"features": np.full((5, 4), 3.0)})
        np.testing.assert_allclose(outputs["output_1"], np.full((5, 4), 6.0))


class SavedModelTest(absltest.TestCase):
    def test_saved_model_predicts_like_the_trained_model(self):
        path = os.path.join(self.create_tempdir().full_path, "lenet", "7")
        _trained()["reference"].export(path, format="tf_saved_model", verbose=False)
        served = model_lib.load(path)
        self.assertEqual((served.name, served.version, served.kind), ("lenet", 7, "saved_model"))
        self.assertEqual(model_lib.latest_version(path), 7)
        signature = tf.saved_model.load(path).signatures["serving_default"]
        (input_name,) = signature.structured_input_signature[1]
        self.assertEqual(served.signature.inputs, {input_name: (_FLOAT, (28, 28, 1))})
        self.assertEqual(served.signature.outputs, {"output_0": (_FLOAT, (10,))})
        served.warm_up([2, 256])
        outputs = served.predict({input_name: _trained()["images"]})["output_0"]
        np.testing.assert_allclose(outputs, _trained()["expected"], rtol=0, atol=1e-6)
        self.assertEqual(served.tracing_count, 2)

        unversioned = os.path.join(self.create_tempdir().full_path, "exported")
        shutil.copytree(path, unversioned)
        served = model_lib.load(unversioned, name="digits")
        self.assertEqual(served.name, "digits")
        self.assertEqual(
            served.version, int(os.path.getmtime(os.path.join(unversioned, "saved_model.pb")))
        )

    def test_saved_model_without_serving_signature(self):
        path = self.create_tempdir().full_path
        tf.saved_model.save(tf.Module(), path)
        with self.assertRaisesRegex(
            model_lib.LoadError, "has no 'serving_default' signature. Received signatures: none"
        ):
            model_lib.load(path)


class LoadErrorsTest(absltest.TestCase):
    def test_missing_path(self):
        path = os.path.join(self.create_tempdir().full_path, "nothing")
        with self.assertRaisesRegex(
            model_lib.LoadError, f"^No model at {re.escape(path)}: the path does not exist$"
        ):
            model_lib.load(path)
        with self.assertRaisesRegex(model_lib.LoadError, "does not exist"):
            model_lib.latest_version(path)

    def test_unknown_format_names_what_was_looked_for(self):
        directory = self.create_tempdir()
        text = directory.create_file("model.txt", "hello").full_path
        for path in (directory.full_path, text):
            with self.assertRaisesRegex(
                model_lib.LoadError,
                f"^{re.escape(path)} is not a model: expected a tfscale-train workdir "
                r"\(with checkpoints/ or config.json\), a .keras file or a SavedModel directory "
                r"\(with saved_model.pb\)$",
            ):
                model_lib.load(path)

    def test_corrupt_keras_file(self):
        path = self.create_tempdir().create_file("broken.keras", "not a zip").full_path
        with self.assertRaisesRegex(
            model_lib.LoadError, f"^Keras file {re.escape(path)} cannot be loaded: "
        ):
            model_lib.load(path)

    def test_workdir_options_on_a_file(self):
        path = self.create_tempdir().create_file("x.keras", "").full_path
        with self.assertRaisesRegex(model_lib.LoadError, "apply to workdirs only"):
            model_lib.load(path, config_path="configs/default.py")


class PredictErrorsTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        self.served = model_lib.ServableModel.from_keras(model, name="tiny")

    def test_wrong_names(self):
        with self.assertRaisesRegex(
            ValueError, re.escape("Model 'tiny' takes inputs ['input']. Received: ['x']")
        ):
            self.served.predict({"x": np.zeros((1, 3))})

    def test_wrong_shape(self):
        with self.assertRaisesRegex(
            ValueError,
            re.escape(
                "Input 'input' of model 'tiny' must have shape (batch, 3). Received: shape=(2, 4)"
            ),
        ):
            self.served.predict({"input": np.zeros((2, 4))})
        with self.assertRaisesRegex(ValueError, re.escape("Received: shape=(3,)")):
            self.served.predict({"input": np.zeros(3)})

    def test_wrong_dtype(self):
        with self.assertRaisesRegex(
            ValueError, "Input 'input' of model 'tiny' must be float32. Received: dtype=str"
        ):
            self.served.predict({"input": np.array([["a", "b", "c"]])})

    def test_empty_batch(self):
        with self.assertRaisesRegex(ValueError, "one positive batch size. Received: {'input': 0}"):
            self.served.predict({"input": np.zeros((0, 3))})

    def test_keras_model_without_inputs(self):
        with self.assertRaisesRegex(
            model_lib.LoadError, "Keras model 'bare' has no defined inputs .* keras.Input"
        ):
            model_lib.ServableModel.from_keras(
                keras.Sequential([keras.layers.Dense(2)], name="bare"), name="bare"
            )

    def test_bad_warm_up_size_and_version(self):
        with self.assertRaisesRegex(ValueError, "positive ints. Received: 0"):
            self.served.warm_up([0])
        with self.assertRaisesRegex(ValueError, "version must be a non-negative int"):
            model_lib.ServableModel("tiny", -1, self.served.signature, lambda features: features)


if __name__ == "__main__":
    absltest.main()
