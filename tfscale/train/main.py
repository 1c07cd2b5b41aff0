"""`tfscale-train`: train a Keras model from a config file.

Usage: tfscale-train --config=FILE[:variant] --workdir=DIR [--config.a.b=value ...]

Examples:

```
tfscale-train --config=configs/default.py --workdir=/tmp/tfscale/default
tfscale-train --config=configs/default.py:smoke --workdir=/tmp/smoke \\
    --config.distribution.kind=one_device --config.training.epochs=1
```

`--config` names a Python file whose `get_config(variant)` returns the
experiment's ConfigDict (`tfscale/train/config.py` lists every field with its
default). `--config.a.b=value` overrides one field, e.g.
`--config.training.epochs=5`, `--config.distribution.kind=mirrored` or
`--config.optimizer.learning_rate=0.001`; an unknown field or a bad value
fails with one line naming it (exit status 2). Checkpoints, logs and
metrics.json go to `--workdir`; the same command run again resumes there.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) hides the
# progress bar; users can still ask for it with TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tfscale import cli  # noqa: E402
from tfscale.train import config as config_lib  # noqa: E402
from tfscale.train import config_cli  # noqa: E402
from tfscale.train import lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/default.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.json.")
flags.mark_flags_as_required(["config", "workdir"])

_PROG = "tfscale-train"
# 128 + SIGTERM: stopped by the signal (after a checkpoint), to be restarted.
PREEMPTED_EXIT_CODE = 143


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.info("config:\n%s", _CONFIG.value)
    try:
        lib.run(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:
        config_cli.fail(_PROG, str(e))
    except lib.Preempted as e:
        print(f"{_PROG}: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


parse_flags = config_cli.parser(_PROG, _CONFIG)


def run_main() -> None:
    """Console-script entry point."""
    cli.run(main, cli.Usage(__doc__, flags=("config", "workdir")), flags_parser=parse_flags)


if __name__ == "__main__":
    run_main()
