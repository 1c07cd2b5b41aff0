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

import ast
import difflib
import os
import sys
from typing import Any
from typing import NoReturn
from typing import Optional
from typing import Sequence

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) hides the
# progress bar; users can still ask for it with TF_CPP_MIN_LOG_LEVEL=0.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tfscale import cli  # noqa: E402
from tfscale.train import config as config_lib  # noqa: E402
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
        _fail(str(e))
    except lib.Preempted as e:
        print(f"{_PROG}: {e}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags; a bad flag, config file or config field ends in one line.

    absl's own parser prints flag errors as one line, but errors raised while
    loading the config file or applying `--config.a.b=value` come out as
    chained tracebacks (and a missing file only surfaces later).
    """
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a file that failed to load raises here, not later
        return rest
    except flags.Error as e:
        # A config file that raised comes as a flag error with its traceback.
        _fail(str(e) if len(str(e).splitlines()) == 1 else _explain(argv, e))
    except Exception as e:  # pylint: disable=broad-except
        _fail(_explain(argv, e))


def _explain(argv: Sequence[str], error: Exception) -> str:
    """One line for an error raised while loading the config or its overrides."""
    config = _load_config(argv)
    if isinstance(config, str):
        return config
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            path = arg[len("--config.") :].split("=", 1)[0]
            unknown = _unknown_field(config, path)
            if unknown:
                return f"{unknown} (from {arg})"
    return _one_line(error)


def _load_config(argv: Sequence[str]) -> "ml_collections.ConfigDict | str":
    """The config the --config flag names, or why it cannot be loaded."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return "--config=FILE[:variant] is required"
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        return f"--config={spec}: no such file {path!r} (from {os.getcwd()})"
    try:
        namespace: dict[str, Any] = {"__file__": path, "__name__": "tfscale_config"}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)  # pylint: disable=exec-used
        return namespace["get_config"](variant or None)
    except Exception as e:  # pylint: disable=broad-except
        return f"--config={spec} cannot be loaded: {_one_line(e)}"


def _unknown_field(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
    """Why `path` names no field of `config`, or None if it does."""
    node: Any = config
    walked = []
    for name in path.split("."):
        fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if name not in fields:
            where = "config." + ".".join(walked) if walked else "the config"
            close = difflib.get_close_matches(name, fields, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; fields: {', '.join(sorted(fields))}"
            )
            return f"Unknown config field {'.'.join(walked + [name])!r} in {where}{hint}"
        node = node[name]
        walked.append(name)
    return None


def _one_line(error: BaseException) -> str:
    text = str(error)
    if text.startswith(("'", '"')):
        try:
            text = str(ast.literal_eval(text))  # a message quoted by repr()
        except (ValueError, SyntaxError):
            pass
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(message: str) -> NoReturn:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run_main() -> None:
    """Console-script entry point."""
    cli.run(main, cli.Usage(__doc__, flags=("config", "workdir")), flags_parser=parse_flags)


if __name__ == "__main__":
    run_main()
