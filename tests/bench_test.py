"""Every benchmark script runs from a fresh checkout (tiny settings) and writes
its JSON and plot; the figures themselves are not asserted (they are timings)."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

# name -> (script, quick flags, keys results.json must have, plot file)
BENCHMARKS = {
    "wrapper_overhead": (
        "wrapper_overhead.py",
        ["--rounds=2", "--steps=5", "--warmup_steps=3", "--examples=512"],
        ["per_round", "median_ratio", "target_met"],
        "wrapper_overhead.png",
    ),
    "steps_per_execution": (
        "steps_per_execution.py",
        ["--rounds=1", "--steps=16", "--models=lenet", "--values=1,4", "--examples=256"],
        ["per_round", "median_mirrored_over_one_device", "median_speedup_over_n1"],
        "steps_per_execution.png",
    ),
    "dtensor_sharding": (
        "dtensor_sharding.py",
        [
            "--rounds=1",
            "--steps=3",
            "--model_sizes=1,4",
            "--model_dim=16",
            "--mlp_dim=32",
            "--num_layers=1",
        ],
        ["setups"],
        "dtensor_sharding.png",
    ),
    "balance_skew": (
        "balance_skew.py",
        ["--quick", "--shard_counts=64", "--elements=512", "--cost_ms=0.5"],
        ["cases", "adaptive_worst_ratio", "target_met"],
        "balance_skew.png",
    ),
    "faults": (
        "faults.py",
        ["--quick", "--systems=tfscale,tf.data"],
        ["summary", "journal_restart"],
        "faults.png",
    ),
    "input_throughput": (
        "input_throughput.py",
        ["--quick", "--datasets=synthetic", "--consumers=1"],
        ["summary"],
        "input_throughput.png",
    ),
    "dispatched_training": (
        "dispatched_training.py",
        ["--rounds=1", "--epochs=2", "--max_train_examples=4096"],
        ["rounds", "summary"],
        "dispatched_training.png",
    ),
    "dispatcher_grant_rate": (
        "dispatcher_grant_rate.py",
        ["--clients=1,4", "--shards_per_call=8", "--seconds=0.5", "--repeats=1", "--splits=2000"],
        ["tfscale", "tf_data_service"],
        "dispatcher_grant_rate.png",
    ),
    "planner": (
        "planner.py",
        ["--device_counts=2", "--models=tiny_mlp", "--rounds=1", "--steps=2"],
        ["summary", "workers"],
        "planner.png",
    ),
    "elastic": (
        "elastic.py",
        ["--repeats=1", "--epochs=4", "--epochs_per_phase=1", "--steps_per_epoch=40"],
        ["join", "leave", "runs", "targets"],
        "elastic.png",
    ),
    "serving": (
        "serving.py",
        ["--quick", "--json_name=results.json", "--setups=single_batching,slow_least_loaded"],
        ["per_round", "medians", "summary"],
        "serving.png",
    ),
}


class BenchmarkScriptsTest(parameterized.TestCase):
    @parameterized.named_parameters((name, name) for name in BENCHMARKS)
    def test_quick_run_writes_results_and_plot(self, name):
        script, flags, keys, plot = BENCHMARKS[name]
        out = self.create_tempdir().full_path
        env = dict(os.environ, PYTHONPATH=testutil.REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(
            [
                sys.executable,
                os.path.join(testutil.REPO_ROOT, "tools", "bench", script),
                f"--out={out}",
                *flags,
            ],
            cwd=testutil.REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        for key in keys:
            self.assertIn(key, results)
        self.assertGreater(os.path.getsize(os.path.join(out, plot)), 1000)


if __name__ == "__main__":
    absltest.main()
