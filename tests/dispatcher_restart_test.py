"""Dispatcher restarts and outages under a working consumer, on loopback."""

import collections
import dataclasses
import threading
import time

from absl.testing import absltest

from tfscale.data import readers
from tfscale.data.dispatcher import client as client_lib
from tfscale.data.dispatcher import consumer as consumer_lib
from tfscale.data.dispatcher import server as server_lib
from tfscale.data.dispatcher import shards
from tfscale.data.dispatcher import types

SHARD_SIZE = 5
NUM_EPOCHS = 2
LEASE_TIMEOUT_S = 2.0
# Seconds a consumer spends on each element while the dispatcher restarts
# (training): the consumer is mid-shard, holding a committed lease, at most stops.
PACE_S = 0.02


def _spec(num_shards):
    total = num_shards * SHARD_SIZE
    return types.JobSpec(
        "job",
        tuple(shards.expand(f"range:{total}:{SHARD_SIZE}")),
        num_epochs=NUM_EPOCHS,
        lease_timeout_s=LEASE_TIMEOUT_S,
    )


class _PacedConsumer:
    """Iterates a ShardConsumer in a thread, slowly until `hurry()`."""

    def __init__(self, consumer):
        self.consumer = consumer
        self.elements = []
        self.error = None
        self._hurry = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def hurry(self):
        self._hurry.set()

    def join(self, timeout_s):
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def running(self):
        return self._thread.is_alive()

    def _run(self):
        try:
            for element in self.consumer:
                self.elements.append(element)
                if not self._hurry.is_set():
                    time.sleep(PACE_S)
        except Exception as e:  # the test reports it
            self.error = e


class RestartTest(absltest.TestCase):
    def _restart_under_a_consumer(self, num_shards, restarts, outage_s, uptime_s):
        config = server_lib.ServerConfig(work_dir=self.create_tempdir().full_path, fsync=False)
        server = server_lib.DispatcherServer(config).start()
        config = dataclasses.replace(config, port=int(server.target.rsplit(":", 1)[1]))
        client = client_lib.DispatcherClient(server.target, unavailable_timeout_s=30)
        self.addCleanup(client.close)
        client.create_job(_spec(num_shards))
        consumer = consumer_lib.ShardConsumer(client, "job", "w0", readers.elements, max_shards=2)
        paced = _PacedConsumer(consumer)
        try:
            for _ in range(restarts):
                time.sleep(uptime_s)
                server.stop()
                time.sleep(outage_s)
                server = server_lib.DispatcherServer(config).start()
            self.assertTrue(
                paced.running, f"the job ended before the last restart: {paced.error!r}"
            )
            paced.hurry()
            self.assertTrue(paced.join(timeout_s=60), "the consumer did not finish")
        finally:
            paced.hurry()
            server.stop()
        self.assertIsNone(paced.error)
        return consumer, paced.elements

    def _assert_each_element_once_per_epoch(self, num_shards, consumer, elements):
        counts = collections.Counter(elements)
        duplicated = sorted(e for e, c in counts.items() if c > NUM_EPOCHS)
        self.assertEqual(duplicated, [], "elements delivered twice in an epoch")
        self.assertEqual(set(counts), set(range(num_shards * SHARD_SIZE)))
        self.assertEqual(set(counts.values()), {NUM_EPOCHS})
        self.assertLen(set(consumer.delivered), num_shards * NUM_EPOCHS)
        self.assertEqual(consumer.lost, [])
        self.assertEqual(consumer.lost, [])

    def test_a_live_worker_keeps_its_leases_over_restarts(self):
        consumer, elements = self._restart_under_a_consumer(
            num_shards=40, restarts=3, outage_s=1.5, uptime_s=0.5
        )
        self._assert_each_element_once_per_epoch(40, consumer, elements)


class ManyRestartsTest(RestartTest):
    def test_a_live_worker_keeps_its_leases_over_restarts(self):
        consumer, elements = self._restart_under_a_consumer(
            num_shards=120, restarts=10, outage_s=1.5, uptime_s=0.5
        )
        self._assert_each_element_once_per_epoch(120, consumer, elements)


if __name__ == "__main__":
    absltest.main()
