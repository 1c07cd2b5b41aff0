"""The dispatcher as real processes: kill -9 recovery, workers, the CLI."""

import collections
import glob
import os
import signal
import socket
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.data.dispatcher import client as client_lib

NUM_ELEMENTS = 240
SHARD_SIZE = 10


class Dispatcher:
    """`tfscale-dispatcher serve` in a subprocess."""

    def __init__(self, work_dir, *flags):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tfscale.data.dispatcher",
                "serve",
                f"--work_dir={work_dir}",
                *flags,
            ],
            cwd=testutil.REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.process.stdout.readline()
        if "listening on" not in line:
            self.process.kill()
            raise AssertionError(f"dispatcher did not start: {line!r}")
        self.address = line.split()[-1]

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (testutil.REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _serve_flags(policy="round_robin", num_epochs=2, lease_timeout_s=3.0):
    return (
        f"--shards=range:{NUM_ELEMENTS}:{SHARD_SIZE}",
        "--job=audit",
        f"--policy={policy}",
        f"--num_epochs={num_epochs}",
        f"--lease_timeout_s={lease_timeout_s}",
    )


class RecoveryTest(absltest.TestCase):
    def test_kill_9_restores_every_completion_and_lease(self):
        work_dir = self.create_tempdir().full_path
        dispatcher = Dispatcher(work_dir, *_serve_flags(lease_timeout_s=30))
        self.addCleanup(dispatcher.stop)
        client = client_lib.DispatcherClient(dispatcher.address, unavailable_timeout_s=5)
        client.register_worker("audit", "w0")
        completed = []
        for lease in client.acquire("audit", "w0", 5).leases:
            client.complete("audit", "w0", lease.token)
            completed.append(lease.shard_name)
        held = client.acquire("audit", "w0", 3).leases
        client.commit("audit", "w0", held[0].token)
        (before,) = client.list_jobs()
        dispatcher.kill()

        restarted = Dispatcher(work_dir, *_serve_flags(lease_timeout_s=30))
        self.addCleanup(restarted.stop)
        client = client_lib.DispatcherClient(restarted.address, unavailable_timeout_s=5)
        (after,) = client.list_jobs()
        self.assertEqual(after, before)
        self.assertEqual((after.completed, after.leased, after.grants), (5, 3, 8))
        # The held leases survived (the committed one too) and can be completed.
        for lease in held:
            client.complete("audit", "w0", lease.token)
        (lease,) = client.acquire("audit", "w0", 1).leases
        self.assertGreater(lease.token, max(l.token for l in held))
        self.assertNotIn(lease.shard_name, completed + [l.shard_name for l in held])

    def test_torn_last_record_is_tolerated(self):
        work_dir = self.create_tempdir().full_path
        dispatcher = Dispatcher(work_dir, *_serve_flags())
        client = client_lib.DispatcherClient(dispatcher.address, unavailable_timeout_s=5)
        client.register_worker("audit", "w0")
        (lease,) = client.acquire("audit", "w0", 1).leases
        client.complete("audit", "w0", lease.token)
        dispatcher.kill()
        (segment,) = sorted(glob.glob(os.path.join(work_dir, "journal-*.log")))[-1:]
        with open(segment, "ab") as f:
            f.write(b'1234abcd 40 {"op": "gra')  # a write cut short by the crash
        restarted = Dispatcher(work_dir, *_serve_flags())
        self.addCleanup(restarted.stop)
        client = client_lib.DispatcherClient(restarted.address, unavailable_timeout_s=5)
        (job,) = client.list_jobs()
        self.assertEqual((job.completed, job.grants), (1, 1))


class WorkersTest(parameterized.TestCase):
    """3 worker processes: one 4x slower, one killed -9 mid-epoch while holding a lease."""

    @parameterized.parameters("round_robin", "least_loaded", "consistent_hash", "adaptive")
    def test_every_element_once_per_epoch(self, policy):
        tmp = self.create_tempdir().full_path
        dispatcher = Dispatcher(tmp, *_serve_flags(policy, num_epochs=2, lease_timeout_s=4.0))
        self.addCleanup(dispatcher.stop)
        outs = [os.path.join(tmp, f"w{i}.out") for i in range(3)]
        specs = [("w0", 0.002, -1), ("w1", 0.008, -1), ("w2", 0.002, 3)]  # w1 slow, w2 dies
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(testutil.REPO_ROOT, "tests", "dispatcher_worker.py"),
                    dispatcher.address,
                    "audit",
                    name,
                    out,
                    str(delay),
                    str(hang),
                ],
                cwd=testutil.REPO_ROOT,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for (name, delay, hang), out in zip(specs, outs)
        ]
        for worker in workers:
            self.addCleanup(worker.kill)
        self.assertEqual(workers[2].stdout.readline().strip(), "HANGING")
        workers[2].send_signal(signal.SIGKILL)
        for worker in workers[:2]:
            line = worker.stdout.readline()
            self.assertStartsWith(line, "DONE")
            self.assertEqual(worker.wait(timeout=120), 0)

        counts = collections.Counter()
        per_worker = []
        for out in outs:
            with open(out) as f:
                ids = [int(line) for line in f]
            per_worker.append(len(ids))
            counts.update(ids)
        self.assertEqual(set(counts), set(range(NUM_ELEMENTS)), "missing elements")
        self.assertEqual(set(counts.values()), {2}, "an element not seen exactly once per epoch")
        self.assertEqual(per_worker[2], 3 * SHARD_SIZE)  # the killed worker's 3 shards count
        client = client_lib.DispatcherClient(dispatcher.address)
        (job,) = client.list_jobs()
        self.assertTrue(job.finished)

    def test_a_killed_workers_shard_resumes_where_its_training_stopped(self):
        # w1 reports each element consumed before recording it, then dies
        # mid-shard holding the lease: the shard goes back at that offset, so
        # no element is trained twice and none is lost.
        tmp = self.create_tempdir().full_path
        dispatcher = Dispatcher(tmp, *_serve_flags(num_epochs=1, lease_timeout_s=2.0))
        self.addCleanup(dispatcher.stop)
        outs = [os.path.join(tmp, f"w{i}.out") for i in range(2)]
        specs = [("w0", 0.004, -1, -1), ("w1", 0.002, -1, 15)]  # w1: 1.5 shards, then dies
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(testutil.REPO_ROOT, "tests", "dispatcher_worker.py"),
                    dispatcher.address,
                    "audit",
                    name,
                    out,
                    str(delay),
                    str(hang),
                    str(train),
                ],
                cwd=testutil.REPO_ROOT,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for (name, delay, hang, train), out in zip(specs, outs)
        ]
        for worker in workers:
            self.addCleanup(worker.kill)
        self.assertEqual(workers[1].stdout.readline().strip(), "HANGING")
        workers[1].send_signal(signal.SIGKILL)
        self.assertStartsWith(workers[0].stdout.readline(), "DONE")
        self.assertEqual(workers[0].wait(timeout=120), 0)
        counts = collections.Counter()
        for out in outs:
            with open(out) as f:
                counts.update(int(line) for line in f)
        self.assertEqual(set(counts), set(range(NUM_ELEMENTS)), "missing elements")
        self.assertEqual(max(counts.values()), 1, "an element trained twice")


