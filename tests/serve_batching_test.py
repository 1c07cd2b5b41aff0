"""Tests for the dynamic batcher of a serving replica (no gRPC)."""

import threading
import time

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.serve import batching

testutil.setup_devices()

TIMEOUT = 10.0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Recorder:
    """A run_fn computing y = 2 * x that records its batches and can be held."""

    def __init__(self, fail_if_negative=False):
        self.batches = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_if_negative = fail_if_negative

    def hold(self):
        self.entered.clear()
        self.release.clear()

    def __call__(self, inputs):
        self.batches.append({k: v.copy() for k, v in inputs.items()})
        self.entered.set()
        if not self.release.wait(TIMEOUT):
            raise AssertionError("run_fn was never released")
        if self.fail_if_negative and (inputs["x"] < 0).any():
            raise ValueError("negative input")
        return {"y": inputs["x"] * 2, "row": np.arange(len(inputs["x"]))}


def _x(rows, start=0.0, width=2):
    return {"x": np.arange(start, start + rows * width, dtype=np.float32).reshape(rows, width)}


def _batcher(run_fn, **options):
    options.setdefault("max_queue_delay_ms", 0.0)
    batcher = batching.DynamicBatcher(run_fn, batching.BatchingOptions(**options))
    return batcher


class DynamicBatcherMergingTest(absltest.TestCase):
    def _start_held(self, recorder, batcher):
        """Submits one request and waits until run_fn holds it."""
        recorder.hold()
        first = batcher.submit(_x(1, start=-1000.0))
        self.assertTrue(recorder.entered.wait(TIMEOUT))
        return first

    def test_queued_requests_are_merged_in_order_and_get_their_rows(self):
        recorder = Recorder()
        sizes_seen = []
        batcher = batching.DynamicBatcher(
            recorder,
            batching.BatchingOptions(max_batch_size=8, max_queue_delay_ms=0.0),
            on_batch=lambda rows, padded, wait_s, compute_s: sizes_seen.append((rows, padded)),
        )
        with batcher:
            first = self._start_held(recorder, batcher)
            rows = [1, 3, 2, 2, 3, 1, 1, 4, 2, 3, 1, 2, 2, 2, 3, 1]
            requests = [_x(n, start=100.0 * i) for i, n in enumerate(rows)]
            futures = [batcher.submit(r) for r in requests]
            recorder.release.set()
            for request, future in zip(requests, futures):
                out = future.result(TIMEOUT)
                np.testing.assert_array_equal(out["y"], request["x"] * 2)
                self.assertLen(out["row"], len(request["x"]))
            first.result(TIMEOUT)
        # Greedy in arrival order: a batch closes when the next request would not fit.
        expected, batch = [], 0
        for n in rows:
            if batch + n > 8:
                expected.append(batch)
                batch = 0
            batch += n
        expected.append(batch)
        self.assertEqual([rows for rows, _ in sizes_seen], [1] + expected)
        self.assertLess(len(sizes_seen), len(rows))
        for batch_inputs in recorder.batches:
            self.assertLessEqual(len(batch_inputs["x"]), 8)
        stats = batcher.stats()
        self.assertEqual(stats.requests, len(rows) + 1)
        self.assertEqual(stats.rows, sum(rows) + 1)
        self.assertEqual(stats.batches, len(sizes_seen))
        self.assertEqual(stats.queue_depth, 0)

    def test_row_offsets_follow_the_merged_batch(self):
        recorder = Recorder()
        with _batcher(recorder, max_batch_size=8) as batcher:
            self._start_held(recorder, batcher)
            futures = [batcher.submit(_x(n, start=10.0 * i)) for i, n in enumerate((2, 3, 3))]
            recorder.release.set()
            rows = [list(f.result(TIMEOUT)["row"]) for f in futures]
        self.assertEqual(rows, [[0, 1], [2, 3, 4], [5, 6, 7]])

    def test_requests_of_different_shapes_are_not_merged(self):
        recorder = Recorder()
        with _batcher(recorder, max_batch_size=8) as batcher:
            self._start_held(recorder, batcher)
            narrow_a = batcher.submit(_x(1, width=3))
            wide = batcher.submit(_x(2, width=4))
            narrow_b = batcher.submit(_x(1, start=50.0, width=3))
            as_int = batcher.submit({"x": np.ones((1, 3), np.int32)})
            recorder.release.set()
            for future in (narrow_a, wide, narrow_b, as_int):
                future.result(TIMEOUT)
        shapes = [(b["x"].shape, b["x"].dtype) for b in recorder.batches[1:]]
        self.assertEqual(
            shapes,
            [((2, 3), np.float32), ((2, 4), np.float32), ((1, 3), np.int32)],
        )
        self.assertEqual(wide.result()["y"].shape, (2, 4))

    def test_several_batch_threads_serve_concurrently(self):
        recorder = Recorder()
        with _batcher(recorder, max_batch_size=2, num_batch_threads=2) as batcher:
            recorder.hold()
            first = batcher.submit(_x(2))
            self.assertTrue(recorder.entered.wait(TIMEOUT))
            recorder.entered.clear()
            second = batcher.submit(_x(2, start=10.0))
            # The second thread runs it while the first is still held.
            self.assertTrue(recorder.entered.wait(TIMEOUT))
            recorder.release.set()
            first.result(TIMEOUT)
            second.result(TIMEOUT)

    def test_concurrent_clients_each_get_their_rows(self):
        seen_sizes = set()

        def run_fn(inputs):
            seen_sizes.add(len(inputs["x"]))
            return {"y": inputs["x"] * 2}

        def client(index, results):
            rng = np.random.default_rng(index)
            for i in range(50):
                x = _x(int(rng.integers(1, 6)), start=1000.0 * index + 10.0 * i)
                results.append((x, batcher.submit(x)))

        options = dict(max_batch_size=8, max_queue_delay_ms=1.0, num_batch_threads=2)
        with _batcher(run_fn, **options) as batcher:
            results = [[] for _ in range(8)]
            clients = [threading.Thread(target=client, args=(i, results[i])) for i in range(8)]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join(TIMEOUT)
            for x, future in sum(results, []):
                np.testing.assert_array_equal(future.result(TIMEOUT)["y"], x["x"] * 2)
        self.assertLessEqual(seen_sizes, {1, 2, 4, 8})
        stats = batcher.stats()
        self.assertEqual(stats.requests, 400)
        self.assertEqual(stats.rows, sum(len(x["x"]) for x, _ in sum(results, [])))


