"""Tests for the dispatcher's gRPC server and client, on loopback."""

import os
import subprocess

import grpc
from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import server as server_lib

SPEC = core.JobSpec(
    "train", tuple(core.ShardSpec(f"range:{i}:{i + 1}", 1) for i in range(8)), lease_timeout_s=30
)


def _raw_stub(target, metadata=None):
    return pb_grpc.ShardDispatcherStub(grpc.insecure_channel(target)), metadata or ()


class ServerTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.server = server_lib.DispatcherServer(server_lib.ServerConfig()).start()
        self.addCleanup(self.server.stop)
        self.client = client_lib.DispatcherClient(self.server.target, unavailable_timeout_s=2)
        self.client.create_job(SPEC)

    def test_binds_loopback_on_a_free_port(self):
        host, port = self.server.target.rsplit(":", 1)
        self.assertEqual(host, "127.0.0.1")
        self.assertGreater(int(port), 0)

    def test_lease_round_trip(self):
        self.assertFalse(self.client.create_job(SPEC))
        registration = self.client.register_worker("train", "w0")
        self.assertEqual(registration.lease_timeout_s, 30)
        self.assertLess(registration.heartbeat_interval_s, 30)
        leases = self.client.acquire("train", "w0", 3).leases
        self.assertLen(leases, 3)
        self.assertEqual(len({l.token for l in leases}), 3)
        for lease in leases:
            self.client.complete("train", "w0", lease.token)
        self.assertEqual(self.client.heartbeat("train", "w0"), [])
        (job,) = self.client.list_jobs()
        self.assertEqual((job.completed, job.pending, job.grants), (3, 5, 3))
        status = self.client.status()
        self.assertEqual(status.workers[0].completed_shards, 3)
        self.assertEqual(status.workers[0].worker, "w0")

    @parameterized.parameters(
        dict(call="Acquire", request=pb.AcquireRequest(job="train", worker="w0", max_shards=0),
             code=grpc.StatusCode.INVALID_ARGUMENT),
        dict(call="Acquire", request=pb.AcquireRequest(job="train", worker="ghost", max_shards=1),
             code=grpc.StatusCode.FAILED_PRECONDITION),
        dict(call="Complete", request=pb.CompleteRequest(job="train", worker="w0", token=12345),
             code=grpc.StatusCode.FAILED_PRECONDITION),
        dict(call="Release", request=pb.ReleaseRequest(job="train", worker="ghost", token=1),
             code=grpc.StatusCode.FAILED_PRECONDITION),
        dict(call="RegisterWorker", request=pb.RegisterWorkerRequest(job="train", worker=""),
             code=grpc.StatusCode.INVALID_ARGUMENT),
        dict(call="CreateJob", request=pb.CreateJobRequest(job=pb.JobSpec(name="empty")),
             code=grpc.StatusCode.INVALID_ARGUMENT),
        dict(call="Heartbeat", request=pb.HeartbeatRequest(job="nope", worker="w0"),
             code=grpc.StatusCode.NOT_FOUND),
    )
    def test_bad_requests_get_status_codes_and_change_nothing(self, call, request, code):
        self.client.register_worker("train", "w0")
        self.client.acquire("train", "w0", 1)
        before = self.client.status()
        stub, _ = _raw_stub(self.server.target)
        with self.assertRaises(grpc.RpcError) as raised:
            getattr(stub, call)(request)
        self.assertEqual(raised.exception.code(), code)
        after = self.client.status()
        self.assertEqual(list(after.jobs), list(before.jobs))
        self.assertEqual(
            [(w.worker, w.leases, w.completed_shards) for w in after.workers],
            [(w.worker, w.leases, w.completed_shards) for w in before.workers],
        )

    def test_client_maps_codes_to_core_errors(self):
        with self.assertRaisesRegex(core.FailedPrecondition, "'ghost' is not registered"):
            self.client.acquire("train", "ghost")
        with self.assertRaisesRegex(core.AlreadyExists, "different spec"):
            self.client.create_job(core.JobSpec("train", SPEC.shards[:2]))

    def test_start_and_stop_are_safe_twice(self):
        self.assertIs(self.server.start(), self.server)
        target = self.server.target
        self.server.stop()
        self.server.stop()
        with self.assertRaises(grpc.RpcError):
            _raw_stub(target)[0].Status(pb.StatusRequest(), timeout=1)

    def test_target_before_start(self):
        with self.assertRaisesRegex(RuntimeError, "after start"):
            server_lib.DispatcherServer().target


class AuthTest(absltest.TestCase):
    def test_every_rpc_without_the_token_is_unauthenticated(self):
        config = server_lib.ServerConfig(auth_token="s3cret")
        with server_lib.server_context(config) as server:
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                stub = pb_grpc.ShardDispatcherStub(grpc.insecure_channel(server.target))
                for call, request in (
                    ("Status", pb.StatusRequest()),
                    ("CreateJob", pb.CreateJobRequest(job=pb.JobSpec(name="x"))),
                    ("Acquire", pb.AcquireRequest(job="x", worker="w", max_shards=1)),
                ):
                    with self.assertRaises(grpc.RpcError) as raised:
                        getattr(stub, call)(request, metadata=metadata)
                    self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
            self.assertEqual(server.core.jobs(), [])
            client = client_lib.DispatcherClient(server.target, auth_token="s3cret")
            self.assertTrue(client.create_job(SPEC))


class TlsTest(absltest.TestCase):
    def test_serves_tls(self):
        tmp = self.create_tempdir().full_path
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", key, "-out", cert],
            check=True,
            capture_output=True,
        )
        config = server_lib.ServerConfig(tls_cert_file=cert, tls_key_file=key)
        with server_lib.server_context(config) as server:
            port = server.target.rsplit(":", 1)[1]
            client = client_lib.DispatcherClient(f"localhost:{port}", tls_root_cert_file=cert)
            self.assertTrue(client.create_job(SPEC))
            plain = client_lib.DispatcherClient(server.target, unavailable_timeout_s=0.5)
            with self.assertRaises(grpc.RpcError):
                plain.status()

    def test_cert_without_key(self):
        with self.assertRaisesRegex(ValueError, "TLS needs both a certificate and a key"):
            server_lib.DispatcherServer(server_lib.ServerConfig(tls_cert_file="c.pem")).start()


if __name__ == "__main__":
    absltest.main()
