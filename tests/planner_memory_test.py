"""Tests for tfscale.planner: the candidates and the per-device memory model."""

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402

import tfscale  # noqa: E402
from tfscale import planner  # noqa: E402
from tfscale.planner import profile  # noqa: E402
from tfscale.sharding import memory  # noqa: E402
from tfscale.train import models  # noqa: E402

GLOBAL_BATCH = 8
FLOAT = 4
# Per optimizer: the iteration counter (int64) and the learning rate (float32).
COUNTERS = 8 + 4


def mlp():
    inputs = keras.Input((12,))
    x = keras.layers.Dense(32, activation="relu", name="mlp_up")(inputs)
    x = keras.layers.Dense(16, name="mlp_down")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="head")(x), name="mlp")


def transformer():
    return models.build(
        "transformer", (8, 8, 1), 10, model_dim=32, num_heads=4, mlp_dim=64, num_layers=1
    )


def embedding_heavy():
    inputs = keras.Input((10,), dtype="int32")
    x = keras.layers.Embedding(2000, 32, name="token")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(64, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(32, name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name="embedding_heavy")


def uneven():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, name="mlp_up")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="mlp_down")(x), name="uneven")


MODELS = {"mlp": mlp, "transformer": transformer, "embedding_heavy": embedding_heavy}
OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-3),
}


def _options(found):
    return [(c.kind, c.options) for c in found]


def _dtensor(batch, model, layout):
    return ("dtensor", {"mesh": f"batch={batch},model={model}", "layout_map": layout})


def _trainable_bytes(model_fn):
    return sum(v.num_bytes for v in profile.model_profile(model_fn).variables if v.trainable)


class CandidatesTest(parameterized.TestCase):
    def test_one_device(self):
        self.assertEqual(_options(planner.candidates(1)), [("one_device", {})])

    def test_two_devices(self):
        self.assertEqual(
            _options(planner.candidates(2)),
            [
                ("one_device", {}),
                ("mirrored", {"devices": 2}),
                _dtensor(2, 1, "data_parallel"),
                _dtensor(1, 2, "megatron"),
            ],
        )

    def test_four_devices(self):
        self.assertEqual(
            _options(planner.candidates(4)),
            [
                ("one_device", {}),
                ("mirrored", {"devices": 4}),
                _dtensor(4, 1, "data_parallel"),
                _dtensor(2, 2, "megatron"),
                _dtensor(1, 4, "megatron"),
            ],
        )

    def test_eight_devices(self):
        found = planner.candidates(8)
        self.assertEqual(
            _options(found),
            [
                ("one_device", {}),
                ("mirrored", {"devices": 8}),
                _dtensor(8, 1, "data_parallel"),
                _dtensor(4, 2, "megatron"),
                _dtensor(2, 4, "megatron"),
                _dtensor(1, 8, "megatron"),
            ],
        )
        self.assertEqual([c.num_devices for c in found], [1, 8, 8, 8, 8, 8])
        self.assertEqual([c.num_replicas for c in found], [1, 8, 8, 4, 2, 1])
        self.assertEqual([c.mesh for c in found][:3], [None, None, "batch=8,model=1"])
        self.assertEqual([c.layout for c in found][1:4], [None, "data_parallel", "megatron"])
        self.assertEqual(
            found[3].description,
            "dtensor batch=4,model=2 (megatron): 4 replicas, weights split in 2",
        )

    def test_several_workers_use_the_multi_worker_kind(self):
        found = planner.candidates(2, num_workers=2)
        self.assertEqual(
            _options(found),
            [
                ("multi_worker_mirrored", {}),
                _dtensor(4, 1, "data_parallel"),
                _dtensor(2, 2, "megatron"),
                _dtensor(1, 4, "megatron"),
            ],
        )
        self.assertEqual({c.num_workers for c in found}, {2})
        self.assertEqual({c.num_devices for c in found}, {4})

    def test_deterministic_and_hashable(self):
        self.assertEqual(planner.candidates(4), planner.candidates(4))
        self.assertLen(set(planner.candidates(4)), 5)

    def test_options_build_the_distribution(self):
        for candidate in planner.candidates(testutil.NUM_CPUS):
            dist = tfscale.distribution(candidate.kind, **candidate.options)
            self.assertEqual(dist.num_replicas_in_sync, candidate.num_replicas, candidate)

    @parameterized.parameters(0, -2, 1.5, True, "4")
    def test_bad_device_count_is_named(self, count):
        with self.assertRaisesRegex(ValueError, rf"num_devices={count!r}"):
            planner.candidates(count)
        with self.assertRaisesRegex(ValueError, rf"num_workers={count!r}"):
            planner.candidates(2, num_workers=count)


