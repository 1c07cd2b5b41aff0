"""Hardening of the dispatcher's gRPC server, on loopback: locks, limits, status codes."""

import math
import os

import grpc
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import core
from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import dispatcher_pb2_grpc as pb_grpc
from tfscale.data.dispatcher import journal as journal_lib
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import types
from tfscale.data.dispatcher import wire

_SERVICE = "/tfscale.dispatcher.ShardDispatcher/"
_METHODS = (
    "CreateJob",
    "ListJobs",
    "RegisterWorker",
    "Heartbeat",
    "Acquire",
    "Commit",
    "Complete",
    "Release",
    "Rewind",
    "EpochProgress",
    "Status",
)


def _job(name="train", sizes=(1, 1), **fields):
    shards = [pb.Shard(name=f"range:{i}:{i + 1}", size=size) for i, size in enumerate(sizes)]
    fields = {"policy": "round_robin", "num_epochs": 1, "lease_timeout_s": 30.0, **fields}
    return pb.JobSpec(name=name, shards=shards, **fields)


class _ServerTestCase(parameterized.TestCase):
    def serve(self, **config):
        server = server_lib.DispatcherServer(server_lib.ServerConfig(**config))
        self.addCleanup(server.stop)
        server.start()
        channel = grpc.insecure_channel(server.target)
        self.addCleanup(channel.close)
        return server, channel

    def assertCode(self, call, code, details=""):
        with self.assertRaises(grpc.RpcError) as raised:
            call()
        self.assertEqual(raised.exception.code(), code, raised.exception.details())
        self.assertIn(details, raised.exception.details())
        return raised.exception


class WorkDirLockTest(_ServerTestCase):
    def test_a_second_server_on_a_work_dir_fails_naming_the_first(self):
        work_dir = self.create_tempdir().full_path
        first, _ = self.serve(work_dir=work_dir)
        with self.assertRaisesRegex(
            journal_lib.WorkDirLockedError,
            f"{work_dir} is in use by another dispatcher \\(pid {os.getpid()} on .*, serving "
            f"{first.target}\\)",
        ):
            server_lib.DispatcherServer(server_lib.ServerConfig(work_dir=work_dir)).start()
        first.stop()
        second, _ = self.serve(work_dir=work_dir)
        self.assertEqual(second.core.jobs(), [])

    def test_a_second_dispatcher_process_fails_in_one_line(self):
        work_dir = self.create_tempdir().full_path
        first, _ = self.serve(work_dir=work_dir)
        result = testutil.run_module(
            "tfscale.data.dispatcher", "serve", f"--work_dir={work_dir}", "--port=0"
        )
        self.assertEqual(result.returncode, 1, result.stderr[-2000:])
        self.assertRegex(
            result.stderr.splitlines()[-1],
            f"cannot use --work_dir={work_dir}: .*pid {os.getpid()} on .*serving {first.target}",
        )


class PortTest(_ServerTestCase):
    def test_a_second_server_on_a_port_fails_at_start(self):
        first, channel = self.serve()
        port = int(first.target.rsplit(":", 1)[1])
        second = server_lib.DispatcherServer(server_lib.ServerConfig(port=port))
        self.addCleanup(second.stop)
        with self.assertRaisesRegex(OSError, f"Could not bind the dispatcher to 127.0.0.1:{port}"):
            second.start()
        pb_grpc.ShardDispatcherStub(channel).Status(pb.StatusRequest(), timeout=5)