class DynamicBatcherDelayTest(absltest.TestCase):
    def test_a_lone_request_waits_for_the_queue_delay(self):
        waits = []
        options = batching.BatchingOptions(max_batch_size=8, max_queue_delay_ms=50.0)
        batcher = batching.DynamicBatcher(
            lambda inputs: {"y": inputs["x"]},
            options,
            on_batch=lambda rows, padded, wait_s, compute_s: waits.append(wait_s),
        )
        with batcher:
            start = time.monotonic()
            batcher.submit(_x(1)).result(TIMEOUT)
            elapsed = time.monotonic() - start
        self.assertGreaterEqual(elapsed, 0.045)
        self.assertGreaterEqual(waits[0], 0.045)

    def test_a_full_batch_does_not_wait(self):
        recorder = Recorder()
        # A delay far beyond the test's timeout: only a full batch can run in time.
        with _batcher(recorder, max_batch_size=4, max_queue_delay_ms=60_000.0) as batcher:
            batcher.submit(_x(4)).result(TIMEOUT)
            first = batcher.submit(_x(1))
            second = batcher.submit(_x(3, start=10.0))
            first.result(TIMEOUT)
            second.result(TIMEOUT)
        self.assertEqual([len(b["x"]) for b in recorder.batches], [4, 4])

    def test_close_runs_queued_requests_without_waiting(self):
        recorder = Recorder()
        batcher = _batcher(recorder, max_batch_size=4, max_queue_delay_ms=60_000.0)
        future = batcher.submit(_x(1))
        batcher.close()
        np.testing.assert_array_equal(future.result(0)["y"], _x(1)["x"] * 2)


