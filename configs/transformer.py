"""The small transformer-encoder classifier (image rows as tokens), mirrored.

tfscale-train --config=configs/transformer.py --workdir=/tmp/tfscale/transformer
tfscale-train --config=configs/transformer.py:smoke --workdir=/tmp/tfscale/transformer_smoke
"""

from tfscale.train import config as config_lib


def get_config(variant=None):
    config = config_lib.base_config()
    config.devices.virtual_cpus = 2
    config.distribution.kind = "mirrored"
    config.model.name = "transformer"
    config.model.kwargs = {"model_dim": 64, "num_heads": 4, "mlp_dim": 128, "num_layers": 2}
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.scaling = "sqrt"
    config.optimizer.warmup_epochs = 0.5
    config.training.epochs = 3
    return config_lib.apply_variant(config, variant, smoke=smoke)


def smoke(config):
    """The transformer shrunk to a run of seconds."""
    config_lib.smoke(config)
    config.model.kwargs = {"model_dim": 32, "num_heads": 4, "mlp_dim": 64, "num_layers": 1}
