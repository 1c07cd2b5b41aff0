"""Tests for emitted manifests: parsed, and the cluster each worker would compute."""

import yaml
from absl.testing import absltest

from tests import testutil
from tfscale.launch import manifests
from tfscale.strategies import cluster

COMMAND = ["tfscale-train", "--config=configs/default.py", "--workdir=/out",
           "--config.distribution.kind=multi_worker_mirrored"]


def _emit(*args):
    result = testutil.run_module("tfscale.launch", *args, "--", *COMMAND)
    if result.returncode:
        raise AssertionError(result.stderr[-2000:])
    return result.stdout


class KubernetesTest(absltest.TestCase):
    def test_headless_service_and_indexed_job(self):
        service, job = yaml.safe_load_all(
            _emit("--emit=kubernetes", "--nnodes=4", "--image=reg/train:1", "--name=mnist")
        )
        self.assertEqual((service["kind"], service["spec"]["clusterIP"]), ("Service", "None"))
        spec = job["spec"]
        self.assertEqual((spec["completionMode"], spec["completions"], spec["parallelism"]), ("Indexed", 4, 4))
        pod = spec["template"]["spec"]
        self.assertEqual(pod["subdomain"], service["metadata"]["name"])
        (container,) = pod["containers"]
        self.assertEqual((container["image"], container["command"]), ("reg/train:1", COMMAND))
        env = {e["name"]: e["value"] for e in container["env"]}
        for index in range(4):
            worker = cluster.from_kubernetes({**env, "JOB_COMPLETION_INDEX": str(index)})
            self.assertEqual(worker.workers, tuple(f"mnist-{i}.mnist:29500" for i in range(4)))
            self.assertEqual(worker.task_index, index)
            self.assertEqual(worker.tf_config()["task"], {"type": "worker", "index": index})


class TfJobTest(absltest.TestCase):
    def test_workers(self):
        job = yaml.safe_load(_emit("--emit=tfjob", "--nnodes=3", "--image=reg/train:1"))
        self.assertEqual((job["apiVersion"], job["kind"]), ("kubeflow.org/v1", "TFJob"))
        worker = job["spec"]["tfReplicaSpecs"]["Worker"]
        self.assertEqual(worker["replicas"], 3)
        self.assertEqual(worker["template"]["spec"]["containers"][0]["name"], "tensorflow")
        self.assertEqual(worker["template"]["spec"]["containers"][0]["command"], COMMAND)


class SlurmTest(absltest.TestCase):
    def test_sbatch_script(self):
        script = _emit("--emit=slurm", "--nnodes=2", "--nproc_per_node=2", "--master_port=4100")
        self.assertIn("#SBATCH --nodes=2", script)
        self.assertIn("#SBATCH --ntasks-per-node=2", script)
        self.assertIn("srun " + " ".join(COMMAND), script)
        env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)",
               "TFSCALE_PORT": script.split("TFSCALE_PORT=")[1].split()[0]}
        workers = [cluster.from_slurm({**env, "SLURM_PROCID": str(i)}) for i in range(4)]
        self.assertEqual(workers[3].workers, ("gpu07:4100", "gpu07:4101", "gpu08:4100", "gpu08:4101"))
        self.assertEqual([w.task_index for w in workers], [0, 1, 2, 3])


class ErrorsTest(absltest.TestCase):
    def test_missing_image_and_several_procs_per_pod(self):
        result = testutil.run_module("tfscale.launch", "--emit=kubernetes", "--nnodes=2", "--", "cmd")
        self.assertIn("A container image is needed: --image=IMAGE", result.stderr)
        result = testutil.run_module(
            "tfscale.launch", "--emit=tfjob", "--nnodes=2", "--image=i", "--nproc_per_node=2", "--", "cmd"
        )
        self.assertIn("runs one worker per pod: use --nproc_per_node=1", result.stderr)

    def test_unknown_format(self):
        with self.assertRaisesRegex(ValueError, "Unknown manifest format 'helm'. Valid formats: kubernetes"):
            manifests.emit("helm", 1, "i", ["c"])


if __name__ == "__main__":
    absltest.main()
