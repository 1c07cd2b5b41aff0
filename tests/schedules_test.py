"""Tests for tfscale.train.schedules."""

import math

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402

from tfscale.train import schedules  # noqa: E402


class ScaleLearningRateTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(rule="linear", expected=0.4),
        dict(rule="sqrt", expected=0.2),
        dict(rule="none", expected=0.1),
    )
    def test_rules(self, rule, expected):
        self.assertAlmostEqual(schedules.scale_learning_rate(0.1, 64, 256, rule), expected)

    def test_unknown_rule(self):
        with self.assertRaisesRegex(
            ValueError, "Unknown scaling rule 'cubic'. Valid rules: linear, sqrt, none"
        ):
            schedules.scale_learning_rate(0.1, 64, 256, "cubic")

    def test_non_positive_batch(self):
        with self.assertRaisesRegex(
            ValueError, "reference_batch_size must be positive. Received: reference_batch_size=0"
        ):
            schedules.scale_learning_rate(0.1, 0, 256, "linear")


class WarmupTest(parameterized.TestCase):
    @parameterized.parameters((0, 0.1), (5, 0.25), (10, 0.4), (50, 0.4))
    def test_linear_warmup(self, step, expected):
        schedule = schedules.Warmup(0.1, 0.4, warmup_steps=10)
        self.assertAlmostEqual(float(schedule(step)), expected, places=6)

    def test_scaled_learning_rate_with_warmup(self):
        lr = schedules.scaled_learning_rate(0.01, 64, 256, "sqrt", warmup_steps=4)
        self.assertIsInstance(lr, schedules.Warmup)
        self.assertAlmostEqual(float(lr(0)), 0.01)
        self.assertAlmostEqual(float(lr(4)), 0.01 * math.sqrt(4), places=6)

    def test_scaled_learning_rate_without_warmup_is_a_float(self):
        self.assertAlmostEqual(schedules.scaled_learning_rate(0.01, 64, 128), 0.02)

    def test_serializes(self):
        config = keras.saving.serialize_keras_object(schedules.Warmup(0.1, 0.2, 3))
        restored = keras.saving.deserialize_keras_object(config)
        self.assertIsInstance(restored, schedules.Warmup)
        self.assertAlmostEqual(float(restored(3)), 0.2, places=6)

    def test_bad_warmup_steps(self):
        with self.assertRaisesRegex(
            ValueError, "warmup_steps must be >= 1. Received: warmup_steps=0"
        ):
            schedules.Warmup(0.1, 0.2, 0)


if __name__ == "__main__":
    absltest.main()
