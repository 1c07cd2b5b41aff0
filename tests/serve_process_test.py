"""`tfscale-serve` as a user runs it: real router and replica processes.

A replica killed with SIGKILL under load is restarted and no request fails;
a newer model file is rolled over the replicas with no failed request;
SIGTERM stops everything.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import grpc  # noqa: E402

from tests.serve_server_test import _keras_model  # noqa: E402
from tests.serve_server_test import _Load  # noqa: E402
from tests.serve_server_test import _post  # noqa: E402
from tfscale.serve import admin  # noqa: E402


def _start(*flags):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=testutil.REPO_ROOT)
    process = subprocess.Popen(
        [sys.executable, "-m", "tfscale.serve.main", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=testutil.REPO_ROOT,
    )
    return process


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


class ServeProcessTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.root = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        self.model_path = os.path.join(self.root, "model.keras")
        _keras_model(seed=1).save(self.model_path)

    def test_kill_restart_reload_and_sigterm(self):
        router = _start(
            f"--model={self.model_path}",
            "--replicas=2",
            "--policy=round_robin",
            "--watch_interval_s=0.5",
            "--max_queue_delay_ms=1",
        )
        self.addCleanup(router.kill)
        target = router.stdout.readline().split()[-1]
        rest = router.stdout.readline().split()[-1]
        self.assertRegex(target, r"^127\.0\.0\.1:\d+$", router.stderr.read() if not target else "")
        self.assertRegex(rest, r"^127\.0\.0\.1:\d+$")
        channel = grpc.insecure_channel(target)
        status = admin.call(channel, "Status", timeout_s=10)
        pids = {
            r["name"]: admin.call(grpc.insecure_channel(r["target"]), "Status", timeout_s=10)["pid"]
            for r in status["replicas"]
        }
        self.assertLen(pids, 2)
        first_version = os.stat(self.model_path).st_mtime_ns // 10**9

        load = _Load(target, threads=2)
        time.sleep(1.0)
        os.kill(pids["replica-0"], signal.SIGKILL)

        def restarted():
            replicas = admin.call(channel, "Status", timeout_s=10)["replicas"]
            replica = next(r for r in replicas if r["name"] == "replica-0")
            if replica["health"] != "up":
                return None
            try:
                pid = admin.call(grpc.insecure_channel(replica["target"]), "Status", timeout_s=10)
            except grpc.RpcError:  # not restarted yet: the router has not seen it die
                return None
            return pid["pid"] != pids["replica-0"] and pid["pid"]

        new_pid = _wait_for(restarted, 120, "replica-0 to be restarted")
        # A newer model file: the router's watcher rolls it over the replicas.
        _keras_model(seed=2).save(self.model_path)
        new_version = first_version + 10
        os.utime(self.model_path, (new_version, new_version))
        _wait_for(
            lambda: load.results and load.results[-1][1] == new_version,
            120,
            "the new version to be served",
        )
        time.sleep(0.5)
        results = load.stop()
        self.assertEqual([r for r in results if r[0] == "error"], [])
        served = {replica for replica, _ in results}
        self.assertEqual(served, {"replica-0", "replica-1"})
        self.assertEqual({version for _, version in results}, {first_version, new_version})

        router.send_signal(signal.SIGTERM)
        self.assertEqual(router.wait(timeout=30), 0)
        for pid in (new_pid, pids["replica-1"]):
            _wait_for(lambda: not _alive(pid), 15, f"replica pid {pid} to exit")

    def test_router_in_front_of_replicas_started_elsewhere(self):
        replica = _start("replica", f"--model={self.model_path}", "--name=remote", "--port=0")
        self.addCleanup(replica.kill)
        replica_target = replica.stdout.readline().split()[-1]
        router = _start(f"--replica_addresses={replica_target}", "--port=0")
        self.addCleanup(router.kill)
        target = router.stdout.readline().split()[-1]
        rest = router.stdout.readline().split()[-1]
        load = _Load(target, threads=1)
        time.sleep(0.5)
        results = load.stop()
        self.assertTrue(results)
        self.assertEqual({r[0] for r in results}, {"remote"})
        status, body, _ = _post(rest, "/v1/models/default:predict", {"instances": [[0.0] * 4]})
        self.assertEqual((status, len(body["predictions"])), (200, 1))
        router.send_signal(signal.SIGTERM)
        self.assertEqual(router.wait(timeout=30), 0)
        replica.send_signal(signal.SIGTERM)
        self.assertEqual(replica.wait(timeout=30), 0)

    def test_a_model_that_cannot_load_fails_in_one_line(self):
        bad = os.path.join(self.root, "broken.keras")
        with open(bad, "w") as f:
            f.write("not a keras archive")
        router = _start(f"--model={bad}", "--replicas=1")
        self.addCleanup(router.kill)
        _, stderr = router.communicate(timeout=120)
        self.assertEqual(router.returncode, 1)
        last = stderr.strip().splitlines()[-1]
        self.assertRegex(last, r"^tfscale-serve: replica-0 exited with \d+ before it was ready: ")
        self.assertIn("broken.keras", last)


if __name__ == "__main__":
    absltest.main()
