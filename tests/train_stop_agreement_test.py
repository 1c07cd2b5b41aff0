"""`preemption.StopAgreement`: every worker stops after one agreed step."""

import os
import subprocess
import sys

from absl.testing import absltest

from tests import testutil
from tfscale.train import preemption

_WORKER = os.path.join(testutil.REPO_ROOT, "tests", "stop_agreement_worker.py")


def _run_workers(propose_at, late=()):
    """Runs two lockstep workers; worker i proposes after step propose_at[i]
    (the workers in `late` only after the other ended its fit)."""
    addresses = ",".join(f"127.0.0.1:{testutil.free_port()}" for _ in propose_at)
    env = dict(os.environ, PYTHONPATH=testutil.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    processes = [
        subprocess.Popen(
            [sys.executable, _WORKER, str(i), addresses, str(at)] + (["late"] if i in late else []),
            cwd=testutil.REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, at in enumerate(propose_at)
    ]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=120)
        finally:
            process.kill()
        results.append((process.returncode, out.strip(), err))
    return results


class OneWorkerTest(absltest.TestCase):
    def test_stops_at_the_boundary_where_the_signal_is_seen(self):
        agreement = preemption.StopAgreement()
        agreement.begin()
        self.assertFalse(agreement.should_stop(7))
        agreement.propose(7)
        agreement.propose(9)  # a second proposal changes nothing
        self.assertEqual(agreement.stop_step, 7)
        self.assertTrue(agreement.should_stop(7))
        agreement.end()
        agreement.begin()  # a new fit: nothing agreed yet
        self.assertIsNone(agreement.stop_step)
        self.assertFalse(agreement.should_stop(100))

    def test_several_workers_without_a_coordination_service_stop_alone(self):
        # A TPU slice: several hosts, one client process and no coordination service.
        agreement = preemption.StopAgreement(num_workers=4)
        agreement.begin()
        agreement.propose(3)
        self.assertTrue(agreement.should_stop(3))
        agreement.end()

    def test_bad_arguments(self):
        with self.assertRaisesRegex(
            ValueError, "num_workers must be >= 1. Received: num_workers=0"
        ):
            preemption.StopAgreement(num_workers=0)
        with self.assertRaisesRegex(ValueError, "ack_timeout_s must be > 0"):
            preemption.StopAgreement(ack_timeout_s=0)


class TwoWorkersTest(absltest.TestCase):
    def test_a_proposal_by_one_worker_stops_both_after_the_next_step(self):
        results = _run_workers([-1, 5])
        for code, out, err in results:
            self.assertEqual(code, 0, err[-3000:])
        self.assertEqual([out for _, out, _ in results], ["stopped 6", "stopped 6"])

    def test_the_first_of_two_proposals_wins(self):
        results = _run_workers([3, 8])
        for code, out, err in results:
            self.assertEqual(code, 0, err[-3000:])
        self.assertEqual([out for _, out, _ in results], ["stopped 4", "stopped 4"])

    def test_proposals_at_the_same_step_agree_too(self):
        results = _run_workers([5, 5])
        for code, out, err in results:
            self.assertEqual(code, 0, err[-3000:])
        self.assertEqual([out for _, out, _ in results], ["stopped 6", "stopped 6"])

    def test_a_proposal_after_the_others_ended_the_fit_does_not_wait(self):
        results = _run_workers([-1, -1], late=(1,))
        for code, out, err in results:
            self.assertEqual(code, 0, err[-3000:])
        self.assertEqual(results[0][1], "finished")
        took, finished = results[1][1].splitlines()
        self.assertEqual(finished, "finished")
        # Not the 30 s acknowledgement timeout.
        self.assertLess(float(took.split()[-2]), 5.0, took)

    def test_without_a_proposal_both_finish_and_end_returns(self):
        results = _run_workers([-1, -1])
        for code, out, err in results:
            self.assertEqual(code, 0, err[-3000:])
        self.assertEqual([out for _, out, _ in results], ["finished", "finished"])


if __name__ == "__main__":
    absltest.main()
