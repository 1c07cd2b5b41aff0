"""`tfscale-train` trains step by step alike under every kind and mesh shape.

The same config (seed, data, global batch, optimizer, schedule) is run
through `tfscale.train.lib.run` (what `tfscale-train` runs) under each kind
and DTensor mesh; the per-step loss TensorBoard receives and the final
evaluation must match the `one_device` run. SGD with and without momentum is
covered as well as Adam: Adam is nearly blind to a constant gradient scale,
SGD is not.
"""

import glob
import os

import numpy as np
import tensorflow as tf
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

from tfscale.train import config as config_lib  # noqa: E402
from tfscale.train import lib  # noqa: E402

STEPS_PER_EPOCH = 5
EPOCHS = 2

# Loss after each step (the epoch's running mean, as the progress bar shows).
# Reordered float sums differ by ~1e-7 a step; training on other data (the
# defect this guards against) moved the first step's loss by 5e-4.
LOSS_TOLERANCE = 2e-5

_OPTIMIZERS = {
    "sgd_momentum": {"optimizer.name": "sgd", "optimizer.momentum": 0.9},
    "sgd": {"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.learning_rate": 0.15},
    "adam": {"optimizer.name": "adam", "optimizer.learning_rate": 0.002},
}

_KINDS = {
    "mirrored": {"distribution.kind": "mirrored"},
    "multi_worker_mirrored": {"distribution.kind": "multi_worker_mirrored"},
    "dtensor_batch4": {
        "distribution.kind": "dtensor",
        "distribution.mesh": "batch=4",
        "distribution.layout_map": "data_parallel",
    },
    "dtensor_batch2_model2_data_parallel": {
        "distribution.kind": "dtensor",
        "distribution.mesh": "batch=2,model=2",
        "distribution.layout_map": "data_parallel",
    },
    "dtensor_batch2_model2_megatron": {
        "distribution.kind": "dtensor",
        "distribution.mesh": "batch=2,model=2",
        "distribution.layout_map": "megatron",
    },
    "dtensor_model2_batch2_megatron": {
        "distribution.kind": "dtensor",
        "distribution.mesh": "model=2,batch=2",
        "distribution.layout_map": "megatron",
    },
    # lenet's 50-unit layer does not split 4 ways; the transformer's do.
    "dtensor_model4_megatron_transformer": {
        "model.name": "transformer",
        "distribution.kind": "dtensor",
        "distribution.mesh": "model=4",
        "distribution.layout_map": "megatron",
    },
    "dtensor_batch2_model2_megatron_transformer": {
        "model.name": "transformer",
        "distribution.kind": "dtensor",
        "distribution.mesh": "batch=2,model=2",
        "distribution.layout_map": "megatron",
    },
}


def _config(overrides):
    config = config_lib.smoke(config_lib.base_config())
    config.devices.virtual_cpus = testutil.NUM_CPUS
    config.data.cache_dir = testutil.cache_dir()
    config.data.max_eval_examples = 128
    config.training.epochs = EPOCHS
    config.training.steps_per_epoch = STEPS_PER_EPOCH
    config.training.log_every_steps = 1
    config.training.verbose = 0
    config.optimizer.warmup_epochs = 0.5  # the schedule is part of what must match
    for key, value in overrides.items():
        section, name = key.rsplit(".", 1)
        config_section = config
        for part in section.split("."):
            config_section = config_section[part]
        config_section[name] = value
    return config


def _step_losses(workdir):
    """step -> loss, from the TensorBoard events of the run's train writer."""
    losses = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "train", "events.out.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "batch_loss":
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return losses


class TrainEquivalenceTest(parameterized.TestCase):
    _references: dict = {}

    def _run(self, name, overrides):
        workdir = os.path.join(self.create_tempdir().full_path, name)
        metrics = lib.run(_config(overrides), workdir)
        return _step_losses(workdir), metrics

    def _reference(self, optimizer, model):
        key = (optimizer, model)
        if key not in self._references:
            overrides = {
                **_OPTIMIZERS[optimizer],
                "model.name": model,
                "distribution.kind": "one_device",
            }
            self._references[key] = self._run("one_device", overrides)
        return self._references[key]

    def _assert_matches(self, kind, optimizer):
        model = _KINDS[kind].get("model.name", "lenet")
        expected_losses, expected = self._reference(optimizer, model)
        losses, metrics = self._run(kind, {**_OPTIMIZERS[optimizer], **_KINDS[kind]})
        self.assertEqual(sorted(expected_losses), list(range(1, STEPS_PER_EPOCH * EPOCHS + 1)))
        self.assertEqual(sorted(losses), sorted(expected_losses))
        steps = sorted(expected_losses)
        np.testing.assert_allclose(
            [losses[s] for s in steps],
            [expected_losses[s] for s in steps],
            rtol=0,
            atol=LOSS_TOLERANCE,
            err_msg=f"{kind} / {optimizer}: loss after each step",
        )
        self.assertAlmostEqual(metrics["eval"]["loss"], expected["eval"]["loss"], delta=1e-4)
        # The weights moved: equal curves of a stuck model would prove little.
        self.assertGreater(abs(losses[steps[-1]] - losses[steps[0]]), 0.01)

    def test_sgd_with_momentum_on_a_batch_and_model_mesh_matches_one_device(self):
        self._assert_matches("dtensor_batch2_model2_megatron", "sgd_momentum")


class TrainEquivalenceMatrixTest(TrainEquivalenceTest):
    """Every kind and mesh, and the other optimizers (a `long` test: CI and bazel)."""

    @parameterized.named_parameters((kind, kind) for kind in _KINDS)
    def test_sgd_with_momentum_matches_one_device(self, kind):
        self._assert_matches(kind, "sgd_momentum")

    @parameterized.product(
        kind=[
            "mirrored",
            "dtensor_batch4",
            "dtensor_batch2_model2_megatron",
            "dtensor_batch2_model2_megatron_transformer",
        ],
        optimizer=["sgd", "adam"],
    )
    def test_other_optimizers_match_one_device(self, kind, optimizer):
        self._assert_matches(kind, optimizer)


if __name__ == "__main__":
    absltest.main()
