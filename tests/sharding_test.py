"""DTensor sharding: numerics against one device, layouts, memory, resharding.

Models built in a `"dtensor"` distribution's scope train through plain
`fit`: after Adam steps on a `batch=2,model=2` mesh their weights match
unsharded one-device training; sharded variables hold 1/size(model) of the
bytes per device; checkpoints restore into meshes of other shapes exactly.
"""

import os
import tempfile

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.experimental import dtensor  # noqa: E402

import tfscale  # noqa: E402
from tfscale.sharding import mesh as mesh_lib  # noqa: E402
from tfscale.sharding import strategy as strategy_lib  # noqa: E402
from tfscale.sharding import variables  # noqa: E402
from tfscale.train import models  # noqa: E402

STEPS = 8
GLOBAL_BATCH = 16
TOLERANCE = 1e-4


def _mlp():
    inputs = keras.Input((12,))
    x = keras.layers.Dense(32, activation="gelu", name="mlp_up")(inputs)
    x = keras.layers.Dense(12, name="mlp_down")(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs, name="mlp")


def _transformer_block():
    return models.transformer((8, 16), 5, model_dim=16, num_heads=4, mlp_dim=32, num_layers=1)


BUILDERS = {"mlp": (_mlp, (12,)), "transformer_block": (_transformer_block, (8, 16))}


def _data(shape, count=STEPS * GLOBAL_BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, *shape)).astype("float32")
    y = rng.integers(0, 5, size=(count,)).astype("int32")
    return x, y


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(learning_rate=3e-3),
    "sgd_momentum": lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
}


def _compile(model, optimizer="adam"):
    model.compile(
        optimizer=OPTIMIZERS[optimizer](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _build(name, dist=None, initial=None, optimizer="adam"):
    builder = BUILDERS[name][0]
    if dist is None:
        model = _compile(builder(), optimizer)
    else:
        with dist.scope():
            model = _compile(builder(), optimizer)
    if initial is not None:
        model.set_weights(initial)
    return model


def _dtensor(mesh="batch=2,model=2", layout_map="megatron"):
    return tfscale.distribution("dtensor", mesh=mesh, layout_map=layout_map)


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))


class EquivalenceTest(parameterized.TestCase):
    @parameterized.parameters(
        ("mlp", "adam", "batch=2,model=2"),
        ("transformer_block", "adam", "batch=2,model=2"),
        ("transformer_block", "sgd_momentum", "batch=2,model=2"),
        ("transformer_block", "adam", "model=4"),
    )
    def test_steps_match_one_device(self, name, optimizer, mesh):
        keras.utils.set_random_seed(11)
        initial = BUILDERS[name][0]().get_weights()
        x, y = _data(BUILDERS[name][1])
        data = tf.data.Dataset.from_tensor_slices((x, y))

        single = _build(name, initial=initial, optimizer=optimizer)
        single.fit(data.batch(GLOBAL_BATCH), epochs=1, shuffle=False, verbose=0)
        dist = _dtensor(mesh)
        sharded = _build(name, dist, initial, optimizer)
        split = [
            v.path for v in sharded.weights if "model" in (v.value.layout.sharding_specs or [])
        ]
        self.assertNotEmpty(split, "the megatron preset must split some weights")
        history = sharded.fit(dist.distribute_dataset(data, GLOBAL_BATCH), epochs=1, verbose=0)

        self.assertEqual(int(sharded.optimizer.iterations.numpy()), STEPS)
        moved = _max_diff(single.get_weights(), initial)
        self.assertGreater(moved, 100 * TOLERANCE, "training must move the weights")
        for path, a, b in zip(
            [v.path for v in single.weights], single.get_weights(), sharded.get_weights()
        ):
            np.testing.assert_allclose(b, a, rtol=0, atol=TOLERANCE, err_msg=path)
        reference = single.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
        self.assertTrue(np.isfinite(history.history["loss"][0]))
        got = sharded.evaluate(
            dist.distribute_dataset(data, GLOBAL_BATCH), verbose=0, return_dict=True
        )
        self.assertAlmostEqual(got["loss"], reference["loss"], delta=TOLERANCE)
        self.assertAlmostEqual(got["accuracy"], reference["accuracy"], delta=1e-6)
        np.testing.assert_allclose(
            sharded.predict(x, batch_size=GLOBAL_BATCH, verbose=0),
            single.predict(x, batch_size=GLOBAL_BATCH, verbose=0),
            rtol=0,
            atol=TOLERANCE,
        )


