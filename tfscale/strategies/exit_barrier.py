"""An exit barrier for the processes of one multi-worker job.

When one worker of a job exits while another still runs, the coordination
service that TensorFlow starts for the job (led by task 0) stops hearing
from it and, some seconds later, tells the others "The tasks have crashed"
(a `CoordinationServiceError`), aborting their collectives; a worker that
outlives task 0 fails to reach it instead. Waiting at exit until every
worker is done keeps a clean run clean. A worker that never arrives (it
crashed) makes the barrier fail or time out, and the process exits anyway.

Example:

```python
exit_barrier.register("tfscale_mwms_exit")  # once the job's strategy exists
```
"""

from __future__ import annotations

import atexit

from absl import logging

from tfscale import compat

__all__ = [
    "TIMEOUT_S",
    "register",
]

# How long a worker that is done waits at exit for the others.
TIMEOUT_S = 120

_registered: set[str] = set()


def register(name: str, timeout_s: float = TIMEOUT_S) -> None:
    """Makes this process wait at exit for every task of the job at barrier `name`.

    Registering a name again does nothing.
    """
    if name in _registered:
        return
    _registered.add(name)
    atexit.register(_wait, name, timeout_s)


def _wait(name: str, timeout_s: float) -> None:
    try:
        compat.wait_at_barrier(name, int(timeout_s * 1000))
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("Not every worker reached the exit barrier %r: %s", name, e)
