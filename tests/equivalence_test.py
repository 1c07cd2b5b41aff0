"""Mirrored training over 2 logical CPUs matches one-device training.

Same initial weights, same data order and global batch: after 20 steps the
weights agree to 1e-5 with SGD and 1e-4 with Adam.
"""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfscale  # noqa: E402
from tfscale.data import synthetic  # noqa: E402
from tfscale.train import models  # noqa: E402

STEPS = 20
GLOBAL_BATCH = 32


def _optimizer(name):
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    return keras.optimizers.Adam(learning_rate=1e-3)


def _train(dist, optimizer, initial, data, form):
    with dist.scope():
        model = models.build("lenet", (28, 28, 1), 10)
        model.set_weights(initial)
        model.compile(optimizer=_optimizer(optimizer), loss=models.loss("lenet"))
    source = data if form == "dataset" else (lambda ctx: data)
    model.fit(
        dist.distribute_dataset(source, GLOBAL_BATCH),
        epochs=1,
        steps_per_epoch=STEPS,
        shuffle=False,
        verbose=0,
    )
    return model.get_weights()


class MirroredEquivalenceTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        images, labels = synthetic.generate(STEPS * GLOBAL_BATCH, seed=7)
        images = images[..., None].astype("float32") / 255.0
        cls.data = tf.data.Dataset.from_tensor_slices((images, labels))
        keras.utils.set_random_seed(3)
        cls.initial = models.build("lenet", (28, 28, 1), 10).get_weights()

    @parameterized.named_parameters(
        dict(
            testcase_name="sgd", optimizer="sgd", tolerance=1e-5, all_reduce="auto", form="dataset"
        ),
        dict(
            testcase_name="adam",
            optimizer="adam",
            tolerance=1e-4,
            all_reduce="auto",
            form="dataset",
        ),
        dict(
            testcase_name="sgd_reduce_to_one_fn",
            optimizer="sgd",
            tolerance=1e-5,
            all_reduce="reduce_to_one",
            form="function",
        ),
    )
    def test_weights_match_single_device(self, optimizer, tolerance, all_reduce, form):
        single = _train(
            tfscale.distribution("one_device", device="/cpu:0"),
            optimizer,
            self.initial,
            self.data,
            form,
        )
        mirrored = _train(
            tfscale.distribution("mirrored", devices=2, all_reduce=all_reduce),
            optimizer,
            self.initial,
            self.data,
            form,
        )
        moved = max(float(np.abs(a - b).max()) for a, b in zip(single, self.initial))
        self.assertGreater(moved, 100 * tolerance, "training must move the weights")
        for index, (a, b) in enumerate(zip(single, mirrored)):
            np.testing.assert_allclose(b, a, rtol=0, atol=tolerance, err_msg=f"weight {index}")


if __name__ == "__main__":
    absltest.main()
