"""Tests for emitted manifests: parsed, and what each worker's pod would see."""

import json
import os
import stat
import subprocess
import sys

import yaml
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.launch import manifests
from tfscale.strategies import cluster

COMMAND = [
    "tfscale-train",
    "--config=configs/default.py",
    "--workdir=/out",
    "--config.distribution.kind=multi_worker_mirrored",
]


def _emit(*args, command=COMMAND):
    result = testutil.run_module("tfscale.launch", *args, "--", *command)
    if result.returncode:
        raise AssertionError(result.stderr[-2000:])
    return result.stdout


def _by_kind(text):
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


def _env(container):
    return {e["name"]: e["value"] for e in container["env"]}


class KubernetesTest(parameterized.TestCase):
    def test_each_pod_resolves_its_place_in_the_cluster(self):
        docs = _by_kind(
            _emit("--emit=kubernetes", "--nnodes=4", "--image=reg/train:1", "--name=mnist")
        )
        service, job = docs["Service"], docs["Job"]
        self.assertEqual(service["spec"]["clusterIP"], "None")
        spec = job["spec"]
        self.assertEqual(
            (spec["completionMode"], spec["completions"], spec["parallelism"]), ("Indexed", 4, 4)
        )
        pod = spec["template"]["spec"]
        self.assertEqual(pod["subdomain"], service["metadata"]["name"])
        (container,) = pod["containers"]
        self.assertEqual((container["image"], container["command"]), ("reg/train:1", COMMAND))
        env = _env(container)
        (port,) = container["ports"]
        self.assertEqual(port["containerPort"], service["spec"]["ports"][0]["port"])
        for index in range(4):
            # The Job controller adds the index; pod i's host name is <job>-<i> in the subdomain.
            worker = cluster.resolve("auto", {**env, "JOB_COMPLETION_INDEX": str(index)})
            hosts = [f"{job['metadata']['name']}-{i}.{pod['subdomain']}" for i in range(4)]
            self.assertEqual(worker.workers, tuple(f"{h}:{port['containerPort']}" for h in hosts))
            self.assertEqual(worker.task_index, index)
            self.assertEqual(worker.tf_config()["task"], {"type": "worker", "index": index})

    def test_workdir_lives_on_an_emitted_claim(self):
        docs = _by_kind(
            _emit(
                "--emit=kubernetes",
                "--nnodes=2",
                "--image=i",
                "--volume_size=50Gi",
                "--storage_class=nfs",
            )
        )
        claim = docs["PersistentVolumeClaim"]
        self.assertEqual(claim["spec"]["resources"]["requests"]["storage"], "50Gi")
        self.assertEqual(claim["spec"]["storageClassName"], "nfs")
        self.assertEqual(claim["spec"]["accessModes"], ["ReadWriteMany"])
        pod = docs["Job"]["spec"]["template"]["spec"]
        (volume,) = pod["volumes"]
        self.assertEqual(volume["persistentVolumeClaim"]["claimName"], claim["metadata"]["name"])
        (mount,) = pod["containers"][0]["volumeMounts"]
        self.assertEqual((mount["name"], mount["mountPath"]), (volume["name"], "/out"))
        self.assertEqual(manifests.workdir_of(pod["containers"][0]["command"]), "/out")

    def test_an_existing_claim_mounted_above_the_workdir(self):
        command = ["tfscale-train", "--workdir", "/data/runs/1"]
        docs = _by_kind(
            _emit(
                "--emit=kubernetes",
                "--nnodes=2",
                "--image=i",
                "--volume_claim=shared",
                "--mount_path=/data",
                command=command,
            )
        )
        self.assertNotIn("PersistentVolumeClaim", docs)
        pod = docs["Job"]["spec"]["template"]["spec"]
        self.assertEqual(pod["volumes"][0]["persistentVolumeClaim"]["claimName"], "shared")
        mount_path = pod["containers"][0]["volumeMounts"][0]["mountPath"]
        workdir = manifests.workdir_of(pod["containers"][0]["command"])
        self.assertEqual(os.path.commonpath([workdir, mount_path]), mount_path)

    @parameterized.parameters("/out", "out", "/data/../out")
    def test_workdir_outside_the_volume_is_an_error(self, workdir):
        with self.assertRaisesRegex(ValueError, "--workdir must be .*Received: --workdir="):
            manifests.kubernetes(
                2,
                "i",
                ["train", f"--workdir={workdir}"],
                storage=manifests.Storage(mount_path="/data"),
            )

    @parameterized.parameters(0, 3)
    def test_each_worker_restarts_max_restarts_times(self, max_restarts):
        docs = _by_kind(
            _emit("--emit=kubernetes", "--nnodes=4", "--image=i", f"--max_restarts={max_restarts}")
        )
        spec = docs["Job"]["spec"]
        self.assertEqual(spec["backoffLimitPerIndex"], max_restarts)
        self.assertEqual(spec["maxFailedIndexes"], 0)
        self.assertEqual(spec["backoffLimit"], 4 * max_restarts)
        self.assertEqual(spec["template"]["spec"]["restartPolicy"], "Never")

    def test_resources(self):
        docs = _by_kind(
            _emit(
                "--emit=kubernetes",
                "--nnodes=2",
                "--image=i",
                "--cpu=8",
                "--memory=32Gi",
                "--gpus=2",
            )
        )
        resources = docs["Job"]["spec"]["template"]["spec"]["containers"][0]["resources"]
        want = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
        self.assertEqual(resources, {"requests": want, "limits": want})
        docs = _by_kind(_emit("--emit=kubernetes", "--nnodes=2", "--image=i"))
        self.assertNotIn("resources", docs["Job"]["spec"]["template"]["spec"]["containers"][0])

    def test_a_command_without_workdir_gets_no_volume(self):
        docs = _by_kind(
            _emit("--emit=kubernetes", "--nnodes=2", "--image=i", command=["python", "x.py"])
        )
        self.assertEqual(set(docs), {"Service", "Job"})
        self.assertNotIn("volumes", docs["Job"]["spec"]["template"]["spec"])