class DynamicBatcherPaddingTest(absltest.TestCase):
    def test_batches_are_padded_to_allowed_sizes_with_the_last_row(self):
        recorder = Recorder()
        with _batcher(recorder, max_batch_size=8, allowed_batch_sizes=(2, 4, 8)) as batcher:
            for rows in range(1, 9):
                out = batcher.submit(_x(rows, start=rows * 100.0)).result(TIMEOUT)
                self.assertEqual(out["y"].shape, (rows, 2))
                np.testing.assert_array_equal(out["y"], _x(rows, start=rows * 100.0)["x"] * 2)
        seen = [len(b["x"]) for b in recorder.batches]
        self.assertEqual(seen, [2, 2, 4, 4, 8, 8, 8, 8])
        three = recorder.batches[2]["x"]
        np.testing.assert_array_equal(three[3], three[2])
        self.assertEqual(batcher.stats().padded_rows, sum(seen) - sum(range(1, 9)))

    def test_padding_bounds_the_traces_of_a_tf_function(self):
        @tf.function(reduce_retracing=False)
        def model(inputs):
            return {"y": tf.reduce_sum(inputs["x"], axis=1) * 2.0}

        def run_fn(inputs):
            return {k: v.numpy() for k, v in model(inputs).items()}

        padded_seen = set()
        request_rows = range(1, 17)
        batcher = batching.DynamicBatcher(
            run_fn,
            batching.BatchingOptions(max_batch_size=16, max_queue_delay_ms=0.0),
            on_batch=lambda rows, padded, wait_s, compute_s: padded_seen.add(padded),
        )
        with batcher:
            for rows in request_rows:
                x = _x(rows, width=3)
                out = batcher.submit(x).result(TIMEOUT)
                np.testing.assert_allclose(out["y"], x["x"].sum(axis=1) * 2.0)
        self.assertEqual(padded_seen, {1, 2, 4, 8, 16})
        self.assertEqual(model.experimental_get_tracing_count(), len(padded_seen))
        self.assertLess(model.experimental_get_tracing_count(), len(request_rows))


class DynamicBatcherRefusalTest(absltest.TestCase):
    def test_a_full_queue_refuses_at_once(self):
        recorder = Recorder()
        with _batcher(recorder, max_batch_size=4, max_queue_size=2) as batcher:
            recorder.hold()
            running = batcher.submit(_x(1))
            self.assertTrue(recorder.entered.wait(TIMEOUT))
            queued = [batcher.submit(_x(1)), batcher.submit(_x(1))]
            start = time.monotonic()
            with self.assertRaisesRegex(batching.QueueFull, "max_queue_size=2"):
                batcher.submit(_x(1))
            self.assertLess(time.monotonic() - start, 1.0)
            stats = batcher.stats()
            self.assertEqual((stats.rejected, stats.queue_depth), (1, 2))
            recorder.release.set()
            for future in [running] + queued:
                future.result(TIMEOUT)
            batcher.submit(_x(1)).result(TIMEOUT)

    def test_a_request_larger_than_a_batch_is_refused(self):
        with _batcher(Recorder(), max_batch_size=4) as batcher:
            with self.assertRaisesRegex(
                batching.RequestTooLarge, "max_batch_size=4 rows. Received: 5 rows"
            ):
                batcher.submit(_x(5))

    def test_malformed_inputs_are_refused(self):
        with _batcher(Recorder()) as batcher:
            with self.assertRaisesRegex(batching.InvalidRequest, "batch size of at least 1"):
                batcher.submit({"x": np.ones((2, 3)), "z": np.ones((3,))})
            with self.assertRaisesRegex(batching.InvalidRequest, "batch size of at least 1"):
                batcher.submit({"x": np.ones((0, 3))})
            with self.assertRaisesRegex(batching.InvalidRequest, "batch axis"):
                batcher.submit({"x": np.float32(1.0)})
            with self.assertRaisesRegex(batching.InvalidRequest, "non-empty dict"):
                batcher.submit({})
        self.assertEqual(batcher.stats().requests, 0)

    def test_a_request_not_matching_the_signature_is_refused(self):
        signature = {"x": (np.float32, (None, 3)), "ids": (tf.int64, ())}
        batcher = batching.DynamicBatcher(
            lambda inputs: {"y": inputs["x"]},
            batching.BatchingOptions(max_queue_delay_ms=0.0),
            signature=signature,
        )
        ids = np.zeros((2,), np.int64)
        with batcher:
            out = batcher.submit({"x": np.ones((2, 5, 3), np.float32), "ids": ids})
            self.assertEqual(out.result(TIMEOUT)["y"].shape, (2, 5, 3))
            with self.assertRaisesRegex(
                batching.InvalidRequest,
                r"'x' must have dtype=float32, shape=\(batch, None, 3\). "
                r"Received: dtype=float64, shape=\(2, 5, 3\)",
            ):
                batcher.submit({"x": np.ones((2, 5, 3)), "ids": ids})
            with self.assertRaisesRegex(
                batching.InvalidRequest, r"Received: dtype=float32, shape=\(2, 5, 4\)"
            ):
                batcher.submit({"x": np.ones((2, 5, 4), np.float32), "ids": ids})
            with self.assertRaisesRegex(
                batching.InvalidRequest, r"must be \['ids', 'x'\]. Received: \['x'\]"
            ):
                batcher.submit({"x": np.ones((2, 5, 3), np.float32)})

    def test_a_malformed_signature_is_a_value_error(self):
        with self.assertRaisesRegex(ValueError, "'x': 'float32'"):
            batching.DynamicBatcher(lambda inputs: inputs, signature={"x": "float32"})


