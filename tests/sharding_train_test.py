"""DTensor end to end: tfscale-train with the megatron layout, resharding on
resume, and a mesh spanning two worker processes started by tfscale-launch."""

import os
import sys

import numpy as np
from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402

from tests import dtensor_worker_script as script  # noqa: E402


def _train(workdir, *overrides):
    return testutil.train_binary(workdir, *overrides, config="configs/transformer_dtensor.py:smoke")


class TrainBinaryTest(absltest.TestCase):
    def test_megatron_run_reports_memory_and_resumes_on_another_mesh(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(workdir, "--config.training.epochs=1")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("Memory per device", result.stderr)
        self.assertRegex(
            result.stderr, r"block0_mlp_up/kernel\s+\(32, 64\)\s+\(-, model\)\s+8.00 KiB\s+4.00 KiB"
        )
        metrics = testutil.read_metrics(workdir)
        self.assertEqual(metrics["kind"], "dtensor")
        self.assertEqual(metrics["replicas"], 2)  # the batch axis
        self.assertLen(metrics["devices"], 4)
        memory = metrics["memory"]
        self.assertEqual(memory["mesh"], "batch=2,model=2")
        self.assertLess(memory["per_device_bytes"], memory["full_bytes"])
        self.assertGreater(metrics["eval"]["accuracy"], 0.0)

        # Saved at model=2, resumed at model=4: the checkpoint is resharded.
        result = _train(workdir, "--config.training.epochs=2", "--config.distribution.mesh=model=4")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        resumed = testutil.read_metrics(workdir)
        self.assertEqual(resumed["resumed_from_epoch"], 1)
        self.assertEqual(resumed["epochs_run"], 1)
        self.assertEqual(resumed["memory"]["mesh"], "model=4")
        self.assertEqual([h["epoch"] for h in resumed["history"]], [1, 2])
        self.assertLess(resumed["history"][1]["loss"], resumed["history"][0]["loss"])

    def test_bad_mesh_fails_clearly_and_writes_nothing(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _train(workdir, "--config.distribution.mesh=batch=3,model=2")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("mesh batch=3,model=2 needs 6 devices, found 4", result.stderr)
        self.assertFalse(os.path.exists(workdir))


class MultiClientTest(absltest.TestCase):
    def test_mesh_over_two_launched_workers_matches_one_device(self):
        tmp = self.create_tempdir().full_path
        keras.utils.set_random_seed(5)
        reference = script.model()
        initial = reference.get_weights()
        initial_npz = os.path.join(tmp, "initial.npz")
        np.savez(initial_npz, **{f"w{i}": w for i, w in enumerate(initial)})
        out = os.path.join(tmp, "out.npz")
        result = testutil.run_module(
            "tfscale.launch",
            "--nproc_per_node=2",
            "--log_ranks=all",
            "--",
            sys.executable,
            os.path.join(testutil.REPO_ROOT, "tests", "dtensor_worker_script.py"),
            initial_npz,
            out,
            timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])
        self.assertEqual(result.stdout.count(f"OK workers=2 devices=2 steps={script.STEPS}"), 2)

        x, y = script.data()
        reference.fit(x, y, batch_size=script.GLOBAL_BATCH, shuffle=False, verbose=0)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(reference.get_weights(), initial))
        self.assertGreater(moved, 1e-2)
        with np.load(out) as got:
            for i, want in enumerate(reference.get_weights()):
                np.testing.assert_allclose(
                    got[f"w{i}"], want, rtol=0, atol=1e-4, err_msg=f"weight {i}"
                )


if __name__ == "__main__":
    absltest.main()