class LayoutTest(absltest.TestCase):
    def test_variables_state_and_metrics_take_their_layouts(self):
        dist = _dtensor()
        model = _build("transformer_block", dist)
        x, y = _data((8, 16), count=GLOBAL_BATCH)
        model.fit(x, y, batch_size=GLOBAL_BATCH, verbose=0)
        specs = {v.path: list(v.value.layout.sharding_specs) for v in model.weights}
        self.assertEqual(specs["block0_mlp_up/kernel"], ["unsharded", "model"])
        self.assertEqual(specs["block0_mlp_down/kernel"], ["model", "unsharded"])
        self.assertEqual(
            specs["block0_attention/query/kernel"], ["unsharded", "model", "unsharded"]
        )
        self.assertEqual(
            specs["block0_attention/attention_output/kernel"], ["model", "unsharded", "unsharded"]
        )
        self.assertEqual(specs["head/kernel"], ["unsharded", "unsharded"])
        for v in model.weights:
            self.assertIsInstance(v.value, variables.ShardedVariable)
        owners = {v.path.replace("/", "_"): specs[v.path] for v in model.weights}
        for v in model.optimizer.variables:
            layout = list(v.value.layout.sharding_specs)
            name = v.path.split("/", 1)[1]
            if name in ("iteration", "learning_rate"):
                self.assertEqual(layout, [])
                continue
            owner = name.rsplit("_", 1)[0]
            self.assertEqual(layout, owners[owner], v.path)
        for metric in model.metrics:
            for v in metric.variables:
                self.assertTrue(v.value.layout.is_fully_replicated(), v.path)

    def test_keras_layout_map_is_accepted(self):
        keras_map = keras.distribution.LayoutMap(None)
        keras_map["mlp_up/kernel"] = (None, "model")
        keras_map["mlp_down/.*"] = ("model", None)
        with self.assertRaisesRegex(ValueError, r"mlp_down/bias.*shape \(12,\)"):
            with _dtensor(layout_map=keras_map).scope():
                _mlp()
        keras_map = keras.distribution.LayoutMap(None)
        keras_map["mlp_up/kernel"] = (None, "model")
        keras_map["mlp_down/kernel"] = ("model", None)
        with _dtensor(layout_map=keras_map).scope():
            model = _mlp()
        specs = {v.path: list(v.value.layout.sharding_specs) for v in model.weights}
        self.assertEqual(specs["mlp_up/kernel"], ["unsharded", "model"])
        self.assertEqual(specs["mlp_up/bias"], ["unsharded"])
        self.assertEqual(specs["mlp_down/kernel"], ["model", "unsharded"])

    def test_fit_with_numpy_input_callbacks_and_a_partial_batch(self):
        dist = _dtensor()
        model = _build("mlp", dist)
        x, y = _data((12,), count=GLOBAL_BATCH * 2 + 3)
        seen = []
        callback = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda b, logs: seen.append(logs["loss"])
        )
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=2, callbacks=[callback], verbose=0)
        self.assertLen(seen, 6)  # 3 batches (the last has 3 examples) x 2 epochs
        self.assertTrue(all(np.isfinite(seen)))
        self.assertEqual(model.predict(x, batch_size=GLOBAL_BATCH, verbose=0).shape, (len(x), 5))