class DynamicBatcherDeadlineTest(absltest.TestCase):
    def test_an_expired_request_is_not_computed_and_others_proceed(self):
        clock = FakeClock()
        recorder = Recorder()
        batcher = batching.DynamicBatcher(
            recorder,
            batching.BatchingOptions(max_batch_size=8, max_queue_delay_ms=0.0),
            clock=clock,
        )
        with batcher:
            recorder.hold()
            running = batcher.submit(_x(1), deadline=1.0)
            self.assertTrue(recorder.entered.wait(TIMEOUT))
            expiring = batcher.submit(_x(2, start=-500.0), deadline=5.0)
            plain = batcher.submit(_x(1, start=10.0))
            later = batcher.submit(_x(3, start=20.0), deadline=100.0)
            clock.now = 10.0
            recorder.release.set()
            # Already running when its deadline passed: it completes.
            running.result(TIMEOUT)
            with self.assertRaises(batching.DeadlineExceeded):
                expiring.result(TIMEOUT)
            plain.result(TIMEOUT)
            later.result(TIMEOUT)
            with self.assertRaisesRegex(batching.DeadlineExceeded, "before submit"):
                batcher.submit(_x(1), deadline=9.0)
        self.assertLen(recorder.batches, 2)
        self.assertEqual(len(recorder.batches[1]["x"]), 4)
        self.assertFalse((recorder.batches[1]["x"] < 0).any())
        self.assertEqual(batcher.stats().expired, 2)

    def test_a_waiting_batcher_wakes_to_expire_a_request(self):
        recorder = Recorder()
        with _batcher(recorder, max_batch_size=8, max_queue_delay_ms=60_000.0) as batcher:
            future = batcher.submit(_x(1), deadline=time.monotonic() + 0.05)
            with self.assertRaises(batching.DeadlineExceeded):
                future.result(TIMEOUT)
        self.assertEqual(recorder.batches, [])

    def test_a_cancelled_request_is_not_computed(self):
        recorder = Recorder()
        with _batcher(recorder, max_batch_size=8) as batcher:
            recorder.hold()
            batcher.submit(_x(1))
            self.assertTrue(recorder.entered.wait(TIMEOUT))
            cancelled = batcher.submit(_x(1, start=-5.0))
            kept = batcher.submit(_x(1, start=5.0))
            self.assertTrue(cancelled.cancel())
            recorder.release.set()
            kept.result(TIMEOUT)
        self.assertEqual([len(b["x"]) for b in recorder.batches], [1, 1])
        self.assertEqual(batcher.stats().cancelled, 1)


class DynamicBatcherErrorTest(absltest.TestCase):
    def test_a_failing_batch_fails_its_requests_and_serving_goes_on(self):
        recorder = Recorder(fail_if_negative=True)
        with _batcher(recorder, max_batch_size=8) as batcher:
            recorder.hold()
            first = batcher.submit(_x(1))
            self.assertTrue(recorder.entered.wait(TIMEOUT))
            bad = batcher.submit(_x(1, start=-10.0))
            merged_with_bad = batcher.submit(_x(2, start=10.0))
            recorder.release.set()
            first.result(TIMEOUT)
            for future in (bad, merged_with_bad):
                with self.assertRaisesRegex(ValueError, "negative input"):
                    future.result(TIMEOUT)
            np.testing.assert_array_equal(
                batcher.submit(_x(2, start=3.0)).result(TIMEOUT)["y"], _x(2, start=3.0)["x"] * 2
            )
        self.assertEqual(batcher.stats().failed, 2)

    def test_outputs_with_the_wrong_rows_fail_the_batch(self):
        with _batcher(lambda inputs: {"y": np.zeros((1,))}, max_batch_size=4) as batcher:
            future = batcher.submit(_x(3))
            with self.assertRaisesRegex(ValueError, r"'y' must have 4 rows .* shape=\(1,\)"):
                future.result(TIMEOUT)

    def test_an_on_batch_error_does_not_fail_requests(self):
        def on_batch(*args):
            raise RuntimeError("exporter down")

        batcher = batching.DynamicBatcher(
            lambda inputs: {"y": inputs["x"]},
            batching.BatchingOptions(max_queue_delay_ms=0.0),
            on_batch=on_batch,
        )
        with batcher, self.assertLogs(batching.__name__, "ERROR"):
            batcher.submit(_x(1)).result(TIMEOUT)


