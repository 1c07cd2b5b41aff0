"""Tests for tfscale.planner: calibration, step time, the plan and the "auto" kind.

Calibrations are injected (no timing), so plans are deterministic; one test
runs the real micro benchmark on two devices.
"""

import json
import os
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfscale  # noqa: E402
from tests.planner_memory_test import mlp  # noqa: E402
from tests.planner_memory_test import transformer  # noqa: E402
from tfscale import planner  # noqa: E402
from tfscale.planner import calibration as calibration_lib  # noqa: E402
from tfscale.planner import flops  # noqa: E402
from tfscale.planner import profile  # noqa: E402
from tfscale.planner import step_time  # noqa: E402

GLOBAL_BATCH = 16


def _rates(flops_per_s, memory_bytes_per_s, alpha, beta, counts=(1, 2, 4)):
    """Rates of a ring: the all-reduce over n takes `(n - 1) alpha + (n - 1) / n beta S`."""
    return [
        {
            "num_devices": n,
            "flops_per_s": flops_per_s,
            "memory_bytes_per_s": memory_bytes_per_s,
            "all_reduce_alpha_s": (n - 1) * alpha,
            "all_reduce_beta_s": (n - 1) / n * beta,
        }
        for n in counts
    ]


def _calibration(name, rates):
    return planner.Calibration.from_dict(
        {"fingerprint": name, "device_type": "CPU", "rates": rates}
    )


# Compute is nearly free, every collective costs a millisecond.
COMMUNICATION_BOUND = _calibration("communication", _rates(1e13, 1e15, 1e-3, 1e-9))
# Each device computes as fast with 4 busy as alone; collectives are nearly free.
COMPUTE_BOUND = _calibration("compute", _rates(1e8, 1e15, 1e-7, 1e-13))
# Latency only: AR(2, S) = 1 s, AG(2, S) = 0.5 s.
LATENCY = _calibration("latency", _rates(1e13, 1e15, 1.0, 0.0))


def uneven():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, name="mlp_up")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="mlp_down")(x), name="uneven")


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.up = keras.layers.Dense(32)
        self.down = keras.layers.Dense(5)

    def call(self, x):
        return self.down(self.up(x))


def subclassed():
    model = Subclassed()
    model(np.zeros((1, 12), "float32"))
    return model


def _plan(model_fn=transformer, calibration=COMMUNICATION_BOUND, **kwargs):
    kwargs.setdefault("global_batch_size", GLOBAL_BATCH)
    kwargs.setdefault("optimizer", "adam")
    return planner.plan(model_fn, calibration=calibration, **kwargs)


def _row(plan, mesh):
    return next(r for r in plan.rows if r.candidate.mesh == mesh)