class TfJobTest(absltest.TestCase):
    def test_workers_get_port_env_volume_and_restarts(self):
        docs = _by_kind(
            _emit(
                "--emit=tfjob",
                "--nnodes=3",
                "--image=reg/train:1",
                "--name=mnist",
                "--max_restarts=2",
                "--master_port=4100",
                "--memory=8Gi",
            )
        )
        job = docs["TFJob"]
        self.assertEqual(job["apiVersion"], "kubeflow.org/v1")
        self.assertEqual(job["spec"]["runPolicy"]["backoffLimit"], 2 * 3)
        worker = job["spec"]["tfReplicaSpecs"]["Worker"]
        self.assertEqual((worker["replicas"], worker["restartPolicy"]), (3, "OnFailure"))
        pod = worker["template"]["spec"]
        (container,) = pod["containers"]
        self.assertEqual((container["name"], container["command"]), ("tensorflow", COMMAND))
        self.assertEqual(container["ports"], [{"name": "tfjob-port", "containerPort": 4100}])
        self.assertEqual(container["resources"]["limits"], {"memory": "8Gi"})
        self.assertEqual(container["volumeMounts"][0]["mountPath"], "/out")
        claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
        self.assertEqual(pod["volumes"][0]["persistentVolumeClaim"]["claimName"], claim)
        # The operator's TF_CONFIG for worker i: <job>-worker-<j>.<namespace>.svc at the tfjob-port.
        hosts = [f"mnist-worker-{j}.default.svc:4100" for j in range(3)]
        for index in range(3):
            tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
            resolved = cluster.resolve(
                "auto", {**_env(container), "TF_CONFIG": json.dumps(tf_config)}
            )
            self.assertEqual((resolved.workers, resolved.task_index), (tuple(hosts), index))


