"""The small transformer classifier, split Megatron-style over a 2x2 DTensor mesh.

Four logical CPUs form the mesh `batch=2,model=2`: batches are split in two,
and each MLP and attention block's weights (and their Adam state) are split
in two along the model axis. The run logs each variable's per-device bytes
before training.

  tfscale-train --config=configs/transformer_dtensor.py --workdir=/tmp/tfscale/transformer_dtensor
  tfscale-train --config=configs/transformer_dtensor.py:smoke --workdir=/tmp/tfscale/td_smoke
  tfscale-train --config=configs/transformer_dtensor.py --workdir=/tmp/tfscale/td_model4 \\
      --config.distribution.mesh=model=4
"""

import importlib.util
import os

from tfscale.train import config as config_lib


def _sibling(name):
    # Configs are loaded by path, not as a package: load transformer.py beside this file.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tfscale_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


transformer = _sibling("transformer")


def get_config(variant=None):
    config = transformer.get_config()
    config.devices.virtual_cpus = 4
    config.distribution.kind = "dtensor"
    config.distribution.mesh = "batch=2,model=2"
    config.distribution.layout_map = "megatron"
    return config_lib.apply_variant(config, variant, smoke=transformer.smoke)