class CalibrationTest(parameterized.TestCase):
    def test_dict_round_trip(self):
        for calibration in (COMMUNICATION_BOUND, COMPUTE_BOUND):
            again = planner.Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
            self.assertEqual(again, calibration)

    def test_a_dict_without_rates_is_named(self):
        with self.assertRaisesRegex(ValueError, "needs fingerprint, device_type and rates"):
            planner.Calibration.from_dict({"fingerprint": "x"})
        with self.assertRaisesRegex(ValueError, r"rates of one device.*\[2\]"):
            _calibration("x", _rates(1e9, 1e15, 0, 0, counts=(2,)))

    def test_counts_between_and_above_the_measured(self):
        rates = _rates(1e9, 1e15, 1e-3, 1e-9, counts=(1, 2, 4))
        calibration = _calibration("x", rates)
        self.assertEqual(calibration.flops_per_s(3), 1e9)  # as for 2
        self.assertEqual(calibration.flops_per_s(8), 0.5e9)  # 4 devices' total, shared by 8
        self.assertEqual(calibration.all_reduce_s(1, 1 << 20), 0.0)
        self.assertAlmostEqual(calibration.all_reduce_s(4, 1000), 3e-3 + 0.75e-6)
        # Extrapolated from 4 as a ring: 7 latencies, 7/8 of the bytes' time.
        self.assertAlmostEqual(calibration.all_reduce_s(8, 1000), 7e-3 + 7 / 8 * 1e-6)
        self.assertAlmostEqual(calibration.all_gather_s(4, 1000), (3e-3 + 0.75e-6) / 2)

    def test_the_cache_path_names_the_fingerprint(self):
        path = calibration_lib.cache_path(cache_dir="/some/dir")
        self.assertEqual(path, f"/some/dir/calibration-{calibration_lib.fingerprint()}.json")
        self.assertRegex(calibration_lib.fingerprint(), r"^[0-9a-f]{16}$")
        self.assertNotEqual(calibration_lib.fingerprint(2), calibration_lib.fingerprint())
        default = calibration_lib.cache_path()
        self.assertTrue(default.startswith(os.path.expanduser("~/.cache/tfscale/calibration-")))

    def test_a_cached_calibration_is_read_not_measured(self):
        with tempfile.TemporaryDirectory() as cache_dir:
            path = calibration_lib.cache_path(cache_dir=cache_dir)
            cached = dict(COMPUTE_BOUND.to_dict(), fingerprint=calibration_lib.fingerprint())
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cached, f)
            start = time.perf_counter()
            self.assertEqual(
                planner.calibrate(cache_dir=cache_dir), planner.Calibration.from_dict(cached)
            )
            self.assertLess(time.perf_counter() - start, 1.0)

    def test_a_real_calibration_on_two_devices(self):
        with tempfile.TemporaryDirectory() as cache_dir:
            start = time.perf_counter()
            measured = planner.calibrate(devices=2, force=True, cache_dir=cache_dir)
            self.assertLess(time.perf_counter() - start, 30)
            self.assertEqual([r.num_devices for r in measured.rates], [1, 2])
            self.assertTrue(all(r.flops_per_s > 1e6 for r in measured.rates))
            self.assertTrue(all(r.memory_bytes_per_s > 1e6 for r in measured.rates))
            # Two of the four devices: no mesh spans them, so no dtensor overhead.
            self.assertEqual(
                [(o.family, o.num_devices) for o in measured.overheads],
                [("one_device", 1), ("mirrored", 2)],
            )
            self.assertTrue(all(o.seconds(100) > 0 for o in measured.overheads))
            self.assertGreater(measured.all_reduce_s(2, 1 << 20), 0)
            self.assertTrue(os.path.exists(calibration_lib.cache_path(2, cache_dir)))
            self.assertEqual(planner.calibrate(devices=2, cache_dir=cache_dir), measured)


class FlopsTest(parameterized.TestCase):
    def test_dense_layers(self):
        costs = profile.model_profile(mlp).layers
        self.assertEqual([c.name for c in costs], ["mlp_up", "mlp_down", "head"])
        self.assertEqual([c.flops for c in costs], [2 * 12 * 32, 2 * 32 * 16, 2 * 16 * 5])
        self.assertEqual(costs[0].consumers, ("mlp_down",))

    def test_attention_counts_projections_and_scores(self):
        costs = {c.name: c for c in profile.model_profile(transformer).layers}
        # 8 tokens of width 32, 4 heads of 8: four 32x32 projections, then scores and sums.
        projections = 4 * 2 * 32 * 32 * 8
        scores = 2 * 4 * 8 * 8 * (8 + 8)
        self.assertEqual(costs["block0_attention"].flops, projections + scores)
        self.assertLen(costs["block0_attention"].kernels, 4)

    def test_the_layer_graph_agrees_with_the_traced_graph(self):
        for model_fn, shape in ((transformer, (8, 8, 1)), (mlp, (12,))):
            analytic = sum(c.flops for c in profile.model_profile(model_fn).layers)
            traced = flops.traced_flops(profile.host_model(model_fn), np.zeros((2, *shape)))
            # The traced graph has no elementwise ops counted: within 2%.
            self.assertAlmostEqual(analytic / traced, 1.0, delta=0.02, msg=model_fn.__name__)

    def test_a_subclassed_model_needs_a_sample_for_its_flops(self):
        one = planner.candidates(1)[0]
        guessed = planner.predict(subclassed, one, GLOBAL_BATCH, COMPUTE_BOUND)
        traced = planner.predict(
            subclassed, one, GLOBAL_BATCH, COMPUTE_BOUND, sample_input=np.zeros((4, 12))
        )
        self.assertEqual(traced.flops, 3 * GLOBAL_BATCH * 2 * (12 * 32 + 32 * 5))
        # Two per parameter: the biases too.
        self.assertEqual(guessed.flops, 3 * GLOBAL_BATCH * 2 * (12 * 32 + 32 + 32 * 5 + 5))


def _with_overheads(calibration, *overheads):
    value = calibration.to_dict()
    value["overheads"] = [
        {"family": f, "num_devices": n, "base_s": base, "per_unit_s": per}
        for f, n, base, per in overheads
    ]
    return planner.Calibration.from_dict(value)


