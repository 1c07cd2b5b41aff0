"""Elastic `tfscale-launch --nnodes=MIN:MAX`: launchers as real processes on loopback.

Each "node" is a launcher process on this host; its workers are
`tests/elastic_worker_script.py`, which record their rank, world size and
round, then wait for a finish file.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from absl.testing import absltest

from tests import testutil
from tfscale.launch import elastic
from tfscale.launch import main as launch_main

WORKER = os.path.join(testutil.REPO_ROOT, "tests", "elastic_worker_script.py")
# Every change must reach the workers well within the 20 s.
CHANGE_S = 20


class ElasticLaunchTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.out = self.create_tempdir().full_path
        self.port = testutil.free_port()
        self.launchers = []

    def tearDown(self):
        for process in self.launchers:
            if process.poll() is None:
                process.kill()
                process.wait()
        super().tearDown()

    def _start(self, *flags, env=None):
        command = [
            sys.executable,
            "-m",
            "tfscale.launch",
            "--nnodes=2:3",
            "--master_addr=127.0.0.1",
            f"--master_port={self.port}",
            "--heartbeat_timeout_s=5",
            "--rendezvous_timeout_s=60",
            "--log_ranks=all",
            *flags,
            "--",
            sys.executable,
            WORKER,
            self.out,
        ]
        process = subprocess.Popen(
            command,
            cwd=testutil.REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=testutil.REPO_ROOT, **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.launchers.append(process)
        return process

    def _start_master(self, *flags, env=None):
        """The first launcher, once it serves the rendezvous: the one later ones join."""
        process = self._start(*flags, env=env)
        deadline = time.monotonic() + CHANGE_S
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return process
            except OSError:
                time.sleep(0.1)
        self.fail(f"no rendezvous on port {self.port} after {CHANGE_S}s")

    def _records(self):
        path = os.path.join(self.out, "records.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def _wait_for_round(self, world, after=-1, timeout=CHANGE_S):
        """The records of the first round after `after` that has `world` workers, all started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rounds = {}
            for r in self._records():
                rounds.setdefault(r["round"], []).append(r)
            for number in sorted(rounds):
                records = rounds[number]
                if number > after and records[0]["world"] == world and len(records) == world:
                    return number, records
            time.sleep(0.2)
        self.fail(f"no round of {world} workers after round {after} in {timeout}s: {rounds}")

    def _finish(self, *launchers):
        """Lets the workers end; every launcher exits 0. Their stderr, joined."""
        open(os.path.join(self.out, "finish"), "w").close()
        errors = []
        for process in launchers:
            _, stderr = process.communicate(timeout=60)
            self.assertEqual(process.returncode, 0, stderr[-3000:])
            errors.append(stderr)
        return "".join(errors)

    def assert_one_world(self, records, world):
        self.assertEqual(sorted(r["rank"] for r in records), list(range(world)))
        self.assertLen({tuple(r["workers"]) for r in records}, 1)
        self.assertLen(records[0]["workers"], world)

    def test_a_node_that_joins_then_leaves_restarts_every_node_at_the_new_size(self):
        a = self._start_master()
        b = self._start()
        first, records = self._wait_for_round(2)
        self.assert_one_world(records, 2)

        joined = time.monotonic()
        c = self._start()
        second, records = self._wait_for_round(3, after=first)
        self.assertLess(time.monotonic() - joined, CHANGE_S)
        self.assert_one_world(records, 3)

        # Its launcher killed outright: its worker dies with it, and the others
        # go on at 2 once its heartbeats are missed (5 s here).
        c.send_signal(signal.SIGKILL)
        c.wait()
        left = time.monotonic()
        _, records = self._wait_for_round(2, after=second)
        self.assertLess(time.monotonic() - left, CHANGE_S)
        self.assert_one_world(records, 2)
        self._finish(a, b)

    def test_a_launcher_stopped_with_sigterm_leaves_at_once(self):
        a = self._start_master()
        b = self._start()
        c = self._start()
        first, records = self._wait_for_round(3)
        self.assert_one_world(records, 3)
        c.send_signal(signal.SIGTERM)
        c.communicate(timeout=30)
        _, records = self._wait_for_round(2, after=first)
        self.assert_one_world(records, 2)
        self._finish(a, b)

    def test_a_failed_worker_restarts_every_node(self):
        env = {"ELASTIC_FAIL": "1", "ELASTIC_FAIL_ROUNDS": "1"}
        a = self._start_master("--max_restarts=2", env=env)
        b = self._start("--max_restarts=2", env=env)
        # Rank 1 exits 3 in round 0 (perhaps before rank 0 even started); both
        # nodes start again together in the next round.
        _, records = self._wait_for_round(2, after=0)
        self.assert_one_world(records, 2)
        self.assertIn((0, 1), {(r["round"], r["rank"]) for r in self._records()})
        self.assertIn("rank 1 (node 1, local rank 0, pid ", self._finish(a, b))

    def test_failures_past_max_restarts_end_the_job_on_every_node(self):
        env = {"ELASTIC_FAIL": "1"}
        a = self._start_master("--max_restarts=1", env=env)
        b = self._start("--max_restarts=1", env=env)
        outputs = [p.communicate(timeout=90) for p in (a, b)]
        self.assertEqual([a.returncode, b.returncode], [3, 3], outputs)

    def test_a_rendezvous_without_min_nodes_names_who_is_there(self):
        a = self._start("--rendezvous_timeout_s=3")
        _, stderr = a.communicate(timeout=60)
        self.assertEqual(a.returncode, 1, stderr[-3000:])
        self.assertRegex(
            stderr,
            r"tfscale-launch: rendezvous at 127\.0\.0\.1:\d+: no round with this node after "
            r"3s; 1 node\(s\) there, 2 needed: \S+-\d+ \(127\.0\.0\.1\)",
        )


