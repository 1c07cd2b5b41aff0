"""Child processes that die with their parent.

A launcher or a supervisor killed with SIGKILL cannot stop its children;
on Linux the kernel can (`PR_SET_PDEATHSIG`). Two ways to ask for it:

- `die_with_parent`, a `preexec_fn` (SIGTERM: the child may clean up). It
  runs between fork and exec, which is unsafe in a parent with other
  threads (TensorFlow's): use it only in processes without them.
- `parent_death_prefix`, a command prefix (util-linux's `setpriv`, present
  on every Debian-like system): nothing runs between fork and exec, so any
  parent may use it.

Elsewhere both do nothing.

Example:

```python
subprocess.Popen(processes.parent_death_prefix(signal.SIGKILL) + command)
subprocess.Popen(command, preexec_fn=processes.die_with_parent)   # no threads here
```
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import sys

__all__ = [
    "die_with_parent",
    "parent_death_prefix",
]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when its parent process dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # elsewhere a killed parent leaves its children running


def parent_death_prefix(signum: int = signal.SIGKILL) -> list[str]:
    """`setpriv --pdeathsig SIG --`: the command that follows gets `signum` when its parent dies.

    Returns:
      The prefix; `[]` off Linux or without `setpriv`.
    """
    path = shutil.which("setpriv")
    if path is None or not sys.platform.startswith("linux"):
        return []
    return [path, "--pdeathsig", signal.Signals(signum).name[len("SIG") :], "--"]
