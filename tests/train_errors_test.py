"""tfscale-train's failures: one line naming the cause, exit status 2, nothing written."""

import glob
import json
import os
from unittest import mock

import tensorflow as tf
from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

from tfscale.train import callbacks  # noqa: E402
from tfscale.train import lib  # noqa: E402


def _train(workdir, *args, config="configs/default.py:smoke"):
    return testutil.train_binary(workdir, *args, config=config)


class OneLineErrorTest(absltest.TestCase):
    def _assert_fails(self, result, message):
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        self.assertEqual(last, f"tfscale-train: error: {message}")

    def test_unknown_config_field_names_it_and_the_close_match(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(workdir, "--config.training.epoch=3")
        self._assert_fails(
            result,
            "Unknown config field 'training.epoch' in config.training; did you mean 'epochs'? "
            "(from --config.training.epoch=3)",
        )
        self.assertFalse(os.path.exists(workdir))

    def test_missing_config_file_and_variant(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(workdir, config="configs/nope.py")
        self._assert_fails(
            result,
            f"--config=configs/nope.py: no such file 'configs/nope.py' (from {testutil.REPO_ROOT})",
        )
        result = _train(workdir, config="configs/default.py:smok")
        self._assert_fails(
            result,
            "--config=configs/default.py:smok cannot be loaded: Unknown config variant 'smok'. "
            "Valid variants: smoke",
        )

    def test_bad_value_and_kind(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        self._assert_fails(
            _train(workdir, "--config.training.epochs=0"),
            "config.training.epochs must be a positive int. Received: training.epochs=0",
        )
        result = _train(workdir, "--config.distribution.kind=mirroredx")
        self._assert_fails(
            result,
            "config.distribution: Unknown distribution kind 'mirroredx'. Valid kinds: auto, "
            "default, dtensor, mirrored, multi_worker_mirrored, one_device, tpu",
        )
        self.assertFalse(os.path.exists(workdir))

    def test_workdir_that_is_a_file(self):
        path = self.create_tempfile().full_path
        self._assert_fails(_train(path), f"--workdir={path} exists and is not a directory")

    def test_workdir_that_cannot_be_written(self):
        # /proc refuses new files even to root.
        result = _train("/proc/tfscale-run")
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        last = result.stderr.strip().splitlines()[-1]
        self.assertStartsWith(
            last, "tfscale-train: error: --workdir=/proc/tfscale-run cannot be written (/proc: "
        )

    def test_single_host_kind_in_a_cluster_names_the_kind_to_use(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        tf_config = {
            "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
            "task": {"type": "worker", "index": 1},
        }
        with mock.patch.dict(os.environ, {"TF_CONFIG": json.dumps(tf_config)}):
            result = _train(workdir)
        self._assert_fails(
            result,
            "config.distribution: kind 'mirrored' trains on one host, but this process is worker 1 "
            "of 2 (TF_CONFIG, Slurm or Kubernetes): each would train alone on the same "
            "checkpoints. Use --config.distribution.kind=multi_worker_mirrored, or dtensor with a "
            "mesh over every worker's devices",
        )
        self.assertFalse(os.path.exists(workdir))

    def test_truncated_checkpoint_is_named(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(
            workdir, "--config.training.epochs=1", "--config.training.steps_per_epoch=2"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        state = callbacks.read_backup_state(os.path.join(workdir, lib.CHECKPOINTS_DIR))
        path = os.path.join(workdir, lib.CHECKPOINTS_DIR, state["weights"])
        with open(path, "rb") as f:
            head = f.read(3000)
        with open(path, "wb") as f:
            f.write(head)
        result = _train(
            workdir, "--config.training.epochs=2", "--config.training.steps_per_epoch=2"
        )
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        self.assertStartsWith(
            last, f"tfscale-train: error: Checkpoint {path} (epoch 1) cannot be read: "
        )
        self.assertIn("truncated file", last)

    def test_truncated_latest_checkpoint_falls_back_to_the_one_before(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(
            workdir, "--config.training.epochs=2", "--config.training.steps_per_epoch=2"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        path = os.path.join(workdir, lib.CHECKPOINTS_DIR, "epoch-00002.weights.h5")
        with open(path, "rb") as f:
            head = f.read(3000)
        with open(path, "wb") as f:
            f.write(head)
        result = _train(
            workdir, "--config.training.epochs=3", "--config.training.steps_per_epoch=2"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(f"Checkpoint {path} (epoch 2) cannot be read", result.stderr)
        self.assertIn("resuming from epoch-00001.weights.h5 (epoch 1)", result.stderr)
        self.assertEqual(result.stderr.count("cannot be read"), 1)
        state = callbacks.read_backup_state(os.path.join(workdir, lib.CHECKPOINTS_DIR))
        self.assertEqual(state["epoch"], 3)
        metrics = testutil.read_metrics(workdir)
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1, 2, 3])


class KindSwitchTest(absltest.TestCase):
    def test_switching_kind_drops_the_other_kinds_options(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(
            workdir,
            "--config.distribution.kind=mirrored",
            "--config.training.epochs=1",
            "--config.training.steps_per_epoch=2",
            "--config.model.kwargs.num_layers=1",
            config="configs/transformer_dtensor.py:smoke",
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(
            "config.distribution: kind 'mirrored' takes no layout_map, mesh; ignored", result.stderr
        )
        self.assertEqual(testutil.read_metrics(workdir)["kind"], "mirrored")


class TensorBoardTest(absltest.TestCase):
    def test_per_step_and_evaluation_scalars(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(
            workdir,
            "--config.training.epochs=1",
            "--config.training.steps_per_epoch=4",
            "--config.training.log_every_steps=2",
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(_scalars(workdir, "train", "batch_loss"), [2, 4])
        self.assertEqual(_scalars(workdir, "eval", "eval/loss"), [4])
        self.assertEqual(_scalars(workdir, "eval", "eval/accuracy"), [4])
        # Resumed: the per-step curve continues at the restored step.
        result = _train(
            workdir,
            "--config.training.epochs=2",
            "--config.training.steps_per_epoch=4",
            "--config.training.log_every_steps=2",
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(_scalars(workdir, "train", "batch_loss"), [2, 4, 6, 8])
        self.assertEqual(_scalars(workdir, "eval", "eval/loss"), [4, 8])


def _scalars(workdir, writer, tag):
    steps = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", writer, "events.out.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


if __name__ == "__main__":
    absltest.main()
