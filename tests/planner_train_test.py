"""`kind=auto` trains every config in configs/, and `tfscale-plan` prints the plan.

Each config's smoke variant trains one epoch in this process under the
plan's choice for this process's logical CPUs (`configs/mnist_tfds.py` on
`tfds.testing.mock_data`); `tfscale-plan` runs as a real process.
"""

import contextlib
import json
import math
import os

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import tensorflow_datasets as tfds  # noqa: E402

from tests.config_test import CONFIG_FILES  # noqa: E402
from tests.config_test import _load  # noqa: E402
from tfscale import planner  # noqa: E402
from tfscale.train import lib  # noqa: E402


class AutoTrainsEveryConfigTest(parameterized.TestCase):
    @parameterized.named_parameters((os.path.basename(p)[:-3], p) for p in CONFIG_FILES)
    def test_auto_kind_trains(self, path):
        config = _load(path).get_config("smoke")
        config.distribution.kind = "auto"
        config.devices.virtual_cpus = testutil.NUM_CPUS
        config.data.cache_dir = testutil.cache_dir()
        config.training.epochs = 1
        config.training.verbose = 0
        data = contextlib.nullcontext()
        if config.data.source.startswith("tfds:"):
            config.data.max_train_examples = None
            config.data.max_eval_examples = None
            data = tfds.testing.mock_data(num_examples=128)
        workdir = self.create_tempdir().full_path
        with data:
            metrics = lib.run(config, workdir)
        plan = metrics["plan"]
        self.assertEqual(metrics["kind"], plan["chosen"]["kind"])
        self.assertLen(plan["rows"], len(planner.candidates(testutil.NUM_CPUS)))
        self.assertEqual([h["epoch"] for h in metrics["history"]], [1])
        self.assertTrue(math.isfinite(metrics["history"][0]["loss"]))
        self.assertGreater(plan["measured"]["step_time_s"], 0)
        self.assertEqual(testutil.read_metrics(workdir)["plan"]["chosen"], plan["chosen"])


class PlanBinaryTest(absltest.TestCase):
    def test_prints_the_table_and_writes_the_json(self):
        out = os.path.join(self.create_tempdir().full_path, "plan.json")
        result = testutil.run_module(
            "tfscale.train.plan_main", "--config=configs/default.py:smoke", f"--json={out}"
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(out, encoding="utf-8") as f:
            plan = json.load(f)
        # configs/default.py splits the CPU in two: four candidates.
        descriptions = [row["description"] for row in plan["rows"]]
        self.assertEqual(descriptions, [c.description for c in planner.candidates(2)])
        for description in descriptions:
            self.assertIn(description, result.stdout)
        self.assertIn(f"chosen: {plan['chosen']['description']}, ", result.stdout)
        self.assertEqual(plan["global_batch_size"], 64)

    def test_a_budget_nothing_fits_is_one_line(self):
        result = testutil.run_module(
            "tfscale.train.plan_main",
            "--config=configs/default.py:smoke",
            "--config.distribution.memory_budget=1000",
        )
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("tfscale-plan:")]
        self.assertRegex(
            line,
            r"^tfscale-plan: error: config.distribution: No candidate fits the memory budget "
            r"of 1000 bytes .* the smallest need is \d+ bytes",
        )

    def test_an_unknown_field_is_one_line(self):
        result = testutil.run_module(
            "tfscale.train.plan_main",
            "--config=configs/default.py",
            "--config.distribution.memory_budgt=5",
        )
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertIn(
            "tfscale-plan: error: Unknown config field 'distribution.memory_budgt' in "
            "config.distribution; did you mean 'memory_budget'?",
            result.stderr,
        )


if __name__ == "__main__":
    absltest.main()
