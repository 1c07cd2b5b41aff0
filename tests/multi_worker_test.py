"""Multi-worker training with Keras 3: the upstream failure, and tfscale's fix.

Two real worker processes with TF_CONFIG on loopback ports.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfscale  # noqa: E402
from tests import multi_worker_script as script  # noqa: E402
from tfscale.data import synthetic  # noqa: E402
from tfscale.strategies import cluster  # noqa: E402
from tfscale.train import models  # noqa: E402


def _start_workers(command_for, log_level="3"):
    """Starts 2 processes with TF_CONFIG on free loopback ports; returns their results."""
    workers = [f"127.0.0.1:{testutil.free_port()}" for _ in range(2)]
    processes = []
    for index in range(2):
        tf_config = cluster.Cluster(tuple(workers), index).tf_config()
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(tf_config),
            PYTHONPATH=testutil.REPO_ROOT,
            TF_CPP_MIN_LOG_LEVEL=log_level,
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, *command_for(index)],
                cwd=testutil.REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=300) for p in processes]
    return [(p.returncode, stdout, stderr) for p, (stdout, stderr) in zip(processes, results)]


_SCRIPT = os.path.join(testutil.REPO_ROOT, "tests", "multi_worker_script.py")


def _run_workers(mode, initial_npz, tmp, steps_per_execution=1):
    outs = [os.path.join(tmp, f"{mode}-{index}.npz") for index in range(2)]
    return (
        _start_workers(lambda i: [_SCRIPT, mode, initial_npz, outs[i], str(steps_per_execution)]),
        outs,
    )


class MultiWorkerMirroredTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(3)
        cls.initial = models.build("lenet", (28, 28, 1), 10).get_weights()

    def setUp(self):
        super().setUp()
        self.tmp = self.create_tempdir().full_path
        self.initial_npz = os.path.join(self.tmp, "initial.npz")
        np.savez(self.initial_npz, **{f"w{i}": w for i, w in enumerate(self.initial)})

    def test_stock_strategy_fails_with_keras_3(self):
        results, _ = _run_workers("stock", self.initial_npz, self.tmp)
        for returncode, stdout, stderr in results:
            self.assertEqual(returncode, 0, stderr[-3000:])
            self.assertIn("UPSTREAM_FAILURE Attempt to convert a value (PerReplica", stdout)

    def test_tfscale_matches_mirrored_in_one_process(self):
        self._check_against_mirrored(steps_per_execution=1)

    def test_steps_per_execution_matches_mirrored_in_one_process(self):
        self._check_against_mirrored(steps_per_execution=4)

    def _check_against_mirrored(self, steps_per_execution):
        results, outs = _run_workers(
            "tfscale", self.initial_npz, self.tmp, steps_per_execution=steps_per_execution
        )
        for returncode, stdout, stderr in results:
            self.assertEqual(returncode, 0, stderr[-3000:])
            self.assertIn("OK accuracy=", stdout)
            self.assertIn("predict=(8, 10)", stdout)
        workers = []
        for out in outs:
            with np.load(out) as saved:
                workers.append([saved[f"arr_{i}"] for i in range(len(saved.files))])

        dist = tfscale.distribution("mirrored", devices=2)
        images, labels = synthetic.generate(script.STEPS * script.GLOBAL_BATCH, seed=7)
        data = tf.data.Dataset.from_tensor_slices(
            (images[..., None].astype("float32") / 255.0, labels)
        )
        with dist.scope():
            model = models.build("lenet", (28, 28, 1), 10)
            model.set_weights(self.initial)
            model.compile(
                optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
                loss=models.loss("lenet"),
            )
        model.fit(
            dist.distribute_dataset(data, script.GLOBAL_BATCH),
            epochs=1,
            steps_per_epoch=script.STEPS,
            shuffle=False,
            verbose=0,
        )
        reference = model.get_weights()
        moved = max(float(np.abs(a - b).max()) for a, b in zip(reference, self.initial))
        self.assertGreater(moved, 1e-2)
        for index, weights in enumerate(workers):
            for a, b in zip(reference, weights):
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=f"worker {index}")


class ExitBarrierTest(absltest.TestCase):
    """A worker that finishes first must not make the chief report crashed tasks."""

    _CRASH = ("have crashed", "CoordinationServiceError", "unhealthy")

    def _chief_stderr(self, mode):
        results = _start_workers(lambda i: [_SCRIPT, mode], log_level="1")
        for returncode, stdout, stderr in results:
            self.assertEqual(returncode, 0, stderr[-3000:])
            self.assertIn("SUM 2.0", stdout)
        return results[0][2]

    def test_stock_chief_reports_the_finished_worker_as_crashed(self):
        stderr = self._chief_stderr("linger_stock")
        self.assertTrue(any(word in stderr for word in self._CRASH), stderr[-3000:])

    def test_tfscale_workers_wait_for_each_other(self):
        stderr = self._chief_stderr("linger_tfscale")
        self.assertFalse(any(word in stderr for word in self._CRASH), stderr[-3000:])


class TrainBinaryTest(absltest.TestCase):
    def test_two_workers_write_one_metrics_file(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        results = _start_workers(
            lambda i: [
                "-m",
                "tfscale.train",
                "--config=configs/default.py:smoke",
                f"--workdir={workdir}",
                f"--config.data.cache_dir={testutil.cache_dir()}",
                "--config.distribution.kind=multi_worker_mirrored",
                "--config.devices.virtual_cpus=1",
            ]
        )
        for returncode, _, stderr in results:
            self.assertEqual(returncode, 0, stderr[-3000:])
        with open(os.path.join(workdir, "metrics.json")) as f:
            metrics = json.load(f)
        self.assertEqual(
            (metrics["kind"], metrics["workers"], metrics["replicas"]),
            ("multi_worker_mirrored", 2, 2),
        )
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1, 2])
        self.assertGreater(metrics["eval"]["accuracy"], 0.2)
        self.assertEqual(
            sorted(os.listdir(workdir)),
            ["checkpoints", "config.json", "metrics.json", "tensorboard"],
        )


if __name__ == "__main__":
    absltest.main()
