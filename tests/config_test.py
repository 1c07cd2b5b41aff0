"""Tests for tfscale.train.config and the experiment files in configs/."""

import glob
import importlib.util
import os

from absl.testing import absltest
from absl.testing import parameterized

from tests import testutil
from tfscale.train import config as config_lib

# Bazel's runfiles add an empty configs/__init__.py: not an experiment.
CONFIG_FILES = sorted(
    p
    for p in glob.glob(os.path.join(testutil.REPO_ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_")
)


def _load(path):
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ConfigFilesTest(parameterized.TestCase):
    def test_there_are_config_files(self):
        self.assertContainsSubset(
            {"default.py", "convnet.py", "transformer.py", "mnist_tfds.py"},
            {os.path.basename(p) for p in CONFIG_FILES},
        )

    @parameterized.parameters(*CONFIG_FILES)
    def test_every_config_and_smoke_variant_validates(self, path):
        for spec in (path, f"{path}:smoke"):
            config = _load(path).get_config(*([] if spec == path else ["smoke"]))
            config_lib.validate(config)
            self.assertEqual(set(config.keys()), set(config_lib.base_config().keys()))


class ApplyVariantTest(absltest.TestCase):
    def test_applies_named_variant(self):
        config = config_lib.apply_variant(config_lib.base_config(), "smoke", smoke=config_lib.smoke)
        self.assertEqual(config.training.epochs, 2)

    def test_none_leaves_config(self):
        config = config_lib.apply_variant(config_lib.base_config(), None, smoke=config_lib.smoke)
        self.assertEqual(config.training.epochs, 3)

    def test_unknown_variant_lists_valid(self):
        with self.assertRaisesRegex(
            ValueError, "Unknown config variant 'big'. Valid variants: smoke, tiny"
        ):
            config_lib.apply_variant(config_lib.base_config(), "big", smoke=print, tiny=print)


class SetOptionsTest(absltest.TestCase):
    def test_drops_unset(self):
        config = config_lib.base_config()
        config.distribution.all_reduce = "reduce_to_one"
        self.assertEqual(
            config_lib.set_options(config.distribution),
            {"kind": "mirrored", "all_reduce": "reduce_to_one"},
        )


if __name__ == "__main__":
    absltest.main()