class OverheadTest(parameterized.TestCase):
    def test_forward_ops_of_a_dense_layer(self):
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        # The kernel and bias reads, MatMul, BiasAdd.
        self.assertEqual(flops.forward_ops(model), 4)
        # Three Dense layers, the first with a ReLU.
        self.assertEqual(profile.model_profile(mlp).forward_ops, 3 * 4 + 1)

    def test_lookup_by_family_and_count(self):
        calibration = _with_overheads(
            COMPUTE_BOUND,
            ("one_device", 1, 1e-3, 1e-5),
            ("mirrored", 2, 2e-3, 2e-5),
            ("mirrored", 4, 4e-3, 4e-5),
        )

        def seconds(calibration, kind, n, ops, model_parallelism=1):
            family = calibration_lib.family(kind, model_parallelism)
            return calibration.overhead(family, n).seconds(ops)

        self.assertAlmostEqual(seconds(calibration, "one_device", 1, 100), 2e-3)
        self.assertAlmostEqual(seconds(calibration, "mirrored", 3, 100), 4e-3)  # as for 2
        self.assertAlmostEqual(seconds(calibration, "multi_worker_mirrored", 4, 0), 4e-3)
        # No dtensor measurement: mirrored's, for a model axis too.
        self.assertAlmostEqual(seconds(calibration, "dtensor", 4, 100), 8e-3)
        self.assertAlmostEqual(seconds(calibration, "dtensor", 4, 100, 2), 8e-3)
        self.assertEqual(seconds(COMPUTE_BOUND, "mirrored", 4, 100), 0.0)
        self.assertEqual(COMPUTE_BOUND.overhead("mirrored", 4).efficiency, 1.0)
        again = planner.Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
        self.assertEqual(again, calibration)

    def test_a_bad_family_or_time_is_named(self):
        with self.assertRaisesRegex(ValueError, "one of one_device, mirrored, dtensor.*'tpu'"):
            planner.StepOverhead("tpu", 1, 0.0, 0.0)
        with self.assertRaisesRegex(ValueError, "No step overhead is measured for kind 'tpu'"):
            calibration_lib.family("tpu")
        with self.assertRaisesRegex(ValueError, "efficiency > 0"):
            planner.StepOverhead("mirrored", 2, 0.0, 0.0, efficiency=0.0)
        with self.assertRaisesRegex(ValueError, "non-negative"):
            planner.StepOverhead("mirrored", 2, -1.0, 0.0)

    def test_efficiency_scales_the_arithmetic_not_the_overhead(self):
        calibration = _with_overheads(COMPUTE_BOUND, ("one_device", 1, 1e-3, 0.0))
        value = calibration.to_dict()
        value["overheads"][0]["efficiency"] = 3.0
        slower = planner.Calibration.from_dict(value)
        one = planner.candidates(1)[0]
        base = planner.predict(mlp, one, GLOBAL_BATCH, calibration)
        t = planner.predict(mlp, one, GLOBAL_BATCH, slower)
        self.assertEqual(t.efficiency, 3.0)
        self.assertAlmostEqual(t.total - t.overhead, 3 * (base.total - base.overhead))

    def test_the_step_pays_it(self):
        calibration = _with_overheads(COMPUTE_BOUND, ("one_device", 1, 1e-3, 1e-5))
        one = planner.candidates(1)[0]
        without = planner.predict(mlp, one, GLOBAL_BATCH, COMPUTE_BOUND)
        with_it = planner.predict(mlp, one, GLOBAL_BATCH, calibration)
        self.assertEqual(without.overhead, 0.0)
        self.assertAlmostEqual(with_it.overhead, 1e-3 + 1e-5 * 13)
        self.assertAlmostEqual(with_it.total, without.total + with_it.overhead)

    def test_it_decides_between_kinds_that_compute_alike(self):
        # Free arithmetic and collectives: the cheaper dispatch wins.
        free = _calibration("free", _rates(1e15, 1e15, 0.0, 0.0))
        cheap_mesh = _with_overheads(
            free,
            ("one_device", 1, 2e-3, 1e-5),
            ("mirrored", 4, 3e-3, 2e-5),
            ("dtensor", 4, 1e-3, 1e-5),
        )
        self.assertEqual(_plan(mlp, cheap_mesh).chosen.kind, "dtensor")
        cheap_one = _with_overheads(
            free,
            ("one_device", 1, 1e-3, 1e-5),
            ("mirrored", 4, 3e-3, 2e-5),
            ("dtensor", 4, 2e-3, 1e-5),
        )
        self.assertEqual(_plan(mlp, cheap_one).chosen.kind, "one_device")


