"""End-to-end tests of tfscale-train and tfscale.train.lib.run."""

import json
import os
import signal
import subprocess
import time

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from tfscale.data import synthetic  # noqa: E402
from tfscale.data.dispatcher import server as server_lib  # noqa: E402
from tfscale.train import callbacks  # noqa: E402
from tfscale.train import config as config_lib  # noqa: E402
from tfscale.train import lib  # noqa: E402


class TrainBinaryTest(absltest.TestCase):
    def test_auto_kind_plans_trains_and_writes_the_plan(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = testutil.train_binary(
            workdir, "--config.distribution.kind=auto", "--config.training.epochs=1"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("kind 'auto' chose ", result.stderr)
        metrics = testutil.read_metrics(workdir)
        plan = metrics["plan"]
        self.assertEqual(metrics["kind"], plan["chosen"]["kind"])
        kinds = {row["kind"] for row in plan["rows"]}
        self.assertTrue({"one_device", "mirrored", "dtensor"} <= kinds, kinds)
        self.assertGreater(plan["measured"]["step_time_s"], 0)
        self.assertGreater(plan["chosen"]["predicted_step_time_s"], 0)

    def test_smoke_run_writes_sane_metrics_and_resumes(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = testutil.train_binary(workdir)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        metrics = testutil.read_metrics(workdir)
        self.assertEqual(metrics["kind"], "mirrored")
        self.assertEqual(metrics["replicas"], 2)
        self.assertLen(metrics["devices"], 2)
        self.assertEqual(metrics["global_batch_size"], 64)
        self.assertEqual(metrics["resumed_from_epoch"], 0)
        self.assertEqual(metrics["epochs_run"], 2)
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1, 2])
        # 2 epochs of 1024 examples: far from chance (10%), loss falling.
        self.assertGreater(metrics["eval"]["accuracy"], 0.3)
        self.assertEqual(metrics["eval"]["examples"], 256)
        self.assertLess(metrics["history"][1]["loss"], metrics["history"][0]["loss"])
        self.assertGreater(metrics["throughput"]["examples_per_sec"], 0)
        self.assertGreater(metrics["wall_time_s"], 0)
        self.assertEqual(
            callbacks.read_backup_state(os.path.join(workdir, "checkpoints"))["epoch"], 2
        )
        self.assertTrue(os.listdir(os.path.join(workdir, "tensorboard")))
        self.assertIn("Epoch 2/2", result.stdout)  # the Keras progress output
        with open(os.path.join(workdir, lib.CONFIG_FILE)) as f:
            saved = json.load(f)
        self.assertEqual((saved["model"]["name"], saved["training"]["epochs"]), ("lenet", 2))

        # The same workdir with one more epoch trains only that epoch.
        result = testutil.train_binary(workdir, "--config.training.epochs=3")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        resumed = testutil.read_metrics(workdir)
        self.assertEqual(resumed["resumed_from_epoch"], 2)
        self.assertEqual(resumed["epochs_run"], 1)
        self.assertEqual([h["epoch"] for h in resumed["history"]], [1, 2, 3])
        self.assertEqual(resumed["history"][:2], metrics["history"])
        self.assertNotIn("Epoch 1/3", result.stdout)
        self.assertIn("Epoch 3/3", result.stdout)

    def test_embedded_dispatcher_feeds_training_and_resumes(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = testutil.train_binary(
            workdir, "--config.data.dispatcher.embedded=True", "--config.training.epochs=1"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        metrics = testutil.read_metrics(workdir)
        self.assertRegex(metrics["dispatcher"], r"^127\.0\.0\.1:\d+$")
        self.assertGreater(metrics["eval"]["accuracy"], 0.2)
        self.assertTrue(os.listdir(os.path.join(workdir, "dispatcher")))
        self.assertNotIn("ran out of data", result.stderr)

        # One more epoch: the journaled job is extended, training resumes.
        result = testutil.train_binary(
            workdir, "--config.data.dispatcher.embedded=True", "--config.training.epochs=2"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertNotIn("ran out of data", result.stderr)
        resumed = testutil.read_metrics(workdir)
        self.assertEqual((resumed["resumed_from_epoch"], resumed["epochs_run"]), (1, 1))

    def test_kill_9_mid_epoch_with_dispatcher_resumes_from_the_checkpoint_position(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        args = (
            "--config.data.dispatcher.embedded=True",
            "--config.data.max_train_examples=24000",  # all 16 shards: 375 steps an epoch
            "--config.training.epochs=2",
        )
        process = testutil.start_train_binary(
            workdir, *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.addCleanup(process.kill)
        state = os.path.join(workdir, "checkpoints")
        deadline = time.monotonic() + 240
        while (callbacks.read_backup_state(state) or {}).get("epoch") != 1:
            self.assertIsNone(process.poll(), "training ended before it could be killed")
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)  # somewhere in epoch 2
        process.wait()
        self.assertFalse(os.path.exists(os.path.join(workdir, lib.METRICS_FILE)))

        result = testutil.train_binary(workdir, *args)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        # Without the rewind the dispatcher, already partway into epoch 2,
        # would run out of shards before the resumed epoch 2 is over.
        self.assertNotIn("ran out of data", result.stderr)
        self.assertIn("epoch 2: ", result.stderr)
        self.assertRegex(result.stderr, r"epoch 2: .* over 375 steps")
        metrics = testutil.read_metrics(workdir)
        self.assertEqual((metrics["resumed_from_epoch"], metrics["epochs_run"]), (1, 1))
        with server_lib.server_context(
            server_lib.ServerConfig(work_dir=os.path.join(workdir, "dispatcher"))
        ) as server:
            (job,) = server.core.jobs()
        self.assertTrue(job.finished)
        self.assertEqual(job.epoch, 2)

    def test_external_dispatcher_job_made_by_the_cli(self):
        files = synthetic.ensure_shards(testutil.cache_dir(), "train")
        pattern = os.path.join(os.path.dirname(files[0]), "*.tfrecord-*")
        server, address = testutil.start_dispatcher(
            f"--shards={pattern}", "--job=train", "--policy=least_loaded"
        )
        self.addCleanup(server.kill)
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = testutil.train_binary(
            workdir, f"--config.data.dispatcher.address={address}", "--config.training.epochs=1"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(testutil.read_metrics(workdir)["dispatcher"], address)
        status = testutil.run_module("tfscale.data.dispatcher", "status", f"--address={address}")
        self.assertIn("job train [least_loaded]: epoch 1/1", status.stdout)
        self.assertIn("shards 16:", status.stdout)
        result = testutil.train_binary(
            workdir + "2",
            f"--config.data.dispatcher.address={address}",
            "--config.training.epochs=3",
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "Dispatcher job 'train' at {} has 1 epoch(s); config.training.epochs=3 needs as many".format(
                address
            ),
            result.stderr,
        )

    def test_one_device_override(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = testutil.train_binary(
            workdir,
            "--config.distribution.kind=one_device",
            "--config.training.epochs=1",
            "--config.data.max_train_examples=256",
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        metrics = testutil.read_metrics(workdir)
        self.assertEqual((metrics["kind"], metrics["replicas"]), ("one_device", 1))

    def test_bad_values_fail_clearly_and_write_nothing(self):
        cases = [
            (
                "--config.training.epochs=0",
                "config.training.epochs must be a positive int. Received: training.epochs=0",
            ),
            (
                "--config.distribution.kind=tpux",
                "Unknown distribution kind 'tpux'. Valid kinds: auto, default, dtensor, mirrored, "
                "multi_worker_mirrored, one_device, tpu",
            ),
            (
                "--config.distribution.all_reduce=ring",
                "all_reduce must be one of auto, nccl, hierarchical_copy, reduce_to_one",
            ),
            (
                "--config.distribution.devices=9",
                "devices=9 asks for more devices than this host has (2:",
            ),
            (
                # No GPU on this machine.
                "--config.devices.gpu_memory_limit_mb=512",
                "config.devices: virtual_gpus_per_gpu and gpu_memory_limit_mb split a GPU, but "
                "TensorFlow finds none on this machine",
            ),
            (
                "--config.training.global_batch_size=63",
                "global_batch_size must be a positive multiple of the 2 replica(s)",
            ),
            (
                "--config.optimizer.name=lamb",
                "config.optimizer.name must be one of ('sgd', 'adam'). Received: optimizer.name='lamb'",
            ),
            ("--config.data.source=mnist", "Unknown data source 'mnist'"),
            (
                "--config.data.dispatcher.policy=fifo",
                "config.data.dispatcher.policy must be one of",
            ),
            (
                "--config.data.dispatcher.address=nohost",
                "config.data.dispatcher.address must be HOST:PORT",
            ),
        ]
        root = self.create_tempdir().full_path
        for flag, message in cases:
            with self.subTest(flag=flag):
                workdir = os.path.join(root, "run")
                result = testutil.train_binary(workdir, flag)
                self.assertEqual(result.returncode, 2, result.stderr[-3000:])
                self.assertIn(message, result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                self.assertFalse(os.path.exists(workdir))

    def test_unknown_variant(self):
        result = testutil.run_module(
            "tfscale.train", "--config=configs/default.py:huge", "--workdir=/nonexistent"
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Unknown config variant 'huge'. Valid variants: smoke", result.stderr)


class RunTest(parameterized.TestCase):
    def _config(self):
        config = config_lib.smoke(config_lib.base_config())
        config.devices.virtual_cpus = testutil.NUM_CPUS
        config.data.cache_dir = testutil.cache_dir()
        config.training.verbose = 0
        return config

    def test_tfds_source_with_mock_data(self):
        config = self._config()
        config.data.source = "tfds:mnist"
        config.data.max_train_examples = None
        config.data.max_eval_examples = None
        config.training.epochs = 1
        config.distribution.devices = "2"
        workdir = self.create_tempdir().full_path
        with tfds.testing.mock_data(num_examples=128):
            metrics = lib.run(config, workdir)
        self.assertEqual(metrics["source"], "tfds:mnist")
        self.assertEqual(metrics["replicas"], 2)
        self.assertEqual(metrics["history"][0]["epoch"], 1)
        self.assertEqual(metrics["eval"]["examples"], 128)
        self.assertEqual(testutil.read_metrics(workdir)["eval"], metrics["eval"])

    def test_tfds_source_through_an_embedded_dispatcher(self):
        config = self._config()
        config.data.source = "tfds:mnist"
        config.data.max_train_examples = None
        config.data.max_eval_examples = None
        config.data.dispatcher.embedded = True
        config.data.dispatcher.tfds_shards = 4
        config.training.epochs = 1
        config.distribution.devices = "2"
        workdir = self.create_tempdir().full_path
        with tfds.testing.mock_data(num_examples=128):
            metrics = lib.run(config, workdir)
        self.assertRegex(metrics["dispatcher"], r"^127\.0\.0\.1:\d+$")
        self.assertEqual(metrics["history"][0]["epoch"], 1)
        state = callbacks.read_backup_state(os.path.join(workdir, lib.CHECKPOINTS_DIR))
        self.assertIn("input_position", state["extra"])

    def test_training_reaches_a_tls_dispatcher(self):
        cert, key = testutil.self_signed_cert(self.create_tempdir().full_path)
        config = self._config()
        config.training.epochs = 1
        server_config = server_lib.ServerConfig(tls_cert_file=cert, tls_key_file=key)
        with server_lib.server_context(server_config) as server:
            port = server.target.rsplit(":", 1)[1]
            config.data.dispatcher.address = f"localhost:{port}"
            config.data.dispatcher.tls_root_cert_file = cert
            metrics = lib.run(config, self.create_tempdir().full_path)
            (job,) = server.core.jobs()
        self.assertEqual(metrics["dispatcher"], f"localhost:{port}")
        self.assertEqual(metrics["history"][0]["epoch"], 1)
        self.assertGreater(job.grants, 0)

    def test_mixed_precision_trains_and_restores_the_global_policy(self):
        config = self._config()
        config.training.precision = "mixed_float16"
        config.distribution.devices = "2"
        with self.assertLogs("absl", level="WARNING") as logs:
            metrics = lib.run(config, self.create_tempdir().full_path)
        # No GPU here: the run says float16 will be slower, not faster.
        self.assertTrue(
            any("'mixed_float16' on a machine without a GPU" in line for line in logs.output),
            logs.output,
        )
        self.assertEqual(metrics["precision"], "mixed_float16")
        history = metrics["history"]
        self.assertLess(history[1]["loss"], history[0]["loss"])
        self.assertGreater(metrics["eval"]["accuracy"], 0.15)  # chance is 0.1
        self.assertEqual(keras.config.dtype_policy().name, "float32")

    def test_steps_per_execution_trains_as_one_step_per_call(self):
        runs = {}
        for steps_per_execution in (1, 4):
            config = self._config()
            config.distribution.devices = "2"
            config.training.steps_per_execution = steps_per_execution
            runs[steps_per_execution] = lib.run(config, self.create_tempdir().full_path)
        one, four = runs[1], runs[4]
        self.assertAlmostEqual(four["eval"]["loss"], one["eval"]["loss"], places=5)
        for a, b in zip(four["history"], one["history"]):
            self.assertAlmostEqual(a["loss"], b["loss"], places=5)

    @parameterized.parameters(
        dict(
            field=("training", "precision"),
            value="float16",
            message="config.training.precision must be one of ('float32', 'mixed_float16', 'mixed_bfloat16')",
        ),
        dict(
            field=("training", "verbose"),
            value=3,
            message="config.training.verbose must be 0, 1 or 2",
        ),
        dict(
            field=("optimizer", "learning_rate"),
            value=-1.0,
            message="optimizer.learning_rate must be a positive number",
        ),
        dict(field=("data", "max_train_examples"), value=10, message="fewer than one global batch"),
        dict(
            field=("training", "steps_per_execution"),
            value=0,
            message=r"config.training.steps_per_execution must be an int in \[1, 10000\]",
        ),
        dict(
            field=("seed",),
            value=-1,
            message="config.seed must be a non-negative int. Received: seed=-1",
        ),
    )
    def test_bad_values_raise_before_writing(self, field, value, message):
        config = self._config()
        section = config
        for name in field[:-1]:
            section = section[name]
        section[field[-1]] = value
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        with self.assertRaisesRegex(ValueError, message.replace("(", r"\(").replace(")", r"\)")):
            lib.run(config, workdir)
        self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
    absltest.main()
