"""Child processes that die with their parent.

A launcher or a supervisor killed with SIGKILL cannot stop its children;
on Linux the kernel can (`PR_SET_PDEATHSIG`). `parent_death_prefix` asks
for it through a command prefix (util-linux's `setpriv`, present on every
Debian-like system) rather than a `preexec_fn`: nothing runs between fork
and exec, which in a parent with other threads (TensorFlow's, gRPC's) can
crash or deadlock the child. Elsewhere it does nothing.

Example:

```python
subprocess.Popen(processes.parent_death_prefix(signal.SIGKILL) + command)
```
"""

from __future__ import annotations

import shutil
import signal
import sys

__all__ = ["parent_death_prefix"]


def parent_death_prefix(signum: int = signal.SIGKILL) -> list[str]:
    """`setpriv --pdeathsig SIG --`: the command that follows gets `signum` when its parent dies.

    Returns:
      The prefix; `[]` off Linux or without `setpriv`.
    """
    path = shutil.which("setpriv")
    if path is None or not sys.platform.startswith("linux"):
        return []
    return [path, "--pdeathsig", signal.Signals(signum).name[len("SIG") :], "--"]
