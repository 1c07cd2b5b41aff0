"""Tests for tfscale.distribution: kinds, options, datasets."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfscale  # noqa: E402


class FactoryTest(parameterized.TestCase):
    def test_kinds(self):
        self.assertEqual(
            tfscale.kinds(),
            (
                "auto",
                "default",
                "dtensor",
                "mirrored",
                "multi_worker_mirrored",
                "one_device",
                "tpu",
            ),
        )

    def test_unknown_kind_lists_valid_kinds(self):
        with self.assertRaisesRegex(
            ValueError,
            r"Unknown distribution kind 'mirorred'. Valid kinds: auto, default, dtensor, mirrored, "
            r"multi_worker_mirrored, one_device, tpu",
        ):
            tfscale.distribution("mirorred")

    def test_unknown_option_lists_valid_options(self):
        with self.assertRaisesRegex(
            ValueError,
            r"Unknown option\(s\) device for distribution kind 'mirrored'. "
            r"Valid options: devices, all_reduce",
        ):
            tfscale.distribution("mirrored", device="/cpu:0")

    @parameterized.parameters(
        dict(
            options=dict(communication="mpi"),
            match=r"communication must be one of auto, ring, nccl",
        ),
        dict(options=dict(task_index=1), match=r"task_index goes with an explicit host list"),
        dict(options=dict(cluster="h1:1,h2:2"), match=r"An explicit host list needs task_index"),
        dict(
            options=dict(cluster="h1:1,h2:2", task_index=2), match=r"task_index must be in \[0, 2\)"
        ),
        dict(options=dict(cluster="slurm"), match=r"cluster='slurm', but its environment"),
    )
    def test_bad_multi_worker_options(self, options, match):
        with self.assertRaisesRegex(ValueError, match):
            tfscale.distribution("multi_worker_mirrored", **options)

    def test_nccl_without_a_gpu_is_named_before_the_first_step(self):
        if tf.config.list_physical_devices("GPU"):
            self.skipTest("this machine has a GPU")
        with self.assertRaisesRegex(
            ValueError,
            r"communication='nccl' needs GPUs, and this worker has none.*'auto' or 'ring'",
        ):
            tfscale.distribution("multi_worker_mirrored", communication="nccl")

    def test_default_takes_no_options(self):
        with self.assertRaisesRegex(ValueError, r"Valid options: \(none\)"):
            tfscale.distribution("default", devices=2)

    @parameterized.parameters(
        dict(options=dict(all_reduce="ring"), match=r"all_reduce must be one of auto, nccl"),
        dict(options=dict(all_reduce="nccl"), match=r"all_reduce='nccl' needs GPU devices"),
        dict(
            options=dict(devices=9), match=r"devices=9 asks for more devices than this host has \(4"
        ),
        dict(options=dict(devices=["/cpu:7"]), match=r"Device '/cpu:7' not found"),
        dict(options=dict(devices=[]), match=r"devices must be None, a positive count"),
    )
    def test_bad_mirrored_options(self, options, match):
        with self.assertRaisesRegex(ValueError, match):
            tfscale.distribution("mirrored", **options)


class DistributionTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(kind="default", options={}, replicas=1),
        dict(kind="one_device", options=dict(device="/cpu:1"), replicas=1),
        dict(kind="mirrored", options={}, replicas=testutil.NUM_CPUS),
        dict(kind="mirrored", options=dict(devices=2), replicas=2),
        dict(kind="mirrored", options=dict(devices="cpu:0,cpu:3"), replicas=2),
        dict(kind="mirrored", options=dict(devices="3", all_reduce="reduce_to_one"), replicas=3),
        dict(kind="mirrored", options=dict(all_reduce="hierarchical_copy"), replicas=4),
    )
    def test_replicas_and_chief(self, kind, options, replicas):
        dist = tfscale.distribution(kind, **options)
        self.assertEqual(dist.kind, kind)
        self.assertEqual(dist.options, options)
        self.assertEqual(dist.num_replicas_in_sync, replicas)
        self.assertTrue(dist.is_chief)
        self.assertEqual(dist.num_workers, 1)
        self.assertIsInstance(dist.strategy, tf.distribute.Strategy)

    def test_one_device_places_variables_on_that_device(self):
        dist = tfscale.distribution("one_device", device="/cpu:2")
        self.assertEqual(dist.devices, ("/job:localhost/replica:0/task:0/device:CPU:2",))
        with dist.scope():
            v = tf.Variable(1.0)
        self.assertIn("CPU:2", v.device)

    def test_scope_creates_mirrored_variables(self):
        dist = tfscale.distribution("mirrored", devices=2)
        with dist.scope() as entered:
            self.assertIs(entered, dist)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        self.assertLen(model.weights[0].value.values, 2)

    def test_successive_mirrored_distributions_do_not_share_collectives(self):
        # Stock MirroredStrategy instances over the same devices reuse
        # collective keys: the second fit below would abort with "Shape
        # mismatch in the collective instance 100".
        for width in (1, 7):
            dist = tfscale.distribution("mirrored", devices=2)
            data = tf.data.Dataset.from_tensor_slices(
                (np.ones((8, 3), "float32"), np.ones((8, width), "float32"))
            )
            with dist.scope():
                model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width)])
                model.compile(optimizer="sgd", loss="mse")
            model.fit(dist.distribute_dataset(data, 4), epochs=1, verbose=0)
            self.assertEqual(model.get_weights()[0].shape, (3, width))

    def test_repr(self):
        dist = tfscale.distribution("mirrored", devices=2, all_reduce="reduce_to_one")
        self.assertEqual(
            repr(dist),
            "Distribution(kind='mirrored', replicas=2, workers=1, devices=["
            "'/job:localhost/replica:0/task:0/device:CPU:0', "
            "'/job:localhost/replica:0/task:0/device:CPU:1'], all_reduce='reduce_to_one')",
        )


class DistributeDatasetTest(parameterized.TestCase):
    def _elements(self, distributed, dist):
        """Per step, the element ids each replica received."""
        steps = []
        for batch in distributed:
            parts = dist.strategy.experimental_local_results(batch)
            steps.append([p.numpy().tolist() for p in parts])
        return steps

    @parameterized.parameters("dataset", "function")
    def test_each_replica_gets_its_share_and_nothing_is_lost(self, form):
        dist = tfscale.distribution("mirrored", devices=4)
        ids = tf.data.Dataset.range(70)
        source = ids if form == "dataset" else (lambda ctx: ids)
        steps = self._elements(dist.distribute_dataset(source, global_batch_size=16), dist)
        self.assertLen(steps, 4)  # 70 // 16; the partial last batch is dropped
        for step in steps:
            self.assertEqual([len(p) for p in step], [4, 4, 4, 4])
        seen = sorted(i for step in steps for part in step for i in part)
        self.assertEqual(seen, list(range(64)))

    def test_function_receives_input_context(self):
        dist = tfscale.distribution("mirrored", devices=2)
        contexts = []

        def fn(context):
            contexts.append(context)
            return tf.data.Dataset.range(8)

        self._elements(dist.distribute_dataset(fn, global_batch_size=4), dist)
        self.assertEqual(contexts[0].num_replicas_in_sync, 2)
        self.assertEqual(contexts[0].get_per_replica_batch_size(4), 2)

    @parameterized.parameters(6, 0, -4, 4.0, True)
    def test_indivisible_global_batch_raises(self, global_batch_size):
        dist = tfscale.distribution("mirrored", devices=4)
        with self.assertRaisesRegex(
            ValueError, r"positive multiple of the 4 replica\(s\).*Received: global_batch_size="
        ):
            dist.distribute_dataset(tf.data.Dataset.range(8), global_batch_size)

    def test_rejects_non_dataset(self):
        dist = tfscale.distribution("mirrored", devices=2)
        with self.assertRaisesRegex(TypeError, "Received: list"):
            dist.distribute_dataset([1, 2, 3], 2)

    def test_fit_accepts_distributed_dataset(self):
        dist = tfscale.distribution("mirrored", devices=2)
        x = np.random.default_rng(0).random((64, 4)).astype("float32")
        data = tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1)))
        with dist.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        history = model.fit(dist.distribute_dataset(data, 16), epochs=3, verbose=0)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0])


class ExportsTest(absltest.TestCase):
    def test_exports_survive_importing_every_module(self):
        # A submodule named like an export would rebind the package attribute.
        result = testutil.run_python(
            "-c",
            "import tfscale, tfscale.distributions, tfscale.devices, tfscale.train.lib; "
            "print(tfscale.kinds()); print(tfscale.distribution('default').kind)",
        )
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("default", result.stdout.splitlines()[-1])


if __name__ == "__main__":
    absltest.main()
