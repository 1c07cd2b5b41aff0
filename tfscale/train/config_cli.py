"""The `--config` flag of the commands that read an experiment config.

`tfscale-train` and `tfscale-plan` take `--config=FILE[:variant]` and
`--config.a.b=value` overrides (ml_collections' config flags). `parser`
parses them so that a bad flag, a config file that does not load and an
unknown field each end in one line naming it, with exit status 2.

Example:

```python
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
cli.run(main, usage, flags_parser=config_cli.parser("tfscale-plan", _CONFIG))
```
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
from typing import Any
from typing import Callable
from typing import NoReturn
from typing import Optional
from typing import Sequence

import ml_collections
from absl import flags

__all__ = [
    "fail",
    "parser",
]


def parser(prog: str, config: flags.FlagHolder) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing, with a bad flag, config file or config field as one line.

    absl's own parser prints flag errors as one line, but errors raised while
    loading the config file or applying `--config.a.b=value` come out as
    chained tracebacks (and a missing file only surfaces later).

    Args:
      prog: the command's name, for `PROG: error: CAUSE` (exit status 2).
      config: the `--config` flag (`config_flags.DEFINE_config_file`).

    Returns:
      The `flags_parser` for `cli.run`.
    """

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            config.value.keys()  # a file that failed to load raises here, not later
            return rest
        except flags.Error as e:
            # A config file that raised comes as a flag error with its traceback.
            fail(prog, str(e) if len(str(e).splitlines()) == 1 else _explain(argv, e))
        except Exception as e:  # pylint: disable=broad-except
            fail(prog, _explain(argv, e))

    return parse


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


def fail(prog: str, message: str) -> NoReturn:
    """Prints `PROG: error: MESSAGE` and exits with status 2 (a bad command line)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