class MemoryReportMatchTest(parameterized.TestCase):
    """Parameters and optimizer state equal the memory report of the model built sharded."""

    @parameterized.product(model=sorted(MODELS), optimizer=["adam", "momentum"])
    def test_dtensor_candidates_match_the_memory_report(self, model, optimizer):
        model_fn = MODELS[model]
        for candidate in planner.candidates(testutil.NUM_CPUS):
            if candidate.kind != "dtensor":
                continue
            with self.subTest(candidate=candidate.description):
                predicted = planner.estimate(
                    model_fn, candidate, GLOBAL_BATCH, optimizer=OPTIMIZERS[optimizer]()
                )
                dist = tfscale.distribution(candidate.kind, **candidate.options)
                with dist.scope():
                    built = model_fn()
                    built.compile(optimizer=OPTIMIZERS[optimizer](), loss="mse")
                report = dist.memory_report(built)
                self.assertEqual(predicted.parameters, report.parameter_bytes)
                self.assertEqual(predicted.optimizer, report.optimizer_bytes)
                trainable = sum(
                    v.per_device_bytes
                    for v, w in zip(report.variables, built.weights)
                    if w.trainable
                )
                self.assertEqual(predicted.gradients, trainable)

    @parameterized.parameters(
        lambda: keras.optimizers.AdamW(use_ema=True),
        lambda: keras.optimizers.Adam(amsgrad=True, gradient_accumulation_steps=2),
        lambda: keras.optimizers.RMSprop(momentum=0.9),
        # Its factored state has a lower rank than the variable it belongs to.
        lambda: keras.optimizers.Adafactor(),
    )
    def test_other_optimizers_match(self, make_optimizer):
        candidate = planner.candidates(testutil.NUM_CPUS)[3]
        self.assertEqual(candidate.mesh, "batch=2,model=2")
        predicted = planner.estimate(transformer, candidate, GLOBAL_BATCH, make_optimizer())
        dist = tfscale.distribution(candidate.kind, **candidate.options)
        with dist.scope():
            built = transformer()
            built.compile(optimizer=make_optimizer(), loss="mse")
        self.assertEqual(predicted.optimizer, dist.memory_report(built).optimizer_bytes)

    def test_model_splitting_shrinks_the_share(self):
        share = [
            planner.estimate(transformer, c, GLOBAL_BATCH, optimizer="adam").parameters
            for c in planner.candidates(testutil.NUM_CPUS)
        ]
        self.assertEqual(share[0], share[1])  # one_device and mirrored hold everything
        self.assertEqual(share[1], share[2])  # so does data_parallel
        self.assertGreater(share[2], share[3])
        self.assertGreater(share[3], share[4])

    def test_a_vocabulary_split_layout_map_matches_too(self):
        layout_map = tfscale.LayoutMap.preset("megatron", embedding="vocab")
        candidate = planner.Candidate(
            "dtensor",
            {"mesh": "batch=2,model=2", "layout_map": layout_map},
            "batch=2,model=2",
            "megatron (vocab)",
            4,
            "dtensor batch=2,model=2, embeddings split by vocabulary",
        )
        predicted = planner.estimate(embedding_heavy, candidate, GLOBAL_BATCH, optimizer="adam")
        dist = tfscale.distribution("dtensor", mesh="batch=2,model=2", layout_map=layout_map)
        with dist.scope():
            built = embedding_heavy()
            built.compile(optimizer="adam", loss="mse")
        report = dist.memory_report(built)
        self.assertEqual(predicted.parameters, report.parameter_bytes)
        self.assertEqual(predicted.optimizer, report.optimizer_bytes)
        table = next(v for v in report.variables if v.path.endswith("token/embeddings"))
        self.assertEqual(table.per_device_bytes * 2, table.full_bytes)

    @parameterized.parameters("one_device", "mirrored")
    def test_unsplit_kinds_hold_the_whole_model(self, kind):
        candidate = next(c for c in planner.candidates(testutil.NUM_CPUS) if c.kind == kind)
        predicted = planner.estimate(mlp, candidate, GLOBAL_BATCH, optimizer="adam")
        built = mlp()
        built.compile(optimizer="adam", loss="mse")
        report = memory.memory_report(built)
        self.assertEqual(predicted.parameters, report.parameter_bytes)
        self.assertEqual(predicted.optimizer, report.optimizer_bytes)
        self.assertEqual(predicted.gradients, predicted.parameters)


