"""Tests for the "tpu" kind: option checks, failing fast without a TPU, a mocked TPU system."""

import collections
import contextlib
import os
import socket
import threading
import time
from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfscale  # noqa: E402
from tfscale import compat  # noqa: E402
from tfscale import distributions  # noqa: E402
from tfscale.strategies import keras_paths  # noqa: E402
from tfscale.strategies import local  # noqa: E402
from tfscale.strategies import tpu as tpu_lib  # noqa: E402
from tfscale.train import config as config_lib  # noqa: E402

# Why there is no TPU here (None on a TPU host: the real-TPU tests run).
_NO_TPU = tpu_lib.probe(tpu_lib.parse_target("auto"))

_Device = collections.namedtuple("_Device", ["name", "device_type"])


def _metadata(hosts, cores_per_host):
    devices = []
    for host in range(hosts):
        devices.append(_Device(f"/job:worker/replica:0/task:{host}/device:CPU:0", "CPU"))
        devices.extend(
            _Device(f"/job:worker/replica:0/task:{host}/device:TPU:{core}", "TPU")
            for core in range(cores_per_host)
        )
    return tf.tpu.experimental.TPUSystemMetadata(
        num_cores=hosts * cores_per_host,
        num_hosts=hosts,
        num_of_cores_per_host=cores_per_host,
        topology=None,
        devices=devices,
    )


class _Server:
    """A local TCP server that sends `reply` to each connection (None: stays silent)."""

    def __init__(self, reply):
        self._reply = reply
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._connections = []

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return self._socket.getsockname()[1]

    def _serve(self):
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self._connections.append(connection)
            if self._reply is not None:
                connection.sendall(self._reply)

    def __exit__(self, *exc_info):
        self._socket.close()
        for connection in self._connections:
            connection.close()


@contextlib.contextmanager
def _metadata_host(host):
    """The environment with GCE_METADATA_HOST set to `host` (unset for None)."""
    with mock.patch.dict(os.environ):
        for variable in ("GCE_METADATA_HOST", "GCE_METADATA_IP"):
            os.environ.pop(variable, None)
        if host:
            os.environ["GCE_METADATA_HOST"] = host
        yield


class FakeResolver(tf.distribute.cluster_resolver.ClusterResolver):
    """Answers as `TPUClusterResolver` does for a slice of `hosts` TPU hosts."""

    def __init__(self, hosts=1, cores_per_host=4, task_id=0):
        self.task_type = "worker"
        self.task_id = task_id
        self.metadata = _metadata(hosts, cores_per_host)
        self._workers = [f"10.0.0.{i + 2}:8470" for i in range(hosts)]

    @property
    def environment(self):
        return ""

    def cluster_spec(self):
        return tf.train.ClusterSpec({"worker": self._workers})

    def master(self, task_type=None, task_id=None, rpc_layer=None):
        return f"grpc://{self._workers[0]}"

    def get_tpu_system_metadata(self):
        return self.metadata

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
        return {"TPU": self.metadata.num_of_cores_per_host}


class FakeRuntime:
    """The runtime seam of `tpu.build`, recording each step it is asked for."""

    def __init__(self, resolver, strategy=None, fail=None):
        self.resolver = resolver
        self.calls = []
        self._strategy = strategy
        self._fail = fail or {}

    def runtime(self):
        return tpu_lib.TPURuntime(
            resolve=self._step("resolve", lambda target: self.resolver),
            connect=self._step("connect", lambda resolver: None),
            initialize=self._step("initialize", lambda resolver: None),
            strategy=self._step("strategy", self._strategy or tpu_lib.TPURuntime().strategy),
        )

    def _step(self, name, result):
        def step(arg):
            self.calls.append((name, arg))
            if name in self._fail:
                raise self._fail[name]
            return result(arg)

        return step


class ParseTargetTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(tpu="local", form="local"),
        dict(tpu="my-tpu-v4", form="name"),
        dict(tpu="grpc://10.0.0.2:8470", form="address"),
        dict(tpu="grpc://tpu-host.internal:8470", form="address"),
        dict(tpu="grpc://[fe80::1]:8470", form="address"),
    )
    def test_forms(self, tpu, form):
        self.assertEqual(tpu_lib.parse_target(tpu).form, form)

    def test_address(self):
        self.assertEqual(tpu_lib.parse_target("grpc://[fe80::1]:8470").address, ("fe80::1", 8470))

    def test_auto_takes_tpu_name_else_local(self):
        named = tpu_lib.parse_target("auto", environ={"TPU_NAME": "pod-a"})
        self.assertEqual((named.tpu, named.form), ("pod-a", "name"))
        self.assertEqual(named.describe(), "tpu='pod-a', from tpu='auto' with $TPU_NAME")
        unset = tpu_lib.parse_target("auto", environ={})
        self.assertEqual(unset.describe(), "tpu='local', from tpu='auto' with $TPU_NAME unset")

    def test_auto_names_tpu_name_in_its_errors(self):
        with self.assertRaisesRegex(
            ValueError, r"tpu='My_TPU'.* \(from tpu='auto' with \$TPU_NAME\)$"
        ):
            tpu_lib.parse_target("auto", environ={"TPU_NAME": "My_TPU"})

    def test_zone_and_project_go_with_a_name(self):
        target = tpu_lib.parse_target("pod-a", zone="us-central2-b", project="p")
        self.assertEqual((target.zone, target.project), ("us-central2-b", "p"))

    @parameterized.parameters(
        dict(options=dict(tpu=""), match=r"tpu must be 'auto', 'local', a Cloud TPU name or "),
        dict(options=dict(tpu=3), match=r"Received: tpu=3"),
        dict(options=dict(tpu="grpc://10.0.0.2"), match=r"must be grpc://host:port"),
        dict(options=dict(tpu="grpc://:8470"), match=r"must be grpc://host:port"),
        dict(options=dict(tpu="grpc://h:0"), match=r"port 1-65535\). Received: tpu='grpc://h:0'"),
        dict(options=dict(tpu="grpc://h:70000"), match=r"port 1-65535"),
        dict(options=dict(tpu="grpc://h:8470/x"), match=r"must be grpc://host:port"),
        dict(options=dict(tpu="http://h:8470"), match=r"must use grpc://"),
        dict(options=dict(tpu="10.0.0.2:8470"), match=r"write tpu='grpc://10.0.0.2:8470'"),
        dict(options=dict(tpu="My_TPU"), match=r"lowercase letters, digits and hyphens"),
        dict(options=dict(tpu="a" * 64), match=r"1-63 lowercase"),
        dict(options=dict(tpu="local", zone="us-central2-b"), match=r"zone and project go with"),
        dict(options=dict(tpu="grpc://h:1", project="p"), match=r"go with a Cloud TPU name"),
        dict(options=dict(tpu="pod", zone=""), match=r"zone must be a non-empty string"),
    )
    def test_bad_values(self, options, match):
        started = time.monotonic()
        with self.assertRaisesRegex(ValueError, match) as raised:
            tfscale.distribution("tpu", **options)
        self.assertNotIsInstance(raised.exception, tpu_lib.TPUUnavailableError)
        self.assertLess(time.monotonic() - started, 0.5)


class RegistryTest(absltest.TestCase):
    def test_kind_options(self):
        self.assertEqual(distributions.kind_options("tpu"), ("tpu", "zone", "project"))
        self.assertTrue(distributions.spans_hosts("tpu"))

    def test_config_fields(self):
        config = config_lib.base_config()
        config.distribution.kind = "tpu"
        config.distribution.tpu = "grpc://10.0.0.2:8470"
        config.distribution.zone = None
        self.assertEqual(
            config_lib.set_options(config.distribution),
            {"kind": "tpu", "tpu": "grpc://10.0.0.2:8470"},
        )


