"""Tests for `--help` of the tfscale binaries (tfscale/cli.py), run as real processes.

Only the two `tfscale-train` runs import TensorFlow (a few seconds each); the
launcher, the dispatcher and the serving router start without it, which one
test checks.
"""

import os
import re
import subprocess
import sys
from typing import NamedTuple
from typing import Optional

from absl.testing import absltest
from absl.testing import parameterized

from tfscale import cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The console scripts sit beside the interpreter of the virtualenv that installed them.
SCRIPTS = os.path.dirname(sys.executable)
ABSL_STUB = "Try --helpfull to get a list of all flags."
# `python -m MODULE` for each console script.
MODULES = {
    "tfscale-launch": "tfscale.launch",
    "tfscale-dispatcher": "tfscale.data.dispatcher",
    "tfscale-train": "tfscale.train",
    "tfscale-plan": "tfscale.train.plan_main",
    "tfscale-serve": "tfscale.serve",
}


class Help(NamedTuple):
    """What one command's `--help` must show.

    Attributes:
      argv: the command line, console script first.
      usage: a line of the usage text.
      example: the start of an example command.
      shown: flags listed, by name, with their default (None: listed without one).
      hidden: flags not listed: another command's, or absl's own.
    """

    argv: list[str]
    usage: str
    example: str
    shown: dict[str, Optional[str]]
    hidden: list[str]


