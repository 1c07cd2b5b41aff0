"""Tests for tfscale.devices."""

import textwrap

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import tfscale  # noqa: E402


class ConfigureDevicesTest(parameterized.TestCase):
    def test_splits_cpu_into_logical_devices(self):
        self.assertLen(tfscale.local_devices("CPU"), testutil.NUM_CPUS)

    def test_same_configuration_again_is_a_no_op(self):
        tfscale.configure_devices(virtual_cpus=testutil.NUM_CPUS)
        self.assertLen(tfscale.local_devices("CPU"), testutil.NUM_CPUS)

    def test_different_configuration_after_init_raises_clear_error(self):
        with self.assertRaisesRegex(
            tfscale.DevicesAlreadyInitializedError,
            r"configure_devices\(virtual_cpus=3\) came too late.*4 logical CPU",
        ):
            tfscale.configure_devices(virtual_cpus=3)

    @parameterized.parameters(
        dict(kwargs=dict(virtual_cpus=0), match="virtual_cpus must be a positive integer"),
        dict(kwargs=dict(virtual_cpus=2.5), match="Received: virtual_cpus=2.5"),
        dict(kwargs=dict(virtual_cpus=True), match="Received: virtual_cpus=True"),
        dict(kwargs=dict(virtual_gpus_per_gpu=2), match="needs gpu_memory_limit_mb"),
    )
    def test_bad_arguments_raise_value_error(self, kwargs, match):
        with self.assertRaisesRegex(ValueError, match):
            tfscale.configure_devices(**kwargs)

    def test_a_gpu_split_without_a_gpu_is_an_error_not_a_cpu_run(self):
        # This machine has no GPU; asking to split one must not train on the CPU unnoticed.
        if tfscale.devices.accelerator_type() == "GPU":
            self.skipTest("this machine has a GPU")
        with self.assertRaisesRegex(
            ValueError,
            r"split a GPU, but TensorFlow finds none on this machine.*Drop them to run on the "
            r"CPU.*Received: virtual_gpus_per_gpu=2, gpu_memory_limit_mb=512",
        ):
            tfscale.configure_devices(virtual_gpus_per_gpu=2, gpu_memory_limit_mb=512)
        self.assertLen(tfscale.local_devices("CPU"), testutil.NUM_CPUS)  # nothing changed

    def test_late_call_in_a_fresh_process_is_not_tensorflows_runtime_error(self):
        script = textwrap.dedent(
            """
            import tensorflow as tf, tfscale
            tf.constant(1.0)  # initializes the runtime with one CPU
            try:
                tfscale.configure_devices(virtual_cpus=2)
            except tfscale.DevicesAlreadyInitializedError as e:
                print("CAUGHT", e)
            """
        )
        result = testutil.run_python("-c", script)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("CAUGHT configure_devices(virtual_cpus=2) came too late", result.stdout)
        self.assertIn("1 logical CPU(s)", result.stdout)


if __name__ == "__main__":
    absltest.main()