class SlurmTest(absltest.TestCase):
    def test_sbatch_script(self):
        script = _emit(
            "--emit=slurm", "--nnodes=2", "--nproc_per_node=2", "--master_port=4100", "--gpus=1"
        )
        self.assertIn("#SBATCH --nodes=2", script)
        self.assertIn("#SBATCH --ntasks-per-node=2", script)
        self.assertIn("#SBATCH --gpus-per-task=1", script)
        self.assertIn("srun --kill-on-bad-exit=1 " + " ".join(COMMAND), script)
        env = {
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_NTASKS": "4",
            "SLURM_NTASKS_PER_NODE": "2(x2)",
            "TFSCALE_PORT": script.split("TFSCALE_PORT=")[1].split()[0],
        }
        workers = [cluster.from_slurm({**env, "SLURM_PROCID": str(i)}) for i in range(4)]
        self.assertEqual(
            workers[3].workers, ("gpu07:4100", "gpu07:4101", "gpu08:4100", "gpu08:4101")
        )
        self.assertEqual([w.task_index for w in workers], [0, 1, 2, 3])

    def _run_script(self, max_restarts, fail_until):
        """Runs the sbatch script with bash.

        Slurm is not here, so an `srun` on PATH runs its command as the one task.
        """
        tmp = self.create_tempdir().full_path
        srun = os.path.join(tmp, "srun")
        with open(srun, "w") as f:
            f.write('#!/bin/sh\n[ "$1" = --kill-on-bad-exit=1 ] && shift\nexec "$@"\n')
        os.chmod(srun, os.stat(srun).st_mode | stat.S_IEXEC)
        attempts = os.path.join(tmp, "attempts")
        worker = (
            "import os, sys; restart = int(os.environ['TFSCALE_RESTART'])\n"
            f"open({attempts!r}, 'a').write(str(restart))\n"
            f"sys.exit(7 if restart < {fail_until} else 0)"
        )
        script = manifests.slurm(1, [sys.executable, "-c", worker], max_restarts=max_restarts)
        result = subprocess.run(
            ["bash", "-c", script],
            env=dict(os.environ, PATH=f"{tmp}:{os.environ['PATH']}"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        with open(attempts) as f:
            return result, f.read()

    def test_a_failed_step_runs_again(self):
        result, attempts = self._run_script(max_restarts=3, fail_until=2)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(attempts, "012")
        self.assertIn("attempt 2 of 4 failed with exit code 7", result.stderr)

    def test_restarts_run_out(self):
        result, attempts = self._run_script(max_restarts=1, fail_until=5)
        self.assertEqual((result.returncode, attempts), (7, "01"))
        self.assertIn("attempt 2 of 2 failed with exit code 7", result.stderr)


class MarathonTest(parameterized.TestCase):
    def _group(self, *args, command=COMMAND):
        return json.loads(_emit("--emit=marathon", *args, command=command))

    def test_each_app_resolves_its_place_in_the_same_cluster(self):
        group = self._group("--nnodes=3", "--name=mnist", "--master_port=31000")
        self.assertEqual(group["id"], "/mnist")
        apps = group["apps"]
        self.assertEqual([a["id"] for a in apps], [f"/mnist/worker-{i}" for i in range(3)])
        required = {"id", "cmd", "instances", "cpus", "mem", "env", "portDefinitions"}
        required |= {"requirePorts", "constraints", "healthChecks", "upgradeStrategy"}
        resolved = []
        for index, app in enumerate(apps):
            self.assertEqual(required - set(app), set())
            self.assertEqual(app["instances"], 1)
            self.assertEqual(app["cmd"], " ".join(COMMAND))
            env = app["env"]
            self.assertEqual(env["TFSCALE_NUM_WORKERS"], "3")
            self.assertEqual(env["PYTHONUNBUFFERED"], "1")
            worker = cluster.resolve("auto", env)
            self.assertEqual(worker.task_index, index)
            self.assertEqual(worker.tf_config(), json.loads(env["TF_CONFIG"]))
            resolved.append(worker.workers)
        self.assertLen(set(resolved), 1)
        # Worker i is app i, found by its Mesos-DNS name at the port it declares.
        for app, address in zip(apps, resolved[0]):
            task, group_name = app["id"].split("/")[::-1][:2]
            (port,) = app["portDefinitions"]
            self.assertEqual(address, f"{task}-{group_name}.marathon.mesos:{port['port']}")

    def test_ports_are_fixed_and_distinct(self):
        apps = self._group("--nnodes=4", "--master_port=31000")["apps"]
        ports = [app["portDefinitions"][0]["port"] for app in apps]
        self.assertEqual(ports, [31000, 31001, 31002, 31003])
        self.assertTrue(all(app["requirePorts"] for app in apps))

    def test_placement_health_and_restarts(self):
        (app,) = self._group("--nnodes=1")["apps"]
        self.assertEqual(app["constraints"], [["hostname", "UNIQUE"]])
        (check,) = app["healthChecks"]
        self.assertEqual((check["protocol"], check["portIndex"]), ("MESOS_TCP", 0))
        self.assertGreater(check["gracePeriodSeconds"], 0)
        self.assertGreater(check["maxConsecutiveFailures"], 0)
        self.assertGreater(app["backoffSeconds"], 0)
        self.assertGreaterEqual(app["maxLaunchDelaySeconds"], app["backoffSeconds"])
        self.assertEqual(
            app["upgradeStrategy"], {"minimumHealthCapacity": 0, "maximumOverCapacity": 0}
        )

    def test_image_and_workdir_mount(self):
        (app,) = self._group(
            "--nnodes=1",
            "--image=reg/train:1",
            "--mount_path=/data",
            command=["train", "--workdir=/data/run1"],
        )["apps"]
        container = app["container"]
        self.assertEqual(
            (container["type"], container["docker"]), ("DOCKER", {"image": "reg/train:1"})
        )
        self.assertEqual(
            container["volumes"], [{"containerPath": "/data", "hostPath": "/data", "mode": "RW"}]
        )
        (app,) = self._group("--nnodes=1")["apps"]
        self.assertNotIn("container", app)

    def test_resources(self):
        (app,) = self._group("--nnodes=1", "--image=i", "--cpu=500m", "--memory=32Gi", "--gpus=2")[
            "apps"
        ]
        self.assertEqual((app["cpus"], app["mem"], app["gpus"]), (0.5, 32768, 2))
        # Marathon offers GPUs to the Mesos containerizer only.
        self.assertEqual(app["container"]["type"], "MESOS")
        (app,) = self._group("--nnodes=1")["apps"]
        self.assertEqual((app["cpus"], app["mem"], app["gpus"]), (1, 4096, 0))

    @parameterized.parameters(("8", 8), ("1.5", 1.5), ("250m", 0.25))
    def test_cpu_quantities(self, cpu, cpus):
        self.assertEqual(manifests.Resources(cpu=cpu).to_marathon()["cpus"], cpus)

    @parameterized.parameters(("512Mi", 512), ("2Gi", 2048), ("1G", 1e9 / 2**20), ("1048576", 1))
    def test_memory_quantities(self, memory, mem):
        self.assertAlmostEqual(manifests.Resources(memory=memory).to_marathon()["mem"], mem)

    @parameterized.named_parameters(
        ("max_restarts", {"max_restarts": 3}, "without a limit: drop --max_restarts"),
        ("claim", {"storage": manifests.Storage(claim="pvc")}, "not a claim"),
        ("dotted_name", {"name": "a.b"}, "DNS label .* Received: name='a.b'"),
        ("upper_name", {"name": "MNIST"}, "Received: name='MNIST'"),
        ("long_name", {"name": "x" * 60}, "at most 63 characters"),
        ("port", {"port": 65535}, "Received: port=65535, nnodes=2"),
        ("cpu", {"resources": manifests.Resources(cpu="lots")}, "Received: cpu='lots'"),
        ("memory", {"resources": manifests.Resources(memory="1PB")}, "Received: memory='1PB'"),
    )
    def test_bad_values(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            manifests.marathon(2, None, ["c"], **kwargs)


class ErrorsTest(absltest.TestCase):
    def test_missing_image_and_several_procs_per_pod(self):
        result = testutil.run_module(
            "tfscale.launch", "--emit=kubernetes", "--nnodes=2", "--", "cmd"
        )
        self.assertIn("A container image is needed: --image=IMAGE", result.stderr)
        result = testutil.run_module(
            "tfscale.launch",
            "--emit=tfjob",
            "--nnodes=2",
            "--image=i",
            "--nproc_per_node=2",
            "--",
            "cmd",
        )
        self.assertIn("runs one worker per pod: use --nproc_per_node=1", result.stderr)

    def test_marathon_command_line_errors(self):
        result = testutil.run_module(
            "tfscale.launch", "--emit=marathon", "--nnodes=2", "--nproc_per_node=2", "--", "cmd"
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "--emit=marathon runs one worker per task: use --nproc_per_node=1", result.stderr
        )
        result = testutil.run_module(
            "tfscale.launch", "--emit=marathon", "--nnodes=2", "--mount_path=/data", "--", *COMMAND
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--workdir must be inside the volume mounted at /data", result.stderr)

    def test_workdir_outside_the_mount_from_the_command_line(self):
        result = testutil.run_module(
            "tfscale.launch",
            "--emit=kubernetes",
            "--nnodes=2",
            "--image=i",
            "--mount_path=/data",
            "--",
            *COMMAND,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "--workdir must be inside the volume mounted at /data, or checkpoints die with the pod. "
            "Received: --workdir=/out",
            result.stderr,
        )

    def test_bad_values(self):
        with self.assertRaisesRegex(
            ValueError, "Unknown manifest format 'helm'. Valid formats: kubernetes"
        ):
            manifests.emit("helm", 1, "i", ["c"])
        with self.assertRaisesRegex(
            ValueError, "max_restarts must be >= 0. Received: max_restarts=-1"
        ):
            manifests.kubernetes(1, "i", ["c"], max_restarts=-1)
        with self.assertRaisesRegex(ValueError, "gpus must be >= 0. Received: gpus=-1"):
            manifests.Resources(gpus=-1)
        with self.assertRaisesRegex(
            ValueError, "mount_path must be an absolute path. Received: mount_path='d'"
        ):
            manifests.Storage(mount_path="d")


if __name__ == "__main__":
    absltest.main()
