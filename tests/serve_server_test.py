"""Tests of tfscale.serve.replica and tfscale.serve.proxy: real gRPC and HTTP servers.

Clients are the stock TensorFlow Serving stubs (`tensorflow_serving.apis`)
and plain HTTP, as a user's would be; answers are checked against the
Keras model's own `predict`.
"""

import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request

from absl.testing import absltest

from tests import testutil

testutil.setup_devices()

import grpc  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402
from grpc_health.v1 import health_pb2_grpc  # noqa: E402
from tensorflow_serving.apis import get_model_metadata_pb2  # noqa: E402
from tensorflow_serving.apis import get_model_status_pb2  # noqa: E402
from tensorflow_serving.apis import model_service_pb2_grpc  # noqa: E402
from tensorflow_serving.apis import predict_pb2  # noqa: E402
from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: E402

from tfscale.data.dispatcher import auth  # noqa: E402
from tfscale.serve import admin  # noqa: E402
from tfscale.serve import batching  # noqa: E402
from tfscale.serve import metrics  # noqa: E402
from tfscale.serve import model as model_lib  # noqa: E402
from tfscale.serve import proxy  # noqa: E402
from tfscale.serve import replica as replica_lib  # noqa: E402
from tfscale.serve import replicas as replicas_lib  # noqa: E402

_FLOAT = np.dtype("float32")


def _keras_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])


class _Versions:
    """A loader whose model changes with each `bump()` (a new checkpoint)."""

    def __init__(self):
        self.version = 1
        self.models = {}

    def bump(self):
        self.version += 1

    def __call__(self):
        version = self.version
        if version not in self.models:
            self.models[version] = _keras_model(seed=version)
        return model_lib.ServableModel.from_keras(
            self.models[version], name="default", version=version
        )


def _slow_servable(delay_s):
    """A model that sleeps `delay_s` per batch (a loaded replica), doubling its input."""
    signature = model_lib.Signature({"x": (_FLOAT, (2,))}, {"y": (_FLOAT, (2,))})

    def fn(inputs):
        x = inputs["x"]
        slept = tf.numpy_function(lambda: np.float32(time.sleep(delay_s) or 0), [], tf.float32)
        return {"y": x * 2.0 + slept}

    return model_lib.ServableModel("default", 1, signature, fn)