class StatusCommandTest(absltest.TestCase):
    def test_prints_workers_throughput_and_imbalance(self):
        flags = _serve_flags(lease_timeout_s=60)  # w0 stays live while `status` starts
        dispatcher = Dispatcher(self.create_tempdir().full_path, *flags)
        self.addCleanup(dispatcher.stop)
        client = client_lib.DispatcherClient(dispatcher.address)
        client.register_worker("audit", "w0")
        for lease in client.acquire("audit", "w0", 2).leases:
            client.complete("audit", "w0", lease.token)
        result = testutil.run_module(
            "tfscale.data.dispatcher", "status", f"--address={dispatcher.address}"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("imbalance 1.000", result.stdout)
        self.assertIn("job audit [round_robin]: epoch 1/2", result.stdout)
        self.assertRegex(result.stdout, r"audit\s+w0\s+yes\s+0\s+0\s+2\s+20")

    def test_auth_token_file(self):
        tmp = self.create_tempdir().full_path
        token = os.path.join(tmp, "token")
        with open(token, "w") as f:
            f.write("s3cret\n")
        dispatcher = Dispatcher(tmp, *_serve_flags(), f"--auth_token_file={token}")
        self.addCleanup(dispatcher.stop)
        denied = testutil.run_module(
            "tfscale.data.dispatcher", "status", f"--address={dispatcher.address}"
        )
        self.assertEqual(denied.returncode, 1)
        self.assertEqual(
            denied.stderr.splitlines()[-1],
            f"tfscale-dispatcher: the dispatcher at {dispatcher.address} answered UNAUTHENTICATED: "
            "missing or wrong auth token (check --auth_token_file)",
        )
        self.assertNotIn("Traceback", denied.stderr)
        allowed = testutil.run_module(
            "tfscale.data.dispatcher",
            "status",
            f"--address={dispatcher.address}",
            f"--auth_token_file={token}",
        )
        self.assertEqual(allowed.returncode, 0, allowed.stderr[-2000:])
        self.assertIn("job audit [round_robin]", allowed.stdout)

    def test_serve_takes_snapshot_interval_and_restore_grace(self):
        work_dir = self.create_tempdir().full_path
        flags = ("--snapshot_interval=3", "--restore_grace_s=0.5")
        dispatcher = Dispatcher(work_dir, *_serve_flags(), *flags)
        self.addCleanup(dispatcher.stop)
        client = client_lib.DispatcherClient(dispatcher.address)
        client.register_worker("audit", "w0")
        for lease in client.acquire("audit", "w0", 2).leases:
            client.complete("audit", "w0", lease.token)
        # create + register + 2 grants + 2 completions: at least one snapshot at 3 records.
        self.assertNotEmpty(glob.glob(os.path.join(work_dir, "snapshot-*.json")))
        result = testutil.run_module(
            "tfscale.data.dispatcher", "status", f"--address={dispatcher.address}"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("2 completed", result.stdout)

    def test_serve_rejects_bad_shards(self):
        result = testutil.run_module(
            "tfscale.data.dispatcher", "serve", "--shards=/nonexistent/*.tfrecord"
        )
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr.splitlines()[-1],
            "tfscale-dispatcher: --shards: "
            "No file matches the shard glob '/nonexistent/*.tfrecord'",
        )
        self.assertNotIn("Traceback", result.stderr)


class CommandErrorsTest(parameterized.TestCase):
    """Every failure of the CLI is one line naming the cause, and a non-zero exit."""

    def assertFailsWith(self, result, exit_code, cause):
        self.assertEqual(result.returncode, exit_code, result.stderr[-2000:])
        self.assertEqual(result.stderr.splitlines()[-1], f"tfscale-dispatcher: {cause}")
        self.assertNotIn("Traceback", result.stderr)

    def test_status_of_an_unreachable_address(self):
        address = f"127.0.0.1:{testutil.free_port()}"
        result = testutil.run_module("tfscale.data.dispatcher", "status", f"--address={address}")
        self.assertFailsWith(
            result, 1, f"cannot reach a dispatcher at {address}: connection refused (after 5 s)"
        )

    @parameterized.named_parameters(
        ("no_command", [], "expected one command, serve or status. Received: none"),
        ("unknown_command", ["stat"], "expected one command, serve or status. Received: stat"),
        ("status_without_address", ["status"], "status needs --address=HOST:PORT"),
        (
            "address_without_port",
            ["status", "--address=localhost"],
            "flag --address=localhost: expected HOST:PORT, PORT in [1, 65535]",
        ),
        (
            "address_port_out_of_range",
            ["status", "--address=127.0.0.1:99999"],
            "flag --address=127.0.0.1:99999: expected HOST:PORT, PORT in [1, 65535]",
        ),
        (
            "port_out_of_range",
            ["serve", "--port=99999"],
            "flag --port=99999: 99999 is not an integer in the range [0, 65535]",
        ),
        (
            "unknown_policy",
            ["serve", "--policy=fastest"],
            "flag --policy=fastest: value should be one of "
            "<adaptive|consistent_hash|least_loaded|round_robin>",
        ),
        (
            "snapshot_interval_zero",
            ["serve", "--snapshot_interval=0"],
            "flag --snapshot_interval=0: 0 is not a positive integer",
        ),
        (
            "restore_grace_negative",
            ["serve", "--restore_grace_s=-1"],
            "flag --restore_grace_s=-1.0: expected a finite number of seconds >= 0",
        ),
        (
            "restore_grace_infinite",
            ["serve", "--restore_grace_s=inf"],
            "flag --restore_grace_s=inf: expected a finite number of seconds >= 0",
        ),
        ("unknown_flag", ["serve", "--frobnicate=1"], "Unknown command line flag 'frobnicate'"),
        (
            "bad_range_shards",
            ["serve", "--shards=range:ten"],
            "--shards: Expected 2 integers in 'range:ten'",
        ),
        (
            "bad_job",
            ["serve", "--shards=range:10:2", "--num_epochs=0"],
            "num_epochs must be >= 1. Received: num_epochs=0",
        ),
    )
    def test_bad_command_line_is_one_line(self, args, cause):
        result = testutil.run_module("tfscale.data.dispatcher", *args)
        self.assertFailsWith(result, 2, cause)
        self.assertLen(result.stderr.splitlines(), 1)

    def test_serve_on_a_port_in_use(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = testutil.run_module("tfscale.data.dispatcher", "serve", f"--port={port}")
        cause = f"cannot listen on 127.0.0.1:{port}: Address already in use"
        self.assertFailsWith(result, 1, cause)

    @parameterized.parameters("serve", "status")
    def test_missing_auth_token_file(self, command):
        flags = ("--address=127.0.0.1:1", "--auth_token_file=/x/token")
        result = testutil.run_module("tfscale.data.dispatcher", command, *flags)
        self.assertFailsWith(
            result, 1, "cannot read --auth_token_file: No such file or directory: '/x/token'"
        )


if __name__ == "__main__":
    absltest.main()