TOOLS = {
    "launch": Help(
        argv=["tfscale-launch", "--help"],
        usage="Usage: tfscale-launch [flags] -- COMMAND [ARGS ...]",
        example="tfscale-launch --nproc_per_node=2",
        shown={
            "nproc_per_node": "1",
            "master_port": "29500",
            "log_ranks": "0",
            "name": "tfscale",
            "emit": None,
            "log_dir": None,  # absl's, with a default from the environment
        },
        hidden=["port", "flagfile"],
    ),
    "dispatcher": Help(
        argv=["tfscale-dispatcher", "--help"],
        usage="Usage: tfscale-dispatcher serve|status [flags]",
        example="tfscale-dispatcher status --address=127.0.0.1:40123",
        shown={"port": "0", "policy": "round_robin", "address": None},
        hidden=["flagfile", "nproc_per_node"],
    ),
    "dispatcher_serve": Help(
        argv=["tfscale-dispatcher", "serve", "--help"],
        usage="Usage: tfscale-dispatcher serve [--port=0]",
        example="tfscale-dispatcher serve --port=0 --work_dir=/tmp/dispatcher",
        shown={
            "port": "0",
            "host": "127.0.0.1",
            "policy": "round_robin",
            "lease_timeout_s": "30.0",
            "snapshot_interval": "10000",
            "shards": None,
        },
        hidden=["address", "tls_root_cert_file", "flagfile"],
    ),
    "dispatcher_status": Help(
        argv=["tfscale-dispatcher", "status", "-h"],
        usage="Usage: tfscale-dispatcher status --address=HOST:PORT",
        example="tfscale-dispatcher status --address=127.0.0.1:40123",
        shown={"address": None, "auth_token_file": None, "tls_root_cert_file": None},
        hidden=["port", "shards", "flagfile"],
    ),
    "serve": Help(
        argv=["tfscale-serve", "serve", "--help"],
        usage="Usage: tfscale-serve [serve] --model=PATH [--replicas=N] [flags]",
        example="tfscale-serve --model=/tmp/tfscale/smoke --replicas=2",
        shown={"model": None, "replicas": "1", "policy": "least_loaded", "max_batch_size": "32"},
        hidden=["address", "name", "flagfile"],
    ),
    "serve_replica": Help(
        argv=["tfscale-serve", "replica", "--help"],
        usage="Usage: tfscale-serve replica --model=PATH",
        example="tfscale-serve replica --model=/models/lenet",
        shown={"model": None, "name": "replica-0", "rest_port": "0", "max_queue_size": "1024"},
        hidden=["replicas", "policy", "address", "flagfile"],
    ),
    "serve_reload": Help(
        argv=["tfscale-serve", "reload", "-h"],
        usage="Usage: tfscale-serve reload --address=HOST:PORT",
        example="tfscale-serve reload --address=127.0.0.1:8500",
        shown={"address": None, "auth_token_file": None},
        hidden=["model", "replicas", "flagfile"],
    ),
    "train": Help(
        argv=["tfscale-train", "--help"],
        usage="Usage: tfscale-train --config=FILE[:variant] --workdir=DIR [--config.a.b=value ...]",
        example="tfscale-train --config=configs/default.py --workdir=/tmp/tfscale/default",
        shown={"config": None, "workdir": None},
        hidden=["flagfile", "port"],
    ),
    "plan": Help(
        argv=["tfscale-plan", "--help"],
        usage="Usage: tfscale-plan --config=FILE[:variant] [--config.a.b=value ...] [--json=PATH]",
        example="tfscale-plan --config=configs/transformer.py",
        shown={"config": None, "json": None},
        hidden=["workdir", "flagfile"],
    ),
}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.run(
        list(args), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _script(name: str) -> str:
    path = os.path.join(SCRIPTS, name)
    if not os.path.exists(path):
        raise absltest.SkipTest(f"{name} is not installed beside {sys.executable} (bazel)")
    return path


class HelpTest(parameterized.TestCase):
    def assert_help(self, result: subprocess.CompletedProcess, want: Help) -> None:
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn(ABSL_STUB, result.stdout)
        self.assertIn(want.usage, result.stdout)
        self.assertIn(want.example, result.stdout)
        for name, default in want.shown.items():
            # `  --name: help`, continuation lines, then `    (default: VALUE; ...)`.
            line = rf"^  --{name}: .*\n(?:      .*\n)*"
            if default is not None:
                line += rf"    \(default: {re.escape(default)}[;)]"
            self.assertRegex(result.stdout, re.compile(line, re.M), name)
        for name in want.hidden:
            self.assertNotRegex(result.stdout, re.compile(rf"^  --{name}:", re.M), name)

    @parameterized.named_parameters(
        (tool, tool)
        for tool in (
            "launch",
            "dispatcher",
            "dispatcher_serve",
            "dispatcher_status",
            "serve",
            "serve_replica",
            "serve_reload",
        )
    )
    def test_console_script(self, tool):
        want = TOOLS[tool]
        self.assert_help(_run(_script(want.argv[0]), *want.argv[1:]), want)

    @parameterized.named_parameters(
        ("launch", "launch", "-?"),
        ("dispatcher_serve", "dispatcher_serve", "--helpshort"),
        ("dispatcher_status", "dispatcher_status", "--help"),
        ("serve_replica", "serve_replica", "-h"),
    )
    def test_python_m(self, tool, help_flag):
        want = TOOLS[tool]
        args = [help_flag if arg.startswith("-") else arg for arg in want.argv[1:]]
        self.assert_help(_run(sys.executable, "-m", MODULES[want.argv[0]], *args), want)

    def test_train_python_m(self):
        want = TOOLS["train"]
        result = _run(sys.executable, "-m", MODULES[want.argv[0]], *want.argv[1:])
        self.assert_help(result, want)
        self.assertIn("`--config.a.b=value` overrides one field", " ".join(result.stdout.split()))

    def test_plan_python_m(self):
        want = TOOLS["plan"]
        result = _run(sys.executable, "-m", MODULES[want.argv[0]], "-h")
        self.assert_help(result, want)
        self.assertIn("  --[no]recalibrate: ", result.stdout)

    def test_train_console_script(self):
        want = TOOLS["train"]
        self.assert_help(_run(_script(want.argv[0]), "-h"), want)

    @parameterized.named_parameters(
        ("launch", ["tfscale-launch"], "Usage: tfscale-launch", "  --nproc_per_node: "),
        (
            "dispatcher_serve",
            ["-m", "tfscale.data.dispatcher", "serve"],
            "Usage: tfscale-dispatcher serve",
            "  --port: ",
        ),
    )
    def test_helpfull_adds_absl_flags(self, argv, usage, own_flag):
        command = [sys.executable, *argv] if argv[0] == "-m" else [_script(argv[0]), *argv[1:]]
        result = _run(*command, "--helpfull")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(usage, result.stdout)
        self.assertIn(own_flag, result.stdout)
        for absl_flag in ("--flagfile", "--undefok", "--[no]logtostderr", "--verbosity"):
            self.assertIn(absl_flag, result.stdout)

    @parameterized.named_parameters(
        ("launch", "tfscale.launch", ["--help"]),
        ("dispatcher", "tfscale.data.dispatcher", ["serve", "--help"]),
        ("serve", "tfscale.serve", ["--help"]),
    )
    def test_help_does_not_import_tensorflow(self, module, args):
        code = (
            "import atexit, runpy, sys\n"
            "atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules))\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__')\n"
        )
        result = _run(sys.executable, "-c", code)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("flags:", result.stdout)
        self.assertEqual(result.stdout.splitlines()[-1], "tensorflow imported: False")


class HelpRequestTest(parameterized.TestCase):
    @parameterized.parameters(
        (["--help"], "help"),
        (["-h"], "help"),
        (["-?"], "help"),
        (["--helpshort"], "help"),
        (["serve", "--port=0", "-help"], "help"),
        (["--helpfull"], "helpfull"),
        (["--nproc_per_node=2"], None),
        # After `--` comes the launched command, whose own --help it is.
        (["--nproc_per_node=2", "--", "tfscale-train", "--help"], None),
    )
    def test_help_request(self, args, want):
        self.assertEqual(cli.help_request(["prog", *args]), want)

    def test_format_help_picks_the_named_command(self):
        usage = cli.Usage("Usage: tool COMMAND\n\nExample:\n\n```\ntool a\n```\n")
        commands = {"a": cli.Usage("Usage: tool a"), "b": cli.Usage("Usage: tool b")}
        self.assertEqual(
            cli.format_help(["tool", "--help", "b"], usage, commands),
            "Usage: tool b\n\n--helpfull lists every flag, absl's own included.\n",
        )
        self.assertEqual(
            cli.format_help(["tool", "--help"], usage, commands),
            "Usage: tool COMMAND\n\nExample:\n\ntool a\n\n"
            "--helpfull lists every flag, absl's own included.\n",
        )


if __name__ == "__main__":
    absltest.main()