class StepTimeTest(parameterized.TestCase):
    def test_one_device_computes_only(self):
        t = planner.predict(mlp, planner.candidates(1)[0], GLOBAL_BATCH, COMPUTE_BOUND)
        self.assertEqual(t.communication, 0)
        self.assertEqual(t.flops, 3 * GLOBAL_BATCH * 2 * (12 * 32 + 32 * 16 + 16 * 5))
        self.assertAlmostEqual(t.compute, t.flops / 1e8)

    def test_replicas_split_the_compute_and_sync_the_gradients(self):
        one, mirrored = planner.candidates(testutil.NUM_CPUS)[:2]
        alone = planner.predict(mlp, one, GLOBAL_BATCH, COMPUTE_BOUND)
        spread = planner.predict(mlp, mirrored, GLOBAL_BATCH, COMPUTE_BOUND)
        self.assertEqual(spread.flops * testutil.NUM_CPUS, alone.flops)
        trainable = sum(v.num_bytes for v in profile.model_profile(mlp).variables if v.trainable)
        self.assertAlmostEqual(spread.gradient_sync, 3e-7 + 0.75e-13 * trainable)
        self.assertEqual(spread.activation_sync, 0)

    def test_megatron_syncs_row_parallel_outputs_and_gathers_split_ones(self):
        (m2,) = [c for c in planner.candidates(4) if c.mesh == "batch=2,model=2"]
        t = planner.predict(transformer, m2, GLOBAL_BATCH, LATENCY)
        # Row-parallel: attention (output projection) and mlp_down, two
        # all-reduces each; column-parallel embed feeds the unsplit position
        # embedding: one all-gather. mlp_up feeds mlp_down: none.
        self.assertAlmostEqual(t.activation_sync, 2 * 2 * 1.0 + 0.5)
        self.assertAlmostEqual(t.gradient_sync, 1.0)

    def test_split_layers_compute_less(self):
        dp, m2, m4 = [c for c in planner.candidates(4) if c.kind == "dtensor"]
        per_replica = [
            planner.predict(transformer, c, 4 * c.num_replicas, COMPUTE_BOUND) for c in (dp, m2, m4)
        ]
        # The same per-replica batch of 4: splitting the model splits its matmuls.
        self.assertGreater(per_replica[0].flops, per_replica[1].flops)
        self.assertGreater(per_replica[1].flops, per_replica[2].flops)

    def test_communication_bound_step_time_grows_with_the_model_axis(self):
        result = _plan(transformer, COMMUNICATION_BOUND)
        times = [_row(result, f"batch={4 // m},model={m}").step_time.total for m in (1, 2, 4)]
        self.assertLess(times[0], times[1])
        self.assertLess(times[1], times[2])
        self.assertEqual(result.chosen.kind, "one_device")

    def test_the_update_moves_the_optimizer_state(self):
        # Free matmuls, a byte per microsecond: elementwise traffic is the step.
        slow_memory = _calibration("memory", _rates(1e15, 1e6, 0.0, 0.0))
        one = planner.candidates(1)[0]
        sgd = planner.predict(mlp, one, GLOBAL_BATCH, slow_memory, optimizer="sgd")
        adam = planner.predict(mlp, one, GLOBAL_BATCH, slow_memory, optimizer="adam")
        trainable = sum(v.num_bytes for v in profile.model_profile(mlp).variables if v.trainable)
        # Adam holds two slots per trainable byte, each moved a dozen times.
        self.assertAlmostEqual(
            adam.compute - sgd.compute, step_time.UPDATE_PASSES_STATE * 2 * trainable / 1e6
        )

    def test_compute_bound_spreads_the_batch(self):
        self.assertEqual(_plan(mlp, COMPUTE_BOUND).chosen.kind, "mirrored")