class StatusCodeTest(_ServerTestCase):
    @parameterized.parameters(*_METHODS)
    def test_undecodable_request_is_invalid_argument(self, method):
        _, channel = self.serve()
        call = channel.unary_unary(_SERVICE + method)
        self.assertCode(
            lambda: call(b"\xff\xff\xff\xff", timeout=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is not a valid protocol message",
        )

    def test_undecodable_request_without_the_token_is_unauthenticated(self):
        _, channel = self.serve(auth_token="s3cret")
        call = channel.unary_unary(_SERVICE + "Status")
        self.assertCode(lambda: call(b"\xff\xff", timeout=5), grpc.StatusCode.UNAUTHENTICATED)

    @parameterized.parameters(math.inf, -math.inf, math.nan, -1.0, 0.0, 1e9)
    def test_bad_lease_timeout_is_invalid_argument(self, timeout):
        server, channel = self.serve(work_dir=self.create_tempdir().full_path)
        stub = pb_grpc.ShardDispatcherStub(channel)
        self.assertCode(
            lambda: stub.CreateJob(pb.CreateJobRequest(job=_job(lease_timeout_s=timeout))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lease_timeout_s must be positive and finite",
        )
        self.assertEqual(server.core.jobs(), [])

    def test_an_unexpected_exception_is_internal_with_its_message(self):
        broken = []

        def clock():
            if broken:
                raise ArithmeticError("the clock broke")
            return 0.0

        server = server_lib.DispatcherServer(server_lib.ServerConfig(), clock=clock).start()
        self.addCleanup(server.stop)
        stub = pb_grpc.ShardDispatcherStub(grpc.insecure_channel(server.target))
        stub.CreateJob(pb.CreateJobRequest(job=_job()))
        broken.append(True)
        self.assertCode(
            lambda: stub.Status(pb.StatusRequest()),
            grpc.StatusCode.INTERNAL,
            "ArithmeticError: the clock broke",
        )


class RangeTest(_ServerTestCase):
    @parameterized.parameters(
        dict(job=_job(sizes=(2**62, 2**62)), details="shards[0].size must be <= 1099511627776"),
        dict(job=_job(sizes=(1, -1)), details="shards[1].size must be >= 0"),
        dict(job=_job(num_epochs=0), details="num_epochs must be >= 1"),
        dict(job=_job(num_epochs=2**31 - 1), details="num_epochs must be <= 1000000"),
        dict(job=_job(sizes=(2**40,) * 16, num_epochs=2**19), details="must sum to at most 2**62"),
        dict(job=_job(num_consumers=-1, equalize="pad"), details="num_consumers must be >= 0"),
    )
    def test_out_of_range_fields_are_invalid_argument(self, job, details):
        server, channel = self.serve()
        stub = pb_grpc.ShardDispatcherStub(channel)
        self.assertCode(
            lambda: stub.CreateJob(pb.CreateJobRequest(job=job)),
            grpc.StatusCode.INVALID_ARGUMENT,
            details,
        )
        stub.Status(pb.StatusRequest())
        self.assertEqual(server.core.jobs(), [])

    def test_largest_shards_keep_status_working(self):
        _, channel = self.serve()
        stub = pb_grpc.ShardDispatcherStub(channel)
        stub.CreateJob(pb.CreateJobRequest(job=_job(sizes=(2**40,) * 8)))
        stub.RegisterWorker(pb.RegisterWorkerRequest(job="train", worker="w0"))
        leases = stub.Acquire(pb.AcquireRequest(job="train", worker="w0", max_shards=8)).leases
        for lease in leases:
            stub.Complete(pb.CompleteRequest(job="train", worker="w0", token=lease.token))
        (worker,) = stub.Status(pb.StatusRequest()).workers
        self.assertEqual(worker.completed_size, 8 * 2**40)


class SizeLimitTest(_ServerTestCase):
    def test_huge_names_are_invalid_argument_with_short_details(self):
        _, channel = self.serve()
        stub = pb_grpc.ShardDispatcherStub(channel)
        stub.CreateJob(pb.CreateJobRequest(job=_job()))
        huge = "x" * 2**20
        for call in (
            lambda: stub.RegisterWorker(pb.RegisterWorkerRequest(job="train", worker=huge)),
            lambda: stub.CreateJob(pb.CreateJobRequest(job=_job(name=huge))),
            lambda: stub.CreateJob(
                pb.CreateJobRequest(
                    job=pb.JobSpec(
                        name="other",
                        shards=[pb.Shard(name=huge, size=1)],
                        num_epochs=1,
                        lease_timeout_s=30.0,
                        policy="round_robin",
                    )
                )
            ),
            lambda: stub.Heartbeat(pb.HeartbeatRequest(job=huge, worker="w0")),
        ):
            error = self.assertCode(
                call, grpc.StatusCode.INVALID_ARGUMENT, "name must be at most 1024 bytes"
            )
            self.assertLess(len(error.details()), 1024)
        self.assertLen(stub.Status(pb.StatusRequest()).jobs, 1)

    def test_status_stays_under_4_mib_and_counts_what_it_left_out(self):
        server, channel = self.serve()
        job = "j" * 1024
        server.core.create_job(types.JobSpec(job, (types.ShardSpec("a"),)))
        for i in range(2500):
            server.core.register_worker(job, f"{i:06d}".ljust(1024, "w"))
        reply, call = pb_grpc.ShardDispatcherStub(channel).Status.with_call(pb.StatusRequest())
        self.assertLen(reply.workers, core.MAX_STATUS_WORKERS)
        self.assertLess(reply.ByteSize(), 4 * 2**20)
        self.assertIn(
            (wire.OMITTED_WORKERS_METADATA_KEY, str(2500 - core.MAX_STATUS_WORKERS)),
            call.trailing_metadata(),
        )
        client = client_lib.DispatcherClient(server.target)
        try:
            status = client.status()
        finally:
            client.close()
        self.assertLen(status.workers, core.MAX_STATUS_WORKERS)
        self.assertEqual(status.omitted_workers, 2500 - core.MAX_STATUS_WORKERS)

    def test_a_request_over_the_limit_is_resource_exhausted(self):
        server, channel = self.serve(max_request_bytes=2**20)
        sizes = (1,) * 80_000  # about 2 MB of shards
        self.assertCode(
            lambda: pb_grpc.ShardDispatcherStub(channel).CreateJob(
                pb.CreateJobRequest(job=_job(sizes=sizes))
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        self.assertEqual(server.core.jobs(), [])

    def test_workers_per_job_are_bounded(self):
        server, channel = self.serve()
        server.core.create_job(types.JobSpec("train", (types.ShardSpec("a"),)))
        for i in range(types.MAX_WORKERS_PER_JOB):
            server.core.register_worker("train", f"w{i}")
        stub = pb_grpc.ShardDispatcherStub(channel)
        self.assertCode(
            lambda: stub.RegisterWorker(pb.RegisterWorkerRequest(job="train", worker="one-more")),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "A job has at most 4096 workers",
        )
        stub.RegisterWorker(pb.RegisterWorkerRequest(job="train", worker="w0"))  # a restart


class TokenTest(_ServerTestCase):
    def _token_file(self, mode):
        path = self.create_tempfile(content="s3cret\n").full_path
        os.chmod(path, mode)
        return path

    @parameterized.parameters(0o644, 0o640, 0o604)
    def test_a_token_file_others_can_read_gets_a_warning(self, mode):
        with self.assertLogs(level="WARNING") as logs:
            self.serve(auth_token_file=self._token_file(mode))
        self.assertIn("is readable by its group or others", "\n".join(logs.output))

    def test_a_private_token_file_serves_its_token(self):
        with self.assertNoLogs(level="WARNING"):
            _, channel = self.serve(auth_token_file=self._token_file(0o600))
        stub = pb_grpc.ShardDispatcherStub(channel)
        self.assertCode(lambda: stub.Status(pb.StatusRequest()), grpc.StatusCode.UNAUTHENTICATED)
        for wrong in ("Bearer s3cre", "Bearer s3cret2", "s3cret", ""):
            self.assertCode(
                lambda: stub.Status(pb.StatusRequest(), metadata=(("authorization", wrong),)),
                grpc.StatusCode.UNAUTHENTICATED,
            )
        stub.Status(pb.StatusRequest(), metadata=(("authorization", "Bearer s3cret"),))

    def test_a_token_and_a_token_file_are_refused(self):
        server = server_lib.DispatcherServer(
            server_lib.ServerConfig(auth_token="a", auth_token_file=self._token_file(0o600))
        )
        with self.assertRaisesRegex(ValueError, "not both"):
            server.start()

    def test_binding_off_loopback_without_tls_gets_a_warning(self):
        with self.assertLogs(level="WARNING") as logs:
            self.serve(host="0.0.0.0")
        self.assertIn("without TLS", "\n".join(logs.output))

    def test_loopback_without_tls_gets_no_warning(self):
        with self.assertNoLogs(level="WARNING"):
            self.serve(host="127.0.0.1")


if __name__ == "__main__":
    absltest.main()