class DynamicBatcherCloseTest(absltest.TestCase):
    def test_close_drains_refuses_and_is_idempotent(self):
        recorder = Recorder()
        before = set(threading.enumerate())
        batcher = _batcher(recorder, max_batch_size=2)
        threads = set(threading.enumerate()) - before
        recorder.hold()
        running = batcher.submit(_x(1))
        self.assertTrue(recorder.entered.wait(TIMEOUT))
        queued = [batcher.submit(_x(2, start=10.0 * i)) for i in range(3)]
        closer = threading.Thread(target=batcher.close)
        closer.start()
        while not batcher.closed:
            time.sleep(0.001)
        with self.assertRaises(batching.BatcherClosed):
            batcher.submit(_x(1))
        recorder.release.set()
        closer.join(TIMEOUT)
        self.assertFalse(closer.is_alive())
        for future in [running] + queued:
            self.assertTrue(future.done())
            future.result(0)
        batcher.close()
        self.assertNotEmpty(threads)
        self.assertFalse(any(t.is_alive() for t in threads))

    def test_close_without_draining_fails_the_queued_requests(self):
        recorder = Recorder()
        batcher = _batcher(recorder, max_batch_size=8)
        recorder.hold()
        running = batcher.submit(_x(1))
        self.assertTrue(recorder.entered.wait(TIMEOUT))
        queued = batcher.submit(_x(1))
        closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
        closer.start()
        with self.assertRaises(batching.BatcherClosed):
            queued.result(TIMEOUT)
        recorder.release.set()
        closer.join(TIMEOUT)
        running.result(0)
        self.assertLen(recorder.batches, 1)


class BatchingOptionsTest(parameterized.TestCase):
    def test_defaults(self):
        options = batching.BatchingOptions()
        self.assertEqual(options.allowed_batch_sizes, (1, 2, 4, 8, 16, 32))
        self.assertEqual(
            batching.BatchingOptions(max_batch_size=12).allowed_batch_sizes, (1, 2, 4, 8, 12)
        )
        self.assertEqual(batching.BatchingOptions(max_batch_size=1).allowed_batch_sizes, (1,))
        self.assertEqual(
            batching.BatchingOptions(
                max_batch_size=8, allowed_batch_sizes=[3, 8]
            ).allowed_batch_sizes,
            (3, 8),
        )

    @parameterized.parameters(
        (dict(max_batch_size=0), "max_batch_size=0"),
        (dict(max_batch_size=2.0), "max_batch_size=2.0"),
        (dict(max_queue_delay_ms=-1.0), "max_queue_delay_ms=-1.0"),
        (dict(max_queue_delay_ms=float("nan")), "max_queue_delay_ms=nan"),
        (dict(max_queue_size=0), "max_queue_size=0"),
        (dict(num_batch_threads=True), "num_batch_threads=True"),
        (dict(max_batch_size=8, allowed_batch_sizes=(2, 4)), r"allowed_batch_sizes=\(2, 4\)"),
        (dict(max_batch_size=8, allowed_batch_sizes=(4, 2, 8)), r"allowed_batch_sizes=\(4, 2, 8\)"),
        (dict(max_batch_size=8, allowed_batch_sizes=(0, 8)), r"allowed_batch_sizes=\(0, 8\)"),
        (dict(allowed_batch_sizes=()), r"allowed_batch_sizes=\(\)"),
    )
    def test_bad_values_are_named(self, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            batching.BatchingOptions(**kwargs)

    def test_options_are_frozen_and_checked_by_the_batcher(self):
        options = batching.BatchingOptions()
        with self.assertRaises(AttributeError):
            options.max_batch_size = 3
        with self.assertRaisesRegex(ValueError, "Received: {'max_batch_size': 3}"):
            batching.DynamicBatcher(lambda inputs: inputs, {"max_batch_size": 3})


if __name__ == "__main__":
    absltest.main()