class MemoryReportTest(parameterized.TestCase):
    @parameterized.parameters(1, 2, 4)
    def test_per_device_bytes_of_split_variables(self, model_size):
        mesh = (
            f"model={model_size}"
            if model_size == 4
            else f"batch={4 // model_size},model={model_size}"
        )
        dist = _dtensor(mesh=mesh)
        model = _build("mlp", dist)
        report = tfscale.sharding.memory_report(model)
        entries = {v.path: v for v in report.variables}
        up = entries["mlp_up/kernel"]
        self.assertEqual(up.full_bytes, 12 * 32 * 4)
        self.assertEqual(up.per_device_bytes * model_size, up.full_bytes)
        state = [v for v in report.variables if v.path.endswith("mlp_up_kernel_momentum")]
        self.assertLen(state, 1)
        self.assertEqual(state[0].per_device_bytes * model_size, state[0].full_bytes)
        self.assertEqual(entries["head/kernel"].per_device_bytes, entries["head/kernel"].full_bytes)
        # The report's figure is what a device really holds.
        for v in model.weights:
            component = dtensor.unpack(v.value.read_value())[0]
            self.assertEqual(
                entries[v.path].per_device_bytes, int(np.prod(component.shape)) * 4, v.path
            )
        self.assertEqual(report.per_device_bytes, report.parameter_bytes + report.optimizer_bytes)
        self.assertIn("mlp_up/kernel", str(report))

    def test_unsharded_model_reports_full_bytes(self):
        model = _build("mlp")
        report = tfscale.sharding.memory_report(model)
        self.assertEqual(report.per_device_bytes, report.full_bytes)
        self.assertEqual(report.mesh, "")


