"""Which elements of which shards trained a model, and the audit of it.

A dispatched input hands each worker runs of shards; a `Ledger` records the
element ranges training consumed (`(epoch, shard, first, stop)`, offsets in
the shard's order for that epoch) as checkpoints are taken, so a run
resumed from a checkpoint keeps the ledger of exactly the steps its model
was trained on. `audit` then counts, for every epoch of the job, elements
trained twice and elements not trained: both are 0 when every element was
trained exactly once per epoch, across crashes, preemptions and resizes.

Epochs before the group's position are complete: each is audited once it
is passed and only its counts are kept, so the ledger holds the ranges of
about one epoch.

Example:

```python
ledger = Ledger(sizes=[10, 10])
ledger.add([(0, 0, 0, 10), (0, 1, 0, 4)], InputPosition(0, (0,), ((1, 4),)))
ledger.audit(InputPosition(0, (0,), ((1, 4),)))  # [EpochAudit(epoch=0, ..., missing=0)]
```
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any
from typing import Iterable
from typing import Optional
from typing import Sequence

from tfscale.data.dispatcher import types

__all__ = [
    "EpochAudit",
    "Ledger",
    "Range",
]

Range = tuple[int, int, int, int]  # epoch, shard, first element, stop


@dataclasses.dataclass(frozen=True)
class EpochAudit:
    """One epoch of the job, audited.

    Attributes:
      epoch: the job's epoch.
      complete: whether the position is past it (else it is audited up to
        the position: the shards done and the parts of shards consumed).
      elements: elements trained, counting repeats.
      duplicated_elements: elements trained more than once (each extra time
        counts), or trained beyond the position (they will be again).
      missing_elements: elements up to the position not trained.
      duplicated_shards: shards with a duplicated element.
      missing_shards: shards with a missing element.
    """

    epoch: int
    complete: bool
    elements: int
    duplicated_elements: int
    missing_elements: int
    duplicated_shards: int
    missing_shards: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Ledger:
    """The element ranges training consumed, per epoch, for an audit.

    Args:
      sizes: each shard's element count, by shard index.
      state: a `to_dict()` result to continue from (a resumed run's).

    Raises:
      ValueError: for a range outside the shards (in `add` too).
    """

    def __init__(self, sizes: Sequence[int], state: Optional[dict[str, Any]] = None):
        self._sizes = tuple(sizes)
        self._ranges: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)
        self._closed: list[EpochAudit] = []
        if state:
            self._closed = [EpochAudit(**a) for a in state.get("closed", ())]
            self._extend(tuple(r) for r in state.get("ranges", ()))

    def add(self, ranges: Iterable[Range], position: types.InputPosition) -> None:
        """Records ranges trained; closes the epochs before `position`'s."""
        self._extend(ranges)
        for epoch in sorted(e for e in self._ranges if e < position.epoch):
            self._closed.append(self._audit(epoch, None))
            del self._ranges[epoch]

    def audit(self, position: types.InputPosition) -> list[EpochAudit]:
        """Every epoch with a range, audited (the position's epoch up to it)."""
        open_epochs = [
            self._audit(e, position if e == position.epoch else None) for e in sorted(self._ranges)
        ]
        return sorted(self._closed + open_epochs, key=lambda a: a.epoch)

    def to_dict(self) -> dict[str, Any]:
        ranges = [
            [epoch, *r] for epoch in sorted(self._ranges) for r in _merged(self._ranges[epoch])
        ]
        return {"closed": [a.to_dict() for a in self._closed], "ranges": ranges}

    def _extend(self, ranges: Iterable[Range]) -> None:
        checked = []
        for epoch, shard, first, stop in ranges:
            if not (0 <= shard < len(self._sizes) and 0 <= first <= stop <= self._sizes[shard]):
                raise ValueError(
                    f"A ledger range must lie in a shard of the job ({len(self._sizes)} shards). "
                    f"Received: epoch {epoch}, shard {shard}, elements [{first}, {stop})"
                )
            checked.append((epoch, shard, first, stop))
        for epoch, shard, first, stop in checked:
            if stop > first:
                self._ranges[epoch].append((shard, first, stop))

    def _audit(self, epoch: int, position: Optional[types.InputPosition]) -> EpochAudit:
        """Counts against full shards, or against `position` (done shards, partial prefixes)."""
        by_shard: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for shard, first, stop in self._ranges.get(epoch, ()):
            by_shard[shard].append((first, stop))
        if position is None:
            expected = dict(enumerate(self._sizes))
        else:
            expected = {s: self._sizes[s] for s in position.done}
            expected.update(dict(position.partials))
        elements = duplicated = missing = 0
        duplicated_shards = missing_shards = 0
        for shard in sorted(set(expected) | set(by_shard)):
            covered, extra = _coverage(by_shard.get(shard, []), expected.get(shard, 0))
            elements += sum(stop - first for first, stop in by_shard.get(shard, []))
            lacking = expected.get(shard, 0) - covered
            duplicated += extra
            missing += lacking
            duplicated_shards += extra > 0
            missing_shards += lacking > 0
        return EpochAudit(
            epoch,
            position is None,
            elements,
            duplicated,
            missing,
            duplicated_shards,
            missing_shards,
        )


def _coverage(ranges: list[tuple[int, int]], expected: int) -> tuple[int, int]:
    """(elements of [0, expected) covered, elements covered twice or beyond `expected`)."""
    covered = extra = 0
    reach = 0  # the covered prefix's end, in sorted order
    for first, stop in sorted(ranges):
        overlap = max(0, min(stop, reach) - first)
        extra += overlap
        new_first, new_stop = max(first, reach), stop
        inside = max(0, min(new_stop, expected) - new_first)
        covered += inside
        extra += max(0, new_stop - max(new_first, expected))
        reach = max(reach, stop)
    return covered, extra


def _merged(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent ranges of a shard joined (overlaps are kept, for the audit)."""
    merged: list[tuple[int, int, int]] = []
    for shard, first, stop in sorted(ranges):
        if merged and merged[-1][0] == shard and merged[-1][2] == first:
            merged[-1] = (shard, merged[-1][1], stop)
        else:
            merged.append((shard, first, stop))
    return merged