def _request(x, name="default", input_name="input"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs[input_name].CopyFrom(tf.make_tensor_proto(np.asarray(x)))
    return request


def _post(rest_target, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{rest_target}{path}", data=data, method="POST", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _get(rest_target, path):
    try:
        with urllib.request.urlopen(f"http://{rest_target}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class ReplicaTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.keras_model = _keras_model()
        cls.server = replica_lib.ReplicaServer(
            lambda: model_lib.ServableModel.from_keras(cls.keras_model, name="default", version=3),
            replica_lib.ReplicaOptions(
                batching=batching.BatchingOptions(max_batch_size=8, max_queue_delay_ms=1.0)
            ),
        ).start()
        cls.channel = grpc.insecure_channel(cls.server.target)
        cls.stub = prediction_service_pb2_grpc.PredictionServiceStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.server.stop()
        super().tearDownClass()

    def test_predict_matches_keras(self):
        x = np.random.RandomState(0).randn(5, 4).astype("float32")
        response, call = self.stub.Predict.with_call(_request(x), timeout=30)
        got = tf.make_ndarray(response.outputs["output_0"])
        np.testing.assert_allclose(got, self.keras_model.predict(x, verbose=0), rtol=1e-6)
        self.assertEqual(response.model_spec.version.value, 3)
        trailing = dict(call.trailing_metadata())
        self.assertEqual(trailing[replica_lib.REPLICA_KEY], "replica-0")
        self.assertGreaterEqual(float(trailing[replica_lib.QUEUE_MS_KEY]), 0.0)
        self.assertGreater(float(trailing[replica_lib.COMPUTE_MS_KEY]), 0.0)

    def test_float64_is_cast_and_concurrent_requests_are_batched(self):
        xs = [np.full((1, 4), i, np.float64) for i in range(16)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda x: self.stub.Predict(_request(x), timeout=30), xs))
        for x, response in zip(xs, responses):
            expected = self.keras_model.predict(x.astype("float32"), verbose=0)
            np.testing.assert_allclose(
                tf.make_ndarray(response.outputs["output_0"]), expected, rtol=1e-6
            )
        samples = metrics.parse(self.server.metrics.render())
        batches = samples[("tfscale_serve_batch_size_count", ())]
        rows = samples[("tfscale_serve_batch_size_sum", ())]
        self.assertGreater(rows / batches, 1.0)  # some requests shared a batch

    def test_metadata_and_status_speak_tf_serving(self):
        spec = _request(np.zeros((1, 4), np.float32)).model_spec
        metadata = self.stub.GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"]
            ),
            timeout=10,
        )
        signatures = get_model_metadata_pb2.SignatureDefMap()
        metadata.metadata["signature_def"].Unpack(signatures)
        signature = signatures.signature_def["serving_default"]
        self.assertEqual([d.size for d in signature.inputs["input"].tensor_shape.dim], [-1, 4])
        self.assertEqual(signature.outputs["output_0"].dtype, tf.float32.as_datatype_enum)
        status = model_service_pb2_grpc.ModelServiceStub(self.channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec=spec), timeout=10
        )
        self.assertEqual(status.model_version_status[0].version, 3)
        self.assertEqual(
            status.model_version_status[0].state,
            get_model_status_pb2.ModelVersionStatus.AVAILABLE,
        )

    def test_bad_requests_get_clear_codes_and_the_replica_keeps_serving(self):
        cases = [
            (_request(np.zeros((1, 4), np.float32), name="other"), "NOT_FOUND", "'other'"),
            (_request(np.zeros((1, 5), np.float32)), "INVALID_ARGUMENT", r"shape=\(batch, 4\)"),
            (_request(np.array([["a", "b", "c", "d"]])), "INVALID_ARGUMENT", "float32"),
            (_request(np.zeros((1, 4), np.float32), input_name="x"), "INVALID_ARGUMENT", "input"),
            (_request(np.zeros((9, 4), np.float32)), "INVALID_ARGUMENT", "max_batch_size=8"),
        ]
        versioned = _request(np.zeros((1, 4), np.float32))
        versioned.model_spec.version.value = 7
        cases.append((versioned, "NOT_FOUND", "version 7"))
        malformed = _request(np.zeros((1, 4), np.float32))
        malformed.inputs["input"].tensor_content = b"\x00" * 5
        cases.append((malformed, "INVALID_ARGUMENT", "input"))
        signature = _request(np.zeros((1, 4), np.float32))
        signature.model_spec.signature_name = "classify"
        cases.append((signature, "INVALID_ARGUMENT", "classify"))
        for request, code, message in cases:
            with self.subTest(code=code, message=message):
                with self.assertRaises(grpc.RpcError) as raised:
                    self.stub.Predict(request, timeout=10)
                self.assertEqual(raised.exception.code().name, code)
                self.assertRegex(raised.exception.details(), message)
        response = self.stub.Predict(_request(np.zeros((1, 4), np.float32)), timeout=10)
        self.assertEqual(tf.make_ndarray(response.outputs["output_0"]).shape, (1, 3))

    def test_rest_predict_in_both_forms_and_errors(self):
        x = np.random.RandomState(1).randn(2, 4).astype("float32")
        expected = self.keras_model.predict(x, verbose=0)
        rest = self.server.rest_target
        status, body, headers = _post(rest, "/v1/models/default:predict", {"instances": x.tolist()})
        self.assertEqual(status, 200)
        np.testing.assert_allclose(body["predictions"], expected, rtol=1e-5)
        self.assertIn(replica_lib.COMPUTE_MS_KEY, {k.lower() for k in headers})
        status, body, _ = _post(
            rest, "/v1/models/default/versions/3:predict", {"inputs": {"input": x.tolist()}}
        )
        self.assertEqual(status, 200)
        np.testing.assert_allclose(body["outputs"], expected, rtol=1e-5)
        for path, payload, code, message in [
            ("/v1/models/nope:predict", {"instances": x.tolist()}, 404, "nope"),
            ("/v1/models/default:predict", b"{not json", 400, "JSON"),
            ("/v1/models/default:predict", {"instances": [[1, 2]]}, 400, "shape"),
            ("/v1/models/default:predict", {"instances": [["a"] * 4]}, 400, "float32"),
            ("/v1/models/default:predict", {"rows": []}, 400, "instances"),
        ]:
            with self.subTest(payload=str(payload)[:40]):
                status, body, _ = _post(rest, path, payload)
                self.assertEqual(status, code)
                self.assertRegex(body["error"], message)
        status, text = _get(rest, "/v1/models/default")
        self.assertEqual(json.loads(text)["model_version_status"][0]["state"], "AVAILABLE")
        status, text = _get(rest, "/v1/models/default/metadata")
        inputs = json.loads(text)["metadata"]["signature_def"]["inputs"]
        self.assertEqual(inputs["input"]["shape"], [-1, 4])

    def test_health_and_metrics(self):
        stub = health_pb2_grpc.HealthStub(self.channel)
        for service in ("", replica_lib.LIVENESS, replica_lib.READINESS):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            self.assertEqual(answer.status, health_pb2.HealthCheckResponse.SERVING)
        self.assertEqual(_get(self.server.rest_target, "/healthz")[0], 200)
        self.assertEqual(_get(self.server.rest_target, "/readyz")[0], 200)
        self.stub.Predict(_request(np.zeros((1, 4), np.float32)), timeout=10)
        status, text = _get(self.server.rest_target, "/metrics")
        samples = metrics.parse(text)
        ok = samples[("tfscale_serve_requests_total", (("api", "grpc"), ("code", "OK")))]
        self.assertGreaterEqual(ok, 1)
        self.assertEqual(samples[("tfscale_serve_model_version", ())], 3)


