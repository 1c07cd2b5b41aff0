"""Each upstream internal `tfscale.compat` touches still behaves as tfscale relies on.

A failure here after an upgrade of TensorFlow or Keras names the touch
that changed; the fix then goes into `tfscale/compat.py` alone.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest
from keras.src.trainers.data_adapters import is_tf_dataset
from tensorflow.python.data.ops import multi_device_iterator_ops

from tests import testutil
from tfscale import compat

testutil.setup_devices()


class KerasTest(absltest.TestCase):
    def test_name_scope_path_is_the_layer_path_while_it_builds(self):
        paths = []

        class Probe(keras.layers.Layer):
            def build(self, input_shape):
                paths.append(compat.keras_name_scope_path())
                self.w = self.add_weight(shape=(1,))

        outer = keras.Sequential([keras.Input((3,)), Probe(name="probe")], name="outer")
        self.assertLen(outer.weights, 1)
        self.assertTrue(
            paths and paths[0].endswith("probe"),
            f"Keras no longer opens a name scope per layer while building it: {paths}",
        )

    def test_initial_epoch_set_on_train_begin_skips_epochs(self):
        class Resume(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                compat.set_initial_epoch(self.model, 2)

        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        history = model.fit(
            np.ones((8, 2)), np.ones((8, 1)), epochs=3, verbose=0, callbacks=[Resume()]
        )
        self.assertEqual(history.epoch, [2], "fit no longer starts at model._initial_epoch")


class DistributeTest(absltest.TestCase):
    def test_default_extended_class_runs_a_replica_function_once(self):
        base = compat.default_extended_class()
        self.assertTrue(issubclass(base, tf.distribute.StrategyExtended))
        hooked = []

        class Extended(base):
            def _call_for_each_replica(self, fn, args, kwargs):
                hooked.append(fn)
                return super()._call_for_each_replica(fn, args, kwargs)

        class Strategy(tf.distribute.Strategy):
            def __init__(self):
                super().__init__(Extended(self))

        calls = []
        result = Strategy().run(lambda x: calls.append(x) or x * 2, args=(tf.constant(3),))
        self.assertEqual((len(calls), int(result)), (1, 6))
        self.assertLen(hooked, 1, "Strategy.run no longer calls extended._call_for_each_replica")

    def test_extended_scope_installs_the_variable_creator(self):
        created = []

        class Extended(compat.default_extended_class()):
            def _scope(self, strategy):
                return compat.strategy_extended_scope(self, strategy)

            def _create_variable(self, next_creator, **kwargs):
                created.append(kwargs.get("name"))
                return next_creator(**kwargs)

        class Strategy(tf.distribute.Strategy):
            def __init__(self):
                super().__init__(Extended(self))

        with Strategy().scope():
            tf.Variable(1.0, name="v")
        self.assertEqual(
            created, ["v"], "StrategyExtendedV2._scope no longer calls _create_variable"
        )

    def test_keras_accepts_a_distributed_dataset_subclass(self):
        class Batches(compat.DistributedDatasetBase):
            def __init__(self):  # the base's own __init__ is not called
                pass

        self.assertTrue(is_tf_dataset(Batches()), "Keras's data adapter no longer accepts the base")

    def test_collective_key_base_is_read_by_mirrored_extended(self):
        class Strategy(tf.distribute.MirroredStrategy):
            def __init__(self):
                compat.set_collective_key_base(self, 700_000)
                super().__init__(["/cpu:0", "/cpu:1"])

        extended = Strategy().extended
        self.assertEqual(getattr(extended, "_collective_key_base", None), 700_000)

    def test_device_pipelines_are_built_through_the_wrapped_builder(self):
        compat.disable_device_pipeline_autotune()
        compat.disable_device_pipeline_autotune()  # idempotent
        create = multi_device_iterator_ops._create_device_dataset
        self.assertTrue(getattr(create, "tfscale_no_autotune", False))
        calls = []

        def counting(*args, **kwargs):
            calls.append(1)
            return create(*args, **kwargs)

        counting.tfscale_no_autotune = True
        multi_device_iterator_ops._create_device_dataset = counting
        try:
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
            dataset = tf.data.Dataset.range(8).batch(4)
            next(iter(strategy.experimental_distribute_dataset(dataset)))
        finally:
            multi_device_iterator_ops._create_device_dataset = create
        self.assertEqual(
            len(calls), 2, "MultiDeviceIterator no longer builds per-device pipelines by name"
        )


class VariablesTest(absltest.TestCase):
    def test_read_override_serves_every_read(self):
        class Variable(compat.ReadOverride, type(tf.Variable(0.0))):
            def read_override(self):
                return tf.constant(5.0)

        v = Variable(1.0)
        reads = [
            float(v.value()),
            float(v.read_value()),
            float(tf.convert_to_tensor(v)),
            float(v + 0),
        ]
        self.assertEqual(reads, [5.0] * 4, "reads no longer go through _read_variable_op")

        @tf.function
        def traced():
            return v.read_value()

        self.assertEqual(float(traced()), 5.0)


class RuntimeTest(absltest.TestCase):
    def test_dtensor_initialized_is_false_without_dtensor(self):
        self.assertIs(compat.dtensor_initialized(), False)

    def test_barrier_without_a_coordination_service_is_a_tensorflow_error(self):
        with self.assertRaises((tf.errors.OpError, RuntimeError)) as caught:
            compat.wait_at_barrier("tfscale_compat_test", 1)
        self.assertNotIsInstance(caught.exception, compat.UpstreamChangedError)

    def test_job_keys_without_a_coordination_service_are_tensorflow_errors(self):
        # With one (tests/train_stop_agreement_test.py runs two workers).
        with self.assertRaisesRegex(tf.errors.FailedPreconditionError, "not enabled"):
            compat.insert_job_key("tfscale_compat_test", "1")
        with self.assertRaisesRegex(tf.errors.FailedPreconditionError, "not enabled"):
            compat.get_job_key("tfscale_compat_test", 1)


class DataTest(absltest.TestCase):
    def test_ordered_parallel_interleave_hands_on_whole_inputs_in_order(self):
        dataset = compat.ordered_parallel_interleave(
            tf.data.Dataset.range(4),
            lambda i: tf.data.Dataset.range(i * 10, i * 10 + 5),
            cycle_length=2,
            block_length=2**62,
            buffer_output_elements=2,
        )
        expected = [i * 10 + j for i in range(4) for j in range(5)]
        self.assertEqual([int(x) for x in dataset], expected)


class ErrorTest(absltest.TestCase):
    def test_a_missing_upstream_name_says_which_fix_needs_it(self):
        with self.assertRaisesRegex(
            compat.UpstreamChangedError,
            r"tfscale needs keras.no_such_name \(a test\), which TensorFlow .* does not have",
        ):
            compat._upstream("keras", "no_such_name", "a test")


if __name__ == "__main__":
    absltest.main()
