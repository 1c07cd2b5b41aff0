"""SIGTERM mid-epoch: a checkpoint at the step boundary, then a resume that loses
and repeats nothing (the final weights equal an uninterrupted run's)."""

import os
import signal
import subprocess
import time

import h5py
import numpy as np
from absl.testing import absltest

from tests import testutil
from tfscale.train import callbacks
from tfscale.train import lib

# No shuffle buffer: the input order is then the same whether a run goes
# through or resumes (with one, passes after the first are reshuffled from
# the iterator's own state, which a resumed run does not reproduce).
_ARGS = (
    "--config.data.shuffle_buffer=0",
    "--config.distribution.kind=one_device",
    "--config.training.epochs=2",
    "--config.training.steps_per_epoch=30",
    "--config.training.checkpoint_every_steps=4",
)


def _weights(workdir):
    """Every array of the latest checkpoint, by path."""
    checkpoints = os.path.join(workdir, lib.CHECKPOINTS_DIR)
    state = callbacks.read_backup_state(checkpoints)
    arrays = {}
    with h5py.File(os.path.join(checkpoints, state["weights"]), "r") as f:
        f.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return state, arrays


class PreemptionTest(absltest.TestCase):
    def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(self):
        root = self.create_tempdir().full_path
        reference = os.path.join(root, "reference")
        result = testutil.train_binary(reference, *_ARGS)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        _, expected = _weights(reference)

        workdir = os.path.join(root, "run")
        process = testutil.start_train_binary(workdir, *_ARGS, stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.kill)
        checkpoints = os.path.join(workdir, lib.CHECKPOINTS_DIR)
        deadline = time.monotonic() + 240
        # In epoch 2, after its first periodic checkpoint.
        while (callbacks.read_backup_state(checkpoints) or {}).get("step", 0) < 34:
            self.assertIsNone(process.poll(), "training ended before the signal")
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 143, stderr[-3000:])
        self.assertNotIn("Traceback", stderr)
        self.assertRegex(stderr.strip().splitlines()[-1], r"^tfscale-train: preempted \(SIGTERM\)")
        state = callbacks.read_backup_state(checkpoints)
        self.assertEqual(state["epoch"], 1)
        self.assertBetween(state["step_in_epoch"], 4, 29)
        self.assertEqual(state["step"], 30 + state["step_in_epoch"])
        self.assertFalse(os.path.exists(os.path.join(workdir, lib.METRICS_FILE)))

        result = testutil.train_binary(workdir, *_ARGS)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        state, resumed = _weights(workdir)
        self.assertEqual((state["epoch"], state["step"]), (2, 60))
        self.assertEqual(sorted(resumed), sorted(expected))
        for name in expected:
            np.testing.assert_allclose(resumed[name], expected[name], rtol=1e-6, atol=1e-7)
        metrics = testutil.read_metrics(workdir)
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1, 2])

    def test_step_checkpoints_with_the_dispatcher_are_refused(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = testutil.train_binary(workdir, "--config.data.dispatcher.embedded=True", *_ARGS)
        self.assertEqual(result.returncode, 2)
        self.assertIn("checkpoint_every_steps works with the plain input only", result.stderr)


if __name__ == "__main__":
    absltest.main()
