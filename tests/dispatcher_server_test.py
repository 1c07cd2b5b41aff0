"""Tests for the dispatcher's gRPC server and client, on loopback."""

import dataclasses
import threading
import time

import grpc
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import consumer as consumer_lib
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import types

SPEC = types.JobSpec(
    "train", tuple(types.ShardSpec(f"range:{i}:{i + 1}", 1) for i in range(8)), lease_timeout_s=30
)


def _read_range(name):
    start, stop = name.split(":")[1:]
    return range(int(start), int(stop))


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
        dict(
            call="Acquire",
            request=pb.AcquireRequest(job="train", worker="w0", max_shards=-1),
            code=grpc.StatusCode.INVALID_ARGUMENT,
        ),
        dict(
            call="Acquire",
            request=pb.AcquireRequest(job="train", worker="w0", max_shards=1, claim=7),
            code=grpc.StatusCode.INVALID_ARGUMENT,
        ),
        dict(
            call="Acquire",
            request=pb.AcquireRequest(
                job="train",
                worker="w0",
                max_shards=1,
                complete=[1],
                progress=[pb.ShardProgress(token=1, offset=-5)],
            ),
            code=grpc.StatusCode.INVALID_ARGUMENT,
        ),
        dict(
            call="Acquire",
            request=pb.AcquireRequest(job="train", worker="ghost", max_shards=1),
            code=grpc.StatusCode.FAILED_PRECONDITION,
        ),
        dict(
            call="Complete",
            request=pb.CompleteRequest(job="train", worker="w0", token=12345),
            code=grpc.StatusCode.FAILED_PRECONDITION,
        ),
        dict(
            call="Release",
            request=pb.ReleaseRequest(job="train", worker="ghost", token=1),
            code=grpc.StatusCode.FAILED_PRECONDITION,
        ),
        dict(
            call="RegisterWorker",
            request=pb.RegisterWorkerRequest(job="train", worker=""),
            code=grpc.StatusCode.INVALID_ARGUMENT,
        ),
        dict(
            call="CreateJob",
            request=pb.CreateJobRequest(job=pb.JobSpec(name="empty")),
            code=grpc.StatusCode.INVALID_ARGUMENT,
        ),
        dict(
            call="Heartbeat",
            request=pb.HeartbeatRequest(job="nope", worker="w0"),
            code=grpc.StatusCode.NOT_FOUND,
        ),
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
        with self.assertRaisesRegex(types.FailedPrecondition, "'ghost' is not registered"):
            self.client.acquire("train", "ghost")
        with self.assertRaisesRegex(types.AlreadyExists, "different spec"):
            self.client.create_job(types.JobSpec("train", SPEC.shards[:2]))

    def test_a_group_rewind_carries_the_group_size(self):
        spec = types.JobSpec("eq", SPEC.shards, num_consumers=3, equalize="pad")
        self.client.create_job(spec)
        self.assertEqual(self.client.register_worker("eq", "w0").num_consumers, 3)
        self.client.rewind("eq", "w0", types.InputPosition(), group=True, num_consumers=2)
        self.assertEqual(self.client.register_worker("eq", "w1").num_consumers, 2)
        with self.assertRaisesRegex(types.InvalidArgument, "0 without group"):
            self.client.rewind("eq", "w0", types.InputPosition(), num_consumers=2)

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


class ClientTypesTest(absltest.TestCase):
    """Every client method returns the dispatcher's types, never a protocol message."""

    def test_each_reply_is_a_dispatcher_type(self):
        with server_lib.server_context() as server:
            client = client_lib.DispatcherClient(server.target)
            self.addCleanup(client.close)
            self.assertTrue(client.create_job(SPEC))
            registration = client.register_worker("train", "w0")
            self.assertEqual(
                registration,
                types.Registration(30.0, 1, 0, "none", heartbeat_interval_s=7.5),
            )
            result = client.acquire("train", "w0", 2, claim="commit")
            self.assertIsInstance(result, types.AcquireResult)
            self.assertTrue(all(isinstance(lease, types.Lease) for lease in result.leases))
            self.assertEqual(result.leases[0].worker, "w0")
            self.assertEqual(
                client.epoch_progress("train", 0),
                types.EpochProgress(False, 2, 2, SPEC.shards[0].name),
            )
            (job,) = client.list_jobs()
            self.assertEqual(job, server.core.jobs()[0])
            status = client.status()
            self.assertIsInstance(status, types.DispatcherStatus)
            self.assertEqual(status.jobs, (job,))
            (worker,) = status.workers
            self.assertEqual(
                (worker.worker, worker.live, worker.leases, worker.outstanding), ("w0", True, 2, 2)
            )
            self.assertEqual(status.omitted_workers, 0)

    def test_a_request_over_the_size_limit_is_resource_exhausted(self):
        config = server_lib.ServerConfig(max_request_bytes=1024)
        with server_lib.server_context(config) as server:
            client = client_lib.DispatcherClient(server.target)
            self.addCleanup(client.close)
            shards = tuple(types.ShardSpec(f"shard-{i:04d}") for i in range(200))
            with self.assertRaises(types.ResourceExhausted):
                client.create_job(types.JobSpec("big", shards))


