"""One stop step for every worker of a job, whichever of them got the SIGTERM.

Kubernetes evicts one pod, and a launcher forwards a SIGTERM to each of its
workers at a slightly different moment. A worker that stopped alone at its
next step boundary would leave the others waiting in that step's all-reduce
until their collectives time out, and the workers' checkpoints would not
agree. `StopAgreement` makes them stop together:

- the first worker that sees its own SIGTERM at a step boundary (step `s`)
  proposes `s + 1` through the coordination service TensorFlow runs for a
  multi-worker job (first writer wins, so every worker learns one value);
- a watcher thread on every worker learns the proposal and acknowledges it
  at a barrier of all workers; the proposer runs step `s + 1` only after
  that barrier;
- synchronous workers are at most one step apart (every step all-reduces),
  so no worker can finish step `s + 1` before it knows the proposal: every
  worker stops at the first boundary at or past `s + 1`, the same one.

This is the protocol of TensorFlow's `PreemptionCheckpointHandler`, for
Keras `fit` (which that handler does not drive). With one worker the stop is
the boundary where the signal is seen.

Example:

```python
agreement = StopAgreement(num_workers=dist.num_workers)
agreement.begin()                 # on_train_begin
if sigterm_seen:
    agreement.propose(step)      # on_train_batch_end, on every worker
if agreement.should_stop(step):
    ...                           # save, then stop training
agreement.end()                   # on_train_end
```
"""

from __future__ import annotations

import itertools
import threading
from typing import Optional

import tensorflow as tf
from absl import logging

from tfscale import compat

__all__ = [
    "ACK_TIMEOUT_S",
    "StopAgreement",
]

# How long the proposer waits for every worker to acknowledge its stop step.
ACK_TIMEOUT_S = 60.0

_KEY_PREFIX = "tfscale/stop"
_DONE = "done"  # stored at the end of a fit: nothing to stop, watchers return

# Every worker runs the same sequence of fits, so the n-th agreement of each
# process names the same keys.
_generations = itertools.count()


class StopAgreement:
    """Agrees on the step at which every worker of a job stops.

    Args:
      num_workers: the job's workers; with more than one, the job's
        coordination service (started by `MultiWorkerMirroredStrategy` or
        multi-client DTensor) carries the agreement. Without one (a single
        client driving several hosts) the stop is local, as for one worker.
      ack_timeout_s: how long a proposer waits for every worker to
        acknowledge; past it (a worker is gone) it goes on, with a warning.

    Attributes:
      stop_step: the agreed step, once known (None before).
    """

    def __init__(self, num_workers: int = 1, ack_timeout_s: float = ACK_TIMEOUT_S):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1. Received: num_workers={num_workers}")
        if ack_timeout_s <= 0:
            raise ValueError(f"ack_timeout_s must be > 0. Received: ack_timeout_s={ack_timeout_s}")
        self.num_workers = num_workers
        self.ack_timeout_s = ack_timeout_s
        self.stop_step: Optional[int] = None
        self._key = ""
        self._acknowledged = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._proposed = False

    def begin(self) -> None:
        """Starts an agreement for one `fit` (every worker calls it once per fit)."""
        self.end()
        self.stop_step = None
        self._proposed = False
        self._acknowledged.clear()
        if self.num_workers == 1:
            return
        self._key = f"{_KEY_PREFIX}/{next(_generations)}"
        try:
            compat.insert_job_key(f"{self._key}/begun", "1")
        except tf.errors.FailedPreconditionError:
            # One client process for several hosts (a TPU slice): it stops alone.
            logging.info("No coordination service: a SIGTERM stops this process alone")
            self._key = ""
            return
        # A daemon: a worker that fails inside `fit` must not hang at exit on it.
        self._watcher = threading.Thread(
            target=self._watch, args=(self._key,), name="tfscale-stop-watcher", daemon=True
        )
        self._watcher.start()

    def propose(self, step: int) -> None:
        """This worker saw a SIGTERM at the boundary after `step`: stop soon.

        With several workers, returns once every worker acknowledged the
        agreed step (or after `ack_timeout_s`); proposing again does nothing.
        """
        if self._proposed:
            return
        self._proposed = True
        if not self._key:  # one worker, or no coordination service
            self.stop_step = step
            return
        if compat.insert_job_key(self._key, str(step + 1)):
            logging.warning("SIGTERM: every worker stops after step %d", step + 1)
        if not self._acknowledged.wait(self.ack_timeout_s):
            logging.warning(
                "Not every worker acknowledged the stop step within %.0f s; going on",
                self.ack_timeout_s,
            )

    def should_stop(self, step: int) -> bool:
        """Whether this worker stops at the boundary after `step`."""
        return self.stop_step is not None and step >= self.stop_step

    def end(self) -> None:
        """Ends the agreement of a `fit` that ran to its end."""
        watcher, self._watcher = self._watcher, None
        if watcher is None:
            return
        compat.insert_job_key(self._key, _DONE)  # a no-op if a step was agreed
        watcher.join(self.ack_timeout_s)

    def _watch(self, key: str) -> None:
        try:
            value = compat.get_job_key(key)
        except Exception as e:  # pylint: disable=broad-except
            logging.warning("Stopped watching for a stop step: %s", e)
            return
        if value == _DONE:
            # A worker finished the fit: a proposal that came too late waits for nothing.
            self._acknowledged.set()
            return
        self.stop_step = int(value)
        try:
            compat.wait_at_barrier(f"{key}/ack", int(self.ack_timeout_s * 1000))
        except Exception as e:  # pylint: disable=broad-except
            logging.warning("Not every worker acknowledged stop step %s: %s", value, e)
        self._acknowledged.set()
