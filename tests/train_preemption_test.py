"""SIGTERM mid-epoch: a checkpoint at the step boundary, then a resume that loses
and repeats nothing (the final weights equal an uninterrupted run's); with two
workers, a SIGTERM to one of them stops both after the same step."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.train import callbacks
from tfscale.train import lib

# A shuffle buffer: each pass is shuffled by a seed of its own (tfscale.data.passes),
# so a resumed run reads the same stream as one that goes through.
_ARGS = (
    "--config.data.shuffle_buffer=256",
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


def _wait_for_step(test, processes, checkpoints, step, timeout_s=240):
    """Waits until the latest checkpoint is at `step` or later."""
    deadline = time.monotonic() + timeout_s
    while (callbacks.read_backup_state(checkpoints) or {}).get("step", 0) < step:
        for process in processes:
            test.assertIsNone(process.poll(), "training ended before the signal")
        test.assertLess(time.monotonic(), deadline)
        time.sleep(0.01)


class PreemptionTest(parameterized.TestCase):
    @parameterized.named_parameters(
        dict(testcase_name="plain", extra=(), steps=30),
        # The job is rewound to the checkpoint's position, then to where the
        # rest of the epoch ended: the same shards, in the same order. An
        # epoch is at most a pass over the shards (23 batches).
        dict(
            testcase_name="dispatched", extra=("--config.data.dispatcher.embedded=True",), steps=20
        ),
    )
    def test_sigterm_mid_epoch_then_resume_matches_an_uninterrupted_run(self, extra, steps):
        args = (*_ARGS, *extra, f"--config.training.steps_per_epoch={steps}")
        root = self.create_tempdir().full_path
        reference = os.path.join(root, "reference")
        result = testutil.train_binary(reference, *args)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        _, expected = _weights(reference)

        workdir = os.path.join(root, "run")
        process = testutil.start_train_binary(workdir, *args, stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.kill)
        checkpoints = os.path.join(workdir, lib.CHECKPOINTS_DIR)
        # In epoch 2, after a periodic one.
        _wait_for_step(self, [process], checkpoints, steps + 4)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 143, stderr[-3000:])
        self.assertNotIn("Traceback", stderr)
        self.assertRegex(stderr.strip().splitlines()[-1], r"^tfscale-train: preempted \(SIGTERM\)")
        state = callbacks.read_backup_state(checkpoints)
        self.assertEqual(state["epoch"], 1)
        self.assertBetween(state["step_in_epoch"], 4, steps - 1)
        self.assertEqual(state["step"], steps + state["step_in_epoch"])
        self.assertFalse(os.path.exists(os.path.join(workdir, lib.METRICS_FILE)))

        result = testutil.train_binary(workdir, *args)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        state, resumed = _weights(workdir)
        self.assertEqual((state["epoch"], state["step"]), (2, 2 * steps))
        self.assertEqual(sorted(resumed), sorted(expected))
        for name in expected:
            np.testing.assert_allclose(resumed[name], expected[name], rtol=1e-6, atol=1e-7)
        metrics = testutil.read_metrics(workdir)
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1, 2])
        if extra:  # the ledger of what trained the model: each element once
            audit = metrics["input_audit"]
            self.assertEqual(audit["elements"], 2 * steps * 64)
            self.assertEqual((audit["duplicated_elements"], audit["missing_elements"]), (0, 0))
            self.assertEqual(audit, testutil.read_metrics(reference)["input_audit"])

    def test_step_checkpoints_with_dropping_workers_are_refused(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        process = testutil.start_train_binary(
            workdir,
            "--config.data.dispatcher.embedded=True",
            "--config.data.dispatcher.equalize=drop",
            *_WORKER_ARGS,
            extra_env={
                "TF_CONFIG": _tf_config([f"127.0.0.1:{testutil.free_port()}" for _ in range(2)], 0)
            },
            stderr=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(process.kill)
        _, stderr = process.communicate(timeout=120)
        self.assertEqual(process.returncode, 2, stderr[-3000:])
        self.assertIn("equalize='drop' does not keep", stderr)
        self.assertFalse(os.path.exists(workdir))


_WORKER_ARGS = (
    *_ARGS[:1],
    "--config.distribution.kind=multi_worker_mirrored",
    "--config.devices.virtual_cpus=1",
    *_ARGS[2:],
)


def _tf_config(addresses, index):
    return json.dumps(
        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    )


class MultiWorkerPreemptionTest(absltest.TestCase):
    def _workers(self, workdir, *extra, count=2, **popen_kwargs):
        """Starts the workers of a `multi_worker_mirrored` job on loopback ports."""
        addresses = [f"127.0.0.1:{testutil.free_port()}" for _ in range(count)]
        processes = []
        for index in range(count):
            process = testutil.start_train_binary(
                workdir,
                *_WORKER_ARGS,
                *extra,
                extra_env={"TF_CONFIG": _tf_config(addresses, index)},
                **popen_kwargs,
            )
            self.addCleanup(process.kill)
            processes.append(process)
        return processes

    def _finish(self, processes, timeout_s=240):
        outputs = [p.communicate(timeout=timeout_s)[1] for p in processes]
        return [p.returncode for p in processes], outputs

    def test_sigterm_to_one_worker_stops_both_at_one_step_then_resume_matches(self):
        root = self.create_tempdir().full_path
        reference = os.path.join(root, "reference")
        codes, outputs = self._finish(self._workers(reference, stderr=subprocess.PIPE, text=True))
        self.assertEqual(codes, [0, 0], outputs[0][-3000:] + outputs[1][-3000:])
        _, expected = _weights(reference)

        workdir = os.path.join(root, "run")
        processes = self._workers(workdir, stderr=subprocess.PIPE, text=True)
        checkpoints = os.path.join(workdir, lib.CHECKPOINTS_DIR)
        _wait_for_step(self, processes, checkpoints, 34)
        # Only the non-chief: the chief must learn of it and stop at the same step.
        processes[1].send_signal(signal.SIGTERM)
        started = time.monotonic()
        codes, outputs = self._finish(processes, timeout_s=120)
        self.assertEqual(codes, [143, 143], outputs[0][-3000:] + outputs[1][-3000:])
        # At a step boundary, not after a collective's timeout.
        self.assertLess(time.monotonic() - started, 30)
        stops = [re.findall(r"every worker stops after step (\d+)", o) for o in outputs]
        self.assertEqual(stops[0], [], "the chief got no SIGTERM and proposed nothing")
        self.assertLen(stops[1], 1)
        state = callbacks.read_backup_state(checkpoints)
        self.assertEqual(state["step"], int(stops[1][0]))
        self.assertEqual(state["epoch"], 1)
        self.assertEqual(state["step"], 30 + state["step_in_epoch"])

        # The same checkpoint resumed on one worker: the plain input is one
        # stream whatever the worker count, so the same elements follow.
        alone = os.path.join(root, "alone")
        shutil.copytree(workdir, alone)
        codes, outputs = self._finish(self._workers(workdir, stderr=subprocess.PIPE, text=True))
        self.assertEqual(codes, [0, 0], outputs[0][-3000:] + outputs[1][-3000:])
        self.assertIn(f"and {state['step_in_epoch']} steps", outputs[0])
        state, resumed = _weights(workdir)
        self.assertEqual((state["epoch"], state["step"]), (2, 60))
        self.assertEqual(sorted(resumed), sorted(expected))
        for name in expected:
            np.testing.assert_allclose(resumed[name], expected[name], rtol=1e-6, atol=1e-7)

        result = testutil.train_binary(alone, *_WORKER_ARGS)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        state, resumed = _weights(alone)
        self.assertEqual((state["epoch"], state["step"]), (2, 60))
        for name in expected:
            # One replica sums the global batch's gradient in another order.
            np.testing.assert_allclose(resumed[name], expected[name], rtol=1e-4, atol=1e-5)

    def test_dispatched_sigterm_then_resume_on_three_workers_trains_each_element_once(self):
        """The job is rewound to the two workers' joined position; three go on from it."""
        server, address = testutil.start_dispatcher()
        self.addCleanup(server.kill)
        # 48 splits over 2 and 3 workers. 4 shards of 1500: the two epochs
        # of 75 steps take the workers into the job's second epoch.
        extra = (
            f"--config.data.dispatcher.address={address}",
            "--config.data.max_train_examples=6000",
            "--config.training.global_batch_size=48",
            "--config.training.steps_per_epoch=75",
        )
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        processes = self._workers(workdir, *extra, stderr=subprocess.PIPE, text=True)
        checkpoints = os.path.join(workdir, lib.CHECKPOINTS_DIR)
        _wait_for_step(self, processes, checkpoints, 79)
        processes[1].send_signal(signal.SIGTERM)
        codes, outputs = self._finish(processes, timeout_s=60)
        self.assertEqual(codes, [143, 143], outputs[0][-3000:] + outputs[1][-3000:])
        state = callbacks.read_backup_state(checkpoints)
        self.assertEqual(state["epoch"], 1)
        self.assertGreater(state["step_in_epoch"], 0)
        saved = state["extra"]["input_position"]
        self.assertNotEqual(saved["done"] + saved["partials"], [])

        processes = self._workers(workdir, *extra, count=3, stderr=subprocess.PIPE, text=True)
        codes, outputs = self._finish(processes)
        self.assertEqual(codes, [0, 0, 0], "".join(o[-2000:] for o in outputs))
        self.assertIn(f"and {state['step_in_epoch']} steps", outputs[0])
        metrics = testutil.read_metrics(workdir)
        self.assertEqual((metrics["workers"], metrics["global_batch_size"]), (3, 48))
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1, 2])
        audit = metrics["input_audit"]
        self.assertEqual((audit["duplicated_elements"], audit["missing_elements"]), (0, 0), audit)
        # Padding (which evens out the workers' counts) is trained, but not
        # ledgered. The two workers leased two shards each, so the position
        # has two partial shards: of the three workers, one got none and
        # padded at most a shard (1500) to the others' count; the run ends
        # before the second epoch's padding.
        self.assertBetween(audit["elements"], 2 * 75 * 48 - 1500, 2 * 75 * 48)


if __name__ == "__main__":
    absltest.main()
