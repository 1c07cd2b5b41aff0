"""Tests for tfscale.data.identity: worker names from TF_CONFIG, Slurm, Kubernetes."""

import json
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data import identity


def _tf_config(task_type="worker", index=2, chief=None):
    cluster = {"worker": ["a:1", "b:2", "c:3"]}
    if chief:
        cluster["chief"] = list(chief)
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


_SLURM = {
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2(x2)",
}
_KUBERNETES = {
    "JOB_COMPLETION_INDEX": "1",
    "TFSCALE_NUM_WORKERS": "3",
    "TFSCALE_JOB_NAME": "train",
    "TFSCALE_SERVICE": "train-workers",
}


class WorkerNameTest(parameterized.TestCase):
    def test_tf_config_worker(self):
        self.assertEqual(identity.worker_name({"TF_CONFIG": _tf_config(index=2)}), "worker-2")

    def test_tf_config_keeps_the_task_type(self):
        # The resolved Cluster folds the chief into worker 0 and shifts the
        # workers by one; the name keeps TF_CONFIG's own type and index.
        env = {"TF_CONFIG": _tf_config("chief", 0, chief=["x:9"])}
        self.assertEqual(identity.worker_name(env), "chief-0")
        env = {"TF_CONFIG": _tf_config("worker", 0, chief=["x:9"])}
        self.assertEqual(identity.worker_name(env), "worker-0")

    def test_slurm(self):
        self.assertEqual(identity.worker_name(_SLURM), "worker-3")

    def test_kubernetes_indexed_job(self):
        self.assertEqual(identity.worker_name(_KUBERNETES), "worker-1")

    def test_no_cluster(self):
        self.assertEqual(identity.worker_name({}), "worker-0")
        self.assertEqual(identity.worker_name({"TF_CONFIG": "  "}), "worker-0")

    def test_distinct_per_task(self):
        names = {identity.worker_name({**_SLURM, "SLURM_PROCID": str(i)}) for i in range(4)}
        self.assertLen(names, 4)

    def test_tf_config_before_slurm_unless_named(self):
        env = {**_SLURM, "TF_CONFIG": _tf_config(index=1)}
        self.assertEqual(identity.worker_name(env), "worker-1")
        self.assertEqual(identity.worker_name(env, cluster="slurm"), "worker-3")
        self.assertEqual(identity.worker_name(env, cluster="tf_config"), "worker-1")

    @parameterized.parameters("worker-7", "eval_a", "host.example:0", "x" * 128)
    def test_override(self, name):
        env = {**_SLURM, "TF_CONFIG": _tf_config(), identity.ENV_VAR: name}
        self.assertEqual(identity.worker_name(env), name)

    @parameterized.parameters("", "two words", "tab\there", "x" * 129)
    def test_bad_override(self, name):
        with self.assertRaisesRegex(ValueError, "TFSCALE_WORKER_NAME must be a non-empty") as e:
            identity.worker_name({identity.ENV_VAR: name})
        self.assertIn(f"Received: TFSCALE_WORKER_NAME={name!r}", str(e.exception))

    @parameterized.parameters(
        dict(
            env={"JOB_COMPLETION_INDEX": "0", "TFSCALE_SERVICE": "s"},
            match="Kubernetes Indexed Job without TFSCALE_NUM_WORKERS, TFSCALE_JOB_NAME",
        ),
        dict(env={**_SLURM, "SLURM_PROCID": "4"}, match=r"task_index must be in \[0, 4\)"),
        dict(env={"TF_CONFIG": "{not json"}, match="TF_CONFIG is not valid JSON"),
        dict(
            env={},
            cluster="slurm",
            match="cluster='slurm', but its environment variables are not set",
        ),
        dict(env={}, cluster="mpi", match="Unknown cluster source 'mpi'"),
    )
    def test_malformed_environment_propagates(self, env, match, cluster="auto"):
        with self.assertRaisesRegex(ValueError, match):
            identity.worker_name(env, cluster=cluster)

    def test_does_not_import_tensorflow(self):
        code = (
            "import sys; from tfscale.data import identity; identity.worker_name({}); "
            "sys.exit('tensorflow' in sys.modules)"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    absltest.main()
