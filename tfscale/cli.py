"""`--help` that explains a tfscale command: its usage, an example and its own flags.

absl's `--help` shows the docstring and the flags of `__main__`, which for a
console script is a generated wrapper: all it prints is a bare usage line.
`run` replaces `app.run` in the binaries: `--help` (also `-h`, `-?` and
`--helpshort`) prints the command's usage text and its own flags with their
defaults, `--helpfull` the same usage and every defined flag (absl's full
list), and both exit 0. A tool with subcommands shows the help of the command
named on the line, e.g. `tfscale-dispatcher serve --help`.

This module must not import TensorFlow: `tfscale-launch` and
`tfscale-dispatcher` start without it.

Example:

```python
cli.run(main, cli.Usage(__doc__, flags=("workdir",)), flags_parser=parse_flags)
```
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from typing import Any
from typing import Callable
from typing import Mapping
from typing import NoReturn
from typing import Optional
from typing import Sequence

from absl import app
from absl import flags

Main = Callable[[Any], Any]
FlagsParser = Callable[[list[str]], Any]

# Command-line words asking for help, before a `--`.
_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
_HELPFULL = ("--helpfull", "-helpfull")


@dataclasses.dataclass(frozen=True)
class Usage:
    """What `--help` shows for a command.

    Attributes:
      text: the usage text, with at least one example command line; Markdown
        code fences (lines of three backticks) are dropped.
      flags: names of the flags the command takes, shown in this order.
    """

    text: str
    flags: tuple[str, ...] = ()


class CommandError(Exception):
    """A failure a command reports as one line, `PROG: CAUSE`, with exit code 1."""

    exit_code = 1


class BadUsage(CommandError):
    """A bad command line (command, flag or flag value), reported as one line, exit code 2."""

    exit_code = 2


def fail(prog: str, message: str, code: int) -> NoReturn:
    """Prints `PROG: MESSAGE` to stderr and exits with `code`."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line_flags(prog: str) -> FlagsParser:
    """absl's flag parsing, with a bad flag reported as one line (exit code 2)."""

    def parse(argv: list[str]) -> Any:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, str(e), BadUsage.exit_code)

    return parse


def run(
    main: Main,
    usage: Usage,
    *,
    commands: Optional[Mapping[str, Usage]] = None,
    flags_parser: FlagsParser = app.parse_flags_with_usage,
) -> None:
    """`app.run(main, flags_parser)`, with a `--help` that shows `usage`.

    Args:
      main: the binary's main, as for `app.run`.
      usage: the help of the whole command.
      commands: the help of each subcommand, by name; `--help` after a
        command's name shows its help instead of `usage`.
      flags_parser: parses the flags when no help is asked for.
    """
    commands = dict(commands or {})

    def parse(argv: list[str]) -> Any:
        request = help_request(argv)
        if request is not None:
            _print_and_exit(format_help(argv, usage, commands, full=request == "helpfull"))
        return flags_parser(argv)

    app.run(main, flags_parser=parse)


def help_request(argv: Sequence[str]) -> Optional[str]:
    """What `argv` asks for before any `--`: "help", "helpfull" or None."""
    for arg in _before_separator(argv[1:]):
        if arg in _HELPFULL:
            return "helpfull"
        if arg in _HELP:
            return "help"
    return None


def format_help(
    argv: Sequence[str], usage: Usage, commands: Mapping[str, Usage], full: bool = False
) -> str:
    """The help text for `argv`: the named command's, or the whole tool's."""
    command = next((arg for arg in _before_separator(argv[1:]) if arg in commands), None)
    if command is not None:
        sections = [_text(commands[command].text), _flag_section("flags", commands[command].flags)]
    else:
        sections = [_text(usage.text), _flag_section("flags", usage.flags)]
        sections += [_flag_section(f"{name} flags", u.flags) for name, u in commands.items()]
    if full:
        sections.append("all flags:\n" + flags.FLAGS.get_help().strip("\n"))
    else:
        sections.append("--helpfull lists every flag, absl's own included.")
    return "\n\n".join(section for section in sections if section) + "\n"


def _before_separator(args: Sequence[str]) -> Sequence[str]:
    """The arguments before `--`: after it comes a command of its own (tfscale-launch)."""
    return args[: args.index("--")] if "--" in args else args


def _text(text: str) -> str:
    lines = [line for line in textwrap.dedent(text).splitlines() if line.strip() != "```"]
    return "\n".join(lines).strip("\n")


def _flag_section(title: str, names: Sequence[str]) -> str:
    if not names:
        return ""
    return f"{title}:\n" + "\n".join(_format_flag(flags.FLAGS[name]) for name in names)


def _format_flag(flag: flags.Flag) -> str:
    """`--name: help` and `(default: value; syntax)`, wrapped as absl's help does."""
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    if flag.short_name:
        name = f"-{flag.short_name},{name}"
    notes = []
    if flag.default is not None:
        # `default_as_str` is the repr of the command-line form, e.g. "'30.0'".
        default = flag.default_as_str
        notes.append(f"default: {default[1:-1] if len(default) > 2 else default}")
    if flag.parser.syntactic_help:
        notes.append(flag.parser.syntactic_help)
    lines = flags.text_wrap(f"{name}: {flag.help}", indent="      ", firstline_indent="  ")
    if notes:
        lines += "\n" + flags.text_wrap(f"({'; '.join(notes)})", indent="    ")
    return lines


def _print_and_exit(text: str) -> NoReturn:
    sys.stdout.write(text)
    sys.stdout.flush()
    sys.exit(0)
