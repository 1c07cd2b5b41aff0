"""`tfscale-train`: train a Keras model from a config file.

Usage:

```
tfscale-train --config=configs/default.py --workdir=/tmp/tfscale/default
tfscale-train --config=configs/default.py:smoke --workdir=/tmp/smoke \\
    --config.distribution.kind=one_device --config.training.epochs=1
```

`main` only parses flags; the work is `tfscale.train.lib.run(config, workdir)`.
"""

from __future__ import annotations

import os
from typing import Sequence

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) hides the
# progress bar; users can still ask for it with TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tfscale.train import lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/default.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.info("config:\n%s", _CONFIG.value)
    lib.run(_CONFIG.value, _WORKDIR.value)


def run_main() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run_main()
