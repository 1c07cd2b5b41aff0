"""Tests for the Prometheus metrics of a serving process (text format 0.0.4)."""

import math
import threading

from absl.testing import absltest
from absl.testing import parameterized

from tfscale.serve import metrics

EXPECTED_TEXT = """\
# HELP requests_total Requests handled.
# TYPE requests_total counter
requests_total{method="POST",code="OK"} 1.5
requests_total{method="GET",code="NOT_FOUND"} 2
# HELP queue_depth Requests waiting.
# TYPE queue_depth gauge
queue_depth 3
# HELP latency_seconds Request latency.
# TYPE latency_seconds histogram
latency_seconds_bucket{model="mnist",le="0.125"} 2
latency_seconds_bucket{model="mnist",le="1"} 3
latency_seconds_bucket{model="mnist",le="+Inf"} 4
latency_seconds_sum{model="mnist"} 2.6875
latency_seconds_count{model="mnist"} 4
"""


def _small_registry():
    registry = metrics.Registry()
    requests = registry.counter("requests_total", "Requests handled.", labels=("method", "code"))
    depth = registry.gauge("queue_depth", "Requests waiting.")
    latency = registry.histogram(
        "latency_seconds", "Request latency.", labels=("model",), buckets=(0.125, 1.0)
    )
    requests.labels(method="POST", code="OK").inc()
    requests.labels("GET", "NOT_FOUND").inc(2)
    requests.labels(code="OK", method="POST").inc(0.5)
    depth.set(3)
    for value in (0.0625, 0.125, 0.5, 2.0):
        latency.labels(model="mnist").observe(value)
    return registry


def _histogram(buckets, values):
    histogram = metrics.Registry().histogram("h", "h", buckets=buckets)
    for value in values:
        histogram.observe(value)
    return histogram


