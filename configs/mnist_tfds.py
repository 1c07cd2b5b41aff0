"""Network (a) on MNIST from TensorFlow Datasets (`tfds:mnist`).

Needs the prepared dataset in --config.data.tfds_data_dir (or
--config.data.download=True on a machine with network access):

  tfscale-train --config=configs/mnist_tfds.py --workdir=/tmp/tfscale/mnist \\
      --config.data.tfds_data_dir=~/tensorflow_datasets
"""

from tfscale.train import config as config_lib


def get_config(variant=None):
    config = config_lib.base_config()
    config.devices.virtual_cpus = 2
    config.distribution.kind = "mirrored"
    config.data.source = "tfds:mnist"
    config.model.name = "lenet"
    config.training.epochs = 3
    return config_lib.apply_variant(config, variant, smoke=config_lib.smoke)
