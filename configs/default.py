"""Default: network (a) on the embedded synthetic digits, mirrored over 2 logical CPUs.

  tfscale-train --config=configs/default.py --workdir=/tmp/tfscale/default
  tfscale-train --config=configs/default.py:smoke --workdir=/tmp/tfscale/smoke
  tfscale-train --config=configs/default.py --workdir=/tmp/tfscale/one \\
      --config.distribution.kind=one_device
"""

from tfscale.train import config as config_lib


def get_config(variant=None):
    config = config_lib.base_config()
    config.devices.virtual_cpus = 2
    config.distribution.kind = "mirrored"
    config.model.name = "lenet"
    config.training.epochs = 3
    config.training.global_batch_size = 128
    return config_lib.apply_variant(config, variant, smoke=config_lib.smoke)