class RenderTest(absltest.TestCase):
    def test_exact_text(self):
        self.assertEqual(_small_registry().render(), EXPECTED_TEXT)

    def test_content_type(self):
        self.assertEqual(metrics.CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")

    def test_empty_registry_renders_nothing(self):
        self.assertEqual(metrics.Registry().render(), "")

    def test_labelled_family_without_children_renders_help_and_type(self):
        registry = metrics.Registry()
        registry.counter("errors_total", "Errors.", labels=("kind",))
        self.assertEqual(
            registry.render(), "# HELP errors_total Errors.\n# TYPE errors_total counter\n"
        )

    def test_unlabelled_families_render_zero_before_use(self):
        registry = metrics.Registry()
        registry.counter("a_total", "A.")
        registry.histogram("b", "B.", buckets=(1,))
        self.assertEqual(
            metrics.parse(registry.render()),
            {
                ("a_total", ()): 0.0,
                ("b_bucket", (("le", "1"),)): 0.0,
                ("b_bucket", (("le", "+Inf"),)): 0.0,
                ("b_sum", ()): 0.0,
                ("b_count", ()): 0.0,
            },
        )

    def test_children_in_first_use_order(self):
        registry = metrics.Registry()
        counter = registry.counter("c_total", "C.", labels=("replica",))
        for replica in ("b", "a", "c", "a"):
            counter.labels(replica).inc()
        samples = [line.split(" ")[0] for line in registry.render().splitlines()[2:]]
        self.assertEqual(
            samples, ['c_total{replica="b"}', 'c_total{replica="a"}', 'c_total{replica="c"}']
        )

    def test_help_escapes_backslash_and_newline(self):
        registry = metrics.Registry()
        registry.gauge("g", 'Path C:\\tmp\nsecond "line".')
        self.assertEqual(
            registry.render().splitlines()[0], '# HELP g Path C:\\\\tmp\\nsecond "line".'
        )

    def test_special_values(self):
        registry = metrics.Registry()
        gauge = registry.gauge("g", "G.", labels=("v",))
        for name, value in (("inf", math.inf), ("-inf", -math.inf), ("nan", math.nan)):
            gauge.labels(name).set(value)
        gauge.labels("fraction").set(0.25)
        gauge.labels("big").set(1e20)
        lines = registry.render().splitlines()[2:]
        self.assertEqual(
            lines,
            [
                'g{v="inf"} +Inf',
                'g{v="-inf"} -Inf',
                'g{v="nan"} NaN',
                'g{v="fraction"} 0.25',
                'g{v="big"} 1e+20',
            ],
        )


class ParseTest(parameterized.TestCase):
    def test_round_trip_of_small_registry(self):
        samples = metrics.parse(EXPECTED_TEXT)
        self.assertLen(samples, 8)
        self.assertEqual(samples[("requests_total", (("code", "OK"), ("method", "POST")))], 1.5)
        self.assertEqual(samples[("queue_depth", ())], 3.0)
        inf_bucket = ("latency_seconds_bucket", (("le", "+Inf"), ("model", "mnist")))
        self.assertEqual(samples[inf_bucket], 4.0)
        self.assertEqual(samples[("latency_seconds_sum", (("model", "mnist"),))], 2.6875)

    def test_escaped_label_values_round_trip(self):
        values = ['a"b', "back\\slash", "new\nline", "\\n literal", 'x}{,=" y', "é\r\t", "", "\\"]
        registry = metrics.Registry()
        counter = registry.counter("c_total", "C.", labels=("v",))
        for i, value in enumerate(values):
            counter.labels(v=value).inc(i + 1)
        text = registry.render()
        self.assertIn('c_total{v="a\\"b"} 1\n', text)
        self.assertIn('c_total{v="new\\nline"} 3\n', text)
        self.assertEqual(
            metrics.parse(text), {("c_total", (("v", v),)): i + 1.0 for i, v in enumerate(values)}
        )

    def test_special_values_round_trip(self):
        registry = metrics.Registry()
        gauge = registry.gauge("g", "G.", labels=("v",))
        for value in (math.inf, -math.inf, 0.1, -2.5, 1e-7):
            gauge.labels(repr(value)).set(value)
        gauge.labels("nan").set(math.nan)
        samples = metrics.parse(registry.render())
        self.assertTrue(math.isnan(samples.pop(("g", (("v", "nan"),)))))
        self.assertEqual(
            samples, {("g", (("v", repr(v)),)): v for v in (math.inf, -math.inf, 0.1, -2.5, 1e-7)}
        )

    def test_comments_blank_lines_timestamps_and_trailing_comma(self):
        text = '# a comment\n\n  x{a="1",b="2",} 7 1700000000000\ny 1e3\r\nz{} -Inf\n'
        self.assertEqual(
            metrics.parse(text),
            {("x", (("a", "1"), ("b", "2"))): 7.0, ("y", ()): 1000.0, ("z", ()): -math.inf},
        )

    def test_label_pairs_are_sorted_by_name(self):
        self.assertEqual(list(metrics.parse('m{z="1",a="2"} 1')), [("m", (("a", "2"), ("z", "1")))])

    @parameterized.named_parameters(
        ("no_value", 'x{a="1"}', "line 1 must be a sample"),
        ("bad_value", "x 1.2.3", "the value a float"),
        ("unquoted_label", "x{a=1} 2", "line 1 must be a sample"),
        ("bad_escape", 'x{a="\\t"} 2', "escapes"),
        ("repeated_label", 'x{a="1",a="2"} 2', "each label once"),
        ("bad_name", "1x 2", "line 1 must be a sample"),
        ("repeated_sample", "# c\nx 1\nx 2", "line 3 repeats sample \\('x', \\(\\)\\)"),
    )
    def test_errors(self, text, message):
        with self.assertRaisesRegex(ValueError, message):
            metrics.parse(text)


class CounterTest(absltest.TestCase):
    def test_inc_and_value(self):
        counter = metrics.Registry().counter("c_total", "C.")
        counter.inc()
        counter.inc(2.5)
        counter.inc(0)
        self.assertEqual(counter.value, 3.5)

    def test_labels_by_position_and_by_name_pick_one_child(self):
        counter = metrics.Registry().counter("c_total", "C.", labels=("method", "code"))
        child = counter.labels("GET", 200)
        self.assertIs(counter.labels(code="200", method="GET"), child)
        self.assertIsNot(counter.labels("GET", 404), child)
        child.inc(4)
        self.assertEqual(counter.labels(method="GET", code=200).value, 4.0)

    def test_negative_or_nan_amount_raises(self):
        counter = metrics.Registry().counter("c_total", "C.")
        for amount in (-1, math.nan):
            with self.assertRaisesRegex(
                ValueError, f"counter 'c_total' only goes up. Received: amount={amount}"
            ):
                counter.inc(amount)
        self.assertEqual(counter.value, 0.0)

    def test_wrong_label_names_raise(self):
        counter = metrics.Registry().counter("c_total", "C.", labels=("method", "code"))
        expected = r"counter 'c_total' expects labels \('method', 'code'\)"
        with self.assertRaisesRegex(ValueError, expected + r"\. Received: labels=\('method',\)"):
            counter.labels(method="GET")
        with self.assertRaisesRegex(
            ValueError, expected + r"\. Received: labels=\('method', 'status'\)"
        ):
            counter.labels(method="GET", status="200")
        with self.assertRaisesRegex(
            ValueError, expected + r"\. Received: 3 values \('GET', '200', 'x'\)"
        ):
            counter.labels("GET", "200", "x")
        with self.assertRaisesRegex(ValueError, expected + ", by position or by name, not both"):
            counter.labels("GET", code="200")

    def test_value_of_labelled_family_needs_a_child(self):
        counter = metrics.Registry().counter("c_total", "C.", labels=("code",))
        message = r"counter 'c_total' has labels \('code',\): pick a child with \.labels"
        with self.assertRaisesRegex(ValueError, message):
            counter.inc()
        with self.assertRaisesRegex(ValueError, message):
            counter.value

    def test_labels_of_unlabelled_family_or_child_raise(self):
        counter = metrics.Registry().counter("c_total", "C.", labels=("code",))
        message = "counter 'c_total' has no labels to pick a child by"
        with self.assertRaisesRegex(ValueError, message + r"\. Received: values=\('x',\)"):
            metrics.Registry().counter("c_total", "C.").labels("x")
        with self.assertRaisesRegex(ValueError, message):
            counter.labels("200").labels("x")


class GaugeTest(absltest.TestCase):
    def test_set_inc_dec(self):
        gauge = metrics.Registry().gauge("g", "G.")
        gauge.set(10)
        gauge.inc()
        gauge.dec(3.5)
        gauge.inc(-1)
        self.assertEqual(gauge.value, 6.5)

    def test_set_function_is_read_at_render_time(self):
        registry = metrics.Registry()
        gauge = registry.gauge("depth", "Depth.", labels=("replica",))
        queue = [1, 2]
        gauge.labels("r0").set_function(lambda: len(queue))
        self.assertEqual(metrics.parse(registry.render())[("depth", (("replica", "r0"),))], 2.0)
        queue.extend([3, 4, 5])
        self.assertEqual(metrics.parse(registry.render())[("depth", (("replica", "r0"),))], 5.0)
        self.assertEqual(gauge.labels("r0").value, 5.0)

    def test_set_replaces_the_function(self):
        gauge = metrics.Registry().gauge("g", "G.")
        gauge.set_function(lambda: 7)
        self.assertEqual(gauge.value, 7.0)
        gauge.set(2)
        gauge.inc()
        self.assertEqual(gauge.value, 3.0)

    def test_inc_of_function_gauge_raises(self):
        gauge = metrics.Registry().gauge("g", "G.")
        gauge.set_function(lambda: 7)
        with self.assertRaisesRegex(
            ValueError, "gauge 'g' reads its value from a function.*Received: amount=-1"
        ):
            gauge.dec()

    def test_set_function_needs_a_callable(self):
        with self.assertRaisesRegex(TypeError, "fn must be callable. Received: fn=3"):
            metrics.Registry().gauge("g", "G.").set_function(3)


class HistogramTest(absltest.TestCase):
    def test_bucket_bounds_are_inclusive_and_counts_cumulative(self):
        histogram = _histogram((1, 2, 4), [0.5, 1, 1.5, 2, 2, 3, 4, 100, -1])
        snapshot = histogram.snapshot()
        self.assertEqual(snapshot.buckets, (1.0, 2.0, 4.0))
        self.assertEqual(snapshot.counts, (3, 3, 2, 1))
        self.assertEqual(snapshot.cumulative_counts(), (3, 6, 8, 9))
        self.assertEqual((snapshot.sum, snapshot.count), (113.0, 9))

    def test_rendered_buckets_are_cumulative(self):
        registry = metrics.Registry()
        histogram = registry.histogram("rows", "Rows.", buckets=metrics.BATCH_SIZE_BUCKETS)
        for rows in (1, 3, 3, 8, 9, 1000, 5000):
            histogram.observe(rows)
        samples = metrics.parse(registry.render())
        bounds = [str(b) for b in metrics.BATCH_SIZE_BUCKETS] + ["+Inf"]
        counts = [samples[("rows_bucket", (("le", le),))] for le in bounds]
        self.assertEqual(counts, [1, 1, 3, 4, 5, 5, 5, 5, 5, 5, 6, 7])
        self.assertEqual(samples[("rows_count", ())], 7)
        self.assertEqual(samples[("rows_sum", ())], 6024)

    def test_bucket_constants(self):
        self.assertEqual(metrics.BATCH_SIZE_BUCKETS, (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        latency = metrics.DEFAULT_LATENCY_BUCKETS
        self.assertEqual((latency[0], latency[-1], len(latency)), (0.0005, 10.0, 16))
        self.assertEqual(list(latency), sorted(set(latency)))
        self.assertEqual(metrics.Registry().histogram("h", "H.").snapshot().buckets, latency)

    def test_trailing_inf_bound_is_implicit(self):
        self.assertEqual(_histogram((1, math.inf), []).snapshot().buckets, (1.0,))

    def test_bad_buckets_raise(self):
        registry = metrics.Registry()
        with self.assertRaisesRegex(
            ValueError, r"buckets must be increasing\. Received: buckets=\(1, 0\.5\)"
        ):
            registry.histogram("h", "H.", buckets=(1, 0.5))
        with self.assertRaisesRegex(ValueError, r"buckets must be increasing.*\(1, 1\)"):
            registry.histogram("h", "H.", buckets=[1, 1])
        for buckets in ((), (math.inf,), (1, math.nan), ("a",)):
            with self.assertRaisesRegex(
                ValueError, "buckets must be a non-empty sequence of finite numbers. Received"
            ):
                registry.histogram("h", "H.", buckets=buckets)

    def test_le_label_is_reserved(self):
        with self.assertRaisesRegex(
            ValueError,
            r"label 'le' is reserved in a histogram\. Received: labels=\('model', 'le'\)",
        ):
            metrics.Registry().histogram("h", "H.", labels=("model", "le"))
        metrics.Registry().gauge("g", "G.", labels=("le",))

    def test_observe_nan_raises(self):
        with self.assertRaisesRegex(ValueError, "histogram 'h' cannot observe NaN"):
            _histogram((1,), [math.nan])


class QuantileTest(absltest.TestCase):
    def test_uniform_data(self):
        # 100 values in each of the buckets (0, 1], (1, 2], ..., (9, 10].
        snapshot = _histogram(range(1, 11), [(i + 0.5) / 100 for i in range(1000)]).snapshot()
        for q, expected in ((0.5, 5.0), (0.9, 9.0), (0.95, 9.5), (0.99, 9.9), (1.0, 10.0)):
            self.assertAlmostEqual(metrics.quantile(snapshot, q), expected)

    def test_interpolates_within_the_bucket(self):
        snapshot = _histogram((1, 2, 3, 4), [0.5, 1.5, 2.5, 3.5]).snapshot()
        for q, expected in ((0.125, 0.5), (0.25, 1.0), (0.375, 1.5), (0.5, 2.0), (0.75, 3.0)):
            self.assertAlmostEqual(metrics.quantile(snapshot, q), expected)

    def test_zero_is_the_start_of_the_first_observed_bucket(self):
        snapshot = _histogram((1, 2, 3), [2.5, 2.5]).snapshot()
        self.assertEqual(metrics.quantile(snapshot, 0), 2.0)
        self.assertEqual(metrics.quantile(snapshot, 0.5), 2.5)

    def test_rank_in_inf_bucket_gives_last_bound(self):
        snapshot = _histogram((0.1, 1), [0.05, 50, 60]).snapshot()
        self.assertEqual(metrics.quantile(snapshot, 0.9), 1.0)

    def test_non_positive_first_bound_is_returned(self):
        snapshot = _histogram((-1, 0, 1), [-5, -3]).snapshot()
        self.assertEqual(metrics.quantile(snapshot, 0.5), -1.0)

    def test_no_observations_give_nan(self):
        self.assertTrue(math.isnan(metrics.quantile(_histogram((1,), []).snapshot(), 0.5)))

    def test_q_out_of_range_raises(self):
        snapshot = _histogram((1,), [0.5]).snapshot()
        for q in (-0.1, 1.5, math.nan):
            with self.assertRaisesRegex(ValueError, rf"q must be in \[0, 1\]\. Received: q={q}"):
                metrics.quantile(snapshot, q)


class RegistryTest(absltest.TestCase):
    def test_same_name_twice_raises(self):
        registry = metrics.Registry()
        registry.counter("requests_total", "Requests.")
        with self.assertRaisesRegex(ValueError, "metric 'requests_total' is already registered"):
            registry.gauge("requests_total", "Requests.")

    def test_clashing_sample_names_raise(self):
        registry = metrics.Registry()
        registry.histogram("latency", "Latency.")
        message = "metric 'latency_count' clashes with metric 'latency': both would write"
        with self.assertRaisesRegex(ValueError, message + " 'latency_count'"):
            registry.counter("latency_count", "Count.")
        registry.counter("other_count", "Count.")
        with self.assertRaisesRegex(ValueError, "metric 'other' clashes with metric 'other_count'"):
            registry.histogram("other", "Other.")

    def test_invalid_names_raise(self):
        registry = metrics.Registry()
        pattern = r"\[a-zA-Z_:\]\[a-zA-Z0-9_:\]\*"
        for name in ("1abc", "a-b", "", "a b"):
            with self.assertRaisesRegex(
                ValueError, rf"metric names must match {pattern}\. Received: name='{name}'"
            ):
                registry.counter(name, "C.")
        registry.counter("ns:sub_total", "Colons are allowed.")

    def test_invalid_label_names_raise(self):
        registry = metrics.Registry()
        pattern = r"\[a-zA-Z_\]\[a-zA-Z0-9_\]\*"
        with self.assertRaisesRegex(
            ValueError, rf"label names must match {pattern}\. Received: labels=\('ok', 'a:b'\)"
        ):
            registry.counter("c", "C.", labels=("ok", "a:b"))
        with self.assertRaisesRegex(ValueError, "label '__name' is reserved in a gauge"):
            registry.gauge("g", "G.", labels=("__name",))
        with self.assertRaisesRegex(
            ValueError, r"label names must be unique\. Received: labels=\('a', 'a'\)"
        ):
            registry.counter("c", "C.", labels=("a", "a"))

    def test_help_must_be_str(self):
        with self.assertRaisesRegex(ValueError, "help must be a str. Received: help=None"):
            metrics.Registry().counter("c", None)

    def test_failed_registration_leaves_the_name_free(self):
        registry = metrics.Registry()
        with self.assertRaises(ValueError):
            registry.histogram("h", "H.", buckets=())
        registry.histogram("h", "H.")
        self.assertEqual(registry.render().splitlines()[1], "# TYPE h histogram")


class ThreadSafetyTest(absltest.TestCase):
    THREADS = 8
    STEPS = 10000

    def _run(self, target):
        threads = [threading.Thread(target=target, args=(i,)) for i in range(self.THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def test_concurrent_increments_are_all_counted(self):
        registry = metrics.Registry()
        counter = registry.counter("c_total", "C.")
        labelled = registry.counter("l_total", "L.", labels=("shard",))
        histogram = registry.histogram("h", "H.", buckets=(0.5,))
        texts = []

        def work(index):
            for step in range(self.STEPS):
                counter.inc()
                labelled.labels(shard=str(step % 2)).inc()
                histogram.observe(index % 2)
                if step % 1000 == 0:
                    texts.append(registry.render())

        self._run(work)
        total = self.THREADS * self.STEPS
        self.assertEqual(counter.value, total)
        self.assertEqual(labelled.labels("0").value + labelled.labels("1").value, total)
        self.assertEqual(labelled.labels("0").value, total / 2)
        snapshot = histogram.snapshot()
        self.assertEqual((snapshot.counts, snapshot.count), ((total / 2, total / 2), total))
        self.assertEqual(metrics.parse(registry.render())[("c_total", ())], total)
        for text in texts:
            samples = metrics.parse(text)
            self.assertLessEqual(samples[("h_bucket", (("le", "0.5"),))], samples[("h_count", ())])

    def test_concurrent_gauge_inc_and_dec_cancel_out(self):
        gauge = metrics.Registry().gauge("g", "G.")
        self._run(lambda i: [gauge.inc() if i % 2 else gauge.dec() for _ in range(self.STEPS)])
        self.assertEqual(gauge.value, 0.0)


if __name__ == "__main__":
    absltest.main()