class BatchingLimitsTest(absltest.TestCase):
    def test_full_queue_and_expired_deadline(self):
        server = replica_lib.ReplicaServer(
            lambda: _slow_servable(0.3),
            replica_lib.ReplicaOptions(
                rest_port=None,
                batching=batching.BatchingOptions(
                    max_batch_size=1, max_queue_delay_ms=0.0, max_queue_size=2
                ),
            ),
        ).start()
        self.addCleanup(server.stop)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(server.target)
        )
        x = np.ones((1, 2), np.float32)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stub.Predict, _request(x, input_name="x"), 30) for _ in range(8)]
            codes = []
            for future in futures:
                try:
                    future.result()
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
        self.assertIn("RESOURCE_EXHAUSTED", codes)
        self.assertIn("OK", codes)
        # A request whose deadline passes in the queue is never computed.
        before = metrics.parse(server.metrics.render())[("tfscale_serve_batch_size_count", ())]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(stub.Predict, _request(x, input_name="x"), 30)
            time.sleep(0.05)
            late = pool.submit(stub.Predict, _request(x, input_name="x"), 0.1)
            with self.assertRaises(grpc.RpcError) as raised:
                late.result()
            first.result()
        self.assertEqual(raised.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        time.sleep(0.4)
        after = metrics.parse(server.metrics.render())[("tfscale_serve_batch_size_count", ())]
        self.assertEqual(after - before, 1)


class AuthTest(absltest.TestCase):
    def test_token_is_required_except_for_health(self):
        server = replica_lib.ReplicaServer(
            lambda: model_lib.ServableModel.from_keras(_keras_model(), name="default"),
            replica_lib.ReplicaOptions(auth_token="s3cret"),
        ).start()
        self.addCleanup(server.stop)
        channel = grpc.insecure_channel(server.target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = _request(np.zeros((1, 4), np.float32))
        with self.assertRaises(grpc.RpcError) as raised:
            stub.Predict(request, timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        stub.Predict(request, timeout=10, metadata=auth.call_metadata("s3cret"))
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=replica_lib.READINESS), timeout=5
        )
        self.assertEqual(answer.status, health_pb2.HealthCheckResponse.SERVING)
        body = {"instances": [[0.0] * 4]}
        self.assertEqual(_post(server.rest_target, "/v1/models/default:predict", body)[0], 401)
        headers = {"Authorization": "Bearer s3cret"}
        status = _post(server.rest_target, "/v1/models/default:predict", body, headers)[0]
        self.assertEqual(status, 200)


class TlsTest(absltest.TestCase):
    def test_tls_from_client_to_router_to_replica(self):
        directory = self.create_tempdir().full_path
        cert, key = testutil.self_signed_cert(directory)
        replica = _replica("tls-replica", tls_cert_file=cert, tls_key_file=key)
        self.addCleanup(replica.stop)
        router = proxy.RouterServer(
            proxy.RouterOptions(
                tls_cert_file=cert, tls_key_file=key, replica_tls_root_cert_file=cert
            )
        ).start()
        self.addCleanup(router.stop)
        router.add_replica("tls-replica", f"localhost:{replica.target.rsplit(':', 1)[1]}")
        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(f.read())
        port = router.target.rsplit(":", 1)[1]
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.secure_channel(f"localhost:{port}", credentials)
        )
        response = stub.Predict(_request(np.zeros((1, 4), np.float32)), timeout=30)
        self.assertEqual(tf.make_ndarray(response.outputs["output_0"]).shape, (1, 3))
        plain = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(router.target)
        )
        with self.assertRaises(grpc.RpcError) as raised:
            plain.Predict(_request(np.zeros((1, 4), np.float32)), timeout=5)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)


