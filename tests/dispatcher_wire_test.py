"""Tests for tfscale.data.dispatcher.wire: the types survive the protocol both ways."""

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.data.dispatcher import dispatcher_pb2 as pb
from tfscale.data.dispatcher import types
from tfscale.data.dispatcher import wire

_JOB = types.JobStatus(
    name="train",
    policy="adaptive",
    epoch=1,
    num_epochs=3,
    num_shards=10,
    pending=4,
    leased=2,
    completed=4,
    finished=False,
    grants=17,
)
_WORKER = types.WorkerStatus(
    job="train",
    worker="w0",
    live=True,
    leases=2,
    outstanding=20,
    completed_shards=5,
    completed_size=50,
    throughput=12.5,
)


class RoundTripTest(parameterized.TestCase):
    def test_job_spec(self):
        spec = types.JobSpec(
            "train",
            (types.ShardSpec("a", 3), types.ShardSpec("b", 4)),
            policy="least_loaded",
            num_epochs=2,
            seed=-5,
            lease_timeout_s=7.5,
            num_consumers=2,
            equalize="pad",
        )
        self.assertEqual(wire.job_spec_from_proto(wire.job_spec_to_proto(spec)), spec)

    def test_lease(self):
        lease = types.Lease("train", 1, 3, "c", 9, 42, "w0", speculative=True, offset=4)
        self.assertEqual(wire.lease_from_proto(wire.lease_to_proto(lease), "w0"), lease)

    def test_acquire_result(self):
        lease = types.Lease("train", 0, 1, "b", 2, 7, "w1")
        result = types.AcquireResult(leases=(lease,), retry_after_s=0.5, rejected=(3, 4))
        message = wire.acquire_result_to_proto(result)
        self.assertEqual(wire.acquire_result_from_proto(message, "w1"), result)

    def test_registration(self):
        joined = types.Registration(30.0, 3, 2, "drop", heartbeat_interval_s=7.5)
        message = wire.registration_to_proto(joined)
        self.assertIsInstance(message, pb.RegisterWorkerResponse)
        self.assertEqual(wire.registration_from_proto(message), joined)

    def test_epoch_progress(self):
        progress = types.EpochProgress(finished=True, floor=3, ceiling=9, pad_shard="a")
        message = wire.epoch_progress_to_proto(progress)
        self.assertEqual(wire.epoch_progress_from_proto(message), progress)

    @parameterized.parameters(
        types.InputPosition(),
        types.InputPosition(2, (0, 3), ((1, 5),)),
        types.InputPosition(2, (0,), ((1, 5), (3, 2))),
        types.InputPosition(1, (4,)),
    )
    def test_position(self, position):
        message = wire.position_to_proto("train", "w0", position)
        self.assertEqual(wire.position_from_proto(message), position)

    def test_progress(self):
        progress = {3: 10, 9: 0}
        self.assertEqual(wire.progress_from_proto(wire.progress_to_proto(progress)), progress)
        self.assertEqual(wire.progress_to_proto(None), [])

    def test_status(self):
        status = types.DispatcherStatus(
            jobs=(_JOB,), workers=(_WORKER,), omitted_workers=3, imbalance=1.25, uptime_s=60.0
        )
        message = wire.status_to_proto(status)
        self.assertIsInstance(message, pb.StatusResponse)
        self.assertEqual(wire.status_from_proto(message, omitted=3), status)

    def test_job_status(self):
        self.assertEqual(wire.job_status_from_proto(wire.job_status_to_proto(_JOB)), _JOB)

    def test_int64_totals_saturate(self):
        huge = types.WorkerStatus("j", "w", True, 0, 0, 0, 2**70, 0.0)
        message = wire.status_to_proto(types.DispatcherStatus(workers=(huge,)))
        self.assertEqual(message.workers[0].completed_size, 2**63 - 1)


class ClaimTest(parameterized.TestCase):
    @parameterized.parameters("none", "commit", "complete")
    def test_round_trip(self, claim):
        self.assertEqual(wire.claim_from_proto(wire.claim_to_proto(claim)), claim)

    def test_unknown_value_is_invalid_argument(self):
        with self.assertRaisesRegex(types.InvalidArgument, "claim must be one of.*claim=9"):
            wire.claim_from_proto(9)


class OmittedWorkersTest(parameterized.TestCase):
    @parameterized.parameters(
        ((), 0),
        (((wire.OMITTED_WORKERS_METADATA_KEY, "12"),), 12),
        (((wire.OMITTED_WORKERS_METADATA_KEY, b"5"), ("other", "x")), 5),
        (None, 0),
    )
    def test_count(self, metadata, expected):
        self.assertEqual(wire.omitted_workers(metadata), expected)


if __name__ == "__main__":
    absltest.main()