@absltest.skipIf(_NO_TPU is None, "a TPU is reachable here")
class TrainBinaryTest(absltest.TestCase):
    def test_no_tpu_is_a_one_line_config_error(self):
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        result = testutil.train_binary(
            workdir, "--config.distribution.kind=tpu", "--config.distribution.tpu=local"
        )
        self.assertEqual(result.returncode, 2, result.stderr[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(
            result.stderr.strip().splitlines()[-1],
            f"tfscale-train: error: config.distribution: no TPU found: looked for tpu='local' "
            f"({_NO_TPU})",
        )
        self.assertFalse(os.path.exists(workdir))


@absltest.skipIf(_NO_TPU is None, "a TPU is reachable here")
class NoTPUTest(parameterized.TestCase):
    """The real path, nothing mocked: it must fail within 2 s, in one line."""

    def _fails_fast(self, match, **options):
        started = time.monotonic()
        with self.assertRaises(tpu_lib.TPUUnavailableError) as raised:
            tfscale.distribution("tpu", **options)
        elapsed = time.monotonic() - started
        message = str(raised.exception)
        self.assertLess(elapsed, 2.0, message)
        self.assertNotIn("\n", message)
        self.assertRegex(message, match)
        return message

    def test_local(self):
        self._fails_fast(
            r"^no TPU found: looked for tpu='local' \(no /dev/accel\* or /dev/vfio TPU device, "
            r"and TensorFlow lists no TPU on this host\)$",
            tpu="local",
        )

    def test_auto_without_tpu_name_is_local(self):
        with mock.patch.dict(os.environ, clear=False):
            os.environ.pop("TPU_NAME", None)
            self._fails_fast(
                r"^no TPU found: looked for tpu='local', from tpu='auto' with \$TPU_NAME unset \(no "
            )

    def test_address_refused(self):
        port = testutil.free_port()
        self._fails_fast(
            rf"^no TPU found: looked for tpu='grpc://127.0.0.1:{port}' "
            rf"\(no gRPC server at 127.0.0.1:{port}: .+\)$",
            tpu=f"grpc://127.0.0.1:{port}",
        )

    @parameterized.parameters(
        dict(reply=None, match=r"no answer within 1 s"),
        dict(
            reply=b"HTTP/1.1 400 Bad Request\r\n\r\n", match=r"it answers, but not as a gRPC server"
        ),
    )
    def test_address_that_is_no_grpc_server(self, reply, match):
        # Without the probe, TensorFlow would wait on such a peer for minutes.
        with _Server(reply) as port:
            self._fails_fast(
                rf"no gRPC server at 127.0.0.1:{port}: {match}\)$",
                tpu=f"grpc://127.0.0.1:{port}",
            )

    def test_name_needs_the_metadata_server(self):
        # Nothing listens at the metadata address (loopback: tests send no
        # traffic off this host, so metadata.google.internal is not asked).
        address = f"127.0.0.1:{testutil.free_port()}"
        with _metadata_host(address):
            self._fails_fast(
                r"^no TPU found: looked for tpu='my-tpu' \(looking the name up needs the GCE "
                rf"metadata server at {address}: .+; "
                r"off Google Cloud give zone= and project=, or tpu='grpc://host:port'\)$",
                tpu="my-tpu",
            )

    @parameterized.parameters(
        dict(reply=None, match=r"no answer within 1 s"),
        dict(
            reply=b"HTTP/1.0 404 Not Found\r\n\r\n",
            match=r"it answers, but not as a metadata server",
        ),
    )
    def test_name_with_something_else_at_the_metadata_address(self, reply, match):
        with _Server(reply) as port, _metadata_host(f"127.0.0.1:{port}"):
            self._fails_fast(
                rf"metadata server at 127.0.0.1:{port}: {match}; off Google Cloud",
                tpu="my-tpu",
            )

    def test_name_with_zone_and_project_needs_the_tpu_api(self):
        # The Cloud TPU API's address, moved to a closed loopback port.
        port = testutil.free_port()
        with mock.patch.object(tpu_lib, "_TPU_API", ("127.0.0.1", port)):
            self._fails_fast(
                r"^no TPU found: looked for tpu='my-tpu' \(looking the name up needs the Cloud "
                r"TPU API at 127.0.0.1: ",
                tpu="my-tpu",
                zone="us-central2-b",
                project="my-project",
            )


class MockedTPUTest(parameterized.TestCase):
    """The resolver plumbing against a fake resolver; connect and initialize are recorded."""

    def test_steps_run_in_order_on_one_resolver(self):
        fake = FakeRuntime(FakeResolver(), strategy=lambda r: local.mirrored(devices=4))
        tpu_lib.build("pod-a", zone="z", project="p", runtime=fake.runtime())
        self.assertEqual(
            [name for name, _ in fake.calls], ["resolve", "connect", "initialize", "strategy"]
        )
        target = fake.calls[0][1]
        self.assertEqual(
            (target.tpu, target.form, target.zone, target.project), ("pod-a", "name", "z", "p")
        )
        for _, arg in fake.calls[1:]:
            self.assertIs(arg, fake.resolver)

    def test_one_host_facade(self):
        # A mirrored strategy over 4 CPUs stands in for the 4 TPU cores, so
        # scope() and distribute_dataset() run for real.
        fake = FakeRuntime(
            FakeResolver(hosts=1, cores_per_host=4), lambda r: local.mirrored(devices=4)
        )
        dist = tpu_lib.build("local", runtime=fake.runtime(), environ={})
        self.assertEqual(dist.kind, "tpu")
        self.assertEqual(dist.options, {"tpu": "local"})
        self.assertEqual(dist.num_replicas_in_sync, 4)
        self.assertEqual(dist.num_cores, 4)
        self.assertEqual(dist.num_workers, 1)
        self.assertTrue(dist.is_chief)
        self.assertIs(dist.resolver, fake.resolver)
        with dist.scope() as entered:
            self.assertIs(entered, dist)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
        self.assertLen(model.weights[0].value.values, 4)
        data = tf.data.Dataset.from_tensor_slices(
            (np.ones((64, 3), "float32"), np.ones((64, 1), "float32"))
        )
        history = model.fit(dist.distribute_dataset(data, 16), epochs=2, verbose=0)
        self.assertLen(history.history["loss"], 2)
        with self.assertRaisesRegex(ValueError, r"positive multiple of the 4 replica\(s\)"):
            dist.distribute_dataset(data, 6)

    def test_pod_facade_from_the_metadata(self):
        # The real TPUStrategy subclass, built over the fake resolver's metadata.
        fake = FakeRuntime(FakeResolver(hosts=4, cores_per_host=8))
        dist = tpu_lib.build("grpc://10.0.0.2:8470", runtime=fake.runtime(), environ={})
        self.assertIsInstance(dist.strategy, tf.distribute.TPUStrategy)
        self.assertIsInstance(dist.strategy, keras_paths.KerasPathsMixin)
        # XLA all-reduces: the collective-key fix has nothing to change.
        self.assertEqual(compat.trace_time_collective_keys(dist.strategy), 0)
        self.assertEqual(dist.num_replicas_in_sync, 32)
        self.assertEqual(dist.num_workers, 4)
        self.assertLen(dist.devices, 32)
        self.assertTrue(all("device:TPU:" in d for d in dist.devices))
        self.assertEqual(dist.per_replica_batch_size(128), 4)
        self.assertEqual(dist.per_worker_batch_size(128), 32)
        self.assertTrue(dist.is_chief)
        self.assertStartsWith(
            repr(dist), "Distribution(kind='tpu', replicas=32, workers=4, devices=['/job:worker/"
        )

    @parameterized.parameters(
        dict(task_id=0, environ={}, chief=True),
        dict(task_id=2, environ={}, chief=False),
        dict(task_id=0, environ={"TPU_WORKER_ID": "0"}, chief=True),
        dict(task_id=0, environ={"TPU_WORKER_ID": "3"}, chief=False),
        dict(task_id=2, environ={"TPU_WORKER_ID": "0"}, chief=True),
    )
    def test_chief_is_host_zero(self, task_id, environ, chief):
        fake = FakeRuntime(FakeResolver(hosts=4, cores_per_host=4, task_id=task_id))
        dist = tpu_lib.build("pod-a", runtime=fake.runtime(), environ=environ)
        self.assertEqual(dist.is_chief, chief)

    def test_bad_worker_id(self):
        fake = FakeRuntime(FakeResolver())
        with self.assertRaisesRegex(
            ValueError, r"TPU_WORKER_ID must be a host index. Received: 'x'"
        ):
            tpu_lib.build("local", runtime=fake.runtime(), environ={"TPU_WORKER_ID": "x"})

    @parameterized.parameters(
        dict(step="connect", error=ValueError("bad cluster\nmore")),
        dict(
            step="initialize",
            error=tf.errors.NotFoundError(None, None, "TPUs not found in the cluster.\n[[op]]"),
        ),
    )
    def test_initialization_failure_is_one_line(self, step, error):
        fake = FakeRuntime(FakeResolver(), fail={step: error})
        with self.assertRaises(tpu_lib.TPUUnavailableError) as raised:
            tpu_lib.build("local", runtime=fake.runtime())
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertStartsWith(
            message, f"TPU tpu='local' could not be initialized: {type(error).__name__}: "
        )
        self.assertNotIn("strategy", [name for name, _ in fake.calls])

    def test_no_cores(self):
        fake = FakeRuntime(FakeResolver(hosts=1, cores_per_host=0))
        with self.assertRaisesRegex(
            tpu_lib.TPUUnavailableError,
            r"^no TPU found: looked for tpu='grpc://h:1' \(its TPU system has no cores\)$",
        ):
            tpu_lib.build("grpc://h:1", runtime=fake.runtime())


@absltest.skipUnless(_NO_TPU is None, f"needs a TPU: {_NO_TPU}")
class RealTPUTest(absltest.TestCase):
    def test_fit(self):
        dist = tfscale.distribution("tpu")
        self.assertEqual(dist.num_replicas_in_sync, dist.num_cores)
        self.assertTrue(dist.is_chief)
        with dist.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse", steps_per_execution=4)
        replicas = dist.num_replicas_in_sync
        data = tf.data.Dataset.from_tensor_slices(
            (np.ones((64 * replicas, 3), "float32"), np.ones((64 * replicas, 1), "float32"))
        )
        history = model.fit(dist.distribute_dataset(data, 8 * replicas), epochs=2, verbose=0)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0])


if __name__ == "__main__":
    absltest.main()
