"""Tests for tfscale-launch's output: whose lines the console shows, per-rank logs,
progress bars, and how a failed worker is reported."""

import io
import os
import pty
import subprocess
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.launch import local

# Rewrites one line 20 times as Keras does (backspaces, then a carriage return).
PROGRESS = (
    "import os, sys, time\n"
    "for i in range(1, 21):\n"
    "    sys.stdout.write('\\b' * 12 + '\\r' + f'step {i}/20'); sys.stdout.flush(); time.sleep(0.01)\n"
    "sys.stdout.write('\\n')\n"
)


def _launch(worker, **options):
    """Runs the launcher here on `python -c worker`; returns (exit code, console, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = local.launch(local.LaunchConfig(**options), [sys.executable, "-c", worker], out, err)
    return code, out.getvalue(), err.getvalue()


def _read(path):
    with open(path) as f:
        return f.read()


class ConsoleTest(parameterized.TestCase):
    def test_rank_0_only_by_default_and_every_rank_in_its_log(self):
        logs = self.create_tempdir().full_path
        code, out, _ = _launch(
            "import os; print('hello from', os.environ['TFSCALE_RANK'])",
            nproc_per_node=3,
            log_dir=logs,
        )
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            [
                f"[tfscale-launch] console: rank 0; every rank's output: {logs}/attempt<k>/rank<N>.log",
                "[0] hello from 0",
            ],
        )
        for rank in range(3):
            log = os.path.join(logs, "attempt0", f"rank{rank}.log")
            self.assertEqual(_read(log), f"hello from {rank}\n")

    def test_without_log_dir_hidden_ranks_go_to_a_temporary_directory(self):
        _, out, _ = _launch(
            "import os; print('rank', os.environ['TFSCALE_RANK'])", nproc_per_node=2
        )
        logs = out.split("every rank's output: ")[1].split("/attempt<k>")[0]
        self.addCleanup(lambda: subprocess.run(["rm", "-r", logs], check=True))
        self.assertEqual(_read(os.path.join(logs, "attempt0", "rank1.log")), "rank 1\n")

    @parameterized.parameters(((1, 2), ["[1] 1", "[2] 2"]), (None, ["[0] 0", "[1] 1", "[2] 2"]))
    def test_log_ranks_chooses_the_console(self, ranks, want):
        _, out, _ = _launch(
            "import os; print(os.environ['TFSCALE_RANK'])", nproc_per_node=3, log_ranks=ranks
        )
        self.assertEqual(sorted(l for l in out.splitlines() if not l.startswith("[tfscale")), want)

    def test_log_ranks_all_writes_no_files_unless_asked(self):
        _, out, _ = _launch("print('x')", nproc_per_node=2, log_ranks=None)
        self.assertNotIn("[tfscale-launch]", out)

    def test_the_command_line_writes_no_files_unless_log_dir_is_given(self):
        # absl's --log_dir defaults to $TEST_TMPDIR, which test runners set.
        with mock.patch.dict(os.environ, {"TEST_TMPDIR": self.create_tempdir().full_path}):
            result = testutil.run_module(
                "tfscale.launch",
                "--nproc_per_node=2",
                "--log_ranks=all",
                "--",
                sys.executable,
                "-c",
                "print('x')",
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(sorted(result.stdout.splitlines()), ["[0] x", "[1] x"])

    def test_a_rewritten_line_is_printed_once_off_a_terminal(self):
        logs = self.create_tempdir().full_path
        code, out, _ = _launch(PROGRESS + "print('windows line\\r')", log_dir=logs)
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[1:], ["[0] step 20/20", "[0] windows line"])
        self.assertEqual(
            _read(os.path.join(logs, "attempt0", "rank0.log")), "step 20/20\nwindows line\n"
        )

    def test_a_keras_progress_bar_is_one_line_per_epoch_off_a_terminal(self):
        keras_fit = (
            "import numpy as np, keras\n"
            "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])\n"
            "model.compile('sgd', 'mse')\n"
            "model.fit(np.ones((640, 4)), np.ones((640, 1)), batch_size=8, epochs=2, verbose=1)\n"
        )
        code, out, err = _launch(keras_fit)
        self.assertEqual(code, 0, err)
        bars = [l for l in out.splitlines() if "/80" in l]
        self.assertLen(bars, 2, out)  # the final state of each epoch's bar
        self.assertTrue(all("80/80" in l for l in bars), bars)
        self.assertLen([l for l in out.splitlines() if "loss:" in l], 2, out)

    def test_a_rewritten_line_is_updated_in_place_on_a_terminal(self):
        master, slave = pty.openpty()
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tfscale.launch",
                "--",
                sys.executable,
                "-c",
                PROGRESS + "print('bye')",
            ],
            cwd=testutil.REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=testutil.REPO_ROOT),
            stdout=slave,
            stderr=subprocess.PIPE,
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the launcher closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        self.assertEqual(launcher.wait(timeout=60), 0, launcher.stderr.read())
        screen = b"".join(chunks).decode()
        # The terminal turns \n into \r\n; every update of the bar is on one terminal line.
        lines = [l for l in screen.split("\n") if "step" in l]
        self.assertLen(lines, 1, repr(screen))
        self.assertGreater(lines[0].count("\r\x1b[K[0] step "), 5)
        self.assertTrue(lines[0].endswith("[0] step 20/20\r"), repr(lines[0]))
        self.assertIn("[0] bye", screen)


class FailureTest(absltest.TestCase):
    def test_a_hidden_ranks_failure_shows_its_last_lines_on_stderr(self):
        logs = self.create_tempdir().full_path
        worker = (
            "import os\n"
            "if os.environ['TFSCALE_RANK'] == '1':\n"
            "    print('\\n'.join(f'line {i}' for i in range(100)), flush=True); 1 / 0\n"
        )
        code, out, err = _launch(worker, nproc_per_node=2, log_dir=logs)
        self.assertEqual(code, 1)
        self.assertNotIn("[1]", out)
        log = os.path.join(logs, "attempt0", "rank1.log")
        self.assertRegex(
            err,
            r"^\[tfscale-launch\] rank 1 \(local rank 1, pid \d+\) failed with exit code 1; "
            r"giving up after 0 of 0 restarts\n"
            rf"\[tfscale-launch\] last {local.TAIL_LINES} lines of rank 1 \(all of it: {log}\):\n",
        )
        self.assertIn("[1] ZeroDivisionError: division by zero\n", err)
        self.assertNotIn("[1] line 50\n", err)
        self.assertIn("line 50\n", _read(log))

    def test_a_shown_ranks_failure_is_named_without_repeating_its_lines(self):
        code, out, err = _launch("print('oops'); raise SystemExit(5)", nproc_per_node=1)
        self.assertEqual(code, 5)
        self.assertIn("[0] oops", out)
        self.assertIn("failed with exit code 5; giving up after 0 of 0 restarts", err)
        self.assertNotIn("[0] oops", err)

    def test_a_killed_worker_is_named_with_its_signal_and_restart(self):
        logs = self.create_tempdir().full_path
        worker = (
            "import os, signal, time\n"
            "print('attempt', os.environ['TFSCALE_RESTART'], flush=True)\n"
            "if os.environ['TFSCALE_RANK'] == '1': os.kill(os.getpid(), signal.SIGKILL)\n"
            "time.sleep(60)\n"
        )
        code, _, err = _launch(worker, nproc_per_node=2, max_restarts=1, log_dir=logs)
        self.assertEqual(code, 137)
        self.assertRegex(
            err,
            r"rank 1 \(local rank 1, pid \d+\) failed with exit code 137 \(killed by SIGKILL\); "
            r"restarting the worker group \(restart 1 of 1\)\n",
        )
        self.assertIn(
            "failed with exit code 137 (killed by SIGKILL); giving up after 1 of 1 restarts", err
        )
        # A restart keeps the previous attempt's logs.
        for attempt in range(2):
            log = os.path.join(logs, f"attempt{attempt}", "rank1.log")
            self.assertEqual(_read(log), f"attempt {attempt}\n")

    def test_an_exit_code_of_128_plus_a_signal_names_it(self):
        _, _, err = _launch("raise SystemExit(143)")
        self.assertIn("failed with exit code 143 (128 + SIGTERM)", err)

    def test_a_node_of_several_names_its_node(self):
        code, _, err = _launch(
            "import os, time; rank = int(os.environ['TFSCALE_RANK']); time.sleep(60 * (rank == 3)); "
            "raise SystemExit(rank)",
            nproc_per_node=2,
            nnodes=2,
            node_rank=1,
            node_hosts=("127.0.0.1", "127.0.0.1"),
            master_port=testutil.free_port(),
            log_ranks=(3,),
        )
        self.assertEqual(code, 2)
        self.assertIn("rank 2 (node 1, local rank 0, pid ", err)


class ConfigTest(absltest.TestCase):
    def test_parse_ranks(self):
        self.assertIsNone(local.parse_ranks("all"))
        self.assertEqual(local.parse_ranks("0"), (0,))
        self.assertEqual(local.parse_ranks("0, 2"), (0, 2))
        with self.assertRaisesRegex(
            ValueError, "log_ranks must be 'all' or comma-separated ranks. Received: 'x'"
        ):
            local.parse_ranks("x")

    def test_log_ranks_beyond_the_world(self):
        with self.assertRaisesRegex(
            ValueError, r"log_ranks must be ranks in \[0, 2\). Received: log_ranks=\[2\]"
        ):
            local.LaunchConfig(nproc_per_node=2, log_ranks=(2,))

    def test_bad_log_ranks_flag(self):
        result = testutil.run_module("tfscale.launch", "--log_ranks=first", "--", "true")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "log_ranks must be 'all' or comma-separated ranks. Received: 'first'", result.stderr
        )


if __name__ == "__main__":
    absltest.main()
