"""The dispatched input of a group of synchronous workers: its position, rewinds and ledger.

Each worker of a multi-worker run reads its own dispatched shards, so at a
checkpoint each knows only its own part of the job's position. Every
worker publishes its `InputPosition` (and the element ranges it trained
since the last checkpoint) under a key of the job's coordination service
and reads the others', so each gets the group's position, their union;
the chief saves it with the checkpoint, beside the `ledger.Ledger` of the
ranges. A group that starts (fresh, or from a checkpoint, on any number
of workers) or goes on into another `fit` has the chief rewind the job to
its position; the others wait at a barrier before they lease anything.

Calls must come in the same order on every worker (at the same training
steps): the n-th call of each worker joins the n-th call of the others.
One worker exchanges nothing.

Example:

```python
group = InputGroup(source, sizes, num_workers=2, is_chief=dist.is_chief)
group.start(InputPosition())                 # before the first iterator
state = group.checkpoint(consumed=6400)      # at a checkpoint: save it
group.continue_from(consumed=9600)           # between two fits
group.audit()["duplicated_elements"]         # 0
```
"""

from __future__ import annotations

import itertools
import json
from typing import Any
from typing import Optional
from typing import Sequence

import tensorflow as tf
from absl import logging

from tfscale import compat
from tfscale.data import dispatched
from tfscale.data import ledger as ledger_lib
from tfscale.data.dispatcher import types

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "InputGroup",
]

DEFAULT_TIMEOUT_S = 300.0
_KEY = "tfscale/input_position"
_BARRIER = "tfscale/input_rewound"


class InputGroup:
    """A group's dispatched input: joins positions, rewinds the job, keeps the ledger.

    Args:
      source: this worker's dispatched input.
      sizes: each shard's element count, for the ledger (None: no ledger).
      num_workers: the group's worker processes.
      is_chief: whether this worker rewinds the job for the group.
      ledger_state: the ledger saved with the checkpoint being resumed.
      timeout_s: how long a worker waits for the others' positions or at
        the barrier before it fails.

    Raises:
      ValueError: for `num_workers < 1` or a non-positive `timeout_s`.
    """

    def __init__(
        self,
        source: dispatched.DispatchedInput,
        sizes: Optional[Sequence[int]],
        num_workers: int = 1,
        is_chief: bool = True,
        ledger_state: Optional[dict[str, Any]] = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1. Received: {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0. Received: timeout_s={timeout_s}")
        self.source = source
        self.num_workers = num_workers
        self.is_chief = is_chief
        self.ledger = None if sizes is None else ledger_lib.Ledger(sizes, ledger_state)
        self.position = types.InputPosition()
        self._timeout_ms = int(timeout_s * 1000)
        self._gathers = itertools.count()
        self._rewinds = itertools.count()
        self._mark = 0  # elements of the current iterator in the ledger

    def start(self, position: types.InputPosition) -> None:
        """Moves the job to `position` for the group, before the first iterator."""
        self._rewind(position)

    def checkpoint(self, consumed: int) -> dict[str, Any]:
        """The group's input state after `consumed` elements per worker, to save.

        Returns:
          `{"input_position": ..., "input_ledger": ...}` (no ledger without
          sizes), JSON-able.
        """
        self._gather(consumed)
        state: dict[str, Any] = {"input_position": self.position.to_dict()}
        if self.ledger is not None:
            state["input_ledger"] = self.ledger.to_dict()
        return state

    def continue_from(self, consumed: int) -> None:
        """The next iterators continue after the `consumed` elements per worker trained.

        Between two `fit`s: the job is rewound to the position they reached,
        so that the shards the first fit's iterators had leased but not
        trained are read by the next ones.
        """
        self._gather(consumed)
        self._rewind(self.position)

    def audit(self) -> Optional[dict[str, Any]]:
        """The ledger's audit: per epoch, and the totals (None without a ledger)."""
        if self.ledger is None:
            return None
        epochs = [a.to_dict() for a in self.ledger.audit(self.position)]
        totals = {
            key: sum(e[key] for e in epochs)
            for key in (
                "elements",
                "duplicated_elements",
                "missing_elements",
                "duplicated_shards",
                "missing_shards",
            )
        }
        return {**totals, "epochs": epochs}

    # --- internals -----------------------------------------------------------

    def _gather(self, consumed: int) -> None:
        """Joins every worker's position and new ranges after `consumed` elements."""
        mine = {
            "position": self.source.position(consumed).to_dict(),
            "ranges": self.source.consumed_ranges(self._mark, consumed),
        }
        self._mark = consumed
        reports = [mine] if self.num_workers == 1 else self._exchange(mine)
        self.position = types.InputPosition.union(
            [types.InputPosition.from_dict(r["position"]) for r in reports]
        )
        if self.ledger is not None:
            ranges = [tuple(r) for report in reports for r in report["ranges"]]
            try:
                self.ledger.add(ranges, self.position)
            except ValueError as e:
                # A shard read more elements than the job says it has (e.g. a
                # TFDS slice of a mocked split): training goes on, unaudited.
                logging.warning("The input ledger is off from here: %s", e)
                self.ledger = None

    def _exchange(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        """Every worker's report of this call (this one's included)."""
        prefix = f"{_KEY}/{next(self._gathers)}"
        value = json.dumps(mine)
        # First writer wins a slot: every worker takes the next free one.
        slot = 0
        while not compat.insert_job_key(f"{prefix}/{slot}", value):
            slot += 1
            if slot == self.num_workers:
                raise RuntimeError(
                    f"More than num_workers={self.num_workers} reports were published under "
                    f"{prefix}: the workers' calls are out of step"
                )
        reports = []
        for slot in range(self.num_workers):
            try:
                text = compat.get_job_key(f"{prefix}/{slot}", self._timeout_ms)
            except tf.errors.DeadlineExceededError:
                raise RuntimeError(
                    f"Only {slot} of {self.num_workers} workers published their input position "
                    f"within {self._timeout_ms / 1000:g} s"
                ) from None
            reports.append(json.loads(text))
        return reports

    def _rewind(self, position: types.InputPosition) -> None:
        """The chief rewinds the job; every worker then waits at a barrier for it."""
        self.position = position
        self._mark = 0
        if self.num_workers == 1:
            # As a group of one: the job may have had more consumers before.
            self.source.rewind(position, group=True, num_consumers=1)
            return
        if self.is_chief:
            self.source.rewind(position, group=True, num_consumers=self.num_workers)
        else:
            self.source.start_at(position)
        compat.wait_at_barrier(f"{_BARRIER}/{next(self._rewinds)}", self._timeout_ms)