def _ready(*clients):
    """Each client says it is ready for the current round (as its launcher would)."""
    number = clients[0].call("status")["round"]["number"]
    for client in clients:
        client.call("ready", round=number)


class RendezvousTest(absltest.TestCase):
    def test_rounds_follow_members(self):
        port = testutil.free_port()
        server = elastic.Rendezvous("127.0.0.1", port, 2, 3, heartbeat_timeout_s=60, settle_s=0)
        self.addCleanup(server.close)
        a, b, c, d = (elastic.RendezvousClient("127.0.0.1", port, n) for n in "abcd")
        a.call("join")
        self.assertIsNone(a.call("status")["round"])  # 1 of MIN=2
        b.call("join")
        _wait_until(lambda: a.call("status")["round"] is not None)
        _ready(b)  # a says so itself; the round starts only once both did
        found, _ = a.wait_for_round(-1, timeout_s=10)
        self.assertEqual((found.number, found.nodes), (0, ("a", "b")))
        c.call("join")
        d.call("join")  # over MAX: waits outside the round
        _wait_until(lambda: c.call("status")["round"]["number"] == 1)
        _ready(a, b)
        found, _ = c.wait_for_round(0, timeout_s=10)
        self.assertEqual(found.nodes, ("a", "b", "c"))
        self.assertIsNone(found.rank("d"))
        b.call("leave")
        _wait_until(lambda: d.call("status")["round"]["number"] == 2)
        _ready(a, c)
        found, _ = d.wait_for_round(found.number, timeout_s=10)
        self.assertEqual(found.nodes, ("a", "c", "d"))  # d moves up, ranks in arrival order
        self.assertEqual(found.rank("d"), 2)

    def test_a_failure_is_a_new_round_of_the_same_nodes(self):
        port = testutil.free_port()
        server = elastic.Rendezvous("127.0.0.1", port, 1, 2, heartbeat_timeout_s=60, settle_s=0)
        self.addCleanup(server.close)
        a = elastic.RendezvousClient("127.0.0.1", port, "a")
        found, _ = a.wait_for_round(-1, timeout_s=10)
        a.call("failed", round=found.number)
        again, state = a.wait_for_round(found.number, timeout_s=10)
        self.assertEqual((again.number, again.nodes, state["failures"]), (1, ("a",), 1))
        a.call("failed", round=found.number)  # a stale report: no new round
        self.assertEqual(a.call("status")["round"]["number"], 1)

    def test_bad_sizes_and_requests_are_named(self):
        with self.assertRaisesRegex(ValueError, r"1 <= MIN <= MAX.*min_nodes=3, max_nodes=2"):
            elastic.Rendezvous("127.0.0.1", testutil.free_port(), 3, 2)
        port = testutil.free_port()
        server = elastic.Rendezvous("127.0.0.1", port, 1, 1)
        self.addCleanup(server.close)
        with self.assertRaisesRegex(RuntimeError, "unknown op 'jump'"):
            elastic.RendezvousClient("127.0.0.1", port, "a").call("jump")


def _wait_until(condition, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s}s")
        time.sleep(0.05)


class ParseNnodesTest(absltest.TestCase):
    def test_values(self):
        self.assertEqual(launch_main.parse_nnodes("4"), (4, None))
        self.assertEqual(launch_main.parse_nnodes("2:4"), (2, 4))
        for bad in ("0", "3:2", "a", "1:2:3", ""):
            with self.assertRaisesRegex(ValueError, "--nnodes must be N or MIN:MAX"):
                launch_main.parse_nnodes(bad)


if __name__ == "__main__":
    absltest.main()
