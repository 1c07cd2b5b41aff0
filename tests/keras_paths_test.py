"""Keras paths that stock strategies break work under tfscale's kinds.

Each test first shows the stock `tf.distribute` strategy failing or training
wrong (so the test would catch a regression to stock behaviour), then checks
tfscale's kind against one-device stock Keras.
"""

import itertools

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl.testing import absltest  # noqa: E402

import tfscale  # noqa: E402
from tfscale import compat  # noqa: E402

_DEVICES = ["/cpu:0", "/cpu:1"]
_BATCH = 16
_key_bases = itertools.count(1)


class _StockMirrored(tf.distribute.MirroredStrategy):
    """Stock `MirroredStrategy`, with collective keys of its own so that several
    strategies can live in one test process (nothing else changed).

    tfscale's strategies take the key bases 100_000, 200_000, ...; these take
    the bases halfway between, so no two strategies share a collective group.
    """

    def __init__(self):
        compat.set_collective_key_base(self, next(_key_bases) * 100_000 + 50_000)
        super().__init__(_DEVICES)


def _data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, 4).astype("float32")
    y = (x @ rng.randn(4, 1)).astype("float32") + 0.1
    return x, y


def _aligned(array):
    """A copy of `array` starting on a 64-byte boundary, where TensorFlow adopts
    numpy memory without copying (and a kernel may then write into it)."""
    buffer = np.empty(array.nbytes + 64, dtype=np.uint8)
    start = (-buffer.ctypes.data) % 64
    out = buffer[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def _model(batch_norm=False):
    keras.utils.set_random_seed(1)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(momentum=0.9))
    layers.append(keras.layers.Dense(1))
    return keras.Sequential(layers)


def _train(strategy, fit, *, batch_norm=False, steps_per_execution=1, initial=None):
    """Builds (under `strategy`, if any), compiles and runs `fit(model)`; returns the model."""
    scope = strategy.scope() if strategy is not None else _nothing()
    with scope:
        model = _model(batch_norm)
        if initial is not None:
            model.set_weights(initial)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss="mse",
            steps_per_execution=steps_per_execution,
        )
    fit(model)
    return model


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


class StepsPerExecutionTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.x, self.y = _data()
        self.initial = _model().get_weights()

    def _fit(self, model):
        dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(_BATCH)
        model.fit(dataset, epochs=2, verbose=0, shuffle=False)

    def test_stock_mirrored_fails(self):
        # In its own process: a step that failed inside a collective may leave
        # the runtime of this one unfit for the tests after it.
        script = (
            "from tests import keras_paths_test as k\n"
            "test = k.StepsPerExecutionTest('test_stock_mirrored_fails')\n"
            "test.setUp()\n"
            "try:\n"
            "    k._train(k._StockMirrored(), test._fit, steps_per_execution=3)\n"
            "except k.tf.errors.InvalidArgumentError as e:\n"
            "    print('UPSTREAM_FAILURE', ' '.join(str(e).split()))\n"
        )
        result = testutil.run_python("-c", script)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("UPSTREAM_FAILURE", result.stdout)
        self.assertIn("must feed a value", result.stdout)

    def test_tfscale_kinds_match_one_device(self):
        reference = _train(None, self._fit, steps_per_execution=3, initial=self.initial)
        self.assertGreater(_max_diff(reference.get_weights(), self.initial), 0.1)
        kinds = (
            ("mirrored", {"devices": _DEVICES}),
            ("dtensor", {"mesh": "batch=2,model=2", "layout_map": "data_parallel"}),
        )
        for kind, options in kinds:
            with self.subTest(kind):
                dist = tfscale.distribution(kind, **options)
                model = _train(dist, self._fit, steps_per_execution=3, initial=self.initial)
                self.assertLess(_max_diff(model.get_weights(), reference.get_weights()), 1e-5)
                self.assertEqual(int(model.optimizer.iterations.numpy()), 8)

    def test_distributed_dataset_and_evaluate(self):
        reference = _train(None, self._fit, steps_per_execution=4, initial=self.initial)
        dist = tfscale.distribution("mirrored", devices=_DEVICES)

        def fit(model):
            dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y))
            model.fit(dist.distribute_dataset(dataset, _BATCH), epochs=2, verbose=0)

        model = _train(dist, fit, steps_per_execution=4, initial=self.initial)
        self.assertLess(_max_diff(model.get_weights(), reference.get_weights()), 1e-5)
        loss = model.evaluate(self.x, self.y, batch_size=_BATCH, verbose=0)
        self.assertAlmostEqual(
            loss, reference.evaluate(self.x, self.y, batch_size=_BATCH, verbose=0), places=5
        )


_GENERATOR_KINDS = (
    ("mirrored", {"devices": _DEVICES}),
    ("one_device", {}),
    ("dtensor", {"mesh": "batch=2,model=2", "layout_map": "data_parallel"}),
)