class RestartTest(absltest.TestCase):
    """`start()` after `stop()` serves again."""

    def test_without_a_work_dir_the_state_carries_on(self):
        server = server_lib.DispatcherServer()
        self.addCleanup(server.stop)
        server.start()
        client = client_lib.DispatcherClient(server.target, unavailable_timeout_s=2)
        client.create_job(SPEC)
        client.register_worker("train", "w0")
        client.acquire("train", "w0", 3)
        client.close()
        before = server.core.jobs()
        server.stop()
        server.start()
        client = client_lib.DispatcherClient(server.target, unavailable_timeout_s=2)
        self.addCleanup(client.close)
        self.assertEqual(client.list_jobs(), before)
        self.assertLen(client.acquire("train", "w0", 2).leases, 2)

    def test_with_a_work_dir_the_journal_is_reopened(self):
        work_dir = self.create_tempdir().full_path
        config = server_lib.ServerConfig(work_dir=work_dir)
        server = server_lib.DispatcherServer(config)
        self.addCleanup(server.stop)
        server.start()
        server.core.create_job(SPEC)
        server.core.register_worker("train", "w0")
        (lease,) = server.core.acquire("train", "w0", 1).leases
        server.core.complete("train", "w0", lease.token)
        server.stop()
        server.start()
        (job,) = server.core.jobs()
        self.assertEqual((job.completed, job.grants), (1, 1))
        # Written after the restart: the reopened journal holds it.
        server.core.create_job(dataclasses.replace(SPEC, name="more"))
        server.stop()
        with server_lib.server_context(config) as again:
            self.assertEqual(sorted(j.name for j in again.core.jobs()), ["more", "train"])

    def test_a_work_dir_taken_meanwhile_fails_the_restart(self):
        config = server_lib.ServerConfig(work_dir=self.create_tempdir().full_path)
        server = server_lib.DispatcherServer(config)
        self.addCleanup(server.stop)
        server.start()
        server.stop()
        with server_lib.server_context(config):
            with self.assertRaisesRegex(OSError, "in use by another dispatcher"):
                server.start()
        server.start()
        self.assertEqual(server.core.jobs(), [])


class OutageTest(absltest.TestCase):
    """A dispatcher that goes away (on the same port and work_dir) and comes back."""

    def setUp(self):
        super().setUp()
        config = server_lib.ServerConfig(work_dir=self.create_tempdir().full_path, fsync=False)
        self.server = server_lib.DispatcherServer(config).start()
        self.config = dataclasses.replace(config, port=int(self.server.target.rsplit(":", 1)[1]))
        self.addCleanup(lambda: self.server.stop())
        client_lib.DispatcherClient(self.server.target).create_job(SPEC)

    def _restart_after(self, outage_s):
        self.server.stop()

        def restart():
            time.sleep(outage_s)
            self.server = server_lib.DispatcherServer(self.config).start()

        thread = threading.Thread(target=restart)
        thread.start()
        self.addCleanup(thread.join)

    def test_the_default_timeout_outlasts_long_outages(self):
        client = client_lib.DispatcherClient(self.server.target)
        self.assertEqual(client.unavailable_timeout_s, 600)
        with self.assertRaisesRegex(ValueError, "Received: unavailable_timeout_s=0"):
            client_lib.DispatcherClient(self.server.target, unavailable_timeout_s=0)

    def test_a_call_waits_out_an_outage_shorter_than_the_timeout(self):
        client = client_lib.DispatcherClient(self.server.target, unavailable_timeout_s=4)
        self._restart_after(2.0)
        start = time.monotonic()
        (job,) = client.list_jobs()
        self.assertEqual(job.name, "train")
        self.assertBetween(time.monotonic() - start, 1.9, 4)

    def test_an_outage_longer_than_the_timeout_is_a_clear_error(self):
        client = client_lib.DispatcherClient(self.server.target, unavailable_timeout_s=1)
        self._restart_after(2.5)
        with self.assertRaisesRegex(
            client_lib.DispatcherUnavailable,
            r"127\.0\.0\.1:\d+ was unreachable for 1\.\d s \(unavailable_timeout_s=1\)",
        ) as raised:
            client.list_jobs()
        self.assertIsInstance(raised.exception, grpc.RpcError)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def test_a_consumer_fails_promptly_when_the_outage_outlasts_the_timeout(self):
        client = client_lib.DispatcherClient(self.server.target, unavailable_timeout_s=1)
        stream = iter(consumer_lib.ShardConsumer(client, "train", "w0", _read_range))
        next(stream)
        self.server.stop()
        start = time.monotonic()
        with self.assertRaises(client_lib.DispatcherUnavailable):
            list(stream)
        self.assertLess(time.monotonic() - start, 3)  # no retrying to give leases back


class PrefetchTest(absltest.TestCase):
    def test_a_prefetched_lease_outlives_training_on_the_shard_before(self):
        # Training each shard takes longer than a lease timeout: the second
        # lease of a batch must not expire while the first is trained.
        spec = dataclasses.replace(SPEC, shards=SPEC.shards[:4], lease_timeout_s=0.5)
        reads = []

        def read(name):
            reads.append(name)
            return _read_range(name)

        with server_lib.server_context() as server:
            client = client_lib.DispatcherClient(server.target)
            client.create_job(spec)
            consumer = consumer_lib.ShardConsumer(client, "train", "w0", read, max_shards=2)
            elements = []
            for element in consumer:
                elements.append(element)
                time.sleep(0.8)
        self.assertEqual(sorted(elements), [0, 1, 2, 3])
        self.assertEqual(sorted(reads), sorted(s.name for s in spec.shards))
        self.assertEqual(consumer.lost, [])


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
        cert, key = testutil.self_signed_cert(self.create_tempdir().full_path)
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
