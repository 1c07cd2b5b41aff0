"""Tests for tfscale.train.models."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil

testutil.setup_devices()

import keras  # noqa: E402

from tfscale.train import models  # noqa: E402


class ModelsTest(parameterized.TestCase):
    def test_lenet_architecture(self):
        model = models.build("lenet", (28, 28, 1), 10)
        flatten = next(l for l in model.layers if isinstance(l, keras.layers.Flatten))
        self.assertEqual(flatten.output.shape, (None, 320))
        # conv1 10*25+10, conv2 20*10*25+20, fc1 320*50+50, fc2 50*10+10
        self.assertEqual(model.count_params(), 260 + 5020 + 16050 + 510)

    def test_convnet_architecture(self):
        model = models.build("convnet", (28, 28, 1), 10)
        # conv1 32*9+32, conv2 64*32*9+64, fc1 24*24*64*64+64, fc2 64*10+10
        self.assertEqual(model.count_params(), 320 + 18496 + 2359360 + 650)

    @parameterized.parameters(
        dict(name="lenet", log=True),
        dict(name="convnet", log=False),
    )
    def test_outputs_are_distributions(self, name, log):
        x = np.random.default_rng(0).random((3, 28, 28, 1)).astype("float32")
        out = np.asarray(models.build(name, (28, 28, 1), 10)(x))
        probs = np.exp(out) if log else out
        np.testing.assert_allclose(probs.sum(axis=1), np.ones(3), rtol=1e-5)

    def test_transformer_layers_are_named_for_sharding(self):
        model = models.build(
            "transformer", (28, 28, 1), 10, model_dim=32, num_heads=4, num_layers=2
        )
        names = {l.name for l in model.layers}
        for i in range(2):
            self.assertContainsSubset(
                {f"block{i}_attention", f"block{i}_mlp_up", f"block{i}_mlp_down"}, names
            )
        out = model(np.zeros((2, 28, 28, 1), "float32"))
        self.assertEqual(out.shape, (2, 10))

    def test_transformer_heads_must_divide_dim(self):
        with self.assertRaisesRegex(ValueError, "Received: model_dim=30, num_heads=4"):
            models.build("transformer", (28, 28, 1), 10, model_dim=30, num_heads=4)

    def test_loss_matches_output(self):
        self.assertTrue(models.loss("lenet").get_config()["from_logits"])
        self.assertFalse(models.loss("convnet").get_config()["from_logits"])

    def test_unknown_model(self):
        with self.assertRaisesRegex(
            ValueError, "Unknown model 'resnet'. Valid models: convnet, lenet, transformer"
        ):
            models.build("resnet", (28, 28, 1), 10)


if __name__ == "__main__":
    absltest.main()