class GeneratorInputTest(absltest.TestCase):
    """The batches are views of the caller's arrays, placed where TensorFlow adopts
    numpy memory (see AdoptedMemoryTest): as a user's generator would give them."""

    def setUp(self):
        super().setUp()
        self.x, self.y = (_aligned(a) for a in _data(n=8 * _BATCH))
        self.x0, self.y0 = self.x.copy(), self.y.copy()
        self.initial = _model().get_weights()

    def _generator(self):
        for i in range(8):
            yield self.x[i * _BATCH : (i + 1) * _BATCH], self.y[i * _BATCH : (i + 1) * _BATCH]

    def _fit(self, model):
        model.fit(self._generator(), steps_per_epoch=8, epochs=1, verbose=0)

    def _reference(self):
        """One-device Keras on the same 8 batches, from a tf.data dataset."""

        def fit(model):
            dataset = tf.data.Dataset.from_tensor_slices((self.x0, self.y0)).batch(_BATCH)
            model.fit(dataset, epochs=1, shuffle=False, verbose=0)

        return _train(None, fit, initial=self.initial)

    def test_stock_strategies_skip_batches(self):
        reference = self._reference()
        for strategy in (_StockMirrored(), tf.distribute.OneDeviceStrategy("/cpu:0")):
            self.x[...], self.y[...] = self.x0, self.y0
            model = _train(strategy, self._fit, initial=self.initial)
            self.assertGreater(_max_diff(model.get_weights(), reference.get_weights()), 1e-2)

    def test_tfscale_kinds_train_on_every_batch(self):
        reference = self._reference()
        expected_loss = reference.evaluate(self.x0, self.y0, batch_size=_BATCH, verbose=0)
        for kind, options in _GENERATOR_KINDS:
            with self.subTest(kind):
                dist = tfscale.distribution(kind, **options)
                model = _train(dist, self._fit, initial=self.initial)
                self.assertLess(_max_diff(model.get_weights(), reference.get_weights()), 1e-5)
                np.testing.assert_array_equal(self.y, self.y0)  # the caller's data untouched
                loss = model.evaluate(self._generator(), steps=8, verbose=0)
                self.assertAlmostEqual(loss, expected_loss, places=5)

    def test_the_alternatives_train_on_every_batch(self):
        reference = self._reference()
        x, y = self.x, self.y

        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 8

            def __getitem__(self, i):
                return x[i * _BATCH : (i + 1) * _BATCH], y[i * _BATCH : (i + 1) * _BATCH]

        dist = tfscale.distribution("mirrored", devices=_DEVICES)
        model = _train(
            dist,
            lambda m: m.fit(Batches(), epochs=1, shuffle=False, verbose=0),
            initial=self.initial,
        )
        self.assertLess(_max_diff(model.get_weights(), reference.get_weights()), 1e-5)

        spec = (tf.TensorSpec((None, 4), tf.float32), tf.TensorSpec((None, 1), tf.float32))
        source = tf.data.Dataset.from_generator(self._generator, output_signature=spec)

        def fit(m):
            m.fit(dist.distribute_dataset(source.unbatch(), _BATCH), epochs=1, verbose=0)

        model = _train(dist, fit, initial=self.initial)
        self.assertLess(_max_diff(model.get_weights(), reference.get_weights()), 1e-5)


class ModelBuildTest(absltest.TestCase):
    """Keras builds the model from one batch under a strategy: not from the input."""

    def test_a_tf_data_input_is_iterated_once_per_fit(self):
        starts = []
        x, y = _data(n=8 * _BATCH)

        def elements():
            starts.append(1)  # an input that cannot be rewound would lose what this reads
            yield from zip(x, y)

        spec = (tf.TensorSpec((4,), tf.float32), tf.TensorSpec((1,), tf.float32))
        source = tf.data.Dataset.from_generator(elements, output_signature=spec)
        for kind, options in _GENERATOR_KINDS[:2]:
            with self.subTest(kind):
                del starts[:]
                dist = tfscale.distribution(kind, **options)

                def fit(m, dist=dist):
                    dataset = dist.distribute_dataset(source, _BATCH)
                    m.fit(dataset, steps_per_epoch=8, epochs=1, verbose=0)

                _train(dist, fit, initial=_model().get_weights())
                self.assertEqual(len(starts), 1)


class AdoptedMemoryTest(absltest.TestCase):
    """Batches that are the caller's own aligned numpy memory, under two replicas."""

    def setUp(self):
        super().setUp()
        self.x, self.y = (_aligned(a) for a in _data(n=8 * _BATCH))
        self.x0, self.y0 = self.x.copy(), self.y.copy()
        self.initial = _model().get_weights()

    def _fit(self, model):
        x, y = self.x, self.y

        class Views(keras.utils.PyDataset):
            def __len__(self):
                return 8

            def __getitem__(self, i):
                return x[i * _BATCH : (i + 1) * _BATCH], y[i * _BATCH : (i + 1) * _BATCH]

        model.fit(Views(), epochs=2, shuffle=False, verbose=0)

    def test_stock_mirrored_overwrites_the_callers_labels(self):
        _train(_StockMirrored(), self._fit, initial=self.initial)
        np.testing.assert_array_equal(self.x, self.x0)
        self.assertGreater(float(np.max(np.abs(self.y - self.y0))), 1e-2)

    def test_tfscale_kinds_leave_them_and_match_one_device(self):
        reference = _train(None, self._fit, initial=self.initial)
        np.testing.assert_array_equal(self.y, self.y0)
        for kind, options in _GENERATOR_KINDS:
            with self.subTest(kind):
                model = _train(
                    tfscale.distribution(kind, **options), self._fit, initial=self.initial
                )
                np.testing.assert_array_equal(self.y, self.y0)
                self.assertLess(_max_diff(model.get_weights(), reference.get_weights()), 1e-5)


class ClassWeightTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.RandomState(3)
        self.x = rng.randn(64, 4).astype("float32")
        self.labels = (self.x[:, 0] > 0.3).astype("int32")
        self.weights = {0: 1.0, 1: 4.0}

    def _classifier(self):
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.2), loss="sparse_categorical_crossentropy")
        return model

    def _dataset(self):
        return tf.data.Dataset.from_tensor_slices((self.x, self.labels))

    def test_stock_distributed_dataset_has_no_map(self):
        strategy = _StockMirrored()
        with strategy.scope():
            model = self._classifier()
        distributed = strategy.experimental_distribute_dataset(self._dataset().batch(_BATCH))
        with self.assertRaisesRegex(AttributeError, "has no attribute 'map'"):
            model.fit(distributed, epochs=1, class_weight=self.weights, verbose=0)

    def test_tfscale_distribute_dataset_takes_class_weights(self):
        reference = self._classifier()
        reference.fit(self._dataset().batch(_BATCH), epochs=2, class_weight=self.weights, verbose=0)
        unweighted = self._classifier()
        unweighted.fit(self._dataset().batch(_BATCH), epochs=2, verbose=0)
        self.assertGreater(_max_diff(unweighted.get_weights(), reference.get_weights()), 1e-2)
        kinds = (
            ("mirrored", {"devices": _DEVICES}),
            ("dtensor", {"mesh": "batch=2,model=2", "layout_map": "data_parallel"}),
        )
        for kind, options in kinds:
            with self.subTest(kind):
                dist = tfscale.distribution(kind, **options)
                with dist.scope():
                    model = self._classifier()
                model.fit(
                    dist.distribute_dataset(self._dataset(), _BATCH),
                    epochs=2,
                    class_weight=self.weights,
                    verbose=0,
                )
                self.assertLess(_max_diff(model.get_weights(), reference.get_weights()), 1e-5)


class BatchNormalizationTest(absltest.TestCase):
    """Unsynchronized BatchNormalization: one set of moving statistics, what `evaluate` uses."""

    def setUp(self):
        super().setUp()
        self.x, self.y = _data()
        self.initial = _model(batch_norm=True).get_weights()

    def _fit(self, steps):
        def fit(model):
            dataset = tf.data.Dataset.from_tensor_slices((self.x, self.y)).take(steps * _BATCH)
            model.fit(dataset.batch(_BATCH), epochs=1, verbose=0, shuffle=False)

        return fit

    def _replica_spread(self, model):
        bn = model.layers[1]
        return max(
            float(np.max(np.abs(v.value.values[0].numpy() - v.value.values[1].numpy())))
            for v in (bn.moving_mean, bn.moving_variance)
        )

    def _evaluate_gap(self, model):
        """`evaluate` under the strategy vs. a one-device model with the saved weights."""
        one_device = _model(batch_norm=True)
        one_device.compile(loss="mse")
        one_device.set_weights(model.get_weights())
        return abs(
            model.evaluate(self.x, self.y, batch_size=_BATCH, verbose=0)
            - one_device.evaluate(self.x, self.y, batch_size=_BATCH, verbose=0)
        )

    def test_stock_replicas_keep_their_own_statistics(self):
        model = _train(_StockMirrored(), self._fit(4), batch_norm=True, initial=self.initial)
        self.assertGreater(self._replica_spread(model), 1e-2)
        self.assertGreater(self._evaluate_gap(model), 1e-3)

    def test_tfscale_replicas_share_one_set_of_statistics(self):
        dist = tfscale.distribution("mirrored", devices=_DEVICES)
        model = _train(dist, self._fit(4), batch_norm=True, initial=self.initial)
        self.assertEqual(self._replica_spread(model), 0.0)
        self.assertLess(self._evaluate_gap(model), 1e-5)

    def test_moving_mean_after_one_step_is_the_full_batch_mean(self):
        reference = _train(None, self._fit(1), batch_norm=True, initial=self.initial)
        dist = tfscale.distribution("mirrored", devices=_DEVICES)
        model = _train(dist, self._fit(1), batch_norm=True, initial=self.initial)
        bn, bn_reference = model.layers[1], reference.layers[1]
        np.testing.assert_allclose(
            bn.moving_mean.numpy(), bn_reference.moving_mean.numpy(), atol=1e-6
        )


if __name__ == "__main__":
    absltest.main()
