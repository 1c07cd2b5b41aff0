"""`tfscale-plan`: the distribution `kind=auto` would choose for a config, without training.

Usage: tfscale-plan --config=FILE[:variant] [--config.a.b=value ...] [--json=PATH]

Examples:

```
tfscale-plan --config=configs/transformer.py
tfscale-plan --config=configs/transformer.py --config.devices.virtual_cpus=8 \\
    --config.distribution.memory_budget=400000 --json=/tmp/plan.json
```

Prints the table of every candidate (per-device memory, predicted step
time, why a candidate cannot be chosen) and the choice, for the config's
model, optimizer and global batch on this host's devices (split as
`config.devices` says; `config.distribution.devices` limits them). The
machine's rates are measured on the first run (20-45 s on 2 to 8 CPU
devices) and cached in `~/.cache/tfscale`; `--recalibrate` measures them again. A config whose
model fits no candidate fails with one line naming the smallest need per
device and the budget (exit status 2).
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from typing import Sequence

# TensorFlow's C++ start-up chatter hides the table; TF_CPP_MIN_LOG_LEVEL=0 shows it.
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
_JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
_RECALIBRATE = flags.DEFINE_bool(
    "recalibrate", False, "Measure this machine's rates again instead of reading the cache."
)
flags.mark_flags_as_required(["config"])

_PROG = "tfscale-plan"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # The calibration builds strategies and meshes, which log each at INFO.
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    try:
        result = lib.plan(_CONFIG.value, recalibrate=_RECALIBRATE.value)
    except config_lib.ConfigError as e:
        config_cli.fail(_PROG, str(e))
    print(result.table())
    row = result.chosen_row
    print(
        f"chosen: {result.chosen.description}, {row.step_time.total * 1e3:.2f} ms per step "
        f"predicted, {row.memory.total} bytes per device"
    )
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"wrote {_JSON.value}", file=sys.stderr)


def run_main() -> None:
    """Console-script entry point."""
    cli.run(
        main,
        cli.Usage(__doc__, flags=("config", "json", "recalibrate")),
        flags_parser=config_cli.parser(_PROG, _CONFIG),
    )


if __name__ == "__main__":
    run_main()
