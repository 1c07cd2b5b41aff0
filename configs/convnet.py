"""Network (b) (conv 32, conv 64, dense 64, softmax) on the synthetic digits.

tfscale-train --config=configs/convnet.py --workdir=/tmp/tfscale/convnet
tfscale-train --config=configs/convnet.py:smoke --workdir=/tmp/tfscale/convnet_smoke
"""

from tfscale.train import config as config_lib


def get_config(variant=None):
    config = config_lib.base_config()
    config.devices.virtual_cpus = 2
    config.distribution.kind = "mirrored"
    config.model.name = "convnet"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.scaling = "sqrt"
    config.training.epochs = 2
    return config_lib.apply_variant(config, variant, smoke=config_lib.smoke)