class _Load:
    """Requests from `threads` clients until stopped; records every outcome."""

    def __init__(self, target, threads=4, x=None, metadata=()):
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(target)
        )
        self._x = np.zeros((1, 4), np.float32) if x is None else x
        self._metadata = metadata
        self._stop = threading.Event()
        self.results = []  # (replica, version) or ("error", code)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                response, call = self._stub.Predict.with_call(
                    _request(self._x), timeout=30, metadata=self._metadata
                )
                outcome = (
                    dict(call.trailing_metadata())[replica_lib.REPLICA_KEY],
                    response.model_spec.version.value,
                )
            except grpc.RpcError as e:
                outcome = ("error", f"{e.code().name}: {e.details()}")
            with self._lock:
                self.results.append(outcome)

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.results


def _replica(name, loader=None, **options):
    loader = loader or (lambda: model_lib.ServableModel.from_keras(_keras_model(), name="default"))
    return replica_lib.ReplicaServer(
        loader, replica_lib.ReplicaOptions(name=name, **options)
    ).start()


class RouterTest(absltest.TestCase):
    def _router(self, policy, replicas, **options):
        router = proxy.RouterServer(
            proxy.RouterOptions(policy=policy, health_interval_s=0.2, **options)
        ).start()
        self.addCleanup(router.stop)
        for replica in replicas:
            router.add_replica(replica.status()["name"], replica.target)
        return router

    def _replicas(self, count, **options):
        replicas = [_replica(f"r{i}", **options) for i in range(count)]
        for replica in replicas:
            self.addCleanup(replica.stop)
        return replicas

    def test_policies_spread_requests_and_hash_keeps_affinity(self):
        replicas = self._replicas(3)
        x = np.zeros((1, 4), np.float32)
        for policy in ("round_robin", "least_loaded", "power_of_two"):
            with self.subTest(policy):
                router = self._router(policy, replicas)
                stub = prediction_service_pb2_grpc.PredictionServiceStub(
                    grpc.insecure_channel(router.target)
                )
                seen = []
                for _ in range(30):
                    _, call = stub.Predict.with_call(_request(x), timeout=10)
                    seen.append(dict(call.trailing_metadata())[replica_lib.REPLICA_KEY])
                self.assertEqual(set(seen), {"r0", "r1", "r2"})
                if policy == "round_robin":
                    self.assertEqual([seen.count(n) for n in ("r0", "r1", "r2")], [10, 10, 10])
        router = self._router("consistent_hash", replicas)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(router.target)
        )
        owners = {}
        for key in [f"user-{i}" for i in range(12)] * 3:
            _, call = stub.Predict.with_call(
                _request(x), timeout=10, metadata=((proxy.ROUTE_KEY, key),)
            )
            owners.setdefault(key, set()).add(
                dict(call.trailing_metadata())[replica_lib.REPLICA_KEY]
            )
        self.assertTrue(all(len(o) == 1 for o in owners.values()), owners)
        self.assertGreater(len(set().union(*owners.values())), 1)

    def test_a_replica_that_stops_loses_no_request(self):
        replicas = self._replicas(2)
        router = self._router("round_robin", replicas)
        load = _Load(router.target)
        time.sleep(0.5)
        replicas[0].stop(grace_s=0.0)
        time.sleep(1.0)
        results = load.stop()
        errors = [r for r in results if r[0] == "error"]
        self.assertEqual(errors, [])
        stopped_at = max(i for i, r in enumerate(results) if r[0] == "r0")
        self.assertGreater(len(results) - stopped_at, 5)  # traffic went on on r1
        self.assertEqual(router.status()["replicas"][0]["health"], "down")

    def test_errors_pass_through_and_rest_is_proxied(self):
        replicas = self._replicas(2)
        router = self._router("least_loaded", replicas)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(router.target)
        )
        with self.assertRaises(grpc.RpcError) as raised:
            stub.Predict(_request(np.zeros((1, 5), np.float32)), timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("shape=(batch, 4)", raised.exception.details())
        status, body, _ = _post(
            router.rest_target, "/v1/models/default:predict", {"instances": [[0.0] * 4] * 2}
        )
        self.assertEqual(status, 200)
        self.assertLen(body["predictions"], 2)
        status, body, _ = _post(router.rest_target, "/v1/models/other:predict", {"instances": []})
        self.assertEqual(status, 404)
        status, text = _get(router.rest_target, "/metrics")
        samples = metrics.parse(text)
        names = {labels for name, labels in samples if name == "tfscale_serve_model_version"}
        self.assertEqual(names, {(("replica", "r0"),), (("replica", "r1"),)})
        self.assertEqual(samples[("tfscale_router_replicas_up", ())], 2)
        self.assertEqual(_get(router.rest_target, "/readyz")[0], 200)

    def test_rolling_reload_under_load_fails_no_request(self):
        versions = _Versions()
        replicas = self._replicas(2, loader=versions, rest_port=None)
        router = self._router("round_robin", replicas)
        load = _Load(router.target)
        time.sleep(0.3)
        versions.bump()
        channel = grpc.insecure_channel(router.target)
        answer = admin.call(channel, "Reload", timeout_s=120)
        self.assertEqual({r["version"] for r in answer["replicas"].values()}, {2})
        time.sleep(0.3)
        results = load.stop()
        self.assertEqual([r for r in results if r[0] == "error"], [])
        self.assertEqual({v for _, v in results}, {1, 2})
        self.assertEqual(results[-1][1], 2)
        # Nothing newer: a second reload changes nothing.
        answer = admin.call(channel, "Reload", timeout_s=120)
        self.assertEqual({r["reloaded"] for r in answer["replicas"].values()}, {False})

    def test_a_slow_replica_is_ejected_and_probed(self):
        fast = self._replicas(2, loader=lambda: _slow_servable(0.005), rest_port=None)
        slow = _replica("slow", loader=lambda: _slow_servable(0.005), rest_port=None, slowdown=10)
        self.addCleanup(slow.stop)
        router = self._router(
            "round_robin",
            [*fast, slow],
            outlier=replicas_lib.OutlierOptions(min_requests=5, base_ejection_s=60.0),
        )
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(router.target)
        )
        seen = []
        for _ in range(90):
            _, call = stub.Predict.with_call(
                _request(np.ones((1, 2), np.float32), input_name="x"), timeout=10
            )
            seen.append(dict(call.trailing_metadata())[replica_lib.REPLICA_KEY])
        # Round robin gives it every third request until it has 5 latencies.
        self.assertBetween(seen.count("slow"), 5, 8)
        self.assertEqual(seen[-30:].count("slow"), 0)
        state = {r["name"]: r for r in router.status()["replicas"]}
        self.assertEqual(state["slow"]["health"], "ejected")
        self.assertEqual(state["slow"]["ejections"], 1)

    def test_no_replica_is_unavailable_with_a_reason(self):
        router = self._router("round_robin", [])
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(router.target)
        )
        with self.assertRaises(grpc.RpcError) as raised:
            stub.Predict(_request(np.zeros((1, 4), np.float32)), timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("no replicas", raised.exception.details())

    def test_bad_options_are_refused(self):
        with self.assertRaisesRegex(ValueError, "policy must be one of"):
            proxy.RouterOptions(policy="random")
        with self.assertRaisesRegex(ValueError, "retries"):
            proxy.RouterOptions(retries=-1)


if __name__ == "__main__":
    absltest.main()
