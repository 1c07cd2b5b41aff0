"""Tests for tfscale.strategies.cluster: TF_CONFIG, Slurm, Kubernetes, host lists."""

import json

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.strategies import cluster


def _tf_config(workers=("a:1", "b:2"), index=1, task_type="worker", **extra):
    return json.dumps(
        {"cluster": {"worker": list(workers), **extra}, "task": {"type": task_type, "index": index}}
    )


class TfConfigTest(parameterized.TestCase):
    def test_workers_and_index(self):
        parsed = cluster.from_tf_config(_tf_config())
        self.assertEqual(parsed, cluster.Cluster(("a:1", "b:2"), 1))
        self.assertFalse(parsed.is_chief)
        self.assertEqual(json.loads(_tf_config()), parsed.tf_config())

    def test_chief_becomes_worker_zero(self):
        parsed = cluster.from_tf_config(_tf_config(index=0, chief=["c:3"]))
        self.assertEqual(parsed.workers, ("c:3", "a:1", "b:2"))
        self.assertEqual(parsed.task_index, 1)

    def test_unset_is_none(self):
        self.assertIsNone(cluster.from_tf_config(""))

    @parameterized.parameters(
        dict(value="{not json", match="TF_CONFIG is not valid JSON"),
        dict(
            value=json.dumps({"task": {"type": "worker", "index": 0}}),
            match="TF_CONFIG.cluster is missing",
        ),
        dict(value=json.dumps({"cluster": {"worker": ["a:1"]}}), match="TF_CONFIG.task is missing"),
        dict(
            value=_tf_config(index="0"), match="TF_CONFIG.task.index must be a int. Received: '0'"
        ),
        dict(
            value=_tf_config(index=2),
            match=r"TF_CONFIG.task.index must be in \[0, 2\) for job 'worker'. Received: 2",
        ),
        dict(
            value=_tf_config(task_type="ps"),
            match=r"TF_CONFIG.task.type must be one of \['worker'\]",
        ),
        dict(value=_tf_config(ps=["p:1"]), match="parameter servers are not supported"),
        dict(
            value=_tf_config(workers=("nohost",), index=0),
            match="Worker addresses must be host:port. Received: 'nohost'",
        ),
        dict(value=_tf_config(workers=("a:1", "a:1"), index=0), match="must be distinct"),
        dict(
            value=json.dumps(
                {"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}
            ),
            match="TF_CONFIG.cluster.worker must be a list of host:port",
        ),
    )
    def test_malformed_names_the_field(self, value, match):
        with self.assertRaisesRegex(ValueError, match):
            cluster.from_tf_config(value)


class SlurmTest(parameterized.TestCase):
    @parameterized.parameters(
        ("node[01-03],gpu7", ["node01", "node02", "node03", "gpu7"]),
        ("n[1,4-5]", ["n1", "n4", "n5"]),
        ("single", ["single"]),
    )
    def test_expand_nodelist(self, nodelist, hosts):
        self.assertEqual(cluster.expand_nodelist(nodelist), hosts)

    def test_two_tasks_per_node(self):
        env = {
            "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "4",
            "SLURM_NTASKS_PER_NODE": "2(x2)",
            "TFSCALE_PORT": "4000",
        }
        parsed = cluster.from_slurm(env)
        self.assertEqual(parsed.workers, ("n1:4000", "n1:4001", "n2:4000", "n2:4001"))
        self.assertEqual(parsed.task_index, 3)

    def test_outside_slurm(self):
        self.assertIsNone(cluster.from_slurm({}))


class KubernetesTest(absltest.TestCase):
    def test_indexed_job(self):
        env = {
            "JOB_COMPLETION_INDEX": "2",
            "TFSCALE_NUM_WORKERS": "3",
            "TFSCALE_JOB_NAME": "train",
            "TFSCALE_SERVICE": "train-workers",
        }
        parsed = cluster.from_kubernetes(env)
        self.assertEqual(parsed.workers, tuple(f"train-{i}.train-workers:29500" for i in range(3)))
        self.assertEqual(parsed.task_index, 2)

    def test_missing_variables(self):
        with self.assertRaisesRegex(ValueError, "without TFSCALE_NUM_WORKERS, TFSCALE_JOB_NAME"):
            cluster.from_kubernetes({"JOB_COMPLETION_INDEX": "0", "TFSCALE_SERVICE": "s"})


class ResolveTest(absltest.TestCase):
    def test_auto_prefers_tf_config_then_slurm(self):
        slurm = {"SLURM_JOB_NODELIST": "n1", "SLURM_PROCID": "0"}
        self.assertEqual(
            cluster.resolve("auto", {**slurm, "TF_CONFIG": _tf_config()}).workers, ("a:1", "b:2")
        )
        self.assertEqual(cluster.resolve("auto", slurm).workers, ("n1:29500",))
        self.assertIsNone(cluster.resolve("auto", {}))

    def test_named_source_must_be_present(self):
        with self.assertRaisesRegex(
            ValueError, "cluster='kubernetes', but its environment variables are not set"
        ):
            cluster.resolve("kubernetes", {})

    def test_unknown_source(self):
        with self.assertRaisesRegex(
            ValueError, "Unknown cluster source 'mpi'. Valid sources: auto, tf_config"
        ):
            cluster.resolve("mpi", {})

    def test_hosts(self):
        self.assertEqual(cluster.from_hosts(["a", "b:7"], 1).workers, ("a:29500", "b:7"))


if __name__ == "__main__":
    absltest.main()
