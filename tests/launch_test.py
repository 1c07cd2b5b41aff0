"""Tests for tfscale-launch: TF_CONFIG per rank, prefixes, restarts, signals, training.

The console and failure reports in detail: launch_output_test.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402

from tfscale.launch import local  # noqa: E402
from tfscale.train import callbacks  # noqa: E402
from tfscale.train import models  # noqa: E402


def _children(pid):
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(entry)
    return found


def _launch(*args, timeout=600):
    return testutil.run_module("tfscale.launch", *args, timeout=timeout)


class LaunchTest(absltest.TestCase):
    def test_each_rank_gets_its_tf_config_and_a_prefix(self):
        result = _launch(
            "--nproc_per_node=3",
            "--log_ranks=all",
            "--",
            sys.executable,
            "-c",
            "import json, os; c = json.loads(os.environ['TF_CONFIG']); "
            "print(c['task']['index'], len(c['cluster']['worker']), os.environ['TFSCALE_WORLD_SIZE'])",
        )
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        lines = sorted(l for l in result.stdout.splitlines() if l.startswith("["))
        self.assertEqual(lines, ["[0] 0 3 3", "[1] 1 3 3", "[2] 2 3 3"])

    def test_failure_restarts_the_group_then_gives_up(self):
        result = _launch(
            "--nproc_per_node=2",
            "--max_restarts=2",
            "--",
            sys.executable,
            "-c",
            "import os, sys, time; print('attempt', os.environ['TFSCALE_RESTART']); time.sleep(1); "
            "sys.exit(7) if os.environ['TFSCALE_RANK'] == '1' else time.sleep(60)",
        )
        self.assertEqual(result.returncode, 7)
        self.assertEqual(result.stderr.count("[tfscale-launch] rank 1 (local rank 1, pid "), 3)
        self.assertEqual(
            result.stderr.count("failed with exit code 7; restarting the worker group"), 2
        )
        self.assertIn("exit code 7; restarting the worker group (restart 2 of 2)", result.stderr)
        self.assertIn("exit code 7; giving up after 2 of 2 restarts", result.stderr)
        self.assertIn("[1] attempt 2", result.stderr)  # the hidden rank's last lines
        self.assertIn("[0] attempt 2", result.stdout)

    def test_restart_then_success(self):
        marker = os.path.join(self.create_tempdir().full_path, "failed-once")
        result = _launch(
            "--nproc_per_node=2",
            "--max_restarts=1",
            "--",
            sys.executable,
            "-c",
            f"import os, sys; m = {marker!r}\n"
            "if os.environ['TFSCALE_RANK'] == '0' and not os.path.exists(m):\n"
            "    open(m, 'w').close(); sys.exit(1)\n"
            "print('done')",
        )
        self.assertEqual(result.returncode, 0, result.stdout[-2000:])
        self.assertIn("[0] done", result.stdout)

    def test_sigterm_is_forwarded(self):
        tmp = self.create_tempdir().full_path
        worker = (
            "import os, signal, sys, time\n"
            f"def stop(*_): open(os.path.join({tmp!r}, os.environ['TFSCALE_RANK']), 'w').close(); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop); print('ready', flush=True); time.sleep(60)"
        )
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tfscale.launch",
                "--nproc_per_node=2",
                "--log_ranks=all",
                "--",
                sys.executable,
                "-c",
                worker,
            ],
            cwd=testutil.REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=testutil.REPO_ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2):
            self.assertIn("ready", launcher.stdout.readline())
        launcher.send_signal(signal.SIGTERM)
        self.assertEqual(launcher.wait(timeout=30), 0)
        self.assertEqual(sorted(os.listdir(tmp)), ["0", "1"])

    def test_bad_arguments(self):
        result = _launch("--nnodes=2", "--node_rank=0", "--", "true")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "nnodes=2 needs master_addr or one host per node in node_hosts", result.stderr
        )
        result = _launch("--nproc_per_node=2")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Give the worker command after `--`", result.stderr)

    def test_multi_node_addresses(self):
        config = local.LaunchConfig(
            nproc_per_node=2, nnodes=2, node_rank=1, node_hosts=("a", "b"), master_port=4000
        )
        self.assertEqual(local.worker_addresses(config), ["a:4001", "a:4002", "b:4003", "b:4004"])

    def test_nodes_meet_at_master_addr(self):
        port = str(testutil.free_port())
        snippet = (
            "import json, os; c = json.loads(os.environ['TF_CONFIG']); "
            "print(c['task']['index'], ','.join(c['cluster']['worker']))"
        )
        nodes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tfscale.launch",
                    "--nnodes=2",
                    f"--node_rank={rank}",
                    "--nproc_per_node=2",
                    "--master_addr=127.0.0.1",
                    f"--master_port={port}",
                    "--log_ranks=all",
                    "--",
                    sys.executable,
                    "-c",
                    snippet,
                ],
                cwd=testutil.REPO_ROOT,
                env=dict(os.environ, PYTHONPATH=testutil.REPO_ROOT),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (1, 0)  # node 1 first: it must wait for node 0
        ]
        outputs = [node.communicate(timeout=120) for node in nodes]
        for node, (stdout, stderr) in zip(nodes, outputs):
            self.assertEqual(node.returncode, 0, stderr[-2000:])
        lines = sorted(
            l
            for stdout, _ in outputs
            for l in stdout.splitlines()
            if l[:1] == "[" and l[1].isdigit()
        )
        self.assertIn(
            "[tfscale-launch] rendezvous: nodes ['127.0.0.1', '127.0.0.1']", outputs[0][0]
        )
        workers = ",".join(f"127.0.0.1:{int(port) + 1 + r}" for r in range(4))
        self.assertEqual(lines, [f"[{r}] {r} {workers}" for r in range(4)])


class LaunchTrainingTest(absltest.TestCase):
    def test_two_workers_match_mirrored(self):
        from tests import multi_worker_script as script

        tmp = self.create_tempdir().full_path
        keras.utils.set_random_seed(3)
        initial = models.build("lenet", (28, 28, 1), 10).get_weights()
        initial_npz = os.path.join(tmp, "initial.npz")
        np.savez(initial_npz, **{f"w{i}": w for i, w in enumerate(initial)})
        out = os.path.join(tmp, "w.npz")
        result = _launch(
            "--nproc_per_node=2",
            "--log_ranks=all",
            "--",
            sys.executable,
            os.path.join(testutil.REPO_ROOT, "tests", "multi_worker_script.py"),
            "tfscale",
            initial_npz,
            out,
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])
        self.assertEqual(result.stdout.count("OK accuracy="), 2)
        reference = os.path.join(tmp, "reference.npz")
        script.train_mirrored_reference(initial, reference)
        with np.load(out) as got, np.load(reference) as want:
            for name in want.files:
                np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)

    def test_kill_9_of_a_worker_restarts_the_group_and_training_completes(self):
        root = self.create_tempdir().full_path
        workdir, logs = os.path.join(root, "run"), os.path.join(root, "logs")
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tfscale.launch",
                "--nproc_per_node=2",
                "--max_restarts=2",
                f"--log_dir={logs}",
                "--",
                sys.executable,
                "-m",
                "tfscale.train",
                "--config=configs/default.py:smoke",
                f"--workdir={workdir}",
                f"--config.data.cache_dir={testutil.cache_dir()}",
                "--config.distribution.kind=multi_worker_mirrored",
                "--config.devices.virtual_cpus=1",
                "--config.data.max_train_examples=24000",
                "--config.training.epochs=3",
            ],
            cwd=testutil.REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=testutil.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(launcher.kill)
        state = os.path.join(workdir, "checkpoints")
        deadline = time.monotonic() + 300
        while (callbacks.read_backup_state(state) or {}).get("epoch") != 1:
            self.assertIsNone(launcher.poll(), "training ended before the kill")
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        children = _children(launcher.pid)
        self.assertLen(children, 2)
        killed_at = time.monotonic()
        os.kill(int(children[1]), signal.SIGKILL)
        # The launcher's output, read as it comes: when did training resume?
        lines, resumed_at = [], None
        for line in launcher.stdout:
            lines.append(line)
            if resumed_at is None and "Restored epoch 1" in line:
                resumed_at = time.monotonic()
        output = "".join(lines)
        self.assertEqual(launcher.wait(timeout=60), 0, output[-3000:])
        self.assertIsNotNone(resumed_at, "no worker restored the checkpoint")
        self.assertRegex(
            output,
            rf"\[tfscale-launch\] rank [01] \(local rank [01], pid {children[1]}\) failed with "
            r"exit code 137 \(killed by SIGKILL\); restarting the worker group \(restart 1 of 2\)",
        )
        # The console shows rank 0, and rank 1's last lines if it was the one killed.
        self.assertLessEqual(output.count("\n[1] "), local.TAIL_LINES)
        for attempt in range(2):
            for rank in range(2):
                log = os.path.join(logs, f"attempt{attempt}", f"rank{rank}.log")
                self.assertTrue(os.path.exists(log), log)
        with open(os.path.join(workdir, "metrics.json")) as f:
            metrics = json.load(f)
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1, 2, 3])
        self.assertEqual(metrics["resumed_from_epoch"], 1)
        self.assertEqual(metrics["workers"], 2)
        print(f"kill -9 to restored checkpoint: {resumed_at - killed_at:.1f}s")

    def test_two_workers_read_through_the_dispatcher(self):
        server, address = testutil.start_dispatcher()
        self.addCleanup(server.kill)
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = _launch(
            "--nproc_per_node=2",
            "--log_ranks=all",
            "--",
            sys.executable,
            "-m",
            "tfscale.train",
            "--config=configs/default.py:smoke",
            f"--workdir={workdir}",
            f"--config.data.cache_dir={testutil.cache_dir()}",
            "--config.distribution.kind=multi_worker_mirrored",
            "--config.devices.virtual_cpus=1",
            "--config.data.max_train_examples=24000",
            f"--config.data.dispatcher.address={address}",
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])
        self.assertNotIn("ran out of data", result.stdout)
        with open(os.path.join(workdir, "metrics.json")) as f:
            metrics = json.load(f)
        self.assertEqual((metrics["workers"], metrics["dispatcher"]), (2, address))
        status = testutil.run_module("tfscale.data.dispatcher", "status", f"--address={address}")
        self.assertIn("job train [adaptive]: epoch 2/2 finished, shards 16:", status.stdout)
        self.assertRegex(status.stdout, r"train\s+worker-0\s")
        self.assertRegex(status.stdout, r"train\s+worker-1\s")


class ResizeTest(absltest.TestCase):
    def test_two_worker_run_resumes_as_one_worker(self):
        root = self.create_tempdir().full_path
        workdir = os.path.join(root, "run")
        train = [
            "-m",
            "tfscale.train",
            "--config=configs/default.py:smoke",
            f"--config.data.cache_dir={testutil.cache_dir()}",
            "--config.distribution.kind=multi_worker_mirrored",
            "--config.devices.virtual_cpus=1",
        ]
        result = _launch(
            "--nproc_per_node=2",
            "--",
            sys.executable,
            *train,
            f"--workdir={workdir}",
            "--config.training.epochs=1",
        )
        self.assertEqual(result.returncode, 0, result.stdout[-3000:])
        with open(os.path.join(workdir, "metrics.json")) as f:
            self.assertEqual(json.load(f)["replicas"], 2)
        other = os.path.join(root, "run2")
        shutil.copytree(workdir, other)

        for directory, resize, global_batch in (
            (workdir, "keep_global_batch", 64),
            (other, "keep_per_replica_batch", 32),
        ):
            result = testutil.run_module(
                *train[1:],
                f"--workdir={directory}",
                "--config.training.epochs=2",
                f"--config.training.resize={resize}",
            )
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            with open(os.path.join(directory, "metrics.json")) as f:
                metrics = json.load(f)
            self.assertEqual((metrics["replicas"], metrics["workers"]), (1, 1))
            self.assertEqual((metrics["resumed_from_epoch"], metrics["epochs_run"]), (1, 1))
            self.assertEqual(metrics["global_batch_size"], global_batch, resize)
        self.assertIn("Resumed on 1 replicas (was 2): global batch 64 -> 32", result.stderr)


if __name__ == "__main__":
    absltest.main()