class ReshardTest(absltest.TestCase):
    def test_checkpoint_restores_into_other_mesh_shapes_exactly(self):
        x, y = _data((12,), count=GLOBAL_BATCH * 2)
        dist = _dtensor("batch=2,model=2")
        model = _build("mlp", dist)
        model.fit(x, y, batch_size=GLOBAL_BATCH, verbose=0)
        path = os.path.join(tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR")), "m.weights.h5")
        model.save_weights(path)
        saved = [np.asarray(v) for v in model.weights + model.optimizer.variables]

        for mesh in ("model=4", "batch=4,model=1", "batch=2,model=2"):
            other = _dtensor(mesh)
            restored = _build("mlp", other)
            restored.optimizer.build(restored.trainable_variables)
            restored.load_weights(path)
            up = restored.get_layer("mlp_up").kernel.value
            self.assertEqual(up.layout.mesh.dim_size("model"), int(mesh.rsplit("=", 1)[1]))
            got = [np.asarray(v) for v in restored.weights + restored.optimizer.variables]
            self.assertEqual(len(got), len(saved))
            for a, b in zip(saved, got):
                np.testing.assert_array_equal(a, b, err_msg=mesh)
        # Training goes on from the restored state.
        restored.fit(x, y, batch_size=GLOBAL_BATCH, verbose=0)
        self.assertEqual(int(restored.optimizer.iterations.numpy()), 4)


class ErrorsTest(absltest.TestCase):
    def test_mesh_that_does_not_fit_the_devices(self):
        with self.assertRaisesRegex(ValueError, r"mesh batch=3,model=2 needs 6 devices, found 4"):
            _dtensor("batch=3,model=2")

    def test_missing_mesh_option(self):
        with self.assertRaisesRegex(ValueError, r"'dtensor' needs option\(s\) mesh"):
            tfscale.distribution("dtensor")

    def test_rule_naming_an_axis_the_mesh_lacks(self):
        with self.assertRaisesRegex(ValueError, r"mesh axes \['model'\].*batch=4 does not have"):
            _dtensor("batch=4")

    def test_indivisible_dimension(self):
        dist = _dtensor(layout_map={r"head/kernel": (None, "model")})
        with self.assertRaisesRegex(
            ValueError, r"'head/kernel' of shape \(12, 5\): dimension 1 \(5\).*'model' \(size 2\)"
        ):
            with dist.scope():
                _mlp()

    def test_rank_mismatch_names_variable_and_shapes(self):
        dist = _dtensor(layout_map={r"mlp_up/kernel": ("model",)})
        with self.assertRaisesRegex(
            ValueError, r"1 dimension.*\('model',\).*'mlp_up/kernel' has shape \(12, 32\)"
        ):
            with dist.scope():
                _mlp()

    def test_dataset_function_is_refused(self):
        with self.assertRaisesRegex(TypeError, "unbatched tf.data.Dataset"):
            _dtensor().distribute_dataset(lambda ctx: None, GLOBAL_BATCH)

    def test_batch_axis_must_be_a_mesh_axis(self):
        with self.assertRaisesRegex(
            ValueError,
            r"batch_axis must be an axis of the mesh \(batch, model\)\. "
            r"Received: batch_axis='bacth'",
        ):
            tfscale.distribution("dtensor", mesh="batch=2,model=2", batch_axis="bacth")

    def test_strategy_refuses_a_misspelled_batch_axis(self):
        mesh = tfscale.sharding.build_mesh("batch=2,model=2")
        with self.assertRaisesRegex(ValueError, r"Received: batch_axis='bacth'"):
            tfscale.sharding.DTensorStrategy(mesh, tfscale.LayoutMap(), batch_axis="bacth")
        self.assertEqual(
            tfscale.sharding.DTensorStrategy(mesh, tfscale.LayoutMap()).batch_axis, "batch"
        )

    def test_batch_axis_defaults_to_batch_when_the_mesh_has_it(self):
        self.assertEqual(
            tfscale.distribution("dtensor", mesh="batch=2,model=2").num_replicas_in_sync, 2
        )
        self.assertEqual(tfscale.distribution("dtensor", mesh="model=4").num_replicas_in_sync, 1)
        named = tfscale.distribution("dtensor", mesh="data=2,model=2", batch_axis="data")
        self.assertEqual(named.num_replicas_in_sync, 2)

    def test_global_batch_not_divisible_by_batch_axis(self):
        data = tf.data.Dataset.range(8)
        with self.assertRaisesRegex(ValueError, "positive multiple of the 2 replica"):
            _dtensor().distribute_dataset(data, 3)


class InputSplitTest(parameterized.TestCase):
    @parameterized.parameters(
        ("batch=2,model=2", "batch", 2, (0, 0, 1, 1)),
        ("model=2,batch=2", "batch", 2, (0, 1, 0, 1)),
        ("batch=4", "batch", 4, (0, 1, 2, 3)),
        ("model=4", None, 1, (0, 0, 0, 0)),
    )
    def test_each_device_gets_the_slice_of_its_batch_position(
        self, spec, axis, parts, device_parts
    ):
        split = strategy_lib.InputSplit.of(mesh_lib.build_mesh(spec), axis)
        self.assertEqual(split, strategy_lib.InputSplit(1, 0, parts, device_parts))

    def test_a_batch_holds_one_device_batch_in_order(self):
        dist = tfscale.distribution("dtensor", mesh="model=2,batch=2")
        data = tf.data.Dataset.range(16).map(lambda i: (tf.fill([3], i), i))
        iterator = iter(dist.distribute_dataset(data, 8))
        for step in range(2):
            x, y = next(iterator)
            want = list(range(8 * step, 8 * step + 8))
            self.assertEqual(variables.gather(y).numpy().tolist(), want)
            self.assertEqual(variables.gather(x).numpy()[:, 0].tolist(), want)
            # Devices at the same batch position (along model) hold the same slice.
            components = [c.numpy().tolist() for c in dtensor.unpack(y)]
            self.assertEqual(components, [want[:4], want[4:], want[:4], want[4:]])
        with self.assertRaises(tf.errors.OutOfRangeError):  # how Keras sees the end
            next(iterator)


if __name__ == "__main__":
    absltest.main()