class OptimizerStateTest(parameterized.TestCase):
    @parameterized.parameters(("sgd", 0), ("momentum", 1), ("adam", 2))
    def test_slots_per_trainable_variable(self, optimizer, slots):
        (one_device,) = [c for c in planner.candidates(1) if c.kind == "one_device"]
        predicted = planner.estimate(mlp, one_device, GLOBAL_BATCH, OPTIMIZERS[optimizer]())
        self.assertEqual(predicted.optimizer, COUNTERS + slots * _trainable_bytes(mlp))

    def test_names_and_compiled_optimizer(self):
        (one_device,) = [c for c in planner.candidates(1) if c.kind == "one_device"]
        by_name = planner.estimate(mlp, one_device, GLOBAL_BATCH, optimizer="adam")
        self.assertEqual(by_name.optimizer, COUNTERS + 2 * _trainable_bytes(mlp))

        def compiled():
            model = mlp()
            model.compile(optimizer=keras.optimizers.SGD(momentum=0.5), loss="mse")
            return model

        from_model = planner.estimate(compiled, one_device, GLOBAL_BATCH)
        self.assertEqual(from_model.optimizer, COUNTERS + _trainable_bytes(mlp))
        self.assertEqual(planner.estimate(mlp, one_device, GLOBAL_BATCH).optimizer, 0)

    def test_the_callers_optimizer_is_not_built(self):
        optimizer = keras.optimizers.Adam()
        planner.estimate(mlp, planner.candidates(1)[0], GLOBAL_BATCH, optimizer=optimizer)
        self.assertFalse(optimizer.built)


class ActivationsTest(parameterized.TestCase):
    def test_per_example_outputs_of_every_layer(self):
        # inputs 12, mlp_up 32, mlp_down 16, head 5: float32 per example.
        predicted = planner.estimate(mlp, planner.candidates(1)[0], GLOBAL_BATCH)
        self.assertEqual(predicted.activations, (12 + 32 + 16 + 5) * FLOAT * GLOBAL_BATCH)

    def test_linear_in_the_per_replica_batch(self):
        for candidate in planner.candidates(testutil.NUM_CPUS):
            small = planner.estimate(transformer, candidate, 16, optimizer="adam")
            large = planner.estimate(transformer, candidate, 48, optimizer="adam")
            self.assertEqual(large.activations, 3 * small.activations, candidate)
            self.assertEqual(large.per_replica_batch_size, 3 * small.per_replica_batch_size)
            self.assertEqual(large.parameters, small.parameters)
            self.assertEqual(large.total - small.total, large.activations - small.activations)

    def test_replicas_split_the_batch(self):
        one, mirrored = planner.candidates(testutil.NUM_CPUS)[:2]
        self.assertEqual(
            planner.estimate(mlp, mirrored, 4 * GLOBAL_BATCH).activations,
            planner.estimate(mlp, one, GLOBAL_BATCH).activations,
        )

    def test_column_parallel_outputs_are_split(self):
        (model4,) = [c for c in planner.candidates(4) if c.mesh == "batch=1,model=4"]
        predicted = planner.estimate(mlp, model4, GLOBAL_BATCH)
        self.assertEqual(predicted.activations, (12 + 32 // 4 + 16 + 5) * FLOAT * GLOBAL_BATCH)

    def test_mixed_precision_halves_them(self):
        def mixed():
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            try:
                return mlp()
            finally:
                keras.mixed_precision.set_global_policy("float32")

        candidate = planner.candidates(1)[0]
        half = planner.estimate(mixed, candidate, GLOBAL_BATCH)
        # The input stays float32; the layers compute in bfloat16.
        self.assertEqual(half.activations, (12 * FLOAT + (32 + 16 + 5) * 2) * GLOBAL_BATCH)
        self.assertEqual(half.parameters, planner.estimate(mlp, candidate, 8).parameters)


class ErrorsTest(parameterized.TestCase):
    def test_a_batch_the_replicas_do_not_divide_is_named(self):
        mirrored = planner.candidates(4)[1]
        with self.assertRaisesRegex(planner.InfeasibleError, r"global_batch_size=6\b"):
            planner.estimate(mlp, mirrored, 6)
        self.assertTrue(issubclass(planner.InfeasibleError, ValueError))

    @parameterized.parameters(0, -8, 2.0, None)
    def test_a_bad_batch_is_named(self, batch):
        with self.assertRaisesRegex(ValueError, rf"global_batch_size={batch!r}"):
            planner.estimate(mlp, planner.candidates(1)[0], batch)

    def test_an_uneven_split_is_infeasible_as_in_dtensor(self):
        (model4,) = [c for c in planner.candidates(4) if c.mesh == "batch=1,model=4"]
        with self.assertRaisesRegex(planner.InfeasibleError, r"'mlp_up/kernel' of shape \(4, 6\)"):
            planner.estimate(uneven, model4, GLOBAL_BATCH)
        dist = tfscale.distribution(model4.kind, **model4.options)
        with self.assertRaisesRegex(ValueError, "not divisible"):
            with dist.scope():
                uneven()

    def test_inside_a_distribution_scope(self):
        def fresh():
            return mlp()

        with tfscale.distribution("mirrored").scope():
            with self.assertRaisesRegex(ValueError, "outside a distribution scope"):
                planner.estimate(fresh, planner.candidates(1)[0], GLOBAL_BATCH)


if __name__ == "__main__":
    absltest.main()