class PlanTest(parameterized.TestCase):
    def test_deterministic(self):
        first = _plan().to_dict()
        profile.clear_cache()
        self.assertEqual(_plan().to_dict(), first)
        self.assertEqual(json.loads(json.dumps(first)), first)

    def test_the_table_lists_every_candidate(self):
        result = _plan()
        table = result.table()
        for candidate in planner.candidates(testutil.NUM_CPUS):
            self.assertIn(candidate.description, table)
        self.assertLen(result.rows, len(planner.candidates(testutil.NUM_CPUS)))
        chosen_line = next(line for line in table.splitlines() if line.endswith("chosen"))
        self.assertTrue(chosen_line.startswith(result.chosen.description))
        self.assertIn("calibration communication", table)

    def test_the_budget_excludes_candidates(self):
        unlimited = _plan()
        one_device = unlimited.rows[0].memory.total
        budget = one_device - 1
        result = _plan(memory_budget=budget)
        self.assertFalse(result.rows[0].within_budget)
        self.assertIn("over the budget", result.rows[0].reason)
        self.assertNotEqual(result.chosen.kind, "one_device")
        self.assertLessEqual(result.chosen_row.memory.total, budget)
        self.assertTrue(all(r.memory.total <= budget for r in result.rows if r.within_budget))
        self.assertIn("over budget [1]", result.table())

    def test_a_budget_nothing_fits_names_the_smallest_need(self):
        smallest = min(_plan().rows, key=lambda r: r.memory.total)
        with self.assertRaises(ValueError) as raised:
            _plan(memory_budget=1000)
        message = str(raised.exception)
        self.assertIn("budget of 1000 bytes", message)
        self.assertIn(f"the smallest need is {smallest.memory.total} bytes", message)
        self.assertIn(smallest.candidate.description, message)

    def test_infeasible_candidates_are_marked_never_chosen(self):
        result = _plan(uneven, COMPUTE_BOUND)
        row = _row(result, "batch=1,model=4")
        self.assertFalse(row.feasible)
        self.assertIsNone(row.memory)
        self.assertIn("not divisible", row.reason)
        self.assertNotEqual(result.chosen, row.candidate)
        self.assertIn("infeasible [1]", result.table())
        self.assertIn("[1] Variable 'mlp_up/kernel'", result.table())

    @parameterized.parameters(0, -1, 1.5, True)
    def test_a_bad_budget_is_named(self, budget):
        with self.assertRaisesRegex(ValueError, rf"memory_budget={budget!r}"):
            _plan(memory_budget=budget)

    def test_the_cpu_has_no_default_budget(self):
        self.assertIsNone(_plan().memory_budget)

    def test_planning_is_fast(self):
        _plan(mlp)  # builds the host copy
        start = time.perf_counter()
        _plan(mlp)
        self.assertLess(time.perf_counter() - start, 2.0)


class AutoKindTest(parameterized.TestCase):
    def test_registered(self):
        self.assertIn("auto", tfscale.kinds())

    def test_builds_the_chosen_distribution(self):
        dist = tfscale.distribution(
            "auto", model_fn=mlp, global_batch_size=GLOBAL_BATCH, calibration=COMPUTE_BOUND
        )
        self.assertEqual(dist.kind, "mirrored")
        self.assertEqual(dist.plan.chosen.kind, "mirrored")
        self.assertEqual(dist.num_replicas_in_sync, testutil.NUM_CPUS)
        self.assertIn("planned: mirrored", repr(dist))

    def test_a_budget_can_choose_a_mesh_that_trains(self):
        # Only the smallest candidate fits: a megatron mesh, not the fastest.
        smallest = min(_plan(transformer).rows, key=lambda r: r.memory.total)
        self.assertEqual(smallest.candidate.layout, "megatron")
        dist = tfscale.distribution(
            "auto",
            model_fn=transformer,
            global_batch_size=GLOBAL_BATCH,
            optimizer="adam",
            memory_budget=smallest.memory.total,
            calibration=COMMUNICATION_BOUND,
        )
        self.assertEqual(dist.plan.chosen, smallest.candidate)
        self.assertEqual(str(dist.mesh_spec), smallest.candidate.mesh)
        with dist.scope():
            model = transformer()
            model.compile(optimizer="adam", loss="mse")
        report = dist.memory_report(model)
        predicted = dist.plan.chosen_row.memory
        self.assertEqual(report.parameter_bytes, predicted.parameters)
        self.assertEqual(report.optimizer_bytes, predicted.optimizer)

    def test_nothing_fits(self):
        with self.assertRaisesRegex(ValueError, "smallest need"):
            tfscale.distribution(
                "auto",
                model_fn=mlp,
                global_batch_size=GLOBAL_BATCH,
                memory_budget=10,
                calibration=COMPUTE_BOUND,
            )


if __name__ == "__main__":
    absltest.main()
