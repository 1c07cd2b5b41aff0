"""Child processes that die with their parent.

A launcher or a supervisor killed with SIGKILL cannot stop its children;
on Linux the kernel can: `die_with_parent` is a `preexec_fn` that asks for
SIGTERM when the parent dies (the child may clean up), `killed_with_parent`
for SIGKILL (for children whose SIGTERM handling can wait on peers that are
gone, such as a training worker blocked in a collective). Elsewhere they do
nothing.

Example:

```python
subprocess.Popen(command, preexec_fn=processes.die_with_parent)
```
"""

from __future__ import annotations

import ctypes
import signal

__all__ = [
    "die_with_parent",
    "killed_with_parent",
]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when its parent process dies (Linux)."""
    _on_parent_death(signal.SIGTERM)


def killed_with_parent() -> None:
    """In the child before exec: SIGKILL it when its parent process dies (Linux)."""
    _on_parent_death(signal.SIGKILL)


def _on_parent_death(signum: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        pass  # elsewhere a killed parent leaves its children running
